"""Every server the project starts listens on loopback only (Ray head with dashboard and job server, local Ray)."""

import ipaddress
import os
import subprocess
import sys
import time

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


def _ray_pids() -> set[int]:
    pids = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
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
    env = {**os.environ, **LOOPBACK_ENV}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    temp = f"/tmp/hw-ray-head-{os.getpid()}"
    before = _ray_pids()
    cmd = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           "--port=6391", "--dashboard-port=8271", "--num-cpus=1", f"--temp-dir={temp}", "--disable-usage-stats"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    try:
        time.sleep(3)
        pids = _ray_pids() - before
        listening = _listening(pids)
        ports = {port for _, _, port in listening}
        assert 6391 in ports and 8271 in ports, listening  # GCS and dashboard (job server) are up
        assert all(_is_loopback(ip) for _, ip, _ in listening), listening
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
