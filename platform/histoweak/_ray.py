"""Connecting to Ray: an existing cluster when there is one, else a local one on loopback only."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

__all__ = ["LOOPBACK_ENV", "RayDataConsoleFilter", "configure_console", "free_loopback_port", "init_ray", "release_cpus", "request_cpus",
           "verbose"]

# Measured on Ray 2.60: without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 a local node binds the
# machine's external interface even when told 127.0.0.1, and a driver can hang in ray.init.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# Ray Data's per-operator bars inside Train workers interleave with the sweep's bars; the sweep's
# bars and the tiling bar are the progress users read.
QUIET_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
# Without --verbose, Ray's INFO logs go to its log files only; warnings and errors still reach the console.
CONSOLE_ENV = {
    "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).with_name("_ray_data_logging.yaml")),
    "RAY_AIR_NEW_OUTPUT": "0",  # Ray Tune's new output engine prints its tables even at verbose=0
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    # Ray's own deprecation notice about its own internals, twice per trial
    "PYTHONWARNINGS": "ignore::DeprecationWarning:ray.data._internal.execution.interfaces.execution_options",
}
# A local Ray is one machine, which nothing preempts: Ray Train's preemption watcher (one actor per run, killed
# at its end) would only print core_worker's "max_restarts > 0" error on every run's console. Clusters keep it.
_LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
_OURS: dict[str, str] = {}  # the variables this module set (and hands to every worker of the job)


class RayDataConsoleFilter(logging.Filter):
    """Drops Ray Data's notice that progress bars are off (we turned them off; once per worker process)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Progress bars disabled")


def verbose() -> bool:
    """Whether the user asked for Ray's own INFO logs on the console (``--verbose``, ``HISTOWEAK_VERBOSE=1``)."""
    return os.environ.get("HISTOWEAK_VERBOSE", "0") not in ("", "0")


def configure_console(verbose_logs: bool | None = None) -> None:
    """Set the environment that decides what Ray and MLflow print; call before they are imported.

    Variables the user (or a job's runtime env) already set are left as they are.
    """
    if verbose_logs:
        os.environ["HISTOWEAK_VERBOSE"] = "1"
    env = {**LOOPBACK_ENV, **QUIET_ENV, **({} if verbose() else CONSOLE_ENV)}
    for key, value in env.items():
        if key not in os.environ:
            os.environ[key] = _OURS[key] = value


def init_ray(address: str | None = None, num_cpus: int | None = None, temp_dir: str | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local one bound to 127.0.0.1.

    Inside ``ray job submit`` the job's driver already knows its cluster
    (``RAY_ADDRESS`` is set), so the same script runs on a laptop and on a cluster.
    """
    configure_console()
    import ray

    if ray.is_initialized():
        return
    # every process of the job, also on a cluster's other nodes, gets the same settings; the driver's own
    # Ray INFO lines (node start, Tune's bookkeeping) go to Ray's log files unless --verbose
    common = {"log_to_driver": True, "runtime_env": {"env_vars": dict(_OURS)} if _OURS else None,
              "logging_level": logging.INFO if verbose() else logging.WARNING}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **common)
        _pin_ray_data_actors()
        return
    # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner needs: without it the
    # CPUs of a trial stopped early by ASHA stay reserved and the next trial's Ray Data tasks never start.
    # That cleaner, like every Ray process that calls the State API without an address, finds its cluster
    # through RAY_ADDRESS, else by scanning the machine for Ray's GCS processes: with two jobs on one machine
    # (each with its own local Ray) the scan finds two and the cleaner dies ("Found multiple active Ray
    # instances"), leaving a stopped trial's CPUs reserved for good. So the local Ray is fully addressed: its
    # GCS port is chosen here (RAY_GCS_SERVER_PORT) and every worker process of the job gets RAY_ADDRESS (not
    # this driver's environment: processes it starts, e.g. other jobs, must not join this Ray by accident).
    chosen = "RAY_GCS_SERVER_PORT" not in os.environ
    port = free_loopback_port() if chosen else int(os.environ["RAY_GCS_SERVER_PORT"])
    env = {**_OURS, "RAY_ADDRESS": f"127.0.0.1:{port}", **{k: v for k, v in _LOCAL_ENV.items() if k not in os.environ}}
    common["runtime_env"] = {"env_vars": env}
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(
            address="local",  # a new Ray, whatever RAY_ADDRESS says (it is unset here)
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            _temp_dir=temp_dir or os.environ.get("HISTOWEAK_RAY_TMP"),
            **common,
        )
    finally:
        if chosen:
            del os.environ["RAY_GCS_SERVER_PORT"]


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pin_ray_data_actors() -> None:
    """Create Ray Data's two detached actors (its stats actor and autoscaling coordinator) on this driver's node.

    Ray Data creates them on the node of their first user and never ends them. On an autoscaling cluster
    that is often a worker node (a Train worker streaming its shard), which then never counts as idle and is
    never removed (measured with Ray 2.60's autoscaler: one worker node kept for good after a sweep). Drivers
    run on the head, which stays anyway. Private Ray Data functions: if they move, nothing worse than before.
    """
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import \
            get_or_create_autoscaling_coordinator
        from ray.data._internal.stats import get_or_create_stats_actor

        get_or_create_stats_actor()
        get_or_create_autoscaling_coordinator()
    except (ImportError, AttributeError):  # pragma: no cover — a Ray version without them
        pass


def request_cpus(cpus: float | None, timeout: float = 600.0, poll: float = 1.0) -> float:
    """Ask the cluster's autoscaler for ``cpus`` CPUs in all, and wait until they are there (or ``timeout`` s).

    Runs plan from the cluster's resources when they start (``train.fit``, ``tune.run_sweep``): on an
    autoscaling cluster that still holds only its head, that is too little. This asks the autoscaler first
    (``ray.autoscaler.sdk.request_resources``), prints how many CPUs have arrived, and returns the CPUs the
    cluster has when they are all there or the time is up (then the run plans with what there is). Without
    an autoscaler nothing arrives: it waits only when the cluster has fewer than ``cpus``.
    """
    import ray
    from ray.autoscaler.sdk import request_resources

    have = float(ray.cluster_resources().get("CPU", 0))
    if not cpus or have >= cpus:
        return have
    request_resources(num_cpus=int(math.ceil(cpus)))
    print(f"histoweak: asked the autoscaler for {cpus:g} CPUs; the cluster has {have:g}", flush=True)
    deadline, shown = time.monotonic() + timeout, have
    while have < cpus and time.monotonic() < deadline:
        time.sleep(poll)
        have = float(ray.cluster_resources().get("CPU", 0))
        if have != shown:
            print(f"histoweak: the cluster has {have:g}/{cpus:g} CPUs", flush=True)
            shown = have
    if have < cpus:
        print(f"histoweak: warning: {have:g} of {cpus:g} CPUs after {timeout:.0f} s; planning with {have:g}",
              flush=True)
    return have


def release_cpus() -> None:
    """Withdraw ``request_cpus``'s request, so the autoscaler may remove nodes once they are idle."""
    import ray
    from ray.autoscaler.sdk import request_resources

    if ray.is_initialized():
        request_resources(num_cpus=0)
