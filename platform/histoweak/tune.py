"""Ray Tune sweeps from ``search_spaces/*.yaml``, recorded in MLflow (the only module that knows Ray Tune).

A search-space file::

    name: erm-lr-wd                 # sweep (and MLflow experiment) name
    method: erm
    train: {epochs: 3, batch_size: 32, target: "class:1"}   # fixed TrainConfig fields
    hparams: {backbone: tf_efficientnet_lite0}              # fixed method hyperparameters
    params:                         # swept: "hparams.<name>" or "train.<name>"
      hparams.lr: {loguniform: [1.0e-4, 1.0e-2]}
      hparams.weight_decay: {choice: [0.0, 1.0e-4]}
    metric: val_bca                 # default: the method's selection metric
    mode: max
    num_samples: 4
    scheduler: {type: asha, grace_period: 1}                # or {type: fifo}; max_t: epochs at most
    max_concurrent_trials: null     # default: one per GPU, else one per 2 CPUs
    smoke: {num_samples: 2, train.epochs: 1, train.steps_per_epoch: 2}    # --smoke-test overrides

Distributions: ``choice``, ``grid``, ``uniform``, ``loguniform``, ``randint``.
Every key and value is checked on load; a bad one fails, naming it, before
any work. Each trial is a run nested under the sweep's MLflow run; an
interrupted sweep resumes (``Tuner.restore``) when rerun.

The storage (``--storage``) is a local directory or a URI such as ``s3://bucket/ray-results`` that every
node of a cluster sees: Ray Tune and Train write there through pyarrow, and so does this module
(``histoweak._storage``), so a sweep resumes from S3 the way it resumes from a local directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from histoweak import _storage
from histoweak.methods import METHODS
from histoweak.methods.base import RunInfo
from histoweak.train import TrainConfig, class_names_of

__all__ = ["DISTRIBUTIONS", "SearchSpace", "SweepPlan", "leaderboard", "load_search_space",
           "n_trials", "plan_sweep", "run_sweep", "sweep_identity"]

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
_TOP_KEYS = {"name", "method", "data", "train", "hparams", "params", "metric", "mode", "num_samples", "scheduler",
             "max_concurrent_trials", "smoke", "description", "stage2", "before"}


@dataclass(frozen=True)
class SearchSpace:
    name: str
    method: str
    train: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    metric: str = ""
    mode: str = "max"
    num_samples: int = 1
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "fifo"})
    max_concurrent_trials: int | None = None
    data: str | None = None
    smoke: dict[str, Any] = field(default_factory=dict)
    stage2: dict[str, Any] = field(default_factory=dict)  # the method's second stage (``Method.stage2``) settings
    before: dict[str, Any] = field(default_factory=dict)  # the method's step before the trials (``Method.before_sweep``)
    source: str = "<dict>"

    def with_overrides(self, overrides: dict[str, Any]) -> "SearchSpace":
        """Apply ``{"num_samples": 2, "train.epochs": 1, ...}`` and re-validate."""
        raw = _to_raw(self)
        for key, value in overrides.items():
            section, _, sub = key.partition(".")
            if sub:
                raw.setdefault(section, {})[sub] = value
                raw["params"].pop(key, None)  # a fixed override replaces a swept parameter
            else:
                raw[key] = value
        return _validate(raw, self.source)

    def with_params(self, params: dict[str, dict]) -> "SearchSpace":
        """Add or replace swept parameters (``{"train.seed": {"grid": [0, 1, 2]}}``) and re-validate."""
        raw = _to_raw(self)
        for key in params:
            section, _, sub = key.partition(".")
            (raw.get(section) or {}).pop(sub, None)  # a swept parameter replaces a fixed one
        raw["params"].update(params)
        return _validate(raw, self.source)

    def trial_config(self, sampled: dict[str, Any]) -> TrainConfig:
        train, hparams = dict(self.train), dict(self.hparams)
        for key, value in sampled.items():
            section, _, sub = key.partition(".")
            (train if section == "train" else hparams)[sub] = value
        return TrainConfig.from_dict({**train, "method": self.method, "hparams": hparams})


def _to_raw(space: SearchSpace) -> dict:
    raw = dataclasses.asdict(space)
    raw.pop("source")
    raw["train"], raw["hparams"], raw["params"] = dict(space.train), dict(space.hparams), dict(space.params)
    return raw


def load_search_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML; ``ValueError`` names the file and the bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read search space ({exc})") from None
    return _validate(raw, str(path))


def _validate(raw: Any, where: str) -> SearchSpace:
    def bad(key: str, why: str):
        raise ValueError(f"{where}: {key!r}: {why}")

    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a search space must be a mapping")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        bad(unknown[0], f"unknown key; valid: {sorted(_TOP_KEYS)}")
    for key in ("name", "method"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            bad(key, "required, a non-empty string")
    if raw["method"] not in METHODS:
        bad("method", f"unknown {raw['method']!r}; valid: {sorted(METHODS)}")
    method = METHODS[raw["method"]]
    hp_fields = {f.name for f in dataclasses.fields(method.Hparams)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"method", "hparams"}
    for section, valid in (("train", train_fields), ("hparams", hp_fields)):
        value = raw.get(section) or {}
        if not isinstance(value, dict):
            bad(section, "must be a mapping")
        for k in value:
            if k not in valid:
                bad(f"{section}.{k}", f"unknown; valid: {sorted(valid)}")
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        bad("params", "must be a mapping of '<section>.<name>' to a distribution")
    for key, dist in params.items():
        section, _, sub = str(key).partition(".")
        if section not in ("train", "hparams") or sub not in (train_fields if section == "train" else hp_fields):
            bad(f"params.{key}", f"must be hparams.<one of {sorted(hp_fields)}> or train.<one of {sorted(train_fields)}>")
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            bad(f"params.{key}", f"must be one of {{{', '.join(DISTRIBUTIONS)}: ...}}")
        kind, args = next(iter(dist.items()))
        if kind in ("choice", "grid"):
            if not isinstance(args, list) or not args:
                bad(f"params.{key}.{kind}", "must be a non-empty list")
        else:
            if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)
                    and args[0] < args[1]):
                bad(f"params.{key}.{kind}", "must be [low, high] numbers with low < high")
            if kind == "loguniform" and args[0] <= 0:
                bad(f"params.{key}.loguniform", "bounds must be > 0")
    metric = raw.get("metric") or method.selection_metric
    if not isinstance(metric, str) or not metric.startswith(("val_", "best_val_")):
        bad("metric", f"must be a validation metric (val_*), got {metric!r}")
    mode = raw.get("mode") or method.selection_mode
    if mode not in ("max", "min"):
        bad("mode", f"must be 'max' or 'min', got {mode!r}")
    n = raw.get("num_samples", 1)
    if not isinstance(n, int) or n < 1:
        bad("num_samples", f"must be an integer >= 1, got {n!r}")
    sched = raw.get("scheduler") or {"type": "fifo"}
    if not isinstance(sched, dict) or sched.get("type") not in ("fifo", "asha"):
        bad("scheduler", "must be {type: fifo} or {type: asha, grace_period: N, reduction_factor: N}")
    extra = set(sched) - {"type", "grace_period", "reduction_factor", "max_t"}
    if extra:
        bad(f"scheduler.{sorted(extra)[0]}", "unknown; valid: grace_period, reduction_factor, max_t")
    for k in ("grace_period", "reduction_factor", "max_t"):
        if k in sched and (not isinstance(sched[k], int) or sched[k] < 1):
            bad(f"scheduler.{k}", f"must be an integer >= 1, got {sched[k]!r}")
    mct = raw.get("max_concurrent_trials")
    if mct is not None and (not isinstance(mct, int) or mct < 1):
        bad("max_concurrent_trials", f"must be an integer >= 1 or null, got {mct!r}")
    smoke = raw.get("smoke") or {}
    if not isinstance(smoke, dict):
        bad("smoke", "must be a mapping of overrides")
    sections = {}
    for key, valid, check, what in (("stage2", method.stage2_keys, method.check_stage2, "second stage"),
                                    ("before", method.before_keys, method.check_before, "step before the trials")):
        settings, valid = raw.get(key) or {}, sorted(valid)
        if settings and not valid:
            bad(key, f"method {raw['method']!r} has no {what}")
        if not isinstance(settings, dict):
            bad(key, f"must be a mapping with keys {valid}")
        for k in settings:
            if k not in valid:
                bad(f"{key}.{k}", f"unknown; valid: {valid}")
        try:
            check(dict(settings))
        except ValueError as exc:
            bad(key, str(exc))
        sections[key] = dict(settings)
    space = SearchSpace(name=raw["name"], method=raw["method"], train=dict(raw.get("train") or {}),
                        hparams=dict(raw.get("hparams") or {}), params=dict(params), metric=metric, mode=mode,
                        num_samples=n, scheduler=dict(sched), max_concurrent_trials=mct, data=raw.get("data"),
                        smoke=dict(smoke), **sections, source=where)
    try:  # the fixed settings must make a valid TrainConfig on their own
        space.trial_config({k: _example(v) for k, v in params.items()})
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    return space


def _example(dist: dict) -> Any:
    kind, args = next(iter(dist.items()))
    return args[0]


def _tune_domain(dist: dict):
    from ray import tune

    kind, args = next(iter(dist.items()))
    return {"choice": lambda: tune.choice(args), "grid": lambda: tune.grid_search(args),
            "uniform": lambda: tune.uniform(*args), "loguniform": lambda: tune.loguniform(*args),
            "randint": lambda: tune.randint(int(args[0]), int(args[1]) + 1)}[kind]()


def trial(config: dict, ctx: dict) -> None:
    """One Tune trial: a nested MLflow run around one ``train.fit``; ``config`` holds the sampled values."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from histoweak import tracking
    from histoweak.train import MlflowMetricsCallback, fit

    sampled = dict(config)
    space = SearchSpace(**ctx["space"])
    trial_name = ray.tune.get_context().get_trial_name()
    cfg = space.trial_config(sampled)
    cfg = dataclasses.replace(cfg, name=trial_name, storage_path=ctx["storage"] + "/trials")
    uri = ctx["tracking_uri"]
    run_id = tracking.child_run(ctx["parent_run_id"], trial_name,
                                {**_flat(dataclasses.asdict(cfg)), **{f"swept.{k}": v for k, v in sampled.items()}},
                                ctx["tags"], uri)
    status = "FAILED"
    try:
        out = fit(cfg, ctx["tile_table"], ctx["n_classes"], cpu_share=ctx["cpu_share"], gpu_share=ctx["gpu_share"],
                  callbacks=[MlflowMetricsCallback(run_id, uri), TuneReportCallback()])  # MLflow first: ASHA may stop the trial
        final = {**out.test, f"best_{space.metric}": out.best.get(space.metric, float("nan")),
                 "diverged": float(out.metrics.get("diverged", 0.0))}
        out.metrics.setdefault(space.metric, float("nan"))  # Tune checks every result for it
        tracking.log_metrics(run_id, final, step=cfg.epochs, uri=uri)
        checkpoint = _checkpoint_location(out.checkpoint, ctx["storage"])
        tracking.set_tags(run_id, {"best_checkpoint": checkpoint or ""}, uri)
        tracking.log_params(run_id, {f"data.{k}": v for k, v in out.data_state.items()}, uri)
        _log_test_figures(run_id, uri, out.test_predictions, cfg, ctx["tile_table"], ctx["n_classes"],
                          ctx.get("class_names"))
        ray.tune.report({**out.metrics, **final, "mlflow_run_id": run_id, "best_checkpoint": checkpoint})
        status = "FINISHED"
    finally:
        tracking.end_run(run_id, status, uri)


