"""Misbehaving upstreams against the real server: dead, slow, spoofing, crafted replies."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import pytest

import tests.fake_upstream
from tests.e2e.harness import Server, running_server
from tests.fake_upstream import CRAFTED, SPOOF_ADDRESS, FakeUpstream
from tests.unit.test_upstream import CRAFTED_NAMES_AND_RDATA, crafted_names_and_rdata


def _addresses(reply: dns.message.Message) -> list[str]:
    return sorted(rdata.to_text() for rrset in reply.answer for rdata in rrset)


def _timed(server: Server, name: str) -> tuple[dns.message.Message, float]:
    started = time.monotonic()
    reply = server.query(name, "A")
    return reply, time.monotonic() - started


def _rss_kib(server: Server) -> int:
    assert server.process is not None
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_dead_upstream_stale_for_cached_servfail_for_uncached_within_2s(
    server: Server, upstream: FakeUpstream
) -> None:
    upstream.add("stale.example.org", "A", ["stale.example.org. 1 IN A 192.0.2.70"])
    fresh = server.query("stale.example.org")
    assert _addresses(fresh) == ["192.0.2.70"] and fresh.answer[0].ttl == 1
    time.sleep(1.1)  # let the entry expire
    upstream.drop = True
    stale, took = _timed(server, "stale.example.org")
    assert _addresses(stale) == ["192.0.2.70"] and stale.answer[0].ttl == 30 and took < 2.0
    nothing, took = _timed(server, "uncached.example.org")
    assert nothing.rcode() == dns.rcode.SERVFAIL and took < 2.0


@pytest.mark.slow
def test_slow_upstream_stale_after_1_8_s_then_refreshed_in_background(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    upstream.add("slow.example.org", "A", ["slow.example.org. 1 IN A 192.0.2.71"])
    override = {"upstream": {"timeout": 3.0, "attempts": 1}}
    with running_server(tmp_path, upstream.address, override) as server:
        assert _addresses(server.query("slow.example.org")) == ["192.0.2.71"]
        time.sleep(1.1)  # let the entry expire
        upstream.replace("slow.example.org", "A", ["slow.example.org. 300 IN A 192.0.2.72"])
        upstream.delay_s = 2.6  # answers, but after the client's 1.8 s
        stale, took = _timed(server, "slow.example.org")
        assert _addresses(stale) == ["192.0.2.71"] and stale.answer[0].ttl == 30
        assert 1.6 <= took < 2.4
        upstream.delay_s = 0.0
        # the fetch that was still running refreshes the entry: no further upstream query
        for _ in range(40):
            refreshed = server.query("slow.example.org")
            if _addresses(refreshed) == ["192.0.2.72"]:
                break
            time.sleep(0.1)
        assert _addresses(refreshed) == ["192.0.2.72"] and refreshed.answer[0].ttl > 30
        assert upstream.count("slow.example.org") == 2


@pytest.fixture
def second() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        fake.add("example.org", "A", ["example.org. 300 IN A 192.0.2.2"])
        yield fake


def test_first_upstream_dead_second_answers(
    tmp_path: Path, upstream: FakeUpstream, second: FakeUpstream
) -> None:
    upstream.drop = True
    override = {"upstream": {"servers": [upstream.address, second.address]}}
    with running_server(tmp_path, upstream.address, override) as server:
        reply, took = _timed(server, "example.org")
        assert _addresses(reply) == ["192.0.2.2"] and took < 1.5
        assert upstream.count("example.org") == 1
        second.add("other.example.org", "A", ["other.example.org. 300 IN A 192.0.2.3"])
        reply = server.query("other.example.org", "A")
        assert _addresses(reply) == ["192.0.2.3"]
        assert upstream.count("other.example.org") == 0  # the healthy one is asked first now


def test_spoofed_upstream_replies_are_ignored(server: Server, upstream: FakeUpstream) -> None:
    upstream.spoof_first = True
    upstream.add("spoofed.example.org", "A", ["spoofed.example.org. 300 IN A 192.0.2.73"])
    reply = server.query("spoofed.example.org")
    assert _addresses(reply) == ["192.0.2.73"] and SPOOF_ADDRESS not in reply.to_text()
    again = server.query("spoofed.example.org")  # and nothing spoofed got into the cache
    assert _addresses(again) == ["192.0.2.73"]


@pytest.mark.parametrize("kind", CRAFTED)
def test_crafted_upstream_reply_fails_and_memory_stays_bounded(
    server: Server, upstream: FakeUpstream, kind: str
) -> None:
    upstream.crafted = kind
    server.query("warm-up.example.org")  # allocations of a first crafted reply
    before = _rss_kib(server)
    for index in range(40):
        reply, took = _timed(server, f"crafted{index}.example.org")
        assert reply.rcode() == dns.rcode.SERVFAIL and not reply.answer and took < 2.0
    assert _rss_kib(server) - before < 8 * 1024
    upstream.crafted = None
    assert _addresses(server.query("example.org")) == ["192.0.2.1"]


@pytest.mark.parametrize("kind", CRAFTED_NAMES_AND_RDATA)
def test_upstream_reply_with_bad_names_or_rdata_gets_servfail_and_is_not_cached(
    server: Server, upstream: FakeUpstream, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 2: an unparseable upstream answer is an upstream failure, never relayed (and so
    never cached: only answers are)."""
    monkeypatch.setattr(tests.fake_upstream, "_crafted", crafted_names_and_rdata)
    upstream.crafted = kind
    reply = server.query("bad-rdata.example.org", "A")
    assert reply.rcode() == dns.rcode.SERVFAIL and not reply.answer and not reply.authority
    upstream.crafted = None
    assert _addresses(server.query("example.org")) == ["192.0.2.1"]
