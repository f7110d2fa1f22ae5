"""Every server the project starts listens on loopback only (Ray head with dashboard and job server, local Ray);
`ray job submit` against such a head works."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from PIL import Image

from histoweak._ray import LOOPBACK_ENV
from histoweak.local_cluster import cluster_pids

from _net import is_loopback, listening, wait_for


def _ray_pids() -> set[int]:
    pids = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ray" in cmd and ("gcs_server" in cmd or "raylet" in cmd or "dashboard" in cmd or "ray::" in cmd
                             or "default_worker" in cmd or "log_monitor" in cmd or "runtime_env" in cmd):
            pids.add(p.info["pid"])
    return pids


def test_local_ray_listens_on_loopback_only(ray_local):
    seen = listening(_ray_pids() | {os.getpid()})
    assert seen, "no Ray server found"
    assert all(is_loopback(ip) for _, ip, _ in seen), seen


def _mask(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _check_pseudo_label_table(storage: Path) -> None:
    """Stage 2 trained on a table whose train masks are stage 1's pseudo-labels and whose val/test masks
    are the source's ground truth, row for row."""
    manifests = list(storage.glob("pscl-*/pseudo_labels/_manifest.json"))
    assert len(manifests) == 1, f"one pseudo-label table expected under {storage}, found {manifests}"
    pseudo = manifests[0].parent
    provenance = json.loads(manifests[0].read_text())["pseudo_labels"]
    source = Path(provenance["source"])
    assert (Path(provenance["checkpoint"]) / "state.pt").exists(), provenance
    files = sorted(p.relative_to(source) for p in source.rglob("*.parquet"))
    assert files and sorted(p.relative_to(pseudo) for p in pseudo.rglob("*.parquet")) == files
    changed = {"train": 0, "val": 0, "test": 0}
    rows = {"train": 0, "val": 0, "test": 0}
    for rel in files:
        src, dst = pq.read_table(source / rel), pq.read_table(pseudo / rel)
        assert dst.num_rows == src.num_rows, rel
        assert dst.column("split").to_pylist() == src.column("split").to_pylist(), rel
        for split, before, after in zip(src.column("split").to_pylist(), src.column("mask").to_pylist(),
                                        dst.column("mask").to_pylist()):
            rows[split] += 1
            if split == "train":
                changed["train"] += not np.array_equal(_mask(before), _mask(after))
            else:
                changed[split] += after != before  # ground truth, byte for byte
    assert all(rows.values()), rows
    assert changed == {"train": changed["train"], "val": 0, "test": 0} and changed["train"] > 0, (changed, rows)


@pytest.mark.cluster
def test_ray_head_with_dashboard_on_loopback(tmp_path):
    """`ray start --head` as the README tells users, including the dashboard and job server."""
    # as after `. .venv/bin/activate`: the job's `python` is the head's environment's python
    bindir = os.path.dirname(sys.executable)
    # a new user's home, and no HISTOWEAK_HOME: submitted jobs choose where their results go by themselves
    home = tmp_path / "home"
    home.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "HISTOWEAK_HOME"}, **LOOPBACK_ENV, "RAY_AUTH_MODE": "token",
           "HOME": str(home), "PATH": bindir + os.pathsep + os.environ["PATH"]}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    temp, gcs = f"/tmp/hw-ray-head-{os.getpid()}", "127.0.0.1:6391"
    before = _ray_pids() | cluster_pids(temp, gcs)  # never stop what this test did not start
    cmd = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           "--port=6391", "--dashboard-port=8271", "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats",
           # distinct agent ports: the session's local Ray (other tests) holds the defaults
           "--dashboard-agent-listen-port=52466", "--dashboard-agent-grpc-port=52467", "--runtime-env-agent-port=52468",
           "--metrics-export-port=52469", "--min-worker-port=20000", "--max-worker-port=20999"]

    def head_listening():
        seen = listening(cluster_pids(temp, gcs) - before)
        # GCS, dashboard (job server) and the dashboard agent that runs submitted jobs are up
        return {6391, 8271, 52466} <= {port for _, _, port in seen}, seen

    try:
        # as README says: a new user's `ray start` with token auth needs a token first
        subprocess.run([ray_bin, "get-auth-token", "--generate"], check=True, env=env, capture_output=True, timeout=60)
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr[-3000:]
        seen = wait_for(head_listening, "the head's GCS, dashboard and agent ports listening", timeout=120)
        assert all(is_loopback(ip) for _, ip, _ in seen), seen
        # and a job submitted to it the way the README says runs to completion
        repo = Path(__file__).resolve().parents[1]

        def submitted():
            job = subprocess.run([ray_bin, "job", "submit", "--address", "http://127.0.0.1:8271", "--working-dir",
                                  str(repo), "--", "python", "jobs/tile_slides.py", "--smoke-test"],
                                 env=env, capture_output=True, text=True, timeout=300, cwd=repo)
            # the agent registers with the head shortly after its port opens
            return "No available agent" not in job.stderr + job.stdout, job

        job = wait_for(submitted, "a job accepted by the head's agent", timeout=120)
        assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
        assert "tiles from 3/3 slides" in job.stdout
        # the flagship PSCL sweep, submitted the same way, records into the MLflow store the submitter names; with
        # no --storage, what it writes (results, checkpoints, the embedded dataset) outlives the job's package copy
        store = tmp_path / "mlruns.db"
        runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}})
        submit = [ray_bin, "job", "submit", "--address", "http://127.0.0.1:8271", "--working-dir", str(repo),
                  "--runtime-env-json", runtime_env, "--", "python", "jobs/tune_pscl.py", "--smoke-test", "--stage2",
                  "--no-progress"]
        job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900, cwd=repo)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-2000:]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{store}")
        runs = client.search_runs([client.get_experiment_by_name("pscl").experiment_id])
        trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.info.run_name != "stage2"]
        assert len(trials) == 2 and {r.data.params["hparams.lam"] for r in trials} == {"0.0", "0.2"}  # baseline, PSCL
        for r in trials:
            assert r.info.status == "FINISHED" and {"val_miou", "test_miou", "test_fwiou"} <= set(r.data.metrics)
            arts = {a.path for a in client.list_artifacts(r.info.run_id)}
            assert {"test_cam_overlays.png", "test_cam_histogram.png"} <= arts
            best = Path(r.data.tags["best_checkpoint"])
            # the head's home (~/.histoweak), not Ray's session folder, which Ray deletes
            assert best.is_relative_to(home / ".histoweak" / "ray_results") and (best / "state.pt").is_file(), best
            assert not best.is_relative_to(temp)
        stage2 = [r for r in runs if r.info.run_name == "stage2"]
        assert len(stage2) == 1 and "test_miou" in stage2[0].data.metrics
        storage = home / ".histoweak" / "ray_results"
        _check_pseudo_label_table(storage)
        # the same command again resumes that sweep (same search space, data and code) instead of starting over
        again = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900, cwd=repo)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
        assert "resuming sweep" in again.stdout and "synthesizing" not in again.stdout, again.stdout[-3000:]
        # nothing the jobs started on the head listens beyond loopback either
        seen = listening(cluster_pids(temp, gcs) - before)
        assert all(is_loopback(ip) for _, ip, _ in seen), seen
    finally:
        # Not `ray stop`: it would also kill the session's local Ray that other tests use. This head's processes
        # as found now (a pid seen earlier may since belong to someone else).
        procs = []
        for p in cluster_pids(temp, gcs) - before:
            try:
                procs.append(psutil.Process(p))
            except psutil.NoSuchProcess:
                pass
        for proc in procs:
            proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=15)
        for proc in alive:
            proc.kill()
