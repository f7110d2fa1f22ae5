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

__all__ = ["child_run", "close_children", "dataset_hash", "end_run", "git_commit", "log_figure", "log_metrics", "log_table",
           "latest_sweep", "parent_run", "reopen_run", "tracking_uri"]


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else SQLite in the current directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlruns.db'}"


def _client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or tracking_uri())


def _experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in the cwd of whoever logs
        artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except Exception:  # noqa: BLE001 — created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def git_commit(path: str | Path = ".") -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dataset_hash(tile_table: str | Path) -> str:
    """Short hash of the tile table's ``_manifest.json`` (which slides, which parameters)."""
    m = Path(tile_table) / "_manifest.json"
    if not m.exists():
        return "unknown"
    data = json.loads(m.read_text())
    key = {k: data.get(k) for k in ("params", "classes", "source", "counts")}
    key["slides"] = sorted((s, e.get("status"), e.get("n_tiles")) for s, e in data.get("slides", {}).items())
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _params(flat: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in sorted(flat.items())]


def parent_run(experiment: str, name: str, params: dict[str, Any], tags: dict[str, str], uri: str | None = None) -> str:
    """Create the sweep's run; returns its id."""
    uri = uri or tracking_uri()
    client = _client(uri)
    run = client.create_run(_experiment_id(client, experiment, uri), run_name=name, tags=tags)
    client.log_batch(run.info.run_id, params=_params(params))
    return run.info.run_id


def child_run(parent_id: str, name: str, params: dict[str, Any], tags: dict[str, str], uri: str | None = None) -> str:
    """Create a run nested under ``parent_id`` (tag ``mlflow.parentRunId``); returns its id."""
    client = _client(uri)
    parent = client.get_run(parent_id)
    run = client.create_run(parent.info.experiment_id, run_name=name,
                            tags={**tags, "mlflow.parentRunId": parent_id})
    client.log_batch(run.info.run_id, params=_params(params))
    return run.info.run_id


def log_metrics(run_id: str, metrics: dict[str, Any], step: int | None = None, uri: str | None = None) -> None:
    import math
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    vals = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    if vals:
        _client(uri).log_batch(run_id, metrics=vals)


def log_figure(run_id: str, figure, name: str, uri: str | None = None) -> None:
    _client(uri).log_figure(run_id, figure, name)


def log_table(run_id: str, rows: list[dict], name: str, uri: str | None = None) -> None:
    """Write ``rows`` as CSV and attach it to the run."""
    import csv

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        _client(uri).log_artifact(run_id, str(path))


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