def _checkpoint_location(path: str | None, storage: str) -> str | None:
    """A checkpoint's location as a user can open it: Ray gives its path on the storage's filesystem,
    which on S3 lacks the ``s3://`` that makes it a location."""
    if path and _storage.is_remote(storage) and not _storage.is_remote(path):
        return f"{urlsplit(storage).scheme}://{path}"
    return path


def _log_test_figures(run_id: str, uri: str, pred: dict, cfg: TrainConfig, tile_table: str, n_classes: int,
                      class_names: list[str] | None) -> None:
    """The figures the run's method makes of its best checkpoint on test (``Method.test_figures``)."""
    import matplotlib.pyplot as plt

    from histoweak import tracking
    from histoweak.train import run_info

    if not pred:
        return
    for name, fig in METHODS[cfg.method].test_figures(pred, run_info(cfg, tile_table, n_classes), class_names).items():
        tracking.log_figure(run_id, fig, name, uri)
        plt.close(fig)


def _log_sweep_figures(space: SearchSpace, tile_table, n_classes: int, run_id: str, uri: str) -> None:
    """What the method logs on the sweep's run before its trials (``Method.sweep_figures``)."""
    import matplotlib.pyplot as plt

    from histoweak import tracking

    figs, tables = METHODS[space.method].sweep_figures(dict(space.train), dict(space.params), str(tile_table), n_classes)
    for name, rows in tables.items():
        tracking.log_table(run_id, rows, name, uri)
    for name, fig in figs.items():
        tracking.log_figure(run_id, fig, name, uri)
        plt.close(fig)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclass(frozen=True)
