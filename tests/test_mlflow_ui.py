"""What the MLflow UI shows of a sweep, read through the REST endpoints the UI itself calls.

The UI is a JavaScript app over ``/ajax-api/2.0/mlflow/...`` (and the same ``/api/2.0/...`` routes); what
it can show is what these return: the experiment's kind tag, the runs table (one sweep run, its trials
nested by ``mlflow.parentRunId``, their Source column) and each run's artifacts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tags(entity: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in entity.get("tags", [])}


def test_experiments_are_model_training_and_trials_show_the_drivers_source(tmp_path, monkeypatch):
    """``parent_run`` tags a new or untagged experiment and records this process's script; ``child_run``,
    called from a process with another argv (a Ray worker), shows the parent's."""
    from mlflow.tracking import MlflowClient

    from histoweak import tracking

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    client.create_experiment("made-before")  # no kind tag yet
    client.create_experiment("chosen-in-ui", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    script = tmp_path / "jobs" / "sweep.py"
    script.parent.mkdir()
    script.write_text("")
    monkeypatch.setattr(sys, "argv", [str(script), "--smoke-test"])
    parents = {name: tracking.parent_run(name, "sweep", {}, {"sweep": name}, uri)
               for name in ("new", "made-before", "chosen-in-ui")}
    monkeypatch.setattr(sys, "argv", ["/venv/lib/python3.11/site-packages/ray/_private/workers/default_worker.py"])
    child = client.get_run(tracking.child_run(parents["new"], "trial_0", {}, {"method": "pscl"}, uri))

    kinds = {name: client.get_experiment_by_name(name).tags.get(tracking.EXPERIMENT_KIND_TAG) for name in parents}
    assert kinds == {"new": "custom_model_development", "made-before": "custom_model_development",
                     "chosen-in-ui": "genai_development"}
    assert child.data.tags["mlflow.source.name"] == str(script.resolve())
    assert child.data.tags["mlflow.source.type"] == "LOCAL"
    assert child.data.tags["mlflow.user"] == client.get_run(parents["new"]).data.tags["mlflow.user"]
    assert child.data.tags["mlflow.parentRunId"] == parents["new"] and child.data.tags["method"] == "pscl"
    exp_id = client.get_experiment_by_name("new").experiment_id
    assert tracking.runs_page_url("new", uri) == (
        f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning")


@pytest.mark.cluster
@pytest.mark.slow  # 1.5 min; the stage-2 hook runs in the default suite through `ray job submit` (test_loopback)
def test_pscl_sweep_with_stage2_as_the_ui_sees_it(tile_table, ray_local, mlflow_server, tmp_path):
    """``jobs/tune_pscl.py --smoke-test --stage2`` against a real ``mlflow server``, then the UI's REST calls."""
    import requests

    from histoweak import tracking

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server,
           # the test session's Ray, as a cluster's driver joins its cluster: one Ray on this machine, not two
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    cmd = [sys.executable, str(REPO / "jobs" / "tune_pscl.py"), "--smoke-test", "--stage2", "--no-progress",
           "--set", "hparams.lam=0.1",  # one trial, not the lambda grid's two: the smallest real sweep
           "--data", str(tile_table), "--storage", str(tmp_path / "ray_results")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    print(f"sweep with stage 2: {time.perf_counter() - t0:.0f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    api = f"{mlflow_server}/ajax-api/2.0/mlflow"  # the UI's prefix; /api/2.0/mlflow serves the same

    def get(path: str, **params) -> dict:
        r = requests.get(f"{api}/{path}", params=params, timeout=30)
        r.raise_for_status()
        return r.json()

    exp = get("experiments/get-by-name", experiment_name="pscl")["experiment"]
    assert _tags(exp)["mlflow.experimentKind"] == "custom_model_development"  # "Machine learning", not GenAI
    r = requests.post(f"{api}/runs/search", json={"experiment_ids": [exp["experiment_id"]], "max_results": 1000},
                      timeout=30)
    r.raise_for_status()
    runs = r.json()["runs"]

    top = [run for run in runs if "mlflow.parentRunId" not in _tags(run["data"])]
    assert len(top) == 1, [run["info"]["run_name"] for run in top]  # the sweep; everything else nested under it
    assert _tags(top[0]["data"])["sweep"] == "pscl"
    sweep_id = top[0]["info"]["run_id"]
    children = {run["info"]["run_name"]: run for run in runs if run is not top[0]}
    assert all(_tags(run["data"])["mlflow.parentRunId"] == sweep_id for run in children.values())
    trials = [name for name in children if name.startswith("trial_")]
    assert len(trials) == 1 and set(children) == {*trials, "stage2"}
    for run in runs:
        tags = _tags(run["data"])
        assert run["info"]["status"] == "FINISHED", run["info"]["run_name"]
        assert tags["mlflow.source.name"] == str(REPO / "jobs" / "tune_pscl.py"), run["info"]["run_name"]
        assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"]

    def artifacts(name: str) -> set[str]:
        return {f["path"] for f in get("artifacts/list", run_id=children[name]["info"]["run_id"]).get("files", [])}

    for name in trials:
        assert "test_cam_overlays.png" in artifacts(name)
    assert "test_stage2_predictions.png" in artifacts("stage2")
    png = requests.get(f"{mlflow_server}/get-artifact", timeout=30,  # what the UI's artifact viewer loads
                       params={"path": "test_stage2_predictions.png", "run_uuid": children["stage2"]["info"]["run_id"]})
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n" and len(png.content) > 20_000

    assert tracking.runs_page_url("pscl", mlflow_server) == (
        f"{mlflow_server}/#/experiments/{exp['experiment_id']}/runs?workflowType=machine_learning")
