"""Sensitivity maps (issue 15): the papers' training regimes as settings (optimizer, PSCL warm-up), divergence as a
result, PSCL's CAM coverage, WGA at more thresholds, and synthetic data knobs."""

import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from histoweak.methods.base import Task, build_method, check_finite_loss

REPO = Path(__file__).resolve().parents[1]


def _build(name, hp, task):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        return build_method(name, {"weights": None, **hp}, task)


def test_optimizer_is_a_hyperparameter_with_the_methods_own_default():
    erm = _build("erm", {}, Task("class:1", 5))
    assert type(erm.optimizer) is torch.optim.AdamW  # ERM's own
    sgd = _build("erm", {"optimizer": "sgd", "momentum": 0.8, "lr": 0.1, "weight_decay": 0.0}, Task("class:1", 5))
    assert type(sgd.optimizer) is torch.optim.SGD
    assert sgd.optimizer.defaults["momentum"] == 0.8 and sgd.optimizer.defaults["lr"] == 0.1
    segcls = _build("segcls", {"backbone": "tf_efficientnet_lite0"}, Task("mask", 5))
    assert type(segcls.optimizer) is torch.optim.Adam  # Ciga & Martel's Adam, unless asked otherwise
    assert type(_build("segcls", {"optimizer": "sgd"}, Task("mask", 5)).optimizer) is torch.optim.SGD
    with pytest.raises(ValueError, match=r"optimizer must be one of \['adam', 'adamw', 'sgd'\]"):
        _build("erm", {"optimizer": "rmsprop"}, Task("class:1", 5))
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        _build("erm", {"optimizer": "sgd", "momentum": 1.0}, Task("class:1", 5))


def test_a_non_finite_loss_stops_the_step_before_the_weights_change():
    m = _build("erm", {"lr": 1e30}, Task("class:1", 5))  # one Adam step of 1e30 per weight: the next loss is NaN
    torch.manual_seed(0)
    batch = {"image": torch.rand(8, 3, 64, 64), "labels": torch.randint(0, 2, (8, 5)).float()}
    m.step(batch)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        m.step(batch)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    check_finite_loss(torch.tensor(1.0), "erm")  # finite: nothing happens


def _finite_check_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = []
    for bad_rank in (None, 1):  # all finite; then NaN on rank 1 only
        loss = torch.tensor(float("nan") if rank == bad_rank else 0.5)
        try:
            check_finite_loss(loss, "erm")
            results.append("ok")
        except FloatingPointError as exc:
            results.append(str(exc))
    Path(out, f"rank{rank}").write_text("\n".join(results))
    dist.destroy_process_group()