class SweepPlan:
    """Where a sweep lives and whether it resumes: a sweep is identified by what it computes."""

    directory: Path | str  # <storage>/<name>-<key>, Ray Tune's experiment directory: a local Path or a URI
    identity: dict[str, str]  # hashes of the search space (after overrides), the data and the code
    resume: bool
    restart: bool  # the same sweep exists and the user asked for a clean start
    message: str  # one line for the user


_IDENTITY_NAMES = {"space": "search space (after --set/--seeds/--smoke-test)", "data": "data", "code": "code"}
_SWEEP_FILE = "histoweak_sweep.json"


def _store_key(uri: str) -> str:
    """A tracking URI as the sweep file records it: without a user or password (those stay in the environment)."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def sweep_identity(space: SearchSpace, tile_table: str) -> dict[str, str]:
    """Hashes of what a sweep computes: the search space after every override (not its stage-2 settings,
    which run after the trials, nor its default ``data``, which the data hash covers), the tile table's
    content (``tracking.dataset_hash``) and the package's source (``tracking.code_version``)."""
    from histoweak import tracking

    raw = _to_raw(space)
    for key in ("stage2", "data"):
        raw.pop(key, None)
    return {"space": _digest(raw)[:12], "data": tracking.dataset_hash(tile_table), "code": tracking.code_version()}


