"""The method contract: typed hyperparameters, one training step, predict, a declared selection metric.

A method subclasses ``Method``, declares a ``Hparams`` dataclass, and
implements ``_loss(batch)``; the base class owns the optimizer step, mixed
precision and gradient bookkeeping. Methods register by name::

    @register_method("erm")
    class ERM(Method): ...

and are built with ``build_method("erm", {"lr": 1e-3}, task)``; an unknown
name or hyperparameter fails with the valid ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from histoweak import metrics as M

__all__ = ["GROUP_NAMES", "METHODS", "DataPlan", "Hparams", "Method", "RunInfo", "Stream", "SweepContext", "TableSlice",
           "Task",
           "OPTIMIZERS", "average_gradients", "build_method", "check_finite_loss", "check_hparams", "gather_across_workers", "mean_across_workers",
           "predict_split", "register_method", "tissue_groups", "to_device"]

#: names of the groups ``tissue_groups`` returns, by index
GROUP_NAMES = ("y=0, small tissue", "y=0, large tissue", "y=1, small tissue", "y=1, large tissue")


def tissue_groups(y, tissue_ratio, tau: float) -> np.ndarray:
    """GERNE's groups (y, z) with z = [r_tissue >= tau] (eq. 5), as the index ``2 * y + z``.

    The one place groups are defined: 0 = (y=0, small tissue), 1 = (y=0, large),
    2 = (y=1, small), 3 = (y=1, large); see ``GROUP_NAMES``.

    Parameters
    ----------
    y : (N,) binary labels (0/1)
    tissue_ratio : (N,) fraction of tissue pixels in each tile
    tau : threshold on the tissue ratio, in [0, 1] (the paper uses 0.1 and 0.03)
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"group threshold tau must be in [0, 1], got {tau}")
    y = np.asarray(y)
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("tissue groups need binary labels (0/1)")
    z = np.asarray(tissue_ratio, np.float64) >= tau
    return (2 * y.astype(np.int64) + z).astype(np.int64)

METHODS: dict[str, type["Method"]] = {}


@dataclass(frozen=True)
class Task:
    """What the data asks of a model: how many outputs and which target.

    target : ``"class:<c>"`` — binary, is class c present in the tile (GERNE eq. 3);
             ``"labels"`` — multi-label presence of classes 1..C-1 (background excluded);
             ``"label"`` — the row's integer label column, binary (e.g. a slide label);
             ``"multiclass"`` — the row's integer label column, one of ``n_classes`` classes (a graded patch
             dataset imported from class folders: BN/WD/MD/PD);
             ``"mask"`` — per-pixel classes 0..C-1 (segmentation, e.g. on pseudo-labels).
    n_classes : classes of the tile table including background (from its manifest).
    """

    target: str = "class:1"
    n_classes: int = 5

    def __post_init__(self):
        if not (self.target in ("labels", "label", "multiclass", "mask") or self.target.startswith("class:")):
            raise ValueError(f"task target {self.target!r}: use 'class:<index>', 'labels', 'label', 'multiclass' "
                             "or 'mask'")
        if self.target.startswith("class:"):
            c = int(self.target.split(":", 1)[1])
            if not 0 < c < self.n_classes:
                raise ValueError(f"task target {self.target!r}: class must be in 1..{self.n_classes - 1}")

    @property
    def multilabel(self) -> bool:
        return self.target == "labels"

    @property
    def n_outputs(self) -> int:
        if self.multilabel:
            return self.n_classes - 1
        if self.target in ("mask", "multiclass"):
            return self.n_classes
        return 2  # binary presence or a binary label column

    def groups(self, batch: dict, tau: float) -> np.ndarray:
        """Groups (y, [r_tissue >= tau]) of a numpy batch (``labels``/``label`` and ``tissue_ratio``); binary targets only."""
        if self.multilabel or self.target in ("mask", "multiclass"):
            raise ValueError(f"tissue groups need a binary target ('class:<c>' or 'label'), not {self.target!r}")
        if self.target == "label":
            y = np.asarray(batch["label"])
        else:
            y = np.asarray(batch["labels"])[:, int(self.target.split(":", 1)[1])] > 0
        return tissue_groups(y, batch["tissue_ratio"], tau)

    def targets(self, batch: dict) -> torch.Tensor:
        """(N,) int64 class targets, or (N, C-1) float multi-hot targets."""
        if self.target == "labels":
            return batch["labels"][:, 1:].float()
        if self.target in ("label", "multiclass"):
            return batch["label"].long()
        if self.target == "mask":
            return batch["mask"].long()
        c = int(self.target.split(":", 1)[1])
        return (batch["labels"][:, c] > 0).long()


