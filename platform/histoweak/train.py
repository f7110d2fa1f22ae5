"""Ray Train: the loop every method runs in (the only module that knows Ray Train).

Three layers (Ray's train/tune interop pattern):

- ``train_loop_per_worker(config)`` — sees its dataset shard, the method and
  ``ray.train.report``; one report (metrics + checkpoint) per epoch; resumes
  from ``ray.train.get_checkpoint()`` after a failure or a rerun.
- ``fit(config, tile_table)`` — the driver: builds the ``TorchTrainer``
  (``use_gpu`` and one worker per GPU when the cluster has GPUs, else CPU
  workers sized so Ray Data keeps CPUs), runs it, then scores the best
  checkpoint on the test split.
- ``histoweak.tune`` calls ``fit`` once per trial.

Ray Train sets up torch.distributed; ``Method.step`` averages gradients
across workers between backward and the optimizer step (instead of DDP's
hooks, which expect one forward per step — GERNE has two). BatchNorm
statistics stay per worker, as with DDP's default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.train.v2.api.callback import UserCallback

from histoweak.data.streaming import apply_resource_plan, augment_dataset, plan_resources, read_tiles, torch_batches
from histoweak.methods import METHODS, build_method
from histoweak.methods.base import Task, check_hparams

__all__ = ["MlflowMetricsCallback", "TrainConfig", "TrainOutcome", "evaluate", "fit", "predict_split", "score_checkpoint",
           "train_loop_per_worker"]

TRAIN_COLUMNS = ("image", "labels", "label", "group", "tissue_ratio")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Validated on construction; errors name the key."""

    method: str = "erm"
    hparams: dict[str, Any] = field(default_factory=dict)
    target: str = "class:1"
    epochs: int = 3
    batch_size: int = 32
    steps_per_epoch: int | None = None  # cap, for smoke tests and quick sweeps
    augment: bool = True
    seed: int = 0
    num_workers: int | None = None  # default: one per GPU, else 1
    use_gpu: bool | None = None  # default: whether the cluster has GPUs
    max_failures: int = 2
    name: str = "histoweak-train"
    storage_path: str = str(Path(".cache/ray_results").resolve())
    worker_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        def bad(key, why):
            raise ValueError(f"train config {key!r}: {why}")

        if self.method not in METHODS:
            bad("method", f"unknown {self.method!r}; valid: {sorted(METHODS)}")
        if self.epochs < 1:
            bad("epochs", f"must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            bad("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 1:
            bad("num_workers", f"must be >= 1, got {self.num_workers}")
        if self.max_failures < 0:
            bad("max_failures", f"must be >= 0, got {self.max_failures}")
        Task(self.target)  # validates the target
        check_hparams(METHODS[self.method].Hparams, dict(self.hparams), self.method)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"train config: unknown key(s) {unknown}; valid: {sorted(names)}")
        return cls(**values)


@dataclass
class TrainOutcome:
    metrics: dict[str, float]  # last reported epoch
    best: dict[str, float]  # the best epoch by the method's selection metric
    test: dict[str, float]  # the best checkpoint on the test split
    checkpoint: str | None
    path: str
    test_predictions: dict[str, np.ndarray] = field(default_factory=dict)  # targets, probs, groups


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def predict_split(method, batches) -> dict[str, np.ndarray]:
    """``method.predict`` over ``batches``: targets, probs (N, outputs) and groups (-1 where unset)."""
    targets, probs, groups = [], [], []
    device = method.device
    for b in batches:
        b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
        probs.append(method.predict(b).float().cpu().numpy())
        targets.append(method.task.targets(b).cpu().numpy())
        groups.append(b["group"].cpu().numpy() if "group" in b else np.full(len(probs[-1]), -1))
    if not probs:
        return {}
    return {"targets": np.concatenate(targets), "probs": np.concatenate(probs), "groups": np.concatenate(groups)}


def evaluate(method, batches, prefix: str) -> dict[str, float]:
    """Run ``method.predict`` over ``batches`` and compute the method's metrics for the whole split."""
    pred = predict_split(method, batches)
    return method.evaluate(pred["targets"], pred["probs"], pred["groups"], prefix=prefix) if pred else {}


