"""Checkpoints load with weights only: a round trip, and crafted, old, missing and broken files refused by name."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from histoweak.checkpoint import FORMAT, load_checkpoint, save_checkpoint


class Payload:
    """Unpickling this creates ``marker``: what a hostile checkpoint would run instead."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _at(path: pathlib.Path) -> str:
    return re.escape(str(path))


def _write(d: pathlib.Path, state, config=None) -> pathlib.Path:
    d.mkdir(parents=True, exist_ok=True)
    torch.save(state, d / "state.pt")
    (d / "config.json").write_text(json.dumps(config if config is not None else {"train": {"method": "erm"}}))
    return d


@pytest.fixture
def payload(tmp_path):
    """(checkpoint dir whose state.pt runs Payload on unpickling, the marker it would create)."""
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.exists(), "the payload must really run when unpickled, or the tests below prove nothing"
    marker = tmp_path / "pwned"
    d = _write(tmp_path / "evil", {"format": FORMAT, "model": {"w": Payload(marker)}, "optimizer": {}, "epoch": 0,
                                   "best": None},
               {"train": {"method": "pscl", "target": "labels", "hparams": {"backbone": "resnet18"}}})
    return d, marker


def test_round_trip_keeps_tensors_epoch_best_and_config(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    config = {"train": {"method": "erm", "hparams": {"lr": 1e-3}}, "n_classes": 5, "class_names": ["bg", "tumour"]}
    save_checkpoint(tmp_path / "ck", model.state_dict(), opt.state_dict(), np.int64(3), np.float64(0.25), config)

    state, saved = load_checkpoint(tmp_path / "ck")
    assert state["epoch"] == 3 and state["best"] == 0.25 and type(state["best"]) is float
    assert saved == {**config, "epoch": 3}
    assert state["model"].keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(state["model"][k], v), k
    for p_id, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            assert torch.equal(state["optimizer"]["state"][p_id][k], v), (p_id, k)
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    fresh.load_state_dict(state["model"])
    torch.optim.AdamW(fresh.parameters(), lr=1e-3).load_state_dict(state["optimizer"])


def test_save_refuses_what_would_not_load(tmp_path):
    with pytest.raises(ValueError, match=r"state\['model'\]\['w'\] is a numpy.ndarray"):
        save_checkpoint(tmp_path / "ck", {"w": np.zeros(3)}, {}, 0, None, {})
    assert not (tmp_path / "ck" / "state.pt").exists()


def test_crafted_pickle_is_refused_and_never_runs(payload):
    d, marker = payload
    with pytest.raises(ValueError) as info:
        load_checkpoint(d)
    msg = str(info.value)
    assert msg.startswith(f"{d / 'state.pt'}: refused: not a safe histoweak checkpoint"), msg
    assert "only tensors and plain values are loaded" in msg and "\n" not in msg
    assert not marker.exists()


def test_old_format_with_numpy_scalars_is_refused_by_name(tmp_path):
    state = {"model": {"w": torch.ones(2)}, "optimizer": {}, "epoch": 1, "best": np.float64(0.5)}  # before format 2
    d = _write(tmp_path / "old", state)
    with pytest.raises(ValueError, match=rf"^{_at(d / 'state.pt')}: refused: .*old format.*numpy"):
        load_checkpoint(d)
    del state["best"]  # loads with weights only, but carries no format marker
    _write(d, state)
    unmarked = rf"^{_at(d / 'state.pt')}: refused: .* format {FORMAT} \(format marker: None\)"
    with pytest.raises(ValueError, match=unmarked):
        load_checkpoint(d)


def test_missing_and_broken_files_are_named(tmp_path):
    good = {"format": FORMAT, "model": {}, "optimizer": {}, "epoch": 0, "best": None}
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"^{_at(d / 'state.pt')}: not found"):
        load_checkpoint(d)
    (d / "state.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=rf"^{_at(d / 'state.pt')}: not a PyTorch checkpoint"):
        load_checkpoint(d)
    _write(d, good, {})
    data = (d / "state.pt").read_bytes()
    (d / "state.pt").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=rf"^{_at(d / 'state.pt')}: not a PyTorch checkpoint"):
        load_checkpoint(d)
    _write(d, good, {})
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"^{_at(d / 'config.json')}: not valid JSON"):
        load_checkpoint(d)
    (d / "config.json").unlink()
    with pytest.raises(ValueError, match=rf"^{_at(d / 'config.json')}: not found"):
        load_checkpoint(d)


def test_analyze_refuses_the_payload_before_any_work(payload, tmp_path):
    d, marker = payload
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    env.pop("RAY_ADDRESS", None)
    # A --data that does not exist: had the command resolved its data first, the error would be about it.
    proc = subprocess.run([sys.executable, "-m", "histoweak.cli", "analyze", "--data", str(tmp_path / "no-table"),
                           "--checkpoint", str(d), "--out", str(tmp_path / "figs")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"histoweak analyze: error: {d / 'state.pt'}: refused"), proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "figs").exists() and not (tmp_path / "mlruns.db").exists()


def _pscl_stage1(d: pathlib.Path):
    from histoweak.methods import build_method
    from histoweak.methods.base import Task

    torch.manual_seed(0)
    hp = {"backbone": "resnet18", "weights": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_method("pscl", hp, Task("labels", 5))
    save_checkpoint(d, model.state_dict(), model.optimizer.state_dict(), 0, 0.5,
                    {"train": {"method": "pscl", "target": "labels", "hparams": hp}, "n_classes": 5})
    return model


def test_pscl_stage1_loads_a_real_checkpoint_and_refuses_the_payload(payload, tmp_path):
    from histoweak.methods import build_method
    from histoweak.methods.base import Task
    from histoweak.methods.pscl import load_stage1

    model = _pscl_stage1(tmp_path / "stage1")
    loaded = load_stage1(str(tmp_path / "stage1"), 5)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    d, marker = payload
    with pytest.raises(ValueError, match=rf"^{_at(d / 'state.pt')}: refused"):
        load_stage1(str(d), 5)
    with pytest.raises(ValueError, match=rf"^{_at(d / 'state.pt')}: refused"):
        build_method("pscl-seg", {"backbone": "resnet18", "weights": None, "stage1": str(d)}, Task("mask", 5))
    assert not marker.exists()


def test_pseudo_labels_and_scoring_read_a_real_checkpoint_and_refuse_the_payload(payload, tile_table, tmp_path):
    import ray.train

    from histoweak.methods.pscl import write_pseudo_labels
    from histoweak.train import score_checkpoint

    _pscl_stage1(tmp_path / "stage1")
    out = write_pseudo_labels(str(tmp_path / "stage1"), str(tile_table), str(tmp_path / "pseudo"), 5, batch_size=8,
                              progress=False)
    assert json.loads((out / "_manifest.json").read_text())["pseudo_labels"]["checkpoint"] == str(tmp_path / "stage1")
    metrics, _ = score_checkpoint(ray.train.Checkpoint.from_directory(str(tmp_path / "stage1")), str(tile_table), 5,
                                  "test")
    assert metrics

    d, marker = payload
    with pytest.raises(ValueError, match=rf"^{_at(d / 'state.pt')}: refused"):
        write_pseudo_labels(str(d), str(tile_table), str(tmp_path / "evil-pseudo"), 5, progress=False)
    with pytest.raises(ValueError, match=rf"^{_at(d / 'state.pt')}: refused"):
        score_checkpoint(ray.train.Checkpoint.from_directory(str(d)), str(tile_table), 5, "test")
    assert not marker.exists() and not (tmp_path / "evil-pseudo").exists()