def test_every_worker_stops_when_one_workers_loss_is_not_finite(tmp_path):
    """Rank 0's loss is finite, rank 1's is NaN: both must stop at that step (neither waits in the gradient
    all-reduce that the other never reaches)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_finite_check_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (tmp_path / "rank0").read_text().split("\n"), (tmp_path / "rank1").read_text().split("\n")
    assert r0[0] == r1[0] == "ok"
    assert "non-finite loss" in r0[1] and "on another worker" in r0[1]
    assert "non-finite loss nan" in r1[1] and "another" not in r1[1]


def _pscl(**hp):
    torch.manual_seed(0)
    return _build("pscl", {"backbone": "resnet18", "lam": 0.1, "max_pixels": None, "bg_min_size": 4, **hp},
                  Task("labels", 4))


def _pscl_batch(n=4, size=64):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(n, 3, size, size, generator=g) * 0.6
    images[:, :, :16, :] = 0.97  # a white band: the background seed
    labels = torch.zeros(n, 4)
    labels[:, 1] = 1
    labels[::2, 2] = 1
    mask = torch.zeros(n, size, size, dtype=torch.uint8)
    mask[:, 16:, : size // 2] = 1
    mask[::2, 16:, size // 2:] = 2
    mask[1::2, 16:, size // 2:] = 3
    return {"image": images, "labels": labels, "mask": mask}


def test_pscl_warm_up_trains_the_classifier_alone_first():
    b = _pscl_batch()
    m = _pscl(warmup_epochs=2)
    for epoch, joined in ((0, False), (1, False), (2, True), (5, True)):
        m.on_epoch_start(epoch, 6)
        _, logs = m._loss(b)
        assert ("loss_pscl" in logs) is joined, epoch
    assert "loss_pscl" in _pscl()._loss(b)[1]  # the thesis's default: PSCL from the first step
    with pytest.raises(ValueError, match="warmup_epochs must be >= 0"):
        _pscl(warmup_epochs=-1)


def test_pscl_coverage_and_cam_histogram_match_the_cams_counted_by_hand():
    tau = 0.3
    m = _pscl(tau=tau)
    m.class_names = ["background", "a", "b", "c"]
    b = _pscl_batch()
    metrics, _ = m.evaluate_batches([b], "test")
    _, cams = m.tile_cams(b["image"])  # (N, 3, H, W) at tile resolution
    cams, mask = cams.numpy(), b["mask"].numpy()
    shares = []
    for k, name in enumerate(["a", "b", "c"]):
        values = cams[:, k][mask == k + 1]
        shares.append((values > tau).mean())
        assert metrics[f"test_coverage_{name}"] == pytest.approx(shares[-1])
        hist = np.histogram(values, bins=10, range=(0, 1))[0] / values.size
        got = [metrics[f"test_cam_hist_{name}_{i}"] for i in range(10)]
        assert got == pytest.approx(hist, abs=1e-12)
    assert metrics["test_coverage"] == pytest.approx(np.mean(shares))
    assert 0 < metrics["test_coverage"] < 1  # the hand-made tiles give neither none nor all
    val, _ = m.evaluate_batches([b], "val")  # per epoch: coverage only, not the 10 histogram bins per class
    assert val["val_coverage_a"] == metrics["test_coverage_a"] and not any("cam_hist" in k for k in val)


def test_eval_taus_are_checked():
    from histoweak.train import TrainConfig

    with pytest.raises(ValueError, match=r"'eval_taus': each must be a number in \[0, 1\]"):
        TrainConfig(method="erm", eval_taus=[0.1, 2.0])
    with pytest.raises(ValueError, match=r"'eval_taus': tissue groups need a binary target"):
        TrainConfig(method="pscl", target="labels", eval_taus=[0.1])


@pytest.mark.parametrize("spec,preset,knobs", [
    ("synthetic:gerne", "gerne", {}),
    ("synthetic:gerne?shortcut=0.8", "gerne", {"shortcut": 0.8}),
    ("synthetic:wsss?partial=0.2&n_slides=8", "wsss", {"partial": 0.2, "n_slides": 8}),
    ("synthetic:wsss?class_mix=[0.5,0.3,0.2]", "wsss", {"class_mix": (0.5, 0.3, 0.2)}),
])
def test_data_spec_names_a_preset_and_its_knobs(spec, preset, knobs):
    from histoweak.cli import parse_data_spec

    assert parse_data_spec(spec) == (preset, knobs)


@pytest.mark.parametrize("spec,message", [
    ("synthetic:gerne?shortcut=2", r"'shortcut': must be in \[0, 1\], got 2"),
    ("synthetic:gerne?shortcutt=0.2", r"unknown knob\(s\) \['shortcutt'\] of preset 'gerne'; valid: \[.*'shortcut'"),
    ("synthetic:gernee?shortcut=0.2", r"synthetic:gernee\?shortcut=0.2: unknown synthetic preset; valid: .*synthetic:gerne,"),
    ("synthetic:gerne?shortcut", r"give knobs as <knob>=<value>"),
])
def test_bad_data_spec_fails_naming_the_problem(spec, message):
    from histoweak.cli import parse_data_spec

    with pytest.raises(ValueError, match=message):
        parse_data_spec(spec)


def test_a_diverging_trial_ends_as_a_result_of_the_sweep(tile_table, ray_local, tmp_path, monkeypatch):
    """One trial trains, one diverges at its second step (lr 1e30): the sweep finishes, the diverged trial is
    FINISHED in MLflow with ``diverged`` = 1 (no retry, no checkpoint), the other has ``diverged`` = 0 and WGA at
    every ``eval_taus`` threshold; the sweep's run records the data knobs it was given."""
    from mlflow.tracking import MlflowClient

    from histoweak.tune import load_search_space, run_sweep

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    space = load_search_space(REPO / "search_spaces" / "erm.yaml").with_overrides(
        {"name": "erm-diverge", "num_samples": 1, "train.epochs": 1, "train.steps_per_epoch": 3,
         "train.batch_size": 8, "train.group_tau": 0.1, "train.eval_taus": [0.1, 0.03], "hparams.weight_decay": 0.0,
         "params": {"hparams.lr": {"grid": [1e-3, 1e30]}}})
    rows = run_sweep(space, str(tile_table), 5, storage=tmp_path / "rr", progress=False,
                     data_params={"data.shortcut": 0.5})
    assert len(rows) == 2
    by_lr = {r["swept.hparams.lr"]: r for r in rows}
    ok, bad = by_lr[1e-3], by_lr[1e30]
    assert ok["diverged"] == 0.0 and bad["diverged"] == 1.0
    assert math.isnan(bad["best_val_bca"]) and not bad["best_checkpoint"]
    assert ok["test_tau0.1_wga"] == pytest.approx(ok["test_wga"])  # eval_taus agrees with the run's own groups
    assert 0.0 <= ok["test_tau0.03_wga"] <= 1.0 and "test_tau0.03_bca" in ok

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("erm-diverge")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["data.shortcut"] == "0.5"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    div = children[bad["trial"]]
    assert div.info.status == "FINISHED" and div.data.metrics["diverged"] == 1.0
    assert div.data.metrics["diverged_epoch"] == 0 and div.data.metrics["diverged_step"] == 1
    assert not any(k.startswith("test_") for k in div.data.metrics)
    assert children[ok["trial"]].data.metrics["diverged"] == 0.0
    assert os.path.isdir(ok["best_checkpoint"])


def test_sensitivity_sweeps_run_seed_by_seed_one_per_knob_value():
    from histoweak.sensitivity import sweep_names

    assert sweep_names("gerne-sensitivity", "shortcut", [0.2, 0.5], [0, 1]) == [
        "gerne-sensitivity-shortcut0.2-seed0", "gerne-sensitivity-shortcut0.5-seed0",
        "gerne-sensitivity-shortcut0.2-seed1", "gerne-sensitivity-shortcut0.5-seed1"]


@pytest.mark.slow  # 3 min: tiles a small gerne table, two trials, the heatmap; the pieces run in the default suite
def test_sensitivity_job_runs_its_sweeps_and_logs_the_map(tmp_path):
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "sensitivity_gerne.py"), "--smoke-test",
                           "--shortcut", "0.8", "--no-progress"], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gerne-sensitivity-shortcut0.8-seed0" in proc.stdout and "0.5  " in proc.stdout  # the beta = 0.5 row
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("gerne-sensitivity-shortcut0.8-seed0")
    parent = next(r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["data.shortcut"] == "0.8"
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"heatmap_test_wga.png", "heatmap_test_wga.txt", "heatmap_test_tau0.03_wga.txt"} <= arts
    assert (tmp_path / "report-gerne-sensitivity" / "heatmap_test_wga.png").stat().st_size > 1000
