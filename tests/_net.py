"""Helpers of the tests that start servers: who listens where, and waiting for a condition."""

from __future__ import annotations

import ipaddress
import time

import psutil
import pytest

__all__ = ["is_loopback", "listening", "wait_for"]


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def listening(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket of ``pids``."""
    out = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            out.append((c.pid, c.laddr.ip, c.laddr.port))
    return out


def wait_for(condition, what: str, timeout: float, interval: float = 0.5):
    """Poll ``condition() -> (done, seen)`` every ``interval`` s; return ``seen`` once done, or fail after ``timeout``
    s showing what was last seen."""
    deadline = time.monotonic() + timeout
    while True:
        done, seen = condition()
        if done:
            return seen
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s; last seen: {seen}")
        time.sleep(interval)