def plan_sweep(space: SearchSpace, tile_table: str, storage: str | Path, restart: bool = False) -> SweepPlan:
    """Decide, without running anything, whether ``space`` on ``tile_table`` resumes a sweep under ``storage``.

    The sweep's directory is keyed by its identity, so only the same search space on the same data with
    the same code resumes; anything else is a new sweep, and the message says what differs from the
    newest earlier sweep of that name.
    """
    from ray import tune

    if _storage.is_remote(tile_table):
        _storage.check_location(tile_table)  # it is recorded in the sweep file and in MLflow
    storage = _storage.resolve(storage)
    identity = sweep_identity(space, tile_table)
    directory = _storage.join(storage, f"{space.name}-{_digest(identity)[:10]}")
    name = _storage.name(directory)
    exists = tune.Tuner.can_restore(str(directory))
    if exists and not restart:
        return SweepPlan(directory, identity, True, False,
                         f"resuming sweep {name} (same search space, data and code; "
                         f"--restart starts it afresh): {directory}")
    if exists:
        return SweepPlan(directory, identity, False, True, f"--restart: starting sweep {name} afresh")
    earlier = []
    for d in _storage.list_dir(storage):
        if not d.is_file and d.base_name.startswith(f"{space.name}-") and d.base_name != name:
            f = _storage.join(storage, d.base_name, _SWEEP_FILE)
            try:
                saved = json.loads(_storage.read_text(f))
                if saved.get("name") == space.name:
                    earlier.append((_storage.mtime(f), d.base_name, saved.get("identity", {})))
            except (OSError, ValueError):
                continue
    message = f"new sweep {name}"
    if earlier:
        _, name, old = max(earlier)
        differs = [_IDENTITY_NAMES[k] for k in identity if old.get(k) != identity[k]]
        message += f" (not resuming {name}: its {' and '.join(differs)} differ{'s' if len(differs) == 1 else ''})"
    return SweepPlan(directory, identity, False, False, message)


def n_trials(space: SearchSpace) -> int:
    """Trials the sweep runs: ``num_samples`` times every combination of its grids."""
    n = space.num_samples
    for dist in space.params.values():
        if "grid" in dist:
            n *= len(dist["grid"])
    return n