@dataclass(frozen=True)
class Hparams:
    """Hyperparameters every method has; methods extend this dataclass."""

    backbone: str = "tf_efficientnet_lite0"
    weights: str | None = "imagenet"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    amp: bool = True  # mixed precision, used on GPU only
    optimizer: str | None = None  # "adam", "adamw" or "sgd"; None: the method's own (its paper's) choice
    momentum: float = 0.9  # SGD's momentum (optimizer: sgd)


@dataclass(frozen=True)
class RunInfo:
    """What a hook may know of the run it plans for (generic ``TrainConfig`` fields and the data).

    meta : ``meta(columns)`` -> the training split's rows as ``decode_tiles`` gives them, without images or masks
        (read on demand, in the driver).
    images : ``images(keys)`` -> (N, H, W, 3) uint8, the training tiles with those keys (``schema.tile_keys``) as
        the training stream gives them before augmentation (stain-normalised when the run is); read in the driver.
    """

    target: str = "class:1"
    n_classes: int = 5
    group_tau: float | None = None
    seed: int = 0
    batch_size: int = 32
    meta: Callable[[list[str]], dict[str, np.ndarray]] | None = None
    images: Callable[[set[str]], np.ndarray] | None = None


@dataclass(frozen=True)
class Stream:
    """A batch the platform draws for every step from the training split's rows (``streaming.BalancedSampler``).

    strata : numpy batch of row metadata (``decode_tiles`` of the rows, no images or masks) -> (N,) int stratum
        per row; rows of stratum -1 are never drawn. Each batch holds ``Method.stream_weights`` of each stratum.
        A picklable function (a module-level function or a ``functools.partial`` of one): it runs on workers.
    hidden : columns this stream never carries (their values never reach the method).
    """

    strata: Callable[[dict], np.ndarray]
    hidden: tuple[str, ...] = ()


@dataclass(frozen=True)
class TableSlice:
    """Training rows from another tile table (a derived one, e.g. USegMix's synthetic tiles) that join a run's
    training split: the ``train`` rows of ``path`` whose ``column`` is below ``below`` (``None``: all of them).

    A derived table orders its rows by a column (USegMix: ``x`` = rank of the tile within its class times its
    size), so "the first n per class" is a filter on read and nothing is regenerated per run.
    """

    path: str
    column: str | None = None
    below: float | None = None


@dataclass(frozen=True)
class DataPlan:
    """What a method needs from the data for one run (``Method.data_plan``).

    main : ``None``: every step's batch comes from the Ray Data stream of the training split, sharded across
        workers, and an epoch is one pass over it. A ``Stream``: the batch is drawn from it instead and an epoch
        is ``steps_per_epoch`` steps.
    extra : batch key -> a stream drawn beside the main batch at every step (``batch[key]``), e.g. GERNE's
        less-biased batch.
    state : JSON-able values computed from the data that the method needs in training (``set_data_state``),
        logged with the run.
    more_train : rows of other tile tables that join the training split (streamed and sampled alike).
    """

    main: Stream | None = None
    extra: dict[str, Stream] = field(default_factory=dict)
    steps_per_epoch: int | None = None
    state: dict[str, Any] = field(default_factory=dict)
    more_train: tuple[TableSlice, ...] = ()

    def __post_init__(self):
        if self.main is not None and not self.steps_per_epoch:
            raise ValueError("data plan: a sampled main stream needs steps_per_epoch")


