"""The autoscaling drill, for real on one machine: Ray's autoscaler with the fake multi-node provider runs the
node types of ``cluster.yaml``; a sweep that asks for more CPUs than the head has makes it launch worker nodes,
the trials finish, and the idle nodes are removed. Every step is read from Ray's own state (alive nodes over
time), and it is the README's local drill, command for command (its tile table made beforehand, outside the
job's working directory, which each node unpacks for itself)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from histoweak._ray import LOOPBACK_ENV
from histoweak.local_cluster import FAKE_HEAD_TYPE, cluster_pids, fake_cluster_config, start_local_cluster, \
    stop_local_cluster

from _net import is_loopback, listening, wait_for

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fake_config_keeps_the_node_types_of_cluster_yaml():
    """The drill runs cluster.yaml's worker types (names, limits), scaled down to CPUs this machine has."""
    real = yaml.safe_load((REPO / "cluster.yaml").read_text())
    fake = fake_cluster_config(REPO / "cluster.yaml", 6390, cpus_per_node=2, max_workers_per_type=2,
                               idle_timeout_minutes=0.25)
    workers = {k: v for k, v in real["available_node_types"].items() if k != real["head_node_type"]}
    assert set(fake["available_node_types"]) == {FAKE_HEAD_TYPE, *workers}
    for name, spec in workers.items():
        mine = fake["available_node_types"][name]
        assert mine["resources"] == {"CPU": 2}  # no GPUs: the CUDA path cannot run here
        assert mine["max_workers"] == min(spec["max_workers"], 2)
        assert mine["min_workers"] == min(spec.get("min_workers", 0), mine["max_workers"])
    assert fake["idle_timeout_minutes"] == 0.25 and fake["provider"]["gcs_address"] == "127.0.0.1:6390"
    assert fake_cluster_config(REPO / "cluster.yaml", 6390)["idle_timeout_minutes"] == real["idle_timeout_minutes"]


def _alive_nodes(dashboard: str) -> list[dict]:
    from ray.util.state import list_nodes

    return [{"id": n.node_id, "head": n.is_head_node}
            for n in list_nodes(address=dashboard, raise_on_missing_output=False) if n.state == "ALIVE"]


def _active_types(gcs: int, env: dict) -> set[str]:
    """Node types of the autoscaler's active worker nodes, from ``ray status`` (the fake provider's nodes carry no
    node-group label)."""
    out = subprocess.run(["ray", "status", "--address", f"127.0.0.1:{gcs}"], env=env, capture_output=True, text=True,
                         timeout=60).stdout
    active = out.partition("Active:")[2].partition("Pending:")[0]
    return {m.group(1) for m in re.finditer(r"^\s*\d+ (\S+)$", active, re.M)} - {FAKE_HEAD_TYPE}


@pytest.mark.slow
@pytest.mark.cluster
def test_a_sweep_scales_the_cluster_up_and_idle_nodes_go(tile_table, tmp_path):
    temp = f"/tmp/hw-as-{os.getpid()}"
    gcs, dport = _free_port(), _free_port()
    agents = tuple(_free_port() for _ in range(4))
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, **LOOPBACK_ENV, "RAY_AUTH_MODE": "token", "PATH": bindir + os.pathsep + os.environ["PATH"]}
    address = start_local_cluster(REPO / "cluster.yaml", temp, port=gcs, dashboard_port=dport, head_cpus=1,
                                  cpus_per_node=2, idle_timeout_minutes=0.25, agent_ports=agents)
    timeline: list[tuple[float, int]] = []  # (seconds since the job was submitted, alive nodes)
    types: set = set()  # of the worker nodes seen
    stop = threading.Event()
    t0 = time.monotonic()

    def watch():
        while not stop.is_set():
            try:
                nodes = _alive_nodes(address)
                timeline.append((time.monotonic() - t0, len(nodes)))
                if len(nodes) > 1 and not types:
                    types.update(_active_types(gcs, env))
            except Exception:  # noqa: BLE001 — the state API is briefly unavailable while the head starts
                pass
            stop.wait(1)

    try:
        wait_for(lambda: (len(_alive_nodes(address)) == 1, None), "the head alone", timeout=60)
        watcher = threading.Thread(target=watch, daemon=True)
        runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"}})

        def submitted():
            # no --working-dir: the fake provider's nodes share the head's session directory, and a worker node
            # unpacking the job's package there pulls it from under the running driver; on one machine the
            # checkout is the working directory every node sees
            job = subprocess.run(["ray", "job", "submit", "--address", address, "--runtime-env-json", runtime_env,
                                  "--", "bash", "-c", f"cd {REPO} && python jobs/tune_erm.py --smoke-test --cpus 5 "
                                  f"--no-progress --storage {tmp_path / 'ray_results'} --data {tile_table}"],
                                 env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
            return "No available agent" not in job.stderr + job.stdout, job

        t0 = time.monotonic()
        watcher.start()
        job = wait_for(submitted, "a job accepted by the head's agent", timeout=120)
        t_done = time.monotonic() - t0
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-2000:]
        assert "2 trials with results" in job.stdout, job.stdout[-2000:]
        # the trials asked for 5 CPUs: the autoscaler added nodes of cluster.yaml's worker types
        assert max(n for _, n in timeline) >= 3, timeline
        real = yaml.safe_load((REPO / "cluster.yaml").read_text())
        assert types and types <= set(real["available_node_types"]) - {real["head_node_type"]}, types
        # idle for 15 s after the sweep released its request: removed, the head alone again
        wait_for(lambda: (len(_alive_nodes(address)) == 1, _alive_nodes(address)), "idle nodes removed",
                 timeout=180, interval=1)
        time.sleep(1.5)  # the watcher records it too
        stop.set()
        t_up = next(t for t, n in timeline if n >= 2)
        t_full = next(t for t, n in timeline if n >= 3)
        t_gone = next(t for t, n in timeline if t > t_full and n == 1) if timeline[-1][1] == 1 else float("nan")
        print(f"\nautoscaling (seconds after submit): first worker node alive at {t_up:.0f}, all at {t_full:.0f}; "
              f"head alone again at {t_gone:.0f} (idle timeout 15 s); the job returned at {t_done:.0f}; worker types "
              f"{sorted(types)}")
        seen = listening(cluster_pids(temp, f"127.0.0.1:{gcs}"))
        assert seen and all(is_loopback(ip) for _, ip, _ in seen), seen
    finally:
        stop.set()
        stop_local_cluster(temp)