def check_sweep_data(space: SearchSpace, tile_table: str, n_classes: int) -> SearchSpace:
    """The space with its swept values checked against the data by the method (``Method.check_sweep``: e.g.
    GERNE's beta bound), before any trial; raises ``ValueError`` on values no trial could run."""
    from histoweak.train import run_info

    def run_for(train: dict) -> RunInfo:
        values = {**space.train, **{k: v for k, v in train.items() if v is not None}}
        return run_info(TrainConfig.from_dict({**values, "method": space.method, "hparams": dict(space.hparams)}),
                        tile_table, n_classes)

    fixed = {**_flat(space.train, "train."), **_flat(space.hparams, "hparams.")}
    params = METHODS[space.method].check_sweep(fixed, dict(space.params), run_for)
    return space if params == space.params else space.with_params(params)


def run_sweep(space: SearchSpace, tile_table: str, n_classes: int, storage: str | Path | None = None,
              progress: bool = True, stage2: bool = False, restart: bool = False, verbose: bool = False,
              data_params: dict[str, Any] | None = None) -> list[dict]:
    """Run (or resume) the sweep; returns the leaderboard rows, best first, and logs it to MLflow.

    It resumes only the sweep with the same identity (``plan_sweep``); ``restart`` discards that sweep's
    Ray results and runs it again. A resumed sweep recorded in another MLflow store (a changed
    ``MLFLOW_TRACKING_URI``, a deleted ``mlruns.db``) is recorded anew in this one, its finished trials
    copied from Ray Tune's own records. ``progress``: one bar for the sweep and one per running trial;
    ``verbose``: Ray Tune's own status tables instead. ``data_params`` (e.g. ``{"data.shortcut": 0.8}``, the knobs of
    a synthetic dataset) are logged on the sweep's run, where ``histoweak report --heatmap`` reads them.
    """
    import ray
    from ray import tune

    from histoweak import figures, tracking

    storage = _storage.cache_dir("ray_results") if storage is None else storage
    if (stage2 or space.before) and _storage.is_remote(storage):
        step = "--stage2" if stage2 else "a search space with a `before:` section"
        raise ValueError(f"{step} with --storage {storage}: the method's steps around the trials write their tables "
                         "(PSCL's pseudo-labels, USegMix's synthetic tiles) beside the sweep's directory, which must be "
                         "local for now; use a local or shared-filesystem --storage")
    from histoweak.train import check_table

    check_table(METHODS[space.method], tile_table)  # a slide table for whole-slide methods, tiles for the others
    space = check_sweep_data(space, str(tile_table), n_classes)
    uri = tracking.tracking_uri()
    store = _store_key(uri)
    plan = plan_sweep(space, tile_table, storage, restart)
    sweep_dir = plan.directory
    sweep_file = _storage.join(sweep_dir, _SWEEP_FILE)
    print(f"histoweak: {plan.message}")
    if plan.restart:
        _storage.remove_tree(sweep_dir)
    tags = {"method": space.method, "dataset": str(tile_table), "dataset_hash": plan.identity["data"],
            "code_version": plan.identity["code"], "space_hash": plan.identity["space"],
            "git_commit": tracking.git_commit(Path(__file__).parent), "sweep": space.name,
            "sweep_dir": str(sweep_dir)}
    state = {}
    if plan.resume and _storage.exists(sweep_file):
        state = json.loads(_storage.read_text(sweep_file))
    runs = state.get("runs", {})  # tracking store -> the sweep's run there
    copied_from = None
    if plan.resume and tracking.run_in_store(runs.get(store), uri):
        parent_id = runs[store]
        tracking.reopen_run(parent_id, uri)
    else:
        if plan.resume:
            earlier = [u for u in runs if u != store] + (
                [f"{store} (run {runs[store]}, since deleted)"] if store in runs else [])
            copied_from = ", ".join(earlier) or "an earlier store"
            print(f"histoweak: this sweep was recorded in {copied_from}, not in {uri}: recording it there, its "
                  "finished trials copied from Ray Tune's records (their figures stay where they were)")
        parent_id = tracking.parent_run(space.name, f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                        {"search_space": space.source, "metric": space.metric, "mode": space.mode,
                                         "num_samples": space.num_samples, **_flat(space.train, "train."),
                                         **_flat(space.hparams, "hparams."),
                                         **{f"space.{k}": v for k, v in space.params.items()}, **(data_params or {})},
                                        {**tags, **({"copied_from_store": copied_from} if copied_from else {})}, uri)
        _storage.write_text(sweep_file, json.dumps(
            {"name": space.name, "identity": plan.identity, "runs": {**runs, store: parent_id},
             "search_space": space.source, "tile_table": str(tile_table)}, indent=2))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    concurrency = space.max_concurrent_trials or (max(gpus, 1) if gpus else max(1, cpus // 2))
    scheduler = None
    if space.scheduler["type"] == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=space.scheduler.get("grace_period", 1),
                                  reduction_factor=space.scheduler.get("reduction_factor", 2),
                                  # epochs, then the final report; a smaller max_t stops every trial there
                                  max_t=space.scheduler.get("max_t", int(space.train.get("epochs", TrainConfig.epochs)) + 1))
    if not plan.resume or copied_from:
        _log_sweep_figures(space, tile_table, n_classes, parent_id, uri)
    if space.before:
        space = run_before(space, str(tile_table), n_classes, Path(_storage.parent(sweep_dir)) / "derived",
                           parent_id, uri)
    ctx = {"space": {**_to_raw(space), "source": space.source}, "tile_table": str(tile_table), "n_classes": n_classes,
           "cpu_share": None if gpus else cpus / concurrency,
           "gpu_share": gpus / concurrency if gpus else None,  # k trials at once: each plans with 1/k of the GPUs
           "storage": str(sweep_dir), "tracking_uri": uri, "parent_run_id": parent_id, "tags": tags,
           "class_names": class_names_of(str(tile_table))}
    # The trial function only drives Ray Train (whose workers hold the real resources): a token CPU share.
    trainable = tune.with_resources(tune.with_parameters(trial, ctx=ctx), {"cpu": 0.01})
    param_space = {k: _tune_domain(v) for k, v in space.params.items()}
    from histoweak._tune_progress import SweepProgress

    callbacks = [SweepProgress(space, n_trials(space))] if progress and not verbose else []
    status = "FAILED"
    try:
        if plan.resume:
            tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_errored=True,
                                       param_space=param_space)
        else:
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(metric=space.metric,  # every epoch reports it; best_* only at the end
                                            mode=space.mode, num_samples=space.num_samples, scheduler=scheduler,
                                            max_concurrent_trials=concurrency),
                run_config=tune.RunConfig(name=_storage.name(sweep_dir), storage_path=str(_storage.parent(sweep_dir)),
                                          verbose=1 if verbose else 0, callbacks=callbacks),
            )
        grid = tuner.fit()
        if copied_from:
            _copy_trials_from_ray(grid, space, parent_id, tags, copied_from, uri)
        _score_stopped_trials(grid, space, ctx, uri)
        rows = leaderboard(grid, space)
        tracking.log_table(parent_id, rows, "leaderboard.csv", uri)
        if rows:
            best = rows[0]
            tracking.log_metrics(parent_id, {f"best_{space.metric}": best.get(f"best_{space.metric}", float("nan")),
                                             **{k: v for k, v in best.items() if k.startswith("test_")}}, uri=uri)
            swept = [f"swept.{k}" for k in space.params]
            tracking.log_figure(parent_id, figures.metric_vs_params_figure(rows, f"best_{space.metric}", swept),
                                "summary.png", uri)
            if stage2:
                run_stage2(space, best, str(tile_table), n_classes, sweep_dir, parent_id, tags, uri)
        status = "FINISHED"
        return rows
    finally:
        tracking.close_children(parent_id, uri)  # trials stopped early by the scheduler end as KILLED
        tracking.end_run(parent_id, status, uri)


