"""Ray Train: the loop every method runs in (the only module that knows Ray Train).

Three layers (Ray's train/tune interop pattern):

- ``train_loop_per_worker(config)`` — sees its dataset shard, the method and
  ``ray.train.report``; one report (metrics + checkpoint) per epoch; resumes
  from ``ray.train.get_checkpoint()`` after a failure or a rerun.
- ``fit(config, tile_table)`` — the driver: builds the ``TorchTrainer``
  with the workers ``plan_workers`` picks from the cluster's resources
  (``use_gpu`` and one worker per GPU of all nodes when the cluster has
  GPUs, else CPU workers sized so Ray Data keeps CPUs), runs it, then scores
  the best checkpoint on the test split.
- ``histoweak.tune`` calls ``fit`` once per trial.

Ray Train sets up torch.distributed; ``Method.step`` averages gradients
across workers between backward and the optimizer step (instead of DDP's
hooks, which expect one forward per step — GERNE's two-pass variant has two).
``batch_size`` is per worker: W workers step on W × ``batch_size`` tiles, and
the averaged gradient is the gradient of one process on the workers'
concatenated batches — ``tests/test_distributed.py`` checks this for every
registered method, in float32, to 1e-5 of the largest gradient entry. Losses
that couple the tiles of a batch are computed over the whole step's batch for
that (``methods.base.gather_across_workers``, ``mean_across_workers``: PSCL's
contrastive loss, SegCls's weighted pixel cross-entropy). Two things stay per
worker by design, as in DDP without SyncBatchNorm: BatchNorm normalises with
each worker's own batch statistics and updates its running statistics from
them (the checkpoint keeps rank 0's), and dropout / drop-path draw their own
masks on each worker. The equivalence test therefore runs those modules in
eval mode.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from ray.train.v2.api.callback import UserCallback

from histoweak._storage import cache_dir
from histoweak.checkpoint import load_checkpoint, save_checkpoint
from histoweak.data.schema import tile_keys
from histoweak._ray import verbose
from histoweak.data.streaming import (DEFAULT_SHUFFLE_BUFFER, BalancedSampler, EpochShuffle, ParquetRows, ResourcePlan,
                                      add_column, apply_resource_plan,
                                      augment_dataset, plan_resources, read_split_meta, read_tiles, stain_batch,
                                      stain_normalize_dataset, torch_batches)
from histoweak.methods import METHODS, build_method
from histoweak.methods.base import RunInfo, Task, check_hparams, predict_split, to_device
from histoweak.schedules import apply_lr, check_schedule

__all__ = ["MlflowMetricsCallback", "TrainConfig", "TrainOutcome", "WorkerPlan", "class_names_of", "evaluate", "fit",
           "check_table", "load_trained", "manifest_of", "plan_workers", "predict_split", "run_info", "score_checkpoint",
           "train_loop_per_worker"]

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
TRAIN_COLUMNS = ("image", "labels", "label", "group", "tissue_ratio", "class_ratios")


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
    # every epoch visits the training rows in an order fixed by (seed, epoch) (data.streaming.EpochShuffle); false
    # keeps the table's file order (slide by slide, class by class): for tests of the stream only
    shuffle: bool = True
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER  # rows shuffled together (whole row groups); >= the split: uniform
    # learning rate per epoch, any method: {"name": "cosine" | "cosine_restarts" | "poly", ...} (histoweak.schedules)
    lr_schedule: dict[str, Any] | None = None
    group_tau: float | None = None  # groups (y, [r_tissue >= tau]) for WGA and balanced streams (GERNE)
    # more thresholds at which the best checkpoint's test groups are scored: test_tau<t>_wga, _bca, ... (GERNE's
    # Table 1 reports tau = 0.1 and 0.03; groups depend on the tiles only, so one training serves every threshold)
    eval_taus: list[float] = field(default_factory=list)
    stain_norm: bool = False  # Macenko-normalise every image to one reference tile of the training split
    select: str | None = None  # checkpoint selection metric (val_*); default: the method's
    keep_checkpoints: int | None = 1  # best checkpoints kept (None: every epoch's, for post-hoc selection)
    num_workers: int | None = None  # default: one per GPU, else 1
    use_gpu: bool | None = None  # default: whether the cluster has GPUs
    # Ray's placement of the workers: PACK (default; fewest nodes, fastest all-reduce) or SPREAD (one per node where
    # possible: a lost node takes fewer workers, each node's disk and network serve one worker); STRICT_* or fail
    placement_strategy: str = "PACK"
    max_failures: int = 2
    name: str = "histoweak-train"
    storage_path: str = field(default_factory=lambda: str(cache_dir("ray_results")))
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
        if isinstance(self.shuffle_buffer, bool) or not isinstance(self.shuffle_buffer, int) or self.shuffle_buffer < 1:
            bad("shuffle_buffer", f"must be a whole number of rows >= 1, got {self.shuffle_buffer!r}")
        if not isinstance(self.shuffle, bool):
            bad("shuffle", f"must be true or false, got {self.shuffle!r}")
        if self.num_workers is not None and self.num_workers < 1:
            bad("num_workers", f"must be >= 1, got {self.num_workers}")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            bad("keep_checkpoints", f"must be >= 1 or null, got {self.keep_checkpoints}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            bad("placement_strategy", f"must be one of {list(PLACEMENT_STRATEGIES)}, got {self.placement_strategy!r}")
        if self.max_failures < 0:
            bad("max_failures", f"must be >= 0, got {self.max_failures}")
        try:
            check_schedule(self.lr_schedule)
        except ValueError as exc:
            bad("lr_schedule", str(exc))
        task = Task(self.target)  # validates the target
        if not METHODS[self.method].supports(task):
            bad("target", f"method {self.method!r} does not support {self.target!r}")
        if self.group_tau is not None:
            if not 0.0 <= self.group_tau <= 1.0:
                bad("group_tau", f"must be in [0, 1], got {self.group_tau}")
            if task.multilabel:
                bad("group_tau", "tissue groups need a binary target ('class:<c>' or 'label')")
        for t in self.eval_taus:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
                bad("eval_taus", f"each must be a number in [0, 1], got {t!r}")
        if self.eval_taus and not (task.target.startswith("class:") or task.target == "label"):
            bad("eval_taus", "tissue groups need a binary target ('class:<c>' or 'label')")
        if METHODS[self.method].needs_groups and self.group_tau is None:
            bad("group_tau", f"method {self.method!r} trains on groups: set the tissue-ratio threshold")
        if self.select is not None:
            if not self.select.startswith("val_"):
                bad("select", f"must be a validation metric (val_*), got {self.select!r}")
            if self.select in ("val_wga", "val_gba") and self.group_tau is None:
                bad("select", f"{self.select} needs groups: set group_tau")
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
    test_predictions: dict[str, np.ndarray] = field(default_factory=dict)  # targets, probs, groups, ratios
    checkpoints: list[tuple[str, dict]] = field(default_factory=list)  # every kept checkpoint with its metrics
    data_state: dict[str, Any] = field(default_factory=dict)  # what the method's data plan computed from the data


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def evaluate(method, batches, prefix: str) -> dict[str, float]:
    """The method's metrics over a whole split of ``batches``."""
    return method.evaluate_batches(batches, prefix)[0]


