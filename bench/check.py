"""Answer check: dnsperf counts rcodes only, so before measuring, a sample of each case is
asked with a real client and the answers themselves are compared (a fast wrong answer is a
failure). Uses dnslib, from smartdns' test extra.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass

from dnslib import QTYPE, RCODE, DNSRecord

from bench.tools import (
    REGIONS,
    REGISTERED,
    UNREGISTERED,
    ZONES,
    upstream_address,
    upstream_names,
)

TIMEOUT_S = 2.0
SAMPLE = 25


@dataclass(frozen=True, slots=True)
class Expectation:
    name: str
    source: str
    rcode: str
    addresses: frozenset[str]  # the A records expected in the answer section


def expected_unblock(name: str) -> frozenset[str]:
    labels = name.lower().split(".")
    for start in range(len(labels)):
        zone = ".".join(labels[start:])
        if zone in ZONES:
            return frozenset(REGIONS[ZONES[zone]])
    raise ValueError("not in an unblock zone")


def expectations(
    unblock: Sequence[str], upstream_count: int, refuses_unregistered: bool
) -> list[Expectation]:
    """A spread-out sample of case (a), (b) and, where the server can do it, (c)."""
    step_a = max(1, len(unblock) // SAMPLE)
    step_b = max(1, upstream_count // SAMPLE)
    names_b = upstream_names(upstream_count)
    wanted = [
        Expectation(name, REGISTERED, "NOERROR", expected_unblock(name))
        for name in unblock[::step_a]
    ]
    wanted += [
        Expectation(names_b[i], REGISTERED, "NOERROR", frozenset({upstream_address(i)}))
        for i in range(0, upstream_count, step_b)
    ]
    if refuses_unregistered:
        wanted += [
            Expectation(name, UNREGISTERED, "REFUSED", frozenset())
            for name in (*unblock[::step_a], *names_b[::step_b])
        ]
    return wanted


def ask(port: int, source: str, name: str) -> tuple[str, frozenset[str]]:
    request = DNSRecord.question(name, "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(TIMEOUT_S)
        sock.sendto(request.pack(), ("127.0.0.1", port))
        reply = DNSRecord.parse(sock.recv(65535))
    if reply.header.id != request.header.id:
        return "WRONG-ID", frozenset()
    addresses = frozenset(str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A)
    return str(RCODE.get(reply.header.rcode)), addresses


def check_answers(port: int, wanted: Sequence[Expectation]) -> list[str]:
    """Problems found (empty when every sampled answer is right). No names of clients are
    involved: these are benchmark names on loopback."""
    problems = []
    for item in wanted:
        try:
            rcode, addresses = ask(port, item.source, item.name)
        except (OSError, TimeoutError) as error:
            problems.append(f"{item.name} from {item.source}: no answer ({error})")
            continue
        if rcode != item.rcode or addresses != item.addresses:
            problems.append(
                f"{item.name} from {item.source}: got {rcode} {sorted(addresses)},"
                f" want {item.rcode} {sorted(item.addresses)}"
            )
    return problems
