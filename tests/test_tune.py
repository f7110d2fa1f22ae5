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
    ({"method": "nope"}, r"'method': unknown 'nope'; valid: \['attention_mil', 'ddpm', 'erm'"),
    ({"before": {"count": 3}}, r"'before': method 'erm' has no step before the trials"),
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
    from histoweak.data.defaults import PATCH_PRESETS
    from histoweak.data.synthetic import PRESETS
    from histoweak.tune import n_trials

    paths = sorted((REPO / "search_spaces").glob("*.yaml"))
    assert {p.stem for p in paths} >= {"erm", "gerne", "gerne-erm", "pscl", "segcls", "usegmix", "inpainter"}
    names = []
    for path in paths:
        space = load_search_space(path)  # validates every key and builds a TrainConfig from its settings
        smoke = space.with_overrides(space.smoke)
        assert n_trials(smoke) <= n_trials(space), path  # the smoke test is the small one
        if space.data:  # an embedded dataset must exist
            assert space.data.startswith("synthetic:") and space.data.split(":", 1)[1] in {*PRESETS, *PATCH_PRESETS}, path
        names.append(space.name)
    assert len(names) == len(set(names)), names  # one MLflow experiment per sweep


@pytest.mark.slow  # its checks are covered by test_mlflow_ui (REST), test_sweep_identity and test_cli
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


@pytest.mark.slow  # 3.5 min; the default suite resumes a sweep in test_sweep_identity (the same Tuner.restore path)
def test_interrupted_sweep_resumes_into_the_same_mlflow_run(tile_table, tmp_path):
    """Ctrl-C a 3-trial sweep after its first trial, rerun the same command: it resumes and finishes."""
    import signal

    from mlflow.tracking import MlflowClient

    hold = tmp_path / "hold"  # the second trial waits here until released: interrupted while surely running
    hold.mkdir()
    space = _write(tmp_path, name="erm-resume", num_samples=3, scheduler={"type": "fifo"}, max_concurrent_trials=1,
                   train={"epochs": 1, "steps_per_epoch": 2, "batch_size": 8, "target": "class:1",
                          "worker_env": {"HISTOWEAK_HOLD_DIR": str(hold)}})
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
        if len(list(hold.glob("started-*"))) >= 2 and len(finished_children(client)[1]) >= 1:
            break
        time.sleep(1)
    assert first.poll() is None and len(list(hold.glob("started-*"))) == 2, first.stdout.read()[-3000:]
    first.send_signal(signal.SIGINT)
    try:
        first.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert len(finished_children(client)[1]) == 1

    (hold / "release").touch()
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


@pytest.mark.slow  # 71 s on 2 cores: `make test-all` (room for USegMix's job in `make test`)
def test_asha_stopped_trials_end_killed_and_are_scored_on_test(tile_table, ray_local, tmp_path, monkeypatch):
    """The ASHA path: trials the scheduler stops end KILLED in MLflow, and their best checkpoint is still
    scored on test, so every leaderboard row has test metrics (max_t = 1 stops each after its first epoch)."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'asha.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    space = load_search_space(REPO / "search_spaces" / "erm.yaml").with_overrides(
        {"name": "erm-asha", "num_samples": 1, "scheduler": {"type": "asha", "grace_period": 1, "max_t": 1},
         "train.epochs": 2, "train.steps_per_epoch": 2, "train.batch_size": 8, "hparams.weight_decay": 0.0}
    ).with_params({"hparams.lr": {"grid": [3.0e-3, 1.0e-4]}})
    rows = run_sweep(space, str(tile_table), 5, storage=tmp_path / "rr", progress=False)
    assert len(rows) == 2
    client = MlflowClient(store)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("erm-asha").experiment_id])}
    for row in rows:
        assert row["stopped_after_epoch"] == 0 and 0.0 <= row["test_bca"] <= 1.0
        run = runs[row["trial"]]
        assert run.info.status == "KILLED"
        assert run.data.metrics["test_bca"] == pytest.approx(row["test_bca"])
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_bca")] == [0]  # one epoch ran
        assert "test_confusion_matrix.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
        ckpt = Path(row["best_checkpoint"])
        assert ckpt.is_relative_to(tmp_path / "rr") and (ckpt / "state.pt").is_file()


def test_bad_scheduler_values_fail_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"'scheduler.max_t': must be an integer >= 1"):
        load_search_space(_write(tmp_path, scheduler={"type": "asha", "max_t": 0}))
