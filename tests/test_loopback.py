"""Every server the project starts listens on loopback only (Ray head with dashboard and job server, local Ray);
`ray job submit` against such a head works."""

import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from histoweak._ray import LOOPBACK_ENV

def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _listening(pids: set[int]) -> list[tuple[int, str, int]]:
    out = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            out.append((c.pid, c.laddr.ip, c.laddr.port))
    return out


def _ray_pids(marker: str = "") -> set[int]:
    pids = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker:
            if marker in cmd:
                pids.add(p.info["pid"])
            continue
        if "ray" in cmd and ("gcs_server" in cmd or "raylet" in cmd or "dashboard" in cmd or "ray::" in cmd
                             or "default_worker" in cmd or "log_monitor" in cmd or "runtime_env" in cmd):
            pids.add(p.info["pid"])
    return pids


def test_local_ray_listens_on_loopback_only(ray_local):
    listening = _listening(_ray_pids() | {os.getpid()})
    assert listening, "no Ray server found"
    assert all(_is_loopback(ip) for _, ip, _ in listening), listening


@pytest.mark.cluster
def test_ray_head_with_dashboard_on_loopback(tmp_path):
    """`ray start --head` as the README tells users, including the dashboard and job server."""
    # as after `. .venv/bin/activate`: the job's `python` is the head's environment's python
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, **LOOPBACK_ENV, "RAY_AUTH_MODE": "token", "PATH": bindir + os.pathsep + os.environ["PATH"]}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    temp = f"/tmp/hw-ray-head-{os.getpid()}"
    before = _ray_pids()
    cmd = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           "--port=6391", "--dashboard-port=8271", "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats",
           # distinct agent ports: the session's local Ray (other tests) holds the defaults
           "--dashboard-agent-listen-port=52466", "--dashboard-agent-grpc-port=52467", "--runtime-env-agent-port=52468",
           "--metrics-export-port=52469", "--min-worker-port=20000", "--max-worker-port=20999"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    time.sleep(3)
    pids = _ray_pids(marker=temp) - before  # this head's processes only (their command lines name its temp dir)
    try:
        listening = _listening(pids)
        ports = {port for _, _, port in listening}
        assert 6391 in ports and 8271 in ports, listening  # GCS and dashboard (job server) are up
        assert all(_is_loopback(ip) for _, ip, _ in listening), listening
        # and a job submitted to it the way the README says runs to completion
        repo = Path(__file__).resolve().parents[1]
        for _ in range(20):  # the job agent comes up a few seconds after the head
            job = subprocess.run([ray_bin, "job", "submit", "--address", "http://127.0.0.1:8271", "--working-dir",
                                  str(repo), "--", "python", "jobs/tile_slides.py", "--smoke-test"],
                                 env=env, capture_output=True, text=True, timeout=300, cwd=repo)
            if "No available agent" not in job.stderr + job.stdout:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
        assert "tiles from 3/3 slides" in job.stdout
        # the flagship PSCL sweep, submitted the same way, records into the MLflow store the submitter names
        store = tmp_path / "mlruns.db"
        runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}})
        job = subprocess.run([ray_bin, "job", "submit", "--address", "http://127.0.0.1:8271", "--working-dir",
                              str(repo), "--runtime-env-json", runtime_env, "--", "python", "jobs/tune_pscl.py",
                              "--smoke-test", "--stage2", "--no-progress"],
                             env=env, capture_output=True, text=True, timeout=900, cwd=repo)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-2000:]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{store}")
        runs = client.search_runs([client.get_experiment_by_name("pscl").experiment_id])
        trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.info.run_name != "stage2"]
        assert len(trials) == 2 and {r.data.params["hparams.lam"] for r in trials} == {"0.0", "0.1"}  # baseline, PSCL
        for r in trials:
            assert r.info.status == "FINISHED" and {"val_miou", "test_miou", "test_fwiou"} <= set(r.data.metrics)
            arts = {a.path for a in client.list_artifacts(r.info.run_id)}
            assert {"test_cam_overlays.png", "test_cam_histogram.png"} <= arts
        stage2 = [r for r in runs if r.info.run_name == "stage2"]
        assert len(stage2) == 1 and "test_miou" in stage2[0].data.metrics
    finally:
        # Not `ray stop`: it would also kill the session's local Ray that other tests use.
        procs = [psutil.Process(p) for p in pids if psutil.pid_exists(p)]
        for proc in procs:
            proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=15)
        for proc in alive:
            proc.kill()