@dataclass
class SweepContext:
    """What a sweep gives a method's ``stage2`` step (``tune.run_sweep`` builds it; no Ray in here).

    settings : the search space's ``stage2:`` section (``before:`` for ``before_sweep``), checked against the
        method's keys.
    train : ``train(name, train_values, tile_table, params)`` trains ``TrainConfig.from_dict(train_values)`` on
        ``tile_table`` as a child run ``name`` of the sweep (metrics, test figures and ``params`` logged) and
        returns its ``TrainOutcome``.
    log_metrics : logs on the sweep's own run.
    map_table : ``map_table(source, out, fn_cls, fn_kwargs, split=None, concurrency=None, desc="")`` runs
        ``fn_cls(**fn_kwargs)`` in Ray Data actors over the (decoded) rows of tile table ``source``, a numpy batch
        of rows at a time (``fn(batch) -> pyarrow.Table``), writes what they return as Parquet files into ``out``
        (atomically, a file per block) and returns the number of rows written; the method's derived tables
        (USegMix's segment pool and synthetic tiles) are built this way without the method importing Ray.
    log_figures / log_artifact : figures (name -> matplotlib figure) / a file logged on the sweep's run.
    """

    name: str
    tile_table: str
    n_classes: int
    directory: Path
    settings: dict[str, Any]
    class_names: list[str] | None
    train: Callable[..., Any]
    log_metrics: Callable[[dict[str, float]], None]
    map_table: Callable[..., int] | None = None
    log_figures: Callable[[dict[str, Any]], None] | None = None
    log_artifact: Callable[[str], None] | None = None


#: ``Hparams.optimizer`` values (``Method.make_optimizer``)
OPTIMIZERS = ("adam", "adamw", "sgd")


def check_hparams(cls: type[Hparams], values: dict[str, Any], method: str) -> Hparams:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"method {method!r}: unknown hyperparameter(s) {unknown}; valid: {sorted(fields)}")
    hp = cls(**values)
    if hp.optimizer is not None and hp.optimizer not in OPTIMIZERS:
        raise ValueError(f"method {method!r}: optimizer must be one of {list(OPTIMIZERS)} or null, got {hp.optimizer!r}")
    if not 0.0 <= hp.momentum < 1.0:
        raise ValueError(f"method {method!r}: momentum must be in [0, 1), got {hp.momentum}")
    return hp


