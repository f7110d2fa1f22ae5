"""Ray Train on CPU workers over the synthetic tile table: 2 workers, a killed worker, a resumed rerun."""

import io
import json
import math
import uuid
import warnings
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from histoweak.checkpoint import load_checkpoint
from histoweak.methods import build_method
from histoweak.methods.base import Task
from histoweak.train import TrainConfig, fit

BASE = dict(epochs=2, batch_size=8, steps_per_epoch=2, target="class:1")


def _cfg(tmp_path, **kw):
    return TrainConfig(**{**BASE, "name": f"t-{uuid.uuid4().hex[:8]}", "storage_path": str(tmp_path), **kw})


def _split_table(tile_table, split: str, columns: list[str]):
    """Rows of one split, read with pyarrow directly (not through histoweak's readers)."""
    files = sorted(str(f) for f in Path(tile_table).rglob("*.parquet"))
    t = pads.dataset(files, format="parquet").to_table(columns=["split", *columns])
    return t.filter(pc.equal(t.column("split"), split))


def _param_sum(module) -> float:
    return float(sum(p.detach().double().sum().item() for p in module.parameters()))


def test_two_cpu_workers_average_gradients_split_rows_and_test_the_best_checkpoint(tile_table, ray_local, tmp_path):
    """Two ranks stay in lockstep on disjoint shards; ``out.test`` is the best checkpoint scored independently."""
    keys = _split_table(tile_table, "train", ["slide_id", "x", "y"])
    train_rows = set(zip(*(keys.column(c).to_pylist() for c in ("slide_id", "x", "y"))))
    n_train, bs = len(train_rows), 10
    # Ray Train splits the train split equally (dropping n_train % 2 rows); each rank steps on full batches only.
    steps = (n_train // 2) // bs
    assert steps >= 1, n_train
    trace = tmp_path / "trace"
    cfg = _cfg(tmp_path, num_workers=2, batch_size=bs, steps_per_epoch=None, keep_checkpoints=None,
               worker_env={"HISTOWEAK_WORKER_TRACE": str(trace)})
    out = fit(cfg, str(tile_table), n_classes=5)
    assert out.metrics["epoch"] == 1
    assert math.isfinite(out.metrics["train_loss"])
    assert out.best["val_bca"] == out.metrics["best_val_bca"]

    ranks = [[json.loads(line) for line in (trace / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [[e["epoch"] for e in r] for r in ranks] == [[0, 1], [0, 1]]
    for e0, e1 in zip(*ranks):
        # (a) gradients averaged from identical starting weights: both ranks hold the same weights after every epoch
        assert e0["param_checksum"] == e1["param_checksum"], (e0["epoch"], e0["param_checksum"], e1["param_checksum"])
        # (b) each rank stepped on its own rows of the train split, no row twice, none shared, none left out
        seen = [[tuple(row) for row in e["rows"]] for e in (e0, e1)]
        assert [len(s) for s in seen] == [steps * bs] * 2
        assert all(len(set(s)) == len(s) for s in seen)
        assert not set(seen[0]) & set(seen[1])
        union = set(seen[0]) | set(seen[1])
        assert union <= train_rows
        assert len(train_rows - union) == n_train - 2 * steps * bs  # with bs dividing the shard: only the split's remainder
    assert ranks[0][0]["param_checksum"] != ranks[0][1]["param_checksum"]  # the second epoch's steps moved the weights
    assert out.metrics["param_checksum"] == ranks[0][1]["param_checksum"]  # rank 0's trace is what it reported

    # The kept checkpoint is the epoch with the best validation BCA (every epoch's checkpoint is kept here).
    by_path = {path: m for path, m in out.checkpoints}
    assert len(by_path) == 2
    best_val = max(m["val_bca"] for m in by_path.values())
    assert by_path[out.checkpoint]["val_bca"] == best_val
    state, saved = load_checkpoint(out.checkpoint)
    train = saved["train"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the checkpoint carries the weights
        method = build_method(train["method"], {**train["hparams"], "weights": None}, Task(train["target"], 5))
    method.load_state_dict(state["model"])
    method.eval()
    # the same weights; the float64 sum itself may differ in its last bit (torch's reduction order follows the
    # process's thread count, which differs between a Ray worker and this one), a different epoch by far more
    assert _param_sum(method) == pytest.approx(ranks[0][state["epoch"]]["param_checksum"], rel=1e-12, abs=0)

    # (c) score that checkpoint on the test split read with pyarrow, metrics from scikit-learn
    test = _split_table(tile_table, "test", ["image", "labels"])
    images = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in test.column("image").to_pylist()])
    y = np.array([lab[1] > 0 for lab in test.column("labels").to_pylist()], dtype=int)  # target "class:1"
    assert 0 < y.sum() < len(y)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        p1 = torch.cat([method(x[i:i + 16]).softmax(1)[:, 1] for i in range(0, len(x), 16)]).numpy()
    pred = (p1 > 0.5).astype(int)
    assert out.test["test_acc"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert out.test["test_bca"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert out.test["test_auroc"] == pytest.approx(roc_auc_score(y, p1), abs=1e-6)
    assert len(out.test_predictions["targets"]) == len(y)


@pytest.mark.slow  # 59 s on 2 cores: `make test-all` (room for USegMix's job in `make test`)
def test_killed_worker_restarts_from_its_checkpoint(tile_table, ray_local, tmp_path):
    marker = tmp_path / "killed"
    cfg = _cfg(tmp_path, epochs=3, num_workers=1, max_failures=1,
               worker_env={"HISTOWEAK_FAULT_KILL_AT_EPOCH": "1", "HISTOWEAK_FAULT_MARKER": str(marker)})
    out = fit(cfg, str(tile_table), n_classes=5)
    assert marker.exists()  # the worker process really was killed (SIGKILL) at epoch 1
    assert out.metrics["epoch"] == 2
    assert out.metrics["resumed_from_epoch"] == 1  # restarted from epoch 0's checkpoint, not from scratch


@pytest.mark.slow  # 56 s: `make test` checks the same resume (and its epoch's order) in test_shuffle.py
def test_rerun_with_the_same_name_resumes(tile_table, ray_local, tmp_path):
    first = _cfg(tmp_path, epochs=1, num_workers=1)
    fit(first, str(tile_table), n_classes=5)
    again = TrainConfig(**{**first.__dict__, "epochs": 2})
    out = fit(again, str(tile_table), n_classes=5)
    assert out.metrics["epoch"] == 1 and out.metrics["resumed_from_epoch"] == 1


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="'epochs'"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epoch'\]"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['lrate'\]"):
        TrainConfig(hparams={"lrate": 1})