def train_loop_per_worker(config: dict) -> None:
    """The per-worker loop: shard in, one report with a checkpoint per epoch."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(config["train"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    _seed_everything(cfg.seed + rank)
    device = ray.train.torch.get_device()
    method = build_method(cfg.method, cfg.hparams, Task(cfg.target, config["n_classes"])).to(device)

    start_epoch, best = 0, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location=device, weights_only=False)
        method.load_state_dict(state["model"])
        method.optimizer.load_state_dict(state["optimizer"])
        start_epoch, best = state["epoch"] + 1, state["best"]

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    sel, mode = method.selection_metric, method.selection_mode
    loop_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        t0, logs, n = time.perf_counter(), [], 0
        for i, batch in enumerate(torch_batches(train_shard, batch_size=cfg.batch_size, drop_last=True)):
            if cfg.steps_per_epoch and i >= cfg.steps_per_epoch:
                break
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            logs.append(method.step(batch))
            _maybe_inject_fault(epoch, rank)
            n += len(batch["image"])
        metrics: dict[str, float] = {"epoch": epoch, "train_loss": float(np.mean([l["loss"] for l in logs])) if logs else float("nan"),
                                     "train_images_per_s": n / max(time.perf_counter() - t0, 1e-9),
                                     "train_steps_per_s": len(logs) / max(time.perf_counter() - t0, 1e-9),
                                     "resumed_from_epoch": start_epoch}
        if rank == 0:
            metrics.update(evaluate(method, torch_batches(val_shard, batch_size=cfg.batch_size), "val"))
            score = metrics.get(sel, float("nan"))
            if best is None or (score > best if mode == "max" else score < best):
                best = score
            metrics[f"best_{sel}"] = best
        metrics["loop_seconds"] = time.perf_counter() - loop_start  # this worker's time in the loop so far
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save({"model": method.state_dict(), "optimizer": method.optimizer.state_dict(), "epoch": epoch,
                            "best": best}, Path(d) / "state.pt")
                (Path(d) / "config.json").write_text(json.dumps({**config, "epoch": epoch}, default=str))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)


def _maybe_inject_fault(epoch: int, rank: int) -> None:
    """Resilience testing: SIGKILL this worker once, mid-epoch, when the environment asks for it.

    ``HISTOWEAK_FAULT_KILL_AT_EPOCH=<epoch>`` and ``HISTOWEAK_FAULT_MARKER=<file>`` (created
    on the kill so the restarted worker goes on), set through ``TrainConfig.worker_env``.
    """
    kill_at, marker = os.environ.get("HISTOWEAK_FAULT_KILL_AT_EPOCH"), os.environ.get("HISTOWEAK_FAULT_MARKER")
    if kill_at is not None and marker and int(kill_at) == epoch and rank == 0 and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), 9)


class MlflowMetricsCallback(UserCallback):
    """Logs rank 0's per-epoch metrics to an MLflow run; runs in the Ray Train controller, never on workers."""

    def __init__(self, run_id: str, uri: str):
        self.run_id, self.uri = run_id, uri

    def after_report(self, run_context, metrics, checkpoint):
        from histoweak import tracking

        m = metrics[0]
        tracking.log_metrics(self.run_id, m, step=int(m.get("epoch", 0)), uri=self.uri)


def fit(config: TrainConfig, tile_table: str, n_classes: int, callbacks: list | None = None,
        cpu_share: float | None = None) -> TrainOutcome:
    """Train ``config`` on the tile table's train split, select on val, score the best checkpoint on test.

    ``cpu_share``: the CPUs this run may plan with on a CPU-only cluster (a sweep running k trials at
    once gives each 1/k of the cluster); default all of them.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = config.use_gpu if config.use_gpu is not None else gpus > 0
    num_workers = config.num_workers or (max(gpus, 1) if use_gpu else 1)
    if use_gpu:
        resources = {"GPU": 1, "CPU": 1}
    else:
        # The cluster's CPUs, not what is free right now: a cap computed while a previous trial still
        # held its CPUs left Ray Data under one CPU, and a 1-CPU decode task then never starts.
        plan = plan_resources(cpu_share or ray.cluster_resources().get("CPU", 1), num_workers)
        apply_resource_plan(plan)
        resources = {"CPU": plan.cpus_per_worker}
    cols = list(TRAIN_COLUMNS)
    train_ds = read_tiles(tile_table, split="train", columns=cols)
    train_ds = augment_dataset(train_ds) if config.augment else train_ds
    val_ds = read_tiles(tile_table, split="val", columns=cols)
    method_cls = METHODS[config.method]
    sel, mode = method_cls.selection_metric, method_cls.selection_mode
    run_config = ray.train.RunConfig(
        name=config.name, storage_path=config.storage_path,
        failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=sel,
                                                     checkpoint_score_order=mode),
        worker_runtime_env={"env_vars": dict(config.worker_env)} if config.worker_env else None,
        callbacks=callbacks,
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": dataclasses.asdict(config), "n_classes": n_classes},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=run_config,
    )
    result = trainer.fit()
    best_ckpt = result.get_best_checkpoint(metric=sel, mode=mode) if result.best_checkpoints else result.checkpoint
    best_metrics = next((m for c, m in result.best_checkpoints if c.path == best_ckpt.path), {}) if best_ckpt else {}
    test, predictions = score_checkpoint(best_ckpt, tile_table, n_classes, "test") if best_ckpt else ({}, {})
    return TrainOutcome(metrics=dict(result.metrics or {}), best=dict(best_metrics), test=test,
                        checkpoint=best_ckpt.path if best_ckpt else None, path=str(result.path),
                        test_predictions=predictions)


def score_checkpoint(checkpoint, tile_table: str, n_classes: int, split: str = "test"):
    """Load a checkpoint written by ``train_loop_per_worker`` and evaluate it on ``split`` (in this process).

    Returns (metrics, predictions) with predictions as from ``predict_split``.
    """
    with checkpoint.as_directory() as d:
        saved = json.loads((Path(d) / "config.json").read_text())
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)
    cfg = TrainConfig.from_dict(saved["train"])
    hp = {**cfg.hparams, "weights": None}  # the checkpoint carries the weights
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = build_method(cfg.method, hp, Task(cfg.target, n_classes))
    method.load_state_dict(state["model"])
    ds = read_tiles(tile_table, split=split, columns=list(TRAIN_COLUMNS))
    pred = predict_split(method, torch_batches(ds, batch_size=cfg.batch_size))
    return (method.evaluate(pred["targets"], pred["probs"], pred["groups"], prefix=split) if pred else {}), pred
