"""Connecting to Ray: an existing cluster when there is one, else a local one on loopback only."""

from __future__ import annotations

import os

__all__ = ["LOOPBACK_ENV", "init_ray"]

# Measured on Ray 2.60: without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 a local node binds the
# machine's external interface even when told 127.0.0.1, and a driver can hang in ray.init.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# Ray Data's per-operator bars inside Train workers interleave with Tune's progress table; Tune's table
# and the tiling bar are the progress users read.
QUIET_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def init_ray(address: str | None = None, num_cpus: int | None = None, temp_dir: str | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local one bound to 127.0.0.1.

    Inside ``ray job submit`` the job's driver already knows its cluster
    (``RAY_ADDRESS`` is set), so the same script runs on a laptop and on a cluster.
    """
    for key, value in {**LOOPBACK_ENV, **QUIET_ENV}.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner needs: without it the
    # CPUs of a trial stopped early by ASHA stay reserved and the next trial's Ray Data tasks never start.
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir or os.environ.get("HISTOWEAK_RAY_TMP"),
        log_to_driver=True,
    )
