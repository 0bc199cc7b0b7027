"""tests/ports.py: the ports the tests give their servers, checked against the real kernel."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.ports import _free_everywhere, candidates, free_port


def test_ports_come_from_the_candidates_for_this_kernel_and_are_never_given_twice() -> None:
    low, high = (
        int(part) for part in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    )
    allowed = candidates(low, high)
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(port in allowed for port in ports)


def test_a_port_held_by_any_family_or_kind_counts_as_taken() -> None:
    port = free_port()
    assert _free_everywhere(port)
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            with socket.socket(family, kind) as holder:
                holder.bind((host, port))
                assert not _free_everywhere(port)
    assert _free_everywhere(port)


def test_candidates_avoid_the_ephemeral_range_where_it_leaves_room() -> None:
    assert candidates(32_768, 60_999) == range(10_000, 32_768)  # Linux's default
    assert candidates(10_500, 40_000) == range(40_001, 65_536)  # room above only
    assert candidates(1_024, 65_535) == range(10_000, 65_536)  # no room: the bind check decides
