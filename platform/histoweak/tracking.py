"""MLflow: where runs go, parent/child (nested) runs, metrics and artifacts (the only module that knows MLflow).

Default store: SQLite in the project (``sqlite:///<cwd>/mlruns.db``) with
artifacts in ``<cwd>/mlartifacts``; ``MLFLOW_TRACKING_URI`` overrides it
(e.g. ``http://127.0.0.1:5000`` for an ``mlflow server``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["child_run", "close_children", "code_version", "dataset_hash", "end_run", "git_commit", "log_artifact", "log_figure", "log_metrics", "log_params", "log_table",
           "child_runs", "latest_sweep", "parent_run", "reopen_run", "run_in_store", "run_tag", "runs_page_url", "set_tags", "source_tags",
           "tracking_uri"]


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else SQLite in the current directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlruns.db'}"


_OPENED: set[str] = set()  # the SQLite stores this process has opened (created if new) under the lock


def _client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    if not uri.startswith("sqlite:///") or uri in _OPENED:
        return MlflowClient(tracking_uri=uri)
    # Two jobs that create the same new SQLite store at once (two terminals, one project directory) race in
    # MLflow's schema migration, and one dies ("Online migration expected to match one row", "table … already
    # exists"): a process's first client of a store is made holding a lock on the store's folder (the client
    # opens the store, creating and migrating a new one), so one job creates it and the other finds it made.
    import fcntl

    folder = Path(uri[len("sqlite:///"):]).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    finally:
        os.close(fd)  # releases the lock
    _OPENED.add(uri)
    return client


#: The experiment tag MLflow's UI keeps an experiment's kind in, and our kind: model training (runs,
#: metrics, artifacts; "Machine learning" in the UI), not a GenAI app ("genai_development": traces, sessions).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def _experiment_id(client, name: str, uri: str) -> str:
    """Id of experiment ``name``, created if missing, tagged as model training (``EXPERIMENT_KIND``)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made before we tagged; a kind chosen in the UI stays
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in the cwd of whoever logs
        artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifacts, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # noqa: BLE001 — created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def git_commit(path: str | Path = ".") -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dataset_hash(tile_table: str | Path) -> str:
    """Short hash of what a tile table holds: its ``_manifest.json`` (slides, parameters, classes) and the
    relative path and size of every Parquet file, so a re-tiled, edited or partly deleted table hashes
    differently. Local paths and any pyarrow URI (``s3://…``); ``"unknown"`` when nothing is there."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(str(tile_table))
    except (ValueError, TypeError):  # not a URI (pyarrow.ArrowInvalid is a ValueError): a local path
        fs, root = pafs.LocalFileSystem(), str(Path(tile_table).resolve())
    root = root.rstrip("/")
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError:
        return "unknown"
    files = sorted((i.path[len(root) + 1:], i.size) for i in infos
                   if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    key: dict[str, Any] = {"files": files}
    if any(i.path == f"{root}/_manifest.json" for i in infos):
        with fs.open_input_stream(f"{root}/_manifest.json") as f:
            data = json.loads(f.read())
        key.update({k: data.get(k) for k in ("params", "classes", "source", "counts", "pseudo_labels")})
        key["slides"] = sorted((s, e.get("status"), e.get("n_tiles")) for s, e in data.get("slides", {}).items())
    elif not files:
        return "unknown"
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def code_version(root: str | Path | None = None) -> str:
    """Short hash of the ``histoweak`` package's source files (default: the imported package's); works
    without git, e.g. in the copy of the working directory that ``ray job submit`` ships."""
    root = Path(root or Path(__file__).resolve().parent)
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def _params(flat: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in sorted(flat.items())]


def parent_run(experiment: str, name: str, params: dict[str, Any], tags: dict[str, str], uri: str | None = None) -> str:
    """Create the sweep's run; returns its id.

    Call it in the driver: the run's source (``source_tags``) is this process's, unless ``tags`` sets it.
    """
    uri = uri or tracking_uri()
    client = _client(uri)
    run = client.create_run(_experiment_id(client, experiment, uri), run_name=name,
                            tags=_with_source(tags, source_tags()))
    client.log_batch(run.info.run_id, params=_params(params))
    return run.info.run_id


def child_run(parent_id: str, name: str, params: dict[str, Any], tags: dict[str, str], uri: str | None = None) -> str:
    """Create a run nested under ``parent_id`` (tag ``mlflow.parentRunId``); returns its id.

    The run's source is its parent's (the driver's script, not the Ray worker this may run in), unless
    ``tags`` sets it.
    """
    client = _client(uri)
    parent = client.get_run(parent_id)
    run = client.create_run(parent.info.experiment_id, run_name=name,
                            tags=_with_source({**tags, "mlflow.parentRunId": parent_id}, parent.data.tags))
    client.log_batch(run.info.run_id, params=_params(params))
    return run.info.run_id


def source_tags() -> dict[str, str]:
    """Where this process's runs come from, as ``mlflow.start_run`` tags them (MLflow's run-context
    providers): ``mlflow.user``, ``mlflow.source.name`` (the script, ``sys.argv[0]``, here resolved to an
    absolute path), ``mlflow.source.type`` (``JOB`` for the driver of a ``ray job submit``, else ``LOCAL``)
    and, in a git checkout, ``mlflow.source.git.*``. The UI's Source and Version columns show them.

    Meaningful in the driver only: in a Ray Tune trial ``sys.argv`` is Ray's worker.
    """
    import sys

    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

    tags = resolve_tags()
    main = sys.argv[0] if sys.argv else ""
    if main and Path(main).is_file():
        tags[MLFLOW_SOURCE_NAME] = str(Path(main).resolve())
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # set by Ray's job supervisor for a submitted job's driver
        tags[MLFLOW_SOURCE_TYPE] = "JOB"
    return tags


def _with_source(tags: dict[str, str], source: dict[str, str]) -> dict[str, str]:
    """``tags`` plus the run-source tags of ``source`` (user, source name and type, git) it does not set."""
    return {**{k: v for k, v in source.items() if k == "mlflow.user" or k.startswith("mlflow.source.")}, **tags}


def runs_page_url(experiment: str, uri: str | None = None) -> str:
    """Link to the MLflow UI's runs table of ``experiment`` (for a local store: as served by ``mlflow ui``).

    MLflow 3.17's UI shows an experiment in the kind of its sidebar switch (GenAI or Machine learning,
    GenAI by default, remembered per browser), not by the ``mlflow.experimentKind`` tag; the link's
    ``workflowType=machine_learning`` opens the runs table with the sweep and its nested trials.
    """
    uri = uri or tracking_uri()
    exp = _client(uri).get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment {experiment!r} in {uri}")
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"


def log_metrics(run_id: str, metrics: dict[str, Any], step: int | None = None, uri: str | None = None) -> None:
    import math
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    vals = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    if vals:
        _client(uri).log_batch(run_id, metrics=vals)


def log_params(run_id: str, params: dict[str, Any], uri: str | None = None) -> None:
    _client(uri).log_batch(run_id, params=_params(params))


def run_tag(run_id: str, key: str, uri: str | None = None) -> tuple[str, str | None]:
    """(the run's name, its tag ``key`` or None); ``ValueError`` naming the store when there is no such run."""
    from mlflow.exceptions import MlflowException

    try:
        run = _client(uri).get_run(run_id)
    except MlflowException:
        raise ValueError(f"no MLflow run {run_id} in {uri or tracking_uri()}") from None
    return run.info.run_name, run.data.tags.get(key)


def set_tags(run_id: str, tags: dict[str, str], uri: str | None = None) -> None:
    client = _client(uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v))