def train_loop_per_worker(config: dict) -> dict | None:
    """The per-worker loop: shard in, one report with a checkpoint per epoch. Returns the last epoch's metrics
    (rank 0's reach ``fit``: Ray Train's result holds only reports with a checkpoint, and a run that diverged
    ends with a report without one)."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(config["train"])
    if not verbose():  # Ray 2.60 logs each report at INFO under a logger named by its file, past Train's level filter
        import ray.train.v2._internal.execution.context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    _maybe_hold(cfg.name)
    # Every rank builds the same initial weights (steps average gradients, never weights), then draws its own stream.
    _seed_everything(cfg.seed)
    device = ray.train.torch.get_device()
    method = build_method(cfg.method, cfg.hparams, Task(cfg.target, config["n_classes"])).to(device)
    method.class_names = config.get("class_names")
    method.set_data_state(config.get("data_state") or {})
    _seed_everything(cfg.seed + rank)

    start_epoch, best = 0, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state, _ = load_checkpoint(d, map_location=device)
        method.load_state_dict(state["model"])
        method.optimizer.load_state_dict(state["optimizer"])
        start_epoch, best = state["epoch"] + 1, state["best"]

    plan = config["_plan"]
    shuffled = _shuffled_stream(cfg, config, rank, ctx.get_world_size()) if plan.main is None and cfg.shuffle else None
    train_shard = ray.train.get_dataset_shard("train") if plan.main is None and shuffled is None else None
    val_shard = ray.train.get_dataset_shard("val")
    sel, mode = cfg.select or method.selection_metric, method.selection_mode
    streams = _sampled_streams(plan, method, cfg, rank, config.get("stain_reference"), config.get("_sampled"))
    loop_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        t0, logs, n, rows = time.perf_counter(), [], 0, []
        # from each group's initial lr and the epoch alone: a resumed run gets the uninterrupted run's lr
        lr = apply_lr(method.optimizer, cfg.lr_schedule, epoch, cfg.epochs)
        method.on_epoch_start(epoch, cfg.epochs)
        diverged_at = None
        if shuffled is not None:
            batches = shuffled.batches(epoch, cfg.batch_size)
        elif plan.main is None:  # train.shuffle false: the table's file order
            batches = torch_batches(train_shard, batch_size=cfg.batch_size, drop_last=True)
        else:  # the method draws its main batch too (e.g. from a subset of the tiles): a fixed number of steps
            batches = (next(streams[""]) for _ in range(plan.steps_per_epoch))
        for i, batch in enumerate(batches):
            if cfg.steps_per_epoch and i >= cfg.steps_per_epoch:
                break
            for key, stream in streams.items():
                if key:
                    batch[key] = next(stream)
            try:
                logs.append(method.step(to_device(batch, device)))
            except FloatingPointError as exc:  # a result, not a crash: every worker stops here (check_finite_loss)
                diverged_at = i
                print(f"histoweak: {cfg.name}: diverged at epoch {epoch} step {i} ({exc}); the run ends here")
                break
            _maybe_inject_fault(epoch, rank)
            n += len(batch["image"] if "image" in batch else batch["label"])  # tiles, or slides
            if "slide_id" in batch and "x" in batch:  # the row keys are read only for HISTOWEAK_WORKER_TRACE (see fit)
                rows += zip(batch["slide_id"], batch["x"].tolist(), batch["y"].tolist())
        metrics: dict[str, float] = {"epoch": epoch, "train_loss": float(np.mean([l["loss"] for l in logs])) if logs else float("nan"),
                                     "train_images_per_s": n / max(time.perf_counter() - t0, 1e-9),
                                     "train_steps_per_s": len(logs) / max(time.perf_counter() - t0, 1e-9),
                                     "resumed_from_epoch": start_epoch, "lr": lr,
                                     # every rank's weights after this epoch's steps: equal on all ranks
                                     "param_checksum": float(sum(p.detach().double().sum().item()
                                                                 for p in method.parameters())),
                                     "diverged": float(diverged_at is not None)}
        # the method's other per-step logs (GERNE's loss_b, PSCL's loss_pscl, pscl_grad_ratio): their epoch means
        for key in dict.fromkeys(k for l in logs for k in l if k != "loss"):
            metrics[f"train_{key}"] = float(np.mean([l[key] for l in logs if key in l]))
        if diverged_at is not None:  # report without a checkpoint (the weights led to a non-finite loss) and end
            metrics.update({"diverged_epoch": epoch, "diverged_step": diverged_at, sel: float("nan"),
                            f"best_{sel}": float("nan") if best is None else best,
                            "loop_seconds": time.perf_counter() - loop_start})
            ray.train.report(metrics, checkpoint=None)
            return metrics
        _maybe_trace_worker(epoch, rank, metrics["param_checksum"], rows)
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
                save_checkpoint(d, method.state_dict(), method.optimizer.state_dict(), epoch, best,
                                {k: v for k, v in config.items() if not k.startswith("_")})
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
    return metrics if start_epoch < cfg.epochs else None


def _shuffled_stream(cfg: TrainConfig, config: dict, rank: int, world: int) -> EpochShuffle:
    """The main training stream, shuffled per epoch (``EpochShuffle``), read on this worker from the tile table."""
    import functools

    reference = config.get("stain_reference")
    return EpochShuffle(config["_sampled"], seed=cfg.seed, rank=rank, world=world, buffer_rows=cfg.shuffle_buffer,
                        augment=cfg.augment, group_fn=config.get("_group_fn"),
                        transform=functools.partial(stain_batch, reference=reference) if reference else None)


def _sampled_streams(plan, method, cfg: TrainConfig, rank: int, stain_reference: dict | None,
                     rows: ParquetRows | None) -> dict:
    """The batch iterators of the plan's sampled streams (key "" = the main batch), drawn on this worker from
    ``rows`` (the training split, read here from the tile table: one row index and row-group cache for all the
    streams), each with its own seed."""
    import functools

    wanted = ([("", plan.main)] if plan.main is not None else []) + list(plan.extra.items())
    if not wanted:
        return {}
    transform = functools.partial(stain_batch, reference=stain_reference) if stain_reference else None
    out = {}
    for i, (key, stream) in enumerate(wanted):
        sampler = BalancedSampler(rows, stream.strata, seed=cfg.seed * 1009 + rank + 7919 * i, augment=cfg.augment,
                                  hidden=stream.hidden, transform=transform)
        if rank == 0 and method.needs_groups and len(sampler.counts) < 4:
            print(f"histoweak: warning: the training split has only groups {sampler.counts} "
                  f"at group_tau={cfg.group_tau}; stream {key or 'main'!r} draws from those")
        out[key] = sampler.batches(cfg.batch_size, method.stream_weights(key, sampler.counts))
    return out


def _maybe_inject_fault(epoch: int, rank: int) -> None:
    """Resilience testing: SIGKILL this worker once, mid-epoch, when the environment asks for it.

    ``HISTOWEAK_FAULT_KILL_AT_EPOCH=<epoch>`` and ``HISTOWEAK_FAULT_MARKER=<file>`` (created
    on the kill so the restarted worker goes on), set through ``TrainConfig.worker_env``.
    """
    kill_at, marker = os.environ.get("HISTOWEAK_FAULT_KILL_AT_EPOCH"), os.environ.get("HISTOWEAK_FAULT_MARKER")
    if kill_at is not None and marker and int(kill_at) == epoch and rank == 0 and not os.path.exists(marker):
        Path(marker).touch()
        # mid-epoch, after the controller took the last epoch's report (it polls the workers every few seconds;
        # a worker killed before that loses the report and its checkpoint, and the run restarts from the one before)
        time.sleep(5)
        os.kill(os.getpid(), 9)


def _maybe_hold(name: str) -> None:
    """Sweep testing: with ``HISTOWEAK_HOLD_DIR=<dir>`` (through ``TrainConfig.worker_env``) a run records that it
    started (``<dir>/started-<name>``) and, when another run started before it, waits for ``<dir>/release``:
    a test can then interrupt a sweep while its second trial is certainly running, without guessing times."""
    hold = os.environ.get("HISTOWEAK_HOLD_DIR")
    if not hold:
        return
    with open(Path(hold, f"started-{name}"), "a") as f:  # one line per start: a test can count restarts
        f.write(f"{os.getpid()}\n")
    while len(list(Path(hold).glob("started-*"))) > 1 and not Path(hold, "release").exists():
        time.sleep(0.2)


def _maybe_trace_worker(epoch: int, rank: int, param_checksum: float, rows: list) -> None:
    """Distributed-training diagnostics: what each rank did, when the environment asks for it.

    ``HISTOWEAK_WORKER_TRACE=<directory>`` (set through ``TrainConfig.worker_env``): every rank
    appends one JSON line per epoch to ``<directory>/rank<r>.jsonl`` with its ``param_checksum``,
    the keys ``[slide_id, x, y]`` of the training rows it stepped on (Ray Train keeps only
    rank 0's reported metrics) and the Ray node it ran on.
    """
    directory = os.environ.get("HISTOWEAK_WORKER_TRACE")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        import ray

        line = {"epoch": epoch, "rank": rank, "param_checksum": param_checksum, "rows": [list(r) for r in rows],
                "node_id": ray.get_runtime_context().get_node_id()}
        with open(Path(directory) / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


class MlflowMetricsCallback(UserCallback):
    """Logs rank 0's per-epoch metrics to an MLflow run; runs in the Ray Train controller, never on workers."""

    def __init__(self, run_id: str, uri: str):
        self.run_id, self.uri = run_id, uri

    def after_report(self, run_context, metrics, checkpoint):
        from histoweak import tracking

        m = metrics[0]
        tracking.log_metrics(self.run_id, m, step=int(m.get("epoch", 0)), uri=self.uri)


class WorkerPlan(NamedTuple):
    """The Ray Train workers of one run (``ray.train.ScalingConfig``'s arguments) and Ray Data's CPU plan.

    data : on CPU workers, how the CPUs are split between the workers and Ray Data (``fit`` caps Ray Data at
        ``data.data_cpus``); None on GPU workers, where Ray Data uses whatever CPUs the workers leave, on every
        node (CPU-only worker nodes included).
    """

    use_gpu: bool
    num_workers: int
    resources_per_worker: dict[str, float]
    data: ResourcePlan | None


def plan_workers(config: TrainConfig, cluster_resources: dict[str, float], cpu_share: float | None = None,
                 gpu_share: float | None = None, node_cpus: float | None = None) -> WorkerPlan:
    """The workers ``fit`` asks Ray Train for, from the cluster's total resources (``ray.cluster_resources()``).

    A pure function: it never touches Ray or CUDA, so it can be planned (and tested) anywhere.

    - GPUs (``config.use_gpu``, default: the cluster has any): one worker per GPU of the whole cluster — the
      total over all nodes, e.g. 8 workers on 2 nodes × 4 GPUs — each ``{"GPU": 1, "CPU": 1}``, unless
      ``config.num_workers`` says how many. ``use_gpu: true`` on a cluster that reports no GPU yet (an
      autoscaler adds GPU nodes on demand) plans ``num_workers`` (default 1) GPU workers all the same.
    - CPUs only: ``config.num_workers`` (default 1) workers with the CPU share ``plan_resources`` gives them
      of ``cpu_share`` (a sweep running k trials at once gives each 1/k of the cluster) or of all the cluster's
      CPUs — its total, not what is free right now: a cap computed while a previous trial still held its CPUs
      left Ray Data under one CPU, and a 1-CPU decode task then never starts.

    - ``gpu_share``: the GPUs of one run when a sweep runs several at once (default all of them).
    - ``node_cpus``: the CPUs of the cluster's largest node. A CPU worker asks for at most that less half a
      CPU, so that it fits on a node beside Ray Data's tasks: on a multi-node cluster the cluster's total
      can promise a worker more CPUs than any one node has, and such a worker never starts.

    Raises ``ValueError`` (from ``plan_resources``) on a CPU plan with fewer than 1.5 CPUs.
    """
    gpus = int(cluster_resources.get("GPU", 0))
    use_gpu = config.use_gpu if config.use_gpu is not None else gpus > 0
    num_workers = config.num_workers or (max(int(gpu_share or gpus), 1) if use_gpu else 1)
    if use_gpu:
        return WorkerPlan(True, num_workers, {"GPU": 1, "CPU": 1}, None)
    data = plan_resources(cpu_share or cluster_resources.get("CPU", 1), num_workers)
    if node_cpus is not None and data.cpus_per_worker > node_cpus - 0.5:
        data = dataclasses.replace(data, cpus_per_worker=max(0.25, math.floor((node_cpus - 0.5) * 4) / 4))
    return WorkerPlan(False, num_workers, {"CPU": data.cpus_per_worker}, data)


def fit(config: TrainConfig, tile_table: str, n_classes: int, callbacks: list | None = None,
        cpu_share: float | None = None, gpu_share: float | None = None) -> TrainOutcome:
    """Train ``config`` on the tile table's train split, select on val, score the best checkpoint on test.

    ``cpu_share`` / ``gpu_share``: the CPUs / GPUs this run may plan with (a sweep running k trials at
    once gives each 1/k of the cluster); default all of them.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=None)
    workers = plan_workers(config, ray.cluster_resources(), cpu_share, gpu_share, node_cpus)
    if workers.data is not None:
        apply_resource_plan(workers.data)
    method_cls = METHODS[config.method]
    check_table(method_cls, tile_table)
    cols = _columns(method_cls)
    if "HISTOWEAK_WORKER_TRACE" in config.worker_env:  # the trace names the rows each rank trained on
        cols += ["slide_id", "x", "y"]
    stain = _stain_reference(tile_table) if config.stain_norm else None
    plan = method_cls.data_plan(check_hparams(method_cls.Hparams, dict(config.hparams), config.method),
                                run_info(config, tile_table, n_classes, stain))
    manifest = manifest_of(tile_table)
    loop_config = {"train": dataclasses.asdict(config), "n_classes": n_classes, "class_names": manifest.get("classes"),
                   "tiling": manifest.get("params"), "data_state": plan.state, "stain_reference": stain, "_plan": plan}
    sel, mode = config.select or method_cls.selection_metric, method_cls.selection_mode
    groups = _group_fn(config, n_classes) if config.group_tau is not None else None

    def stream(split: str, columns: list[str], **kw):  # a Ray Data stream: stain (fixed, before augmentation), groups
        ds = read_tiles(tile_table, split=split, columns=columns, **kw)
        ds = stain_normalize_dataset(ds, stain) if stain else ds
        return ds if groups is None else add_column(ds, "group", groups)

    datasets = {"val": stream("val", _eval_columns(method_cls))}
    shuffled = plan.main is None and config.shuffle
    if plan.main is not None or plan.extra or shuffled:  # every worker reads its rows itself: only the files travel
        loop_config["_sampled"] = ParquetRows(tile_table, "train", cols, plan.more_train)
    if shuffled and groups is not None:
        loop_config["_group_fn"] = groups
    if plan.main is None and not shuffled:
        print(f"histoweak: warning: {config.name}: train.shuffle is false: every epoch streams the training rows "
              "in the table's file order (slide by slide or class by class)", flush=True)
        train_ds = stream("train", cols, more=plan.more_train)
        datasets["train"] = augment_dataset(train_ds) if config.augment else train_ds
    run_config = ray.train.RunConfig(
        name=config.name, storage_path=config.storage_path,
        failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints, checkpoint_score_attribute=sel,
                                                     checkpoint_score_order=mode),
        worker_runtime_env={"env_vars": dict(config.worker_env)} if config.worker_env else None,
        callbacks=callbacks,
        logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers.num_workers, use_gpu=workers.use_gpu,
                                               resources_per_worker=workers.resources_per_worker,
                                               placement_strategy=config.placement_strategy),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"] if "train" in datasets else []),
        run_config=run_config,
    )
    result = trainer.fit()
    best_ckpt = result.get_best_checkpoint(metric=sel, mode=mode) if result.best_checkpoints else result.checkpoint
    best_metrics = next((m for c, m in result.best_checkpoints if c.path == best_ckpt.path), {}) if best_ckpt else {}
    test, predictions = score_checkpoint(best_ckpt, tile_table, n_classes, "test") if best_ckpt else ({}, {})
    if predictions and len(predictions.get("tissue_ratio", ())):
        from histoweak.report import metrics_at_tau

        for tau in config.eval_taus:
            test.update(metrics_at_tau(predictions, float(tau), f"test_tau{tau:g}"))
    last = getattr(result, "return_value", None) or result.metrics or {}  # the last epoch's, diverged or not
    return TrainOutcome(metrics=dict(last), best=dict(best_metrics), test=test,
                        checkpoint=best_ckpt.path if best_ckpt else None, path=str(result.path),
                        test_predictions=predictions,
                        checkpoints=[(c.path, dict(m)) for c, m in result.best_checkpoints], data_state=dict(plan.state))


def manifest_of(tile_table: str) -> dict:
    """A tile table's ``_manifest.json``, local or remote (``s3://…``); {} when it has none or it cannot be read."""
    from histoweak.data.tiling_job import read_manifest

    try:
        manifest = read_manifest(tile_table)
    except (OSError, ValueError):  # pyarrow's errors are OSError (I/O) or ValueError (a malformed URI)
        return {}
    return manifest if isinstance(manifest, dict) else {}


def class_names_of(tile_table: str) -> list[str] | None:
    """Class names from a tile table's manifest, local or remote (None when it has none)."""
    classes = manifest_of(tile_table).get("classes")
    return list(classes) if classes else None


def run_info(config: TrainConfig, tile_table: str, n_classes: int, stain: dict | None = None) -> RunInfo:
    """What the method's hooks may know of a run; ``meta`` and ``images`` read the training split on demand.
    ``stain``: the run's Macenko reference when the caller has fitted it (else ``images`` fits one if needed)."""
    import functools

    return RunInfo(target=config.target, n_classes=n_classes, group_tau=config.group_tau, seed=config.seed,
                   batch_size=config.batch_size, meta=functools.partial(read_split_meta, tile_table, "train"),
                   images=functools.partial(_train_images, tile_table, config.stain_norm, stain))


def _train_images(tile_table: str, stain_norm: bool, stain: dict | None, keys: set[str]) -> np.ndarray:
    """(N, H, W, 3) uint8: the training tiles with ``keys`` as the training stream gives them before augmentation
    (normalised to ``stain``, the run's reference, or to one fitted here when the caller has none)."""
    batch = read_split_meta(tile_table, "train", ["image"], keys=set(keys))
    if stain_norm:
        batch = stain_batch(batch, stain or _stain_reference(tile_table))
    return np.asarray(batch["image"])


def _stain_reference(tile_table: str) -> dict:
    """Macenko reference stains of one training tile (``data.stain.pick_reference``), with its key."""
    from histoweak.data.stain import fit_reference, pick_reference

    meta = read_split_meta(tile_table, "train", ["slide_id", "x", "y", "tissue_ratio"])
    keys = tile_keys(meta["slide_id"], meta["x"], meta["y"])
    i = pick_reference(meta["tissue_ratio"], keys)
    image = read_split_meta(tile_table, "train", ["image"], keys={keys[i]})["image"][0]
    return {**fit_reference(image), "tile": keys[i]}


def _columns(method_cls, evaluation: bool = False) -> list[str]:
    """The table columns a run of ``method_cls`` reads (in training, or in evaluation)."""
    from histoweak.data.slide_table import SLIDE_COLUMNS

    base = SLIDE_COLUMNS if method_cls.table == "slides" else TRAIN_COLUMNS
    return list(dict.fromkeys([*base, *method_cls.train_columns, *(method_cls.eval_columns if evaluation else ())]))


def _eval_columns(method_cls) -> list[str]:
    return _columns(method_cls, evaluation=True)


def check_table(method_cls, table: str) -> None:
    """Fail (``ValueError``, naming the table) when ``table`` is not the kind ``method_cls`` streams: a slide
    table (``data.slide_table``) for whole-slide methods, a tile table for the others."""
    kind = manifest_of(table).get("kind", "tiles")
    if kind != method_cls.table:
        how = ("a slide table (`histoweak slides`, or --data synthetic:camelyon)" if method_cls.table == "slides"
               else "a tile table (`histoweak tile` / `histoweak import`)")
        raise ValueError(f"{table}: a {kind} table, but method {method_cls.name!r} trains on {how}")


def _group_fn(config: TrainConfig, n_classes: int):
    """The tile -> group function of a run (``Task.groups`` at the run's threshold), for ``add_column``."""
    import functools

    return functools.partial(Task(config.target, n_classes).groups, tau=config.group_tau)


def score_checkpoint(checkpoint, tile_table: str, n_classes: int, split: str = "test"):
    """Load a checkpoint written by ``train_loop_per_worker`` and evaluate it on ``split`` (in this process).

    Returns (metrics, predictions) with predictions as from ``predict_split``.
    """
    with checkpoint.as_directory() as d:
        method, saved = load_trained(d, n_classes)
    cfg = TrainConfig.from_dict(saved["train"])
    method.class_names = class_names_of(tile_table)
    ds = read_tiles(tile_table, split=split, columns=_eval_columns(METHODS[cfg.method]))
    if saved.get("stain_reference"):
        ds = stain_normalize_dataset(ds, saved["stain_reference"])
    if cfg.group_tau is not None:
        ds = add_column(ds, "group", _group_fn(cfg, n_classes))
    return method.evaluate_batches(torch_batches(ds, batch_size=cfg.batch_size), split)


def load_trained(checkpoint_dir, n_classes: int | None = None):
    """(method with the checkpoint's weights, in eval mode; the run's saved config) from a checkpoint directory
    written by ``train_loop_per_worker``. Only ``load_checkpoint`` opens it (no code runs from the file)."""
    import warnings

    state, saved = load_checkpoint(checkpoint_dir)
    cfg = TrainConfig.from_dict(saved["train"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not random: the checkpoint carries the weights
        method = build_method(cfg.method, {**cfg.hparams, "weights": None},
                              Task(cfg.target, n_classes or int(saved["n_classes"])))
    method.load_state_dict(state["model"])
    method.set_data_state(saved.get("data_state") or {})
    method.class_names = saved.get("class_names")
    return method.eval(), saved
