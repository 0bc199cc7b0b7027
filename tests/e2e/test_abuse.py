"""Floods on loopback (bounded in count and time): rate limits hold, real clients are served."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import pytest

from tests.e2e.harness import REGISTERED, Server, running_server
from tests.fake_upstream import FakeUpstream

CLIENT_QPS = 50
REFUSED_QPS = 5
OTHER_REGISTERED = "127.0.0.4"
FLOOD_SOURCES = [f"127.1.{i // 250}.{i % 250 + 1}" for i in range(200)]
FLOOD_SECONDS = 2.0
SETTLE_S = 0.5  # replies still on their way after the last send
REPLY_BUFFER_BYTES = 1 << 20


@pytest.fixture
def limited(tmp_path: Path, upstream: FakeUpstream) -> Iterator[Server]:
    override = {"rate_limit": {"client_qps": CLIENT_QPS, "refused_qps": REFUSED_QPS}}
    with running_server(
        tmp_path, upstream.address, override, registrations=(REGISTERED, OTHER_REGISTERED)
    ) as server:
        yield server


def _sockets(sources: list[str]) -> list[socket.socket]:
    """One UDP socket per source, with room for every reply until `_collect` reads them: the
    default buffer holds 256 small datagrams, and a client over its rate gets about 230 replies
    to its 400 queries, more when a busy server spreads them over a longer time (the kernel
    caps the size at net.core.rmem_max: 512 datagrams at Linux's default)."""
    sockets = []
    for source in sources:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, REPLY_BUFFER_BYTES)
        sock.bind((source, 0))
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def _collect(sockets: list[socket.socket]) -> list[list[bytes]]:
    """Every reply waiting on each socket (read after the flood settles)."""
    time.sleep(SETTLE_S)
    replies: list[list[bytes]] = []
    for sock in sockets:
        got = []
        while True:
            try:
                got.append(sock.recv(4096))
            except BlockingIOError:
                break
        replies.append(got)
        sock.close()
    return replies


def test_unregistered_flood_is_capped_and_registered_client_is_served(limited: Server) -> None:
    wire = dns.message.make_query("www.netflix.com", "A").to_wire()
    flooders = _sockets(FLOOD_SOURCES)
    registered_results: list[int] = []

    def registered_client() -> None:
        for _ in range(60):
            registered_results.append(limited.query("example.org", "A").rcode())
            time.sleep(0.02)

    client = threading.Thread(target=registered_client)
    client.start()
    sent = 0
    start = time.monotonic()
    while time.monotonic() - start < FLOOD_SECONDS:  # several thousand queries a second
        for sock in flooders:
            sock.sendto(wire, ("127.0.0.1", limited.port))
            sent += 1
        time.sleep(0.01)
    elapsed = time.monotonic() - start
    client.join(timeout=30)
    replies = _collect(flooders)

    assert sent / elapsed > 2000
    assert registered_results == [dns.rcode.NOERROR] * 60
    cap = REFUSED_QPS * (elapsed + SETTLE_S) + REFUSED_QPS + 1  # rate over the flood + burst
    per_source = [len(got) for got in replies]
    assert max(per_source) <= cap
    assert sum(per_source) >= len(FLOOD_SOURCES) * REFUSED_QPS  # the cap, not silence
    assert all(
        dns.message.from_wire(r).rcode() == dns.rcode.REFUSED for got in replies for r in got
    )


def test_registered_client_over_its_rate_gets_drops_and_tc(limited: Server) -> None:
    wire = dns.message.make_query("www.netflix.com", "A").to_wire()
    (fast,) = _sockets([REGISTERED])
    sent = 400
    start = time.monotonic()
    for _ in range(sent):
        fast.sendto(wire, ("127.0.0.1", limited.port))
    other = [limited.query("www.netflix.com", "A", source=OTHER_REGISTERED) for _ in range(20)]
    elapsed = time.monotonic() - start
    (replies,) = _collect([fast])

    kinds = Counter(
        "tc" if dns.message.from_wire(r).flags & dns.flags.TC else "answer" for r in replies
    )
    allowed = CLIENT_QPS * (elapsed + SETTLE_S) + CLIENT_QPS + 1
    assert CLIENT_QPS <= kinds["answer"] <= allowed
    excess = sent - kinds["answer"]
    assert abs(kinds["tc"] - excess / 2) <= 1  # every second excess query gets TC
    assert len(replies) < sent  # the rest were dropped
    assert all(reply.answer for reply in other)  # the other registered client is unaffected


def test_tcp_is_not_rate_limited(limited: Server) -> None:
    results = [
        limited.query("www.netflix.com", "A", tcp=True).rcode() for _ in range(3 * CLIENT_QPS)
    ]
    assert results == [dns.rcode.NOERROR] * (3 * CLIENT_QPS)


def test_malformed_flood_from_unregistered_source_is_capped(limited: Server) -> None:
    (sock,) = _sockets(["127.2.0.1"])
    bad = b"\x12\x34\x01\x00\x00\x02\x00\x00\x00\x00\x00\x00"  # QDCOUNT 0: FORMERR
    start = time.monotonic()
    for _ in range(200):
        sock.sendto(bad, ("127.0.0.1", limited.port))
    elapsed = time.monotonic() - start
    (replies,) = _collect([sock])
    assert 1 <= len(replies) <= REFUSED_QPS * (elapsed + SETTLE_S) + REFUSED_QPS + 1