def average_gradients(module: nn.Module) -> None:
    """Average gradients across torch.distributed workers (a no-op without a process group of 2+).

    Called between backward and the optimizer step, so it serves any
    method, including ones with several forward passes per step.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_across_workers(x: torch.Tensor) -> torch.Tensor:
    """Every torch.distributed worker's ``x`` concatenated along dim 0 in rank order (``x`` itself without a
    process group of 2+); workers may hold different numbers of rows.

    For a loss that couples the samples of a batch (a contrastive loss over all of its pixels): each worker
    computes the loss of the whole step's batch from the gathered tensor. The gather is differentiable and its
    backward sums the W workers' gradients for each worker's rows, so with W identical losses every row gets
    W · dL/dx, and ``average_gradients`` divides by W: exactly the single-process gradient on the concatenated
    batch. Every worker must call it, and run backward, at the same point of the step.
    """
    world = _world_size()
    if world == 1:
        return x
    import torch.distributed as dist

    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    top = max(sizes)
    if x.shape[0] < top:  # the collective needs one shape on every worker
        x = torch.cat([x, x.new_zeros(top - x.shape[0], *x.shape[1:])])
    return torch.cat([part[:s] for part, s in zip(_AllGather.apply(x), sizes)])


class _AllGather(torch.autograd.Function):
    """(W, *x.shape): every worker's ``x``; backward sums the W workers' gradients and keeps this worker's part.

    (``torch.distributed.nn.functional.all_gather`` does the same but is deprecated in torch 2.14.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


@torch.no_grad()
def mean_across_workers(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over torch.distributed workers, without gradient (``x`` detached without a process group).

    For a batch-wide normaliser, e.g. the sum of the weights of a weighted mean: dividing each worker's sum by the
    mean over workers of its normaliser makes the averaged gradient the one of the whole step's batch.
    """
    x = x.detach().clone()
    world = _world_size()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(x)
        x /= world
    return x


def check_finite_loss(loss: torch.Tensor, method: str) -> None:
    """Raise ``FloatingPointError`` when ``loss`` is not finite on this worker or on any other (one all-reduce
    with 2+ workers), before any gradient reaches the weights: every worker stops at the same step, none waits
    in a collective the others never reach. The training loop ends the run there as diverged."""
    bad = torch.tensor(0.0 if torch.isfinite(loss.detach()) else 1.0, device=loss.device)
    if float(mean_across_workers(bad)) > 0:
        raise FloatingPointError(f"method {method!r}: non-finite loss {loss.item()}"
                                 + ("" if float(bad) else " on another worker"))


def to_device(batch: dict, device) -> dict:
    """Tensors of a (nested) batch dict moved to ``device``."""
    return {k: (v.to(device) if torch.is_tensor(v) else to_device(v, device) if isinstance(v, dict) else v)
            for k, v in batch.items()}


def predict_split(method: "Method", batches) -> dict[str, np.ndarray]:
    """``method.predict`` over ``batches``: targets, probs (N, outputs), groups (-1 where unset), and the
    tiles' ``tissue_ratio``/``class_ratios`` when the batches carry them (for the shortcut analysis)."""
    targets, probs, groups, extra = [], [], [], {"tissue_ratio": [], "class_ratios": []}
    device = method.device
    for b in batches:
        b = to_device(b, device)
        probs.append(method.predict(b).float().cpu().numpy())
        targets.append(method.task.targets(b).cpu().numpy())
        groups.append(b["group"].cpu().numpy() if "group" in b else np.full(len(probs[-1]), -1))
        for k in extra:
            if k in b:
                extra[k].append(b[k].cpu().numpy())
    if not probs:
        return {}
    out = {"targets": np.concatenate(targets), "probs": np.concatenate(probs), "groups": np.concatenate(groups)}
    out.update({k: np.concatenate(v) for k, v in extra.items() if len(v) == len(probs)})
    return out


def register_method(name: str):
    """Class decorator: make a ``Method`` buildable by ``name``."""

    def deco(cls):
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def build_method(name: str, hparams: dict[str, Any] | None = None, task: Task | None = None) -> "Method":
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid: {sorted(METHODS)}") from None
    task = task or Task()
    if not cls.supports(task):
        raise ValueError(f"method {name!r} does not support target {task.target!r}")
    return cls(check_hparams(cls.Hparams, dict(hparams or {}), name), task)


class Method(nn.Module):
    """Base class: owns the model's optimizer step; subclasses define ``_build``, ``_loss`` and ``forward``."""

    name: ClassVar[str] = "?"
    Hparams: ClassVar[type[Hparams]] = Hparams
    #: validation metric used to pick the best checkpoint, and whether higher is better
    selection_metric: ClassVar[str] = "val_bca"
    selection_mode: ClassVar[str] = "max"
    #: the test metrics a leaderboard shows for this method (those a run has; the rest stay in the CSV)
    headline_metrics: ClassVar[tuple[str, ...]] = ("test_bca", "test_wga", "test_auroc")
    #: the method trains on tissue groups: ``TrainConfig.group_tau`` is required (GERNE)
    needs_groups: ClassVar[bool] = False
    #: a generative model of the tiles (USegMix's DDPM): it trains and evaluates (a loss), predicts no target
    generative: ClassVar[bool] = False
    #: the table a run streams: "tiles" (a tile table, decoded images in every batch) or "slides" (a slide table,
    #: ``data.slide_table``: one row per slide, ``path`` in the batch; the method reads the pixels it wants, as
    #: MagNets do — ``methods._wsi``)
    table: ClassVar[str] = "tiles"
    #: extra tile-table columns the method reads in training / in evaluation (e.g. pixel masks)
    train_columns: ClassVar[tuple[str, ...]] = ()
    eval_columns: ClassVar[tuple[str, ...]] = ()
    #: the keys of a search space's ``stage2:`` section (settings of this method's ``stage2`` step)
    stage2_keys: ClassVar[frozenset[str]] = frozenset()
    #: the keys of a search space's ``before:`` section (settings of this method's ``before_sweep`` step)
    before_keys: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def supports(cls, task: Task) -> bool:
        """Whether the method can learn ``task``'s target (checked by ``build_method``)."""
        return True

    # -- hooks the generic layers call (train.py, tune.py); each has a default ---------------------
    @classmethod
    def data_plan(cls, hparams: Hparams, run: RunInfo) -> DataPlan:
        """The streams and data-derived state of one run (called once, in the driver). Default: the plain stream."""
        return DataPlan()

    def stream_weights(self, key: str, counts: dict[int, int]) -> dict[int, float]:
        """Share of each stratum in the batch of stream ``key``, given the strata's sizes. Default: equal shares."""
        return {g: 1.0 for g in counts}

    def set_data_state(self, state: dict[str, Any]) -> None:
        """Receive ``DataPlan.state`` before training (and when a checkpoint is scored)."""
        self.data_state = dict(state)

    @classmethod
    def test_figures(cls, pred: dict, run: RunInfo, class_names: list[str] | None) -> dict[str, Any]:
        """Figures (artifact name -> matplotlib figure) of a run's best checkpoint on test, from what
        ``evaluate_batches`` returned. Default: the confusion matrix and, with groups, the accuracy per
        group and the shortcut analysis (``histoweak.figures``)."""
        from histoweak import figures

        return figures.classification_test_figures(pred, run.target, run.group_tau)

    @classmethod
    def sweep_figures(cls, train: dict[str, Any], swept: dict[str, dict], tile_table: str, n_classes: int
                      ) -> tuple[dict[str, Any], dict[str, list[dict]]]:
        """Figures and tables (name -> rows) logged on a sweep's run before its trials, from the fixed ``train``
        settings and the ``swept`` distributions. Default: tiles per group and split at every ``group_tau``."""
        from histoweak.report import group_count_artifacts

        return group_count_artifacts(train, swept, tile_table, n_classes)

    @classmethod
    def check_sweep(cls, fixed: dict[str, Any], params: dict[str, dict], run_for: Callable[[dict], RunInfo]
                    ) -> dict[str, dict]:
        """A sweep's swept ``params`` (``{"hparams.beta": {"grid": [...]}}``) checked against the data before any
        trial: returns them, or them with values the data rules out removed (saying so), or raises ``ValueError``.
        ``fixed``: the space's fixed values (``"train.group_tau"``, ``"hparams.c"``, ...); ``run_for(train_values)``:
        the ``RunInfo`` of a trial with those train values (e.g. ``{"group_tau": 0.03}``). Default: unchanged."""
        return params

    @classmethod
    def before_sweep(cls, hparams: dict[str, Any], ctx: SweepContext) -> dict[str, Any]:
        """A step before a sweep's trials (USegMix: the segment pool and the synthetic tiles), from the fixed
        ``hparams`` of the search space; returns hyperparameter values every trial gets (e.g. the path of a
        derived table). Runs when the search space has a ``before:`` section; default: nothing to do."""
        return {}

    @classmethod
    def check_before(cls, settings: dict[str, Any]) -> None:
        """Raise ``ValueError`` on a bad value in a search space's ``before:`` section (keys are checked already)."""

    @classmethod
    def check_stage2(cls, settings: dict[str, Any]) -> None:
        """Raise ``ValueError`` on a bad value in a search space's ``stage2:`` section (keys are checked already)."""

    @classmethod
    def stage2(cls, best: dict, ctx: SweepContext) -> dict[str, float]:
        """A second stage after the sweep, from its best trial (``best``: its leaderboard row), e.g. PSCL's decoder on
        pseudo-labels; returns its test metrics. Runs when the user asks (``histoweak tune --stage2``)."""
        raise ValueError(f"method {cls.name!r} has no second stage after the sweep")

    def __init__(self, hparams: Hparams, task: Task):
        super().__init__()
        self.hparams, self.task = hparams, task
        self.class_names: list[str] | None = None  # the tile table's classes, when known (metric names)
        self._build()
        self.optimizer = self.configure_optimizer()
        self._scaler: torch.amp.GradScaler | None = None

    # -- to implement ---------------------------------------------------------
    def _build(self) -> None:
        raise NotImplementedError

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    # -- shared mechanics -----------------------------------------------------
    def configure_optimizer(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.parameters(), "adamw")

    def make_optimizer(self, params, default: str, **adam_kwargs) -> torch.optim.Optimizer:
        """The optimizer ``hparams.optimizer`` names (``default``, the method's own, when it names none) over
        ``params``, at ``hparams.lr`` and ``hparams.weight_decay``; SGD with ``hparams.momentum``.
        ``adam_kwargs`` (e.g. ``betas``) go to Adam/AdamW only."""
        hp = self.hparams
        name = hp.optimizer or default
        if name == "sgd":
            return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
        return cls(params, lr=hp.lr, weight_decay=hp.weight_decay, **adam_kwargs)

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """Called by the training loop before each epoch's steps (also on resume), for schedules of the method's
        own (e.g. PSCL's warm-up of the classifier before its contrastive loss). Default: nothing."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def step(self, batch: dict) -> dict[str, float]:
        """One optimisation step on ``batch``; returns floats to log (at least ``loss``)."""
        self.train()
        use_amp = self.hparams.amp and self.device.type == "cuda"
        if use_amp and self._scaler is None:
            self._scaler = torch.amp.GradScaler("cuda")
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=use_amp):
            loss, logs = self._loss(batch)
        check_finite_loss(loss, self.name)
        if use_amp:
            self._scaler.scale(loss).backward()
            average_gradients(self)
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            loss.backward()
            average_gradients(self)
            self.optimizer.step()
        return {"loss": float(loss.detach()), **logs}

    @torch.no_grad()
    def predict(self, batch: dict) -> torch.Tensor:
        """Class probabilities: (N, n_outputs) — softmax, or per-label sigmoid for multi-label tasks."""
        self.eval()
        logits = self(batch["image"])
        return torch.sigmoid(logits) if self.task.multilabel else logits.softmax(1)

    def evaluate_batches(self, batches, prefix: str) -> tuple[dict[str, float], dict]:
        """Metrics over a whole split of batches, and what figures need (here: targets, probs, groups, ratios)."""
        pred = predict_split(self, batches)
        return (self.evaluate(pred["targets"], pred["probs"], pred["groups"], prefix=prefix) if pred else {}), pred

    def evaluate(self, targets: np.ndarray, probs: np.ndarray, groups: np.ndarray | None = None,
                 prefix: str = "val") -> dict[str, float]:
        """Metrics of predictions on a whole split (see ``histoweak.metrics``)."""
        out: dict[str, float] = {}
        if self.task.multilabel:
            pred = (probs > 0.5).astype(int)
            out.update({f"{prefix}_{k}": v for k, v in M.f1_scores(targets.astype(int), pred).items()})
            out[f"{prefix}_acc"] = float((pred == targets).all(1).mean())
            out[f"{prefix}_bca"] = float(np.mean([M.balanced_accuracy(targets[:, c], pred[:, c])
                                                  for c in range(targets.shape[1])]))
            return out
        pred = probs.argmax(1)
        out[f"{prefix}_acc"] = M.accuracy(targets, pred)
        out[f"{prefix}_bca"] = M.balanced_accuracy(targets, pred)
        out.update({f"{prefix}_{k}": v for k, v in M.f1_scores(targets, pred, probs.shape[1]).items()})
        if probs.shape[1] == 2:
            out[f"{prefix}_auroc"] = M.auroc(targets, probs[:, 1])
        if self.task.target == "multiclass":  # ordinal grades: disagreement weighted by distance (USegMix Table 1)
            out[f"{prefix}_kappa"] = M.quadratic_kappa(targets, pred, probs.shape[1])
        if groups is not None and (groups >= 0).all():
            out[f"{prefix}_wga"] = M.worst_group_accuracy(targets, pred, groups)
            out[f"{prefix}_gba"] = M.group_balanced_accuracy(targets, pred, groups)
        return out