def _score_stopped_trials(grid, space: SearchSpace, ctx: dict, uri: str) -> None:
    """Score on test the best checkpoint of each trial the scheduler stopped early (ASHA), which never
    reached its own test step, so every leaderboard row has test metrics.

    The best checkpoint is the kept one whose epoch has the best selection metric in the trial's
    per-epoch reports; its metrics and figures go to the trial's MLflow run (which stays KILLED) and
    into the trial's result, marked ``stopped_after_epoch``.
    """
    import ray.train

    from histoweak import tracking
    from histoweak.checkpoint import load_checkpoint
    from histoweak.methods import METHODS
    from histoweak.train import score_checkpoint

    runs = None
    for r in grid:
        m, df = r.metrics, r.metrics_dataframe
        if not m or any(k.startswith("test_") for k in m) or df is None or "epoch" not in df:
            continue
        sampled = {k: r.config.get(k) for k in space.params}
        cfg = space.trial_config(sampled)
        sel = cfg.select or METHODS[cfg.method].selection_metric
        sign = 1.0 if METHODS[cfg.method].selection_mode == "max" else -1.0
        score = {int(e): sign * v for e, v in zip(df["epoch"], df.get(sel, [])) if v == v}
        name = f"trial_{m['trial_id']}"
        trial_dir = _storage.join(ctx["storage"], "trials", name)
        fs, _ = _storage.filesystem(trial_dir)
        kept = []
        for c in _storage.list_dir(trial_dir):
            if c.is_file or not c.base_name.startswith("checkpoint_"):
                continue
            try:  # local: the directory itself; remote: a downloaded copy
                with ray.train.Checkpoint(c.path, filesystem=fs).as_directory() as d:
                    kept.append((score.get(int(load_checkpoint(d)[1]["epoch"]), -math.inf), c.path))
            except (ValueError, KeyError):
                continue
        if not kept:
            continue
        best_path = max(kept)[1]
        test, pred = score_checkpoint(ray.train.Checkpoint(best_path, filesystem=fs), ctx["tile_table"],
                                      ctx["n_classes"], "test")
        runs = runs if runs is not None else tracking.child_runs(ctx["parent_run_id"], uri)
        run_id = runs.get(name)
        if run_id:
            tracking.log_metrics(run_id, test, step=cfg.epochs, uri=uri)
            _log_test_figures(run_id, uri, pred, cfg, ctx["tile_table"], ctx["n_classes"], ctx.get("class_names"))
            tracking.end_run(run_id, "KILLED", uri)  # stopped by the scheduler (its trial may have ended it FAILED)
        m.update({**test, "stopped_after_epoch": int(df["epoch"].max()),
                  "best_checkpoint": _storage.uri_of(fs, best_path),
                  "mlflow_run_id": run_id})


