"""Loopback ports for the servers that tests and benchmarks start (smartdns, nats-server,
Prometheus), chosen outside the kernel's ephemeral range.

A port found by binding port 0 comes from the ephemeral range, so between the probe and the
server's own bind any outgoing connection (a nats-server route, a client) may take it as its
local port, and the server then fails with "address already in use". Ports below the range
are never handed out by the kernel; this process also never hands one out twice, and the
walk starts at a random place so that a benchmark beside the suite rarely probes the same
ports.
"""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10_000  # below: well-known and registered services that may be installed here
_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(part) for part in _EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        return 32_768, 60_999  # Linux's default
    return low, high


def candidates(low: int, high: int) -> range:
    """Ports the kernel does not hand out on its own, given its ephemeral range [low, high]:
    below it, or above it when it starts too low to leave room; when it leaves room on
    neither side, every port from _LOWEST (the bind check then does all the work)."""
    if low - _LOWEST >= 2_000:
        return range(_LOWEST, low)
    if 65_535 - high >= 2_000:
        return range(high + 1, 65_536)
    return range(_LOWEST, 65_536)


def _free_everywhere(port: int) -> bool:
    """Whether UDP and TCP can bind `port` on 127.0.0.1 and ::1 now."""
    try:
        with contextlib.ExitStack() as stack:
            for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    sock = stack.enter_context(socket.socket(family, kind))
                    sock.bind((host, port))
    except OSError:
        return False
    return True


def free_port() -> int:
    """A port free for UDP and TCP on 127.0.0.1 and ::1, outside the ephemeral range, and not
    given out before by this process."""
    ports = candidates(*_ephemeral_range())
    start = random.randrange(len(ports))
    for offset in range(len(ports)):
        port = ports[(start + offset) % len(ports)]
        if port not in _handed_out and _free_everywhere(port):
            _handed_out.add(port)
            return port
    raise RuntimeError("no free loopback port outside the ephemeral range")
