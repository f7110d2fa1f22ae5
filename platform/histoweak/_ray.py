"""Connecting to Ray: an existing cluster when there is one, else a local one on loopback only."""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["LOOPBACK_ENV", "RayDataConsoleFilter", "configure_console", "init_ray", "verbose"]

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
        return
    # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner needs: without it the
    # CPUs of a trial stopped early by ASHA stay reserved and the next trial's Ray Data tasks never start.
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir or os.environ.get("HISTOWEAK_RAY_TMP"),
        **common,
    )
