"""Ray Train on CPU workers over the synthetic tile table: 2 workers, a killed worker, a resumed rerun."""

import math
import uuid
from pathlib import Path

import pytest

from histoweak.train import TrainConfig, fit

BASE = dict(epochs=2, batch_size=8, steps_per_epoch=2, target="class:1")


def _cfg(tmp_path, **kw):
    return TrainConfig(**{**BASE, "name": f"t-{uuid.uuid4().hex[:8]}", "storage_path": str(tmp_path), **kw})


def test_two_cpu_workers_train_validate_checkpoint_and_test(tile_table, ray_local, tmp_path):
    out = fit(_cfg(tmp_path, num_workers=2), str(tile_table), n_classes=5)
    assert out.metrics["epoch"] == 1
    assert math.isfinite(out.metrics["train_loss"])
    for key in ("val_acc", "val_bca", "val_auroc", "best_val_bca"):
        assert key in out.metrics
    assert out.best["val_bca"] == out.metrics["best_val_bca"]  # the kept checkpoint is the best epoch
    assert (Path(out.checkpoint) / "state.pt").exists()
    assert set(out.test) >= {"test_acc", "test_bca", "test_auroc"}


def test_killed_worker_restarts_from_its_checkpoint(tile_table, ray_local, tmp_path):
    marker = tmp_path / "killed"
    cfg = _cfg(tmp_path, epochs=3, num_workers=1, max_failures=1,
               worker_env={"HISTOWEAK_FAULT_KILL_AT_EPOCH": "1", "HISTOWEAK_FAULT_MARKER": str(marker)})
    out = fit(cfg, str(tile_table), n_classes=5)
    assert marker.exists()  # the worker process really was killed (SIGKILL) at epoch 1
    assert out.metrics["epoch"] == 2
    assert out.metrics["resumed_from_epoch"] == 1  # restarted from epoch 0's checkpoint, not from scratch


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