def _copy_trials_from_ray(grid, space: SearchSpace, parent_id: str, tags: dict, copied_from: str, uri: str) -> None:
    """Record, under ``parent_id``, the trials that finished before the store changed (Tune did not rerun them).

    Their parameters, per-epoch metrics and final metrics come from Ray Tune's records (``progress.csv``);
    their figures stayed in the old store. Each result's ``mlflow_run_id`` is pointed at the new run.
    """
    import pandas as pd

    from histoweak import tracking

    client_children = tracking.child_runs(parent_id, uri)
    for r in grid:
        m = r.metrics or {}
        name = f"trial_{m['trial_id']}" if "trial_id" in m else Path(str(r.path)).name
        if name in client_children or r.metrics_dataframe is None:
            continue
        sampled = {k: r.config.get(k) for k in space.params}
        cfg = space.trial_config(sampled)
        run_id = tracking.child_run(parent_id, name, {**_flat(dataclasses.asdict(cfg)),
                                                      **{f"swept.{k}": v for k, v in sampled.items()}},
                                    {**tags, "copied_from_store": copied_from}, uri)
        for _, row in r.metrics_dataframe.iterrows():
            values = {k: v for k, v in row.items() if not k.startswith(("config/", "timestamp", "time_", "pid"))
                      and not isinstance(v, str) and pd.notna(v)}
            if isinstance(row.get("mlflow_run_id"), str):  # the trial's final report: its test metrics
                tracking.log_metrics(run_id, {k: v for k, v in values.items() if k.startswith(("test_", "best_"))},
                                     step=cfg.epochs, uri=uri)
            else:  # one report per epoch
                tracking.log_metrics(run_id, values, step=int(row.get("epoch", 0)), uri=uri)
        finished = f"best_{space.metric}" in m
        tracking.end_run(run_id, "FINISHED" if finished else "KILLED", uri)
        m["mlflow_run_id"] = run_id


