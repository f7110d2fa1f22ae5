"""Sweeps: search-space validation, and a real sweep recorded in a real `mlflow server` on 127.0.0.1."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from histoweak.tune import load_search_space, run_sweep

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, **changes):
    raw = yaml.safe_load((REPO / "search_spaces" / "erm.yaml").read_text())
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize("change,message", [
    ({"sheduler": {"type": "asha"}}, r"'sheduler': unknown key"),
    ({"method": "nope"}, r"'method': unknown 'nope'; valid: \['erm'"),
    ({"params": {"hparams.lr": {"logunifrom": [1e-4, 1e-2]}}}, r"'params.hparams.lr': must be one of"),
    ({"params": {"hparams.lr": {"loguniform": [0, 1e-2]}}}, r"'params.hparams.lr.loguniform': bounds must be > 0"),
    ({"params": {"hparams.lrate": {"choice": [1]}}}, r"'params.hparams.lrate': must be hparams.<one of"),
    ({"train": {"epochs": 0}}, r"'epochs'"),
    ({"hparams": {"backbone": "x", "depth": 3}}, r"'hparams.depth': unknown"),
    ({"metric": "test_bca"}, r"'metric': must be a validation metric"),
    ({"num_samples": 0}, r"'num_samples'"),
    ({"scheduler": {"type": "asha", "grace": 1}}, r"'scheduler.grace': unknown"),
])
def test_bad_search_space_is_rejected_naming_the_key(tmp_path, change, message):
    with pytest.raises(ValueError, match=message) as err:
        load_search_space(_write(tmp_path, **change))
    assert "space.yaml" in str(err.value)


def test_bad_search_space_fails_the_job_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "tune_erm.py"), str(_write(tmp_path, method="nope")),
                           "--smoke-test"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "'method': unknown 'nope'" in proc.stderr
    assert not (tmp_path / ".cache").exists() and not (tmp_path / "mlruns.db").exists()


def test_shipped_search_spaces_are_valid():
    for path in (REPO / "search_spaces").glob("*.yaml"):
        space = load_search_space(path)
        space.with_overrides(space.smoke)


def test_three_trial_sweep_nested_in_mlflow_server(tile_table, ray_local, tmp_path, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    space = load_search_space(REPO / "search_spaces" / "erm.yaml").with_overrides(
        {"name": "erm-test", "num_samples": 3, "scheduler": {"type": "fifo"}, "train.epochs": 2,
         "train.steps_per_epoch": 2, "train.batch_size": 8})
    rows = run_sweep(space, str(tile_table), 5, storage=tmp_path / "rr", progress=False)
    assert len(rows) == 3
    keys = [r["best_val_bca"] for r in rows]
    assert keys == sorted(keys, reverse=True)

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("erm-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3
    assert {c.info.run_name for c in children} == {r["trial"] for r in rows}
    for c in children:
        assert c.info.status == "FINISHED"
        assert "swept.hparams.lr" in c.data.params and "swept.hparams.weight_decay" in c.data.params
        assert c.data.tags["method"] == "erm" and c.data.tags["dataset_hash"] != "unknown"
        assert len(c.data.tags["git_commit"]) == 40
        history = client.get_metric_history(c.info.run_id, "val_bca")
        assert sorted(m.step for m in history) == [0, 1]  # per-epoch metrics
        assert {"test_bca", "test_acc", "best_val_bca"} <= set(c.data.metrics)
        assert "test_confusion_matrix.png" in {a.path for a in client.list_artifacts(c.info.run_id)}
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"leaderboard.csv", "summary.png"}
    assert parent.info.status == "FINISHED" or client.get_run(parent.info.run_id).info.status == "FINISHED"

    # `histoweak report` reads the same store and prints the leaderboard
    proc = subprocess.run([sys.executable, "-m", "histoweak.cli", "report", "--experiment", "erm-test",
                           "--out", str(tmp_path / "r.png")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server})
    assert proc.returncode == 0, proc.stderr
    assert "best_val_bca" in proc.stdout and proc.stdout.count("FINISHED") == 3
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_interrupted_sweep_resumes_into_the_same_mlflow_run(tile_table, tmp_path):
    """Ctrl-C a 3-trial sweep after its first trial, rerun the same command: it resumes and finishes."""
    import signal

    from mlflow.tracking import MlflowClient

    space = _write(tmp_path, name="erm-resume", num_samples=3, scheduler={"type": "fifo"},
                   train={"epochs": 1, "steps_per_epoch": 2, "batch_size": 8, "target": "class:1"})
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    cmd = [sys.executable, str(REPO / "jobs" / "tune_erm.py"), str(space), "--data", str(tile_table), "--no-progress"]

    def finished_children(client):
        exp = client.get_experiment_by_name("erm-resume")
        if exp is None:
            return [], []
        runs = client.search_runs([exp.experiment_id])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.info.status == "FINISHED"]

    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    client = MlflowClient(store)
    deadline = time.time() + 400
    while time.time() < deadline and first.poll() is None:
        if (tmp_path / "mlruns.db").exists() and len(finished_children(client)[1]) >= 1:
            break
        time.sleep(2)
    assert first.poll() is None, "the sweep ended before it could be interrupted"
    first.send_signal(signal.SIGINT)
    try:
        first.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert len(finished_children(client)[1]) < 3

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming sweep" in again.stdout
    # the console shows the work, not Ray's internals; the leaderboard fits 100 columns
    console = again.stdout + again.stderr
    for internal in ("Execution plan of Dataset", "Reporting training result", "Trial status:", "Started a local Ray"):
        assert internal not in console, internal
    board = again.stdout[again.stdout.index("best first by"):].splitlines()[1:5]
    assert board[0].split()[:2] == ["#", "trial"] and len(board) == 4
    assert max(map(len, board)) <= 100
    parents, done = finished_children(client)
    assert len(parents) == 1  # the resumed sweep logs into its original run
    assert len(done) == 3
    assert client.get_run(parents[0].info.run_id).info.status == "FINISHED"


def test_verbose_brings_rays_logs_back(tile_table, tmp_path):
    """`histoweak train --verbose`: Ray Data's execution plans and Ray Train's reports reach the console."""
    from histoweak._ray import CONSOLE_ENV

    env = {k: v for k, v in os.environ.items() if k not in CONSOLE_ENV}  # as in a fresh shell
    proc = subprocess.run([sys.executable, "-m", "histoweak.cli", "train", "--smoke-test", "--verbose",
                           "--data", str(tile_table)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert "Execution plan of Dataset" in console and "Reporting training result" in console
    assert "best erm checkpoint" in proc.stdout