def log_figure(run_id: str, figure, name: str, uri: str | None = None) -> None:
    _client(uri).log_figure(run_id, figure, name)


def log_artifact(run_id: str, path: str | Path, uri: str | None = None) -> None:
    _client(uri).log_artifact(run_id, str(path))


def log_table(run_id: str, rows: list[dict], name: str, uri: str | None = None) -> None:
    """Write ``rows`` as CSV and attach it to the run."""
    from histoweak.report import write_csv

    with tempfile.TemporaryDirectory() as d:
        _client(uri).log_artifact(run_id, str(write_csv(rows, Path(d) / name)))


def reopen_run(run_id: str, uri: str | None = None) -> None:
    """Mark a run RUNNING again (a resumed sweep goes on logging into its original run)."""
    _client(uri).update_run(run_id, status="RUNNING")


def close_children(parent_id: str, uri: str | None = None) -> None:
    """Mark the parent's child runs still RUNNING (their trial process was stopped) as KILLED."""
    client = _client(uri)
    parent = client.get_run(parent_id)
    for run in client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'"):
        client.set_terminated(run.info.run_id, status="KILLED")


def latest_sweep(experiment: str | None = None, uri: str | None = None) -> tuple[Any, list[Any]]:
    """The newest sweep (parent run) of ``experiment`` (default: the newest experiment with one) and its trials."""
    client = _client(uri)
    exps = [client.get_experiment_by_name(experiment)] if experiment else client.search_experiments(
        order_by=["creation_time DESC"])
    if experiment and exps[0] is None:
        names = [e.name for e in client.search_experiments()]
        raise ValueError(f"no MLflow experiment {experiment!r} in {uri or tracking_uri()}; have {names}")
    for exp in exps:
        parents = [r for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
                   if "mlflow.parentRunId" not in r.data.tags and "sweep" in r.data.tags]
        if parents:
            parent = parents[0]
            children = client.search_runs([exp.experiment_id],
                                          filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
            return parent, children
    raise ValueError(f"no sweep found in {uri or tracking_uri()}" + (f" experiment {experiment!r}" if experiment else ""))


def end_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    _client(uri).set_terminated(run_id, status=status)


def run_in_store(run_id: str | None, uri: str | None = None) -> bool:
    """Whether ``run_id`` is a run of the store at ``uri`` (False after the store was changed or deleted)."""
    if not run_id:
        return False
    from mlflow.exceptions import MlflowException

    try:
        _client(uri).get_run(run_id)
        return True
    except MlflowException:
        return False


def child_runs(parent_id: str, uri: str | None = None) -> dict[str, str]:
    """The runs nested under ``parent_id``: name -> run id."""
    client = _client(uri)
    parent = client.get_run(parent_id)
    return {r.info.run_name: r.info.run_id for r in client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")}
