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
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from histoweak._ray import free_loopback_port

__all__ = ["FAKE_HEAD_TYPE", "LoopbackCluster", "cluster_pids", "fake_cluster_config", "loopback_multinode", "start_local_cluster",
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
    if env.get("RAY_AUTH_MODE") == "token":  # `ray start` refuses to start without one (a new machine has none)
        subprocess.run([_ray_bin(), "get-auth-token", "--generate"], env=env, capture_output=True, check=True,
                       timeout=60)
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


class NodeRef:
    """A node of a ``LoopbackCluster``, by its Ray node id."""

    def __init__(self, node_id: str):
        self.node_id = node_id

    def __repr__(self) -> str:
        return f"NodeRef({self.node_id[:12]}…)"


class LoopbackCluster:
    """A multi-node Ray cluster on 127.0.0.1 hosted by a helper process (``python -m histoweak.local_cluster``).

    The helper owns ``ray.cluster_utils.Cluster``; this process only sends it commands. Hosting it here
    instead would make Ray's utility take over this process's own Ray state (a ``ray.init`` of this
    process dies at its next call), so a test process that also runs a local Ray can use both in any order.
    """

    def __init__(self, proc: subprocess.Popen, ready: dict):
        self._proc = proc
        self.address: str = ready["address"]
        self.webui_url: str | None = ready["webui_url"]
        self.temp: str = ready["temp"]
        self.head_node = NodeRef(ready["head"])
        self.worker_nodes: list[NodeRef] = [NodeRef(n) for n in ready["workers"]]

    def _ask(self, **command) -> dict:
        if self._proc.poll() is not None:
            raise RuntimeError(f"the loopback cluster's helper exited with {self._proc.returncode}")
        self._proc.stdin.write(json.dumps(command) + "\n")
        self._proc.stdin.flush()
        reply = json.loads(self._proc.stdout.readline() or '{"error": "the helper closed its output"}')
        if "error" in reply:
            raise RuntimeError(f"loopback cluster: {command['op']}: {reply['error']}")
        return reply

    def add_node(self, **node) -> NodeRef:
        """Start one more node (``node``: ``Cluster.add_node``'s arguments, default 1 CPU) and wait until it is up."""
        ref = NodeRef(self._ask(op="add_node", node=node)["node_id"])
        self.worker_nodes.append(ref)
        return ref

    def remove_node(self, node: NodeRef, allow_graceful: bool = True) -> None:
        """Stop ``node``'s processes (``allow_graceful=False``: killed, as a lost machine)."""
        self._ask(op="remove_node", node_id=node.node_id, allow_graceful=allow_graceful)
        self.worker_nodes = [n for n in self.worker_nodes if n.node_id != node.node_id]

    def wait_for_nodes(self) -> None:
        """Every node is registered with the head (``add_node`` already waits for its node)."""
        self._ask(op="wait_for_nodes")

    def close(self, timeout: float = 120) -> None:
        """Stop every node and the helper."""
        if self._proc.poll() is None:
            try:
                self._ask(op="stop")
            except (RuntimeError, OSError, ValueError):
                pass
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            stream.close()


@contextlib.contextmanager
def loopback_multinode(workers: int = 2, temp_dir: str | None = None, dashboard: bool = True, **node):
    """A head and ``workers`` worker nodes on 127.0.0.1, each with ``node``'s resources (default 1 CPU), in a
    helper process; yields a ``LoopbackCluster`` (``.address``, ``.webui_url``, ``.temp``, ``.worker_nodes``,
    ``.add_node``, ``.remove_node``) and stops every node at the end.

    Ray's utility records the cluster as the machine's latest in its default temp root, where any
    ``ray.init()`` without an address would find and join it. The helper points that root
    (``RAY_TMPDIR``) at the cluster's own folder, so the machine's record is never read or written, and the
    cluster works on a machine where Ray's default temp root does not exist yet.
    """
    import tempfile

    temp = temp_dir or tempfile.mkdtemp(prefix="hw-mn-")  # short: Ray's socket paths live under it
    spec = {"workers": workers, "temp": temp, "dashboard": dashboard, "node": node}
    proc = subprocess.Popen([sys.executable, "-m", "histoweak.local_cluster", json.dumps(spec)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline()
    ready = json.loads(line) if line.startswith("{") else {"error": f"no answer (exit {proc.wait()})"}
    if "error" in ready:
        proc.kill()
        raise RuntimeError(f"loopback cluster did not start: {ready['error']}")
    cluster = LoopbackCluster(proc, ready)
    try:
        yield cluster
    finally:
        cluster.close()
        if temp_dir is None:
            shutil.rmtree(temp, ignore_errors=True)


def _serve(spec: dict) -> None:
    """The helper process: start the cluster, then answer one JSON command per input line."""
    os.environ["RAY_TMPDIR"] = spec["temp"]  # Ray's address record goes to the cluster's folder (see above)
    import ray._common.utils
    from ray.cluster_utils import Cluster

    Path(ray._common.utils.get_default_ray_temp_dir()).mkdir(parents=True, exist_ok=True)
    args = {**_NODE, **spec["node"]}
    head = {**args, "gcs_server_port": free_loopback_port(), "temp_dir": spec["temp"], "include_dashboard": spec["dashboard"]}
    if spec["dashboard"]:
        head.update(dashboard_host="127.0.0.1", dashboard_port=free_loopback_port(), dashboard_agent_listen_port=free_loopback_port(),
                    metrics_export_port=free_loopback_port(), runtime_env_agent_port=free_loopback_port())
    out = sys.stdout
    sys.stdout = sys.stderr  # only replies go to the output
    try:
        cluster = Cluster(initialize_head=True, head_node_args=head)
        nodes = {}
        for _ in range(spec["workers"]):
            n = cluster.add_node(**args)
            nodes[n.node_id] = n
        cluster.wait_for_nodes()
    except Exception as exc:  # noqa: BLE001 — reported to the caller, which raises it
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), file=out, flush=True)
        return

    def reply(**value):
        print(json.dumps(value), file=out, flush=True)

    reply(address=cluster.address, webui_url=cluster.webui_url if spec["dashboard"] else None, temp=spec["temp"],
          head=cluster.head_node.node_id, workers=list(nodes))
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            try:
                if cmd["op"] == "add_node":
                    n = cluster.add_node(**{**args, **cmd["node"]})
                    cluster.wait_for_nodes()
                    nodes[n.node_id] = n
                    reply(node_id=n.node_id)
                elif cmd["op"] == "remove_node":
                    cluster.remove_node(nodes.pop(cmd["node_id"]), allow_graceful=cmd["allow_graceful"])
                    reply(ok=True)
                elif cmd["op"] == "wait_for_nodes":
                    cluster.wait_for_nodes()
                    reply(ok=True)
                elif cmd["op"] == "stop":
                    break
                else:
                    reply(error=f"unknown op {cmd['op']!r}")
            except Exception as exc:  # noqa: BLE001
                reply(error=f"{type(exc).__name__}: {exc}")
    finally:  # stdin closed (the caller died) or stop: no node outlives the helper
        for n in list(cluster.worker_nodes):
            cluster.remove_node(n, allow_graceful=False)
        if cluster.head_node is not None:
            cluster.remove_node(cluster.head_node, allow_graceful=False)
        reply(ok=True)


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
