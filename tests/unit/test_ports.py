"""tests/ports.py: the ports the tests give their servers, checked against the real kernel."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.ports import _free_everywhere, free_port


def test_ports_come_from_outside_the_ephemeral_range_and_are_never_given_twice() -> None:
    low, high = (
        int(part) for part in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    )
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(not low <= port <= high for port in ports)


def test_a_port_held_by_any_family_or_kind_counts_as_taken() -> None:
    port = free_port()
    assert _free_everywhere(port)
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            with socket.socket(family, kind) as holder:
                holder.bind((host, port))
                assert not _free_everywhere(port)
    assert _free_everywhere(port)