def _sweep_context(space: SearchSpace, tile_table: str, n_classes: int, directory: Path, settings: dict,
                   parent_id: str, uri: str, train=None):
    """What a method's step before or after the trials gets from the sweep (``methods.base.SweepContext``)."""
    import matplotlib.pyplot as plt

    from histoweak import tracking
    from histoweak.data.streaming import derive_table
    from histoweak.methods.base import SweepContext

    def log_figures(figs: dict) -> None:
        for name, fig in figs.items():
            tracking.log_figure(parent_id, fig, name, uri)
            plt.close(fig)

    return SweepContext(name=space.name, tile_table=str(tile_table), n_classes=n_classes, directory=Path(directory),
                        settings=dict(settings), class_names=class_names_of(str(tile_table)), train=train,
                        log_metrics=lambda m: tracking.log_metrics(parent_id, m, uri=uri), map_table=derive_table,
                        log_figures=log_figures, log_artifact=lambda path: tracking.log_artifact(parent_id, path, uri))


def run_before(space: SearchSpace, tile_table: str, n_classes: int, directory: Path, parent_id: str,
               uri: str) -> SearchSpace:
    """The method's step before the trials (``Method.before_sweep``, e.g. USegMix's synthesis); returns the space
    with the hyperparameters it fixes for every trial (e.g. the derived table's path)."""
    from histoweak import tracking

    fixed = METHODS[space.method].before_sweep(dict(space.hparams), _sweep_context(
        space, tile_table, n_classes, directory, space.before, parent_id, uri))
    if fixed:
        tracking.log_params(parent_id, {f"before.{k}": v for k, v in fixed.items()}, uri)
    return dataclasses.replace(space, hparams={**space.hparams, **fixed})


def run_stage2(space: SearchSpace, best: dict, tile_table: str, n_classes: int, sweep_dir: Path, parent_id: str,
               tags: dict, uri: str) -> dict[str, float]:
    """The method's second stage (``Method.stage2``) from the sweep's best trial, its runs nested in the sweep's."""
    from histoweak import tracking

    def train(name: str, values: dict, table: str, params: dict | None = None):
        from histoweak.train import MlflowMetricsCallback, fit

        cfg = TrainConfig.from_dict({**values, "name": f"{space.name}-{name}", "storage_path": str(sweep_dir / name)})
        run_id = tracking.child_run(parent_id, name, {**_flat(dataclasses.asdict(cfg)), **(params or {})}, tags, uri)
        status = "FAILED"
        try:
            out = fit(cfg, table, n_classes, callbacks=[MlflowMetricsCallback(run_id, uri)])
            tracking.log_metrics(run_id, out.test, step=cfg.epochs, uri=uri)
            tracking.set_tags(run_id, {"best_checkpoint": out.checkpoint or ""}, uri)
            _log_test_figures(run_id, uri, out.test_predictions, cfg, table, n_classes, class_names_of(tile_table))
            status = "FINISHED"
            return out
        finally:
            tracking.end_run(run_id, status, uri)

    ctx = _sweep_context(space, tile_table, n_classes, sweep_dir, space.stage2, parent_id, uri, train)
    return METHODS[space.method].stage2(best, ctx)


def leaderboard(grid, space: SearchSpace) -> list[dict]:
    """One row per trial that reported its final metrics, best first by ``best_<metric>``; NaN scores last."""
    key = f"best_{space.metric}"
    rows = []
    for r in grid:
        m = r.metrics or {}
        if key not in m:
            continue
        row = {"trial": f"trial_{m['trial_id']}" if "trial_id" in m else Path(str(r.path)).name,
               **{f"swept.{k}": r.config.get(k) for k in space.params},
               key: m[key], **{k: v for k, v in m.items() if k.startswith("test_")},
               "loop_seconds": m.get("loop_seconds"), "stopped_after_epoch": m.get("stopped_after_epoch"),
               "diverged": m.get("diverged"),
               "mlflow_run_id": m.get("mlflow_run_id"),
               "best_checkpoint": m.get("best_checkpoint")}
        rows.append(row)
    sign = -1.0 if space.mode == "max" else 1.0
    rows.sort(key=lambda r: (math.isnan(r[key]), sign * r[key] if not math.isnan(r[key]) else 0.0))
    return rows
