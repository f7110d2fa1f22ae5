"""Ray clusters on one machine, every port on 127.0.0.1: the autoscaling drill of ``cluster.yaml``, and a
multi-node cluster for drills and benchmarks (``loopback_multinode``).

``histoweak local-cluster up`` starts a Ray head whose autoscaler uses Ray's fake multi-node provider with
the node types of ``cluster.yaml`` (same names and worker limits, each node scaled down to a few CPUs, no
GPUs: a CPU machine cannot run the CUDA path, and logical GPUs would make the planner choose it). Work that
needs more CPUs than the head has makes the autoscaler start worker nodes (local Ray nodes); when they have
been idle for ``idle_timeout_minutes`` it removes them — the same decisions it takes on AWS, without AWS.

Ray's fake provider needs: the head's type named ``ray.head.default`` and its node id set to the provider's
fixed id, ``use_node_id_as_ip`` (all nodes share 127.0.0.1), no node updaters (nothing to SSH into), the
GCS address in the provider section, and ``RAY_FAKE_CLUSTER=1`` for the head's processes (measured on
Ray 2.60; without the first three the workers start and are killed as "launch failed" or never counted).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

__all__ = ["FAKE_HEAD_TYPE", "cluster_pids", "fake_cluster_config", "loopback_multinode", "start_local_cluster",
           "stop_local_cluster"]

FAKE_HEAD_TYPE = "ray.head.default"  # the type the fake provider gives its head node
_FAKE_HEAD_ID = "f" * 51 + "00000"  # the fake provider's head node id (its workers count up from it)
_EMPTY_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
                "rsync_filter")


def fake_cluster_config(cluster_yaml: str | Path, gcs_port: int, cpus_per_node: int = 1, head_cpus: int = 1,
                        max_workers_per_type: int = 2, idle_timeout_minutes: float | None = None) -> dict[str, Any]:
    """An autoscaling config for Ray's fake multi-node provider, derived from a cluster-launcher config.

    Every worker type of ``cluster_yaml`` keeps its name, its ``min_workers`` and its ``max_workers``
    (capped at ``max_workers_per_type``) and custom resources; each node gets ``cpus_per_node`` CPUs and no
    GPUs. ``idle_timeout_minutes`` defaults to the file's.

    Raises
    ------
    ValueError
        When the file is not a cluster config with ``head_node_type`` and ``available_node_types``.
    """
    path = Path(cluster_yaml)
    cfg = yaml.safe_load(path.read_text())
    if not isinstance(cfg, dict) or not isinstance(cfg.get("available_node_types"), dict) or \
            cfg.get("head_node_type") not in cfg["available_node_types"]:
        raise ValueError(f"{path}: not a Ray cluster config (needs available_node_types and a head_node_type "
                         f"that is one of them)")
    types: dict[str, Any] = {FAKE_HEAD_TYPE: {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}}
    for name, spec in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            continue
        resources = {k: v for k, v in (spec.get("resources") or {}).items() if k not in ("CPU", "GPU")}
        top = min(int(spec.get("max_workers", cfg.get("max_workers", max_workers_per_type))), max_workers_per_type)
        types[name] = {"resources": {**resources, "CPU": cpus_per_node}, "node_config": {},
                       "min_workers": min(int(spec.get("min_workers", 0)), top), "max_workers": top}
    return {
        "cluster_name": f"{cfg.get('cluster_name', 'histoweak')}-local",
        "max_workers": sum(t["max_workers"] for t in types.values()),
        "idle_timeout_minutes": cfg.get("idle_timeout_minutes", 5) if idle_timeout_minutes is None
        else idle_timeout_minutes,
        "upscaling_speed": cfg.get("upscaling_speed", 1.0),
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs_port}", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        "auth": {"ssh_user": "ubuntu"},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        **{k: [] for k in _EMPTY_LISTS},
    }


def _ray_bin() -> str:
    here = Path(sys.executable).with_name("ray")
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


def start_local_cluster(cluster_yaml: str | Path, temp_dir: str | Path, port: int = 6390, dashboard_port: int = 8275,
                        head_cpus: int = 1, cpus_per_node: int = 1, idle_timeout_minutes: float | None = None,
                        agent_ports: tuple[int, int, int, int] | None = None) -> str:
    """Start a Ray head on 127.0.0.1 whose autoscaler runs ``cluster_yaml``'s node types on this machine.

    Returns the job server's address (``http://127.0.0.1:<dashboard_port>``). ``agent_ports`` (dashboard
    agent listen and gRPC, runtime-env agent, metrics) must differ from any other Ray node on the machine.
    """
    temp = Path(temp_dir).resolve()
    temp.mkdir(parents=True, exist_ok=True)
    config = temp / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(fake_cluster_config(cluster_yaml, port, cpus_per_node, head_cpus,
                                                         idle_timeout_minutes=idle_timeout_minutes)))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_OVERRIDE_NODE_ID_FOR_TESTING": _FAKE_HEAD_ID, "RAY_CLOUD_INSTANCE_ID": _FAKE_HEAD_ID,
           # a submitted job's `python` is this environment's, as after activating it
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    cmd = [_ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--port={port}", f"--dashboard-port={dashboard_port}", f"--num-cpus={head_cpus}", "--num-gpus=0",
           f"--temp-dir={temp / 'ray'}", "--disable-usage-stats", f"--autoscaling-config={config}"]
    if agent_ports:
        cmd += [f"--dashboard-agent-listen-port={agent_ports[0]}", f"--dashboard-agent-grpc-port={agent_ports[1]}",
                f"--runtime-env-agent-port={agent_ports[2]}", f"--metrics-export-port={agent_ports[3]}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise RuntimeError(f"ray start failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    return f"http://127.0.0.1:{dashboard_port}"


def cluster_pids(temp_dir: str | Path, *also: str) -> set[int]:
    """The processes of the Ray nodes started under ``temp_dir`` (or whose command lines name any of ``also``,
    e.g. the GCS address, which the Ray client server names instead), with all their descendants (agents rename
    themselves, e.g. ``ray::DashboardAgent``; the fake provider's worker nodes are children of the head's
    autoscaler)."""
    import psutil

    markers = [str(Path(temp_dir).resolve()), *also]
    roots = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if any(m in cmd for m in markers):
            roots.append(p)
    pids = {p.pid for p in roots}
    for p in roots:
        try:
            pids.update(c.pid for c in p.children(recursive=True))
        except psutil.Error:
            pass
    me = psutil.Process()  # a caller whose own command line names the directory is not one of the nodes
    return pids - {me.pid, *(p.pid for p in me.parents())}


def stop_local_cluster(temp_dir: str | Path, timeout: float = 15) -> int:
    """Stop the Ray nodes started under ``temp_dir`` (not ``ray stop``, which stops every Ray on the
    machine); returns how many processes were stopped."""
    import psutil

    config = Path(temp_dir) / "autoscaling.yaml"
    gcs = yaml.safe_load(config.read_text())["provider"]["gcs_address"] if config.exists() else None
    procs = []
    for pid in cluster_pids(temp_dir, *([gcs] if gcs else [])):
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    time.sleep(0.5)
    return len(procs)


_NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 150 * 2**20}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def loopback_multinode(workers: int = 2, temp_dir: str | None = None, dashboard: bool = True, **node):
    """A head and ``workers`` worker nodes on 127.0.0.1 (``ray.cluster_utils.Cluster``), each with ``node``'s
    resources (default 1 CPU); yields the ``Cluster`` (``.address``, ``.add_node``, ``.remove_node``) with
    ``.temp`` set, and removes every node at the end.

    Ray's utility records the cluster as the machine's latest (``/tmp/ray/ray_current_cluster``), where any
    ``ray.init()`` without an address would find and join it; the record is put back as it was.
    """
    from ray.cluster_utils import Cluster

    args = {**_NODE, **node}
    temp = temp_dir or f"/tmp/hw-mn-{os.getpid()}"  # short: Ray's socket paths live under it
    current = Path("/tmp/ray/ray_current_cluster")
    before = current.read_text() if current.exists() else None
    head = {**args, "gcs_server_port": _free_port(), "temp_dir": temp, "include_dashboard": dashboard}
    if dashboard:
        head.update(dashboard_host="127.0.0.1", dashboard_port=_free_port(), dashboard_agent_listen_port=_free_port(),
                    metrics_export_port=_free_port(), runtime_env_agent_port=_free_port())
    cluster = Cluster(initialize_head=True, head_node_args=head)
    if before is None:
        current.unlink(missing_ok=True)
    else:
        current.write_text(before)
    cluster.temp = temp
    try:
        for _ in range(workers):
            cluster.add_node(**args)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        for n in list(cluster.worker_nodes):
            cluster.remove_node(n, allow_graceful=False)
        if cluster.head_node is not None:
            cluster.remove_node(cluster.head_node, allow_graceful=False)
