"""Forwarder against real fake upstreams on 127.0.0.1 (UDP and TCP)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest
import uvloop
from dnslib import DNSBuffer, DNSRecord

import tests.fake_upstream
from smartdns.config.model import HostPort, UpstreamConfig
from smartdns.core.answers import Responder
from smartdns.core.wire import FLAG_CD, FLAG_RD, QCLASS_IN, QTYPE_A, QTYPE_AAAA, Query
from smartdns.errors import UpstreamError
from smartdns.upstream.forwarder import Forwarder
from smartdns.upstream.resolver import DEADLINE_S, UpstreamBusyError
from tests.fake_upstream import CRAFTED, SPOOF_ADDRESS, FakeUpstream

WAIT_S = 10.0  # safety net on every await; the forwarder's own deadline is 4 s
EDNS_SIZE = 1232


def encode_name(name: str) -> bytes:
    """Wire format of `name`, ending with the root label."""
    labels = [label.encode("ascii") for label in name.rstrip(".").split(".") if label]
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


def make_query(
    name: str,
    qtype: int = QTYPE_A,
    *,
    query_id: int = 0x1234,
    flags: int = FLAG_RD,
    dnssec_ok: bool = False,
    udp_size: int = 4096,
) -> Query:
    wire_name = encode_name(name)
    question = wire_name + qtype.to_bytes(2, "big") + QCLASS_IN.to_bytes(2, "big")
    return Query(
        id=query_id,
        flags=flags,
        question=question,
        qname=wire_name.lower(),
        qtype=qtype,
        qclass=QCLASS_IN,
        has_edns=True,
        udp_size=udp_size,
        dnssec_ok=dnssec_ok,
    )


def upstream_config(
    *ups: FakeUpstream | HostPort, timeout: float = 0.3, attempts: int = 1, max_qps: int = 1000
) -> UpstreamConfig:
    servers = tuple(u if isinstance(u, HostPort) else HostPort(u.host, u.port) for u in ups)
    return UpstreamConfig(servers=servers, timeout=timeout, attempts=attempts, max_qps=max_qps)


async def resolve(forwarder: Forwarder, query: Query) -> DNSRecord:
    async with asyncio.timeout(WAIT_S):
        answer = await forwarder.resolve(query)  # parsed once, by the forwarder
    # the client's reply as the pipeline builds it from that answer
    return DNSRecord.parse(Responder(EDNS_SIZE).forwarded(query, answer, answer.records, 65535))


def addresses(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr]


@pytest.fixture
def up() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        server.add("example.com", "A", ["example.com. 300 IN A 192.0.2.1"])
        yield server


@pytest.fixture
def up2() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        server.add("example.com", "A", ["example.com. 300 IN A 192.0.2.2"])
        yield server


def closed_port() -> HostPort:
    """A UDP port on 127.0.0.1 with nobody listening (ICMP port unreachable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return HostPort("127.0.0.1", sock.getsockname()[1])


async def test_answer_parsed_and_asked_with_our_lower_cased_question(up: FakeUpstream) -> None:
    forwarder = Forwarder(upstream_config(up), edns_udp_size=EDNS_SIZE)
    reply = await resolve(forwarder, make_query("Example.COM"))
    assert addresses(reply) == ["192.0.2.1"]
    assert forwarder.stats.answers == 1
    received = up.queries[-1]
    assert (received.transport, received.qname, received.qtype) == ("udp", "example.com", "A")
    assert received.raw[12:25] == encode_name("example.com")


async def test_nxdomain_and_nodata_are_answers(up: FakeUpstream) -> None:
    forwarder = Forwarder(upstream_config(up), edns_udp_size=EDNS_SIZE)
    nxdomain = await resolve(forwarder, make_query("missing.test"))
    nodata = await resolve(forwarder, make_query("example.com", QTYPE_AAAA))
    assert (nxdomain.header.rcode, nodata.header.rcode) == (3, 0)
    assert nodata.rr == [] and len(nodata.auth) == 1


async def test_fresh_random_ids_not_the_clients(up: FakeUpstream) -> None:
    forwarder = Forwarder(upstream_config(up), edns_udp_size=EDNS_SIZE)
    for _ in range(12):
        await resolve(forwarder, make_query("example.com", query_id=0x1234))
    ids = [q.id for q in up.queries]
    sources = {q.source[1] for q in up.queries}
    assert 0x1234 not in ids
    assert len(set(ids)) >= 10  # 12 draws from 65536: a collision or two at most
    assert len(sources) >= 10  # a fresh OS-chosen source port per attempt


async def test_opt_has_our_size_and_no_client_options(up: FakeUpstream) -> None:
    # The client's query carried ECS; the Query value has no options, and neither has ours.
    forwarder = Forwarder(upstream_config(up), edns_udp_size=1400)
    await resolve(forwarder, make_query("example.com", udp_size=4096))
    received = up.queries[-1]
    assert received.has_opt
    assert received.udp_size == 1400
    assert received.edns_options == []
    assert received.dnssec_ok is False
    record = DNSRecord.parse(received.raw)
    header = received.raw[4:12]
    assert header == b"\x00\x01\x00\x00\x00\x00\x00\x01"  # QD 1, AN 0, NS 0, AR 1 (the OPT)
    assert len(record.ar) == 1


async def test_do_and_cd_copied_rd_set(up: FakeUpstream) -> None:
    forwarder = Forwarder(upstream_config(up), edns_udp_size=EDNS_SIZE)
    await resolve(forwarder, make_query("example.com", dnssec_ok=True, flags=FLAG_RD | FLAG_CD))
    received = up.queries[-1]
    assert received.dnssec_ok is True
    assert received.flags == FLAG_RD | FLAG_CD
    await resolve(forwarder, make_query("example.com", flags=0))
    assert up.queries[-1].flags == FLAG_RD
    assert up.queries[-1].dnssec_ok is False


async def test_truncated_udp_answer_retried_over_tcp(up: FakeUpstream) -> None:
    up.large_answer("big.test", 120)
    forwarder = Forwarder(upstream_config(up), edns_udp_size=EDNS_SIZE)
    reply = await resolve(forwarder, make_query("big.test"))
    assert len(reply.rr) == 120
    assert [q.transport for q in up.queries] == ["udp", "tcp"]
    assert forwarder.stats.tcp_retries == 1


async def test_truncate_knob_forces_tcp(up: FakeUpstream) -> None:
    up.truncate_udp = True
    forwarder = Forwarder(upstream_config(up), edns_udp_size=EDNS_SIZE)
    reply = await resolve(forwarder, make_query("example.com"))
    assert addresses(reply) == ["192.0.2.1"]
    assert up.count(qtype="A") == 2 and up.queries[-1].transport == "tcp"


async def test_dead_first_upstream_then_health_order_prefers_second(
    up: FakeUpstream, up2: FakeUpstream
) -> None:
    up.drop = True
    forwarder = Forwarder(upstream_config(up, up2, attempts=2), edns_udp_size=EDNS_SIZE)
    reply = await resolve(forwarder, make_query("example.com"))
    assert addresses(reply) == ["192.0.2.2"]
    assert up.count() == 2  # both attempts at the dead one
    assert forwarder.stats.timeouts == 2

    reply = await resolve(forwarder, make_query("example.com"))
    assert addresses(reply) == ["192.0.2.2"]
    assert up.count() == 2  # not asked again: the healthy one goes first
    assert up2.count() == 2


async def test_recovered_upstream_resets_health(up: FakeUpstream, up2: FakeUpstream) -> None:
    up.drop = True
    forwarder = Forwarder(upstream_config(up, up2), edns_udp_size=EDNS_SIZE)
    await resolve(forwarder, make_query("example.com"))
    up.drop = False
    up2.drop = True
    assert addresses(await resolve(forwarder, make_query("example.com"))) == ["192.0.2.1"]
    up2.drop = False
    # up2 now has one failure, up none: up is first again
    assert addresses(await resolve(forwarder, make_query("example.com"))) == ["192.0.2.1"]


async def test_refused_port_fails_fast_to_next(up2: FakeUpstream) -> None:
    forwarder = Forwarder(upstream_config(closed_port(), up2, timeout=2.0), edns_udp_size=EDNS_SIZE)
    started = time.monotonic()
    reply = await resolve(forwarder, make_query("example.com"))
    assert addresses(reply) == ["192.0.2.2"]
    assert time.monotonic() - started < 1.5  # ICMP unreachable, not the 2 s timeout
    assert forwarder.stats.failures == 1


async def test_all_dead_raises_within_deadline(up: FakeUpstream, up2: FakeUpstream) -> None:
    up.drop = up2.drop = True
    # 2 servers x 2 attempts x 1.5 s would be 6 s: the overall deadline cuts it at 4 s.
    forwarder = Forwarder(
        upstream_config(up, up2, timeout=1.5, attempts=2), edns_udp_size=EDNS_SIZE
    )
    started = time.monotonic()
    with pytest.raises(UpstreamError) as raised:
        await resolve(forwarder, make_query("secret-name.example.com"))
    assert time.monotonic() - started < DEADLINE_S + 0.5
    assert "secret-name" not in str(raised.value)
    assert "2 upstream" in str(raised.value)


async def test_all_failing_quickly_raises(up: FakeUpstream, up2: FakeUpstream) -> None:
    up.garbage = up2.garbage = True
    forwarder = Forwarder(upstream_config(up, up2, attempts=2), edns_udp_size=EDNS_SIZE)
    with pytest.raises(UpstreamError, match="2 upstream"):
        await resolve(forwarder, make_query("example.com"))
    assert forwarder.stats.failures == 4


async def test_spoofed_replies_ignored(up: FakeUpstream) -> None:
    up.spoof_first = True
    forwarder = Forwarder(upstream_config(up), edns_udp_size=EDNS_SIZE)
    reply = await resolve(forwarder, make_query("example.com"))
    assert addresses(reply) == ["192.0.2.1"]
    assert SPOOF_ADDRESS not in addresses(reply)
    assert forwarder.stats.mismatched >= 2


async def test_spoofs_alone_never_accepted(up: FakeUpstream) -> None:
    # The spoofs arrive at once, the real answer only after the attempt's timeout.
    up.spoof_first = True
    up.delay_s = 1.0
    forwarder = Forwarder(upstream_config(up, timeout=0.3), edns_udp_size=EDNS_SIZE)
    with pytest.raises(UpstreamError):
        await resolve(forwarder, make_query("example.com"))
    assert forwarder.stats.mismatched == 2
    assert forwarder.stats.timeouts == 1  # the spoofs did not end the attempt early
    assert forwarder.stats.answers == 0


async def test_garbage_goes_to_next_server(up: FakeUpstream, up2: FakeUpstream) -> None:
    up.garbage = True
    forwarder = Forwarder(upstream_config(up, up2), edns_udp_size=EDNS_SIZE)
    reply = await resolve(forwarder, make_query("example.com"))
    assert addresses(reply) == ["192.0.2.2"]
    assert forwarder.stats.failures == 1
    assert forwarder.stats.timeouts == 0  # rejected at once, not waited out


@pytest.mark.parametrize("rcode", ["SERVFAIL", "REFUSED", "NOTIMP", "FORMERR"])
async def test_refusing_rcode_goes_to_next_server(
    up: FakeUpstream, up2: FakeUpstream, rcode: str
) -> None:
    up.set_rcode("example.com", rcode)
    forwarder = Forwarder(upstream_config(up, up2, attempts=2), edns_udp_size=EDNS_SIZE)
    reply = await resolve(forwarder, make_query("example.com"))
    assert addresses(reply) == ["192.0.2.2"]
    assert up.count() == 1  # no second attempt at the same server


async def test_servfail_does_not_demote_server(up: FakeUpstream, up2: FakeUpstream) -> None:
    up.set_rcode("fail.test", "SERVFAIL")
    up2.add("fail.test", "A", ["fail.test. 60 IN A 192.0.2.9"])
    forwarder = Forwarder(upstream_config(up, up2), edns_udp_size=EDNS_SIZE)
    await resolve(forwarder, make_query("fail.test"))
    await resolve(forwarder, make_query("example.com"))
    assert up.count("example.com") == 1  # still first in order


async def test_rate_limit_fails_at_once(up: FakeUpstream) -> None:
    forwarder = Forwarder(upstream_config(up, max_qps=2), edns_udp_size=EDNS_SIZE)
    await resolve(forwarder, make_query("example.com"))
    await resolve(forwarder, make_query("example.com"))
    started = time.monotonic()
    with pytest.raises(UpstreamError, match="rate limit"):
        await resolve(forwarder, make_query("example.com"))
    assert time.monotonic() - started < 0.1
    assert forwarder.stats.rate_limited == 1
    assert up.count() == 2


async def test_closed_forwarder_refuses(up: FakeUpstream) -> None:
    forwarder = Forwarder(upstream_config(up), edns_udp_size=EDNS_SIZE)
    forwarder.close()
    with pytest.raises(UpstreamError):
        await resolve(forwarder, make_query("example.com"))


async def test_cancellation_propagates(up: FakeUpstream) -> None:
    up.drop = True
    forwarder = Forwarder(upstream_config(up, timeout=2.0), edns_udp_size=EDNS_SIZE)
    task = asyncio.create_task(forwarder.resolve(make_query("example.com")))
    assert await asyncio.to_thread(up.wait_for_queries, 1, WAIT_S)  # in flight
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(WAIT_S):
            await task


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_no_socket_leak(up: FakeUpstream, up2: FakeUpstream) -> None:
    up.large_answer("big.test", 120)
    forwarder = Forwarder(upstream_config(up, up2, timeout=0.2), edns_udp_size=EDNS_SIZE)
    await resolve(forwarder, make_query("example.com"))  # warm up lazily opened fds
    assert up.wait_idle(WAIT_S)
    before = open_fds()

    queries = [make_query("example.com"), make_query("big.test"), make_query("missing.test")]
    await asyncio.gather(*(resolve(forwarder, q) for q in queries * 5))
    up.drop = True  # timeouts, then the second server
    await asyncio.gather(*(resolve(forwarder, q) for q in queries[:1] * 5))
    up.drop, up2.garbage = False, True
    up.garbage = True  # every server fails
    for _ in range(3):
        with pytest.raises(UpstreamError):
            await resolve(forwarder, make_query("example.com"))
    # cancelled in flight
    up.garbage, up2.garbage = False, False
    up.drop = up2.drop = True
    seen = len(up.queries) + len(up2.queries)
    task = asyncio.create_task(forwarder.resolve(make_query("example.com")))
    # in flight at whichever server health order puts first
    assert await asyncio.to_thread(
        lambda: (
            up.wait_for_queries(len(up.queries) + 1, 0.5)
            or up2.wait_for_queries(len(up2.queries) + 1, WAIT_S)
        )
    )
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(WAIT_S):
            await task
    assert len(up.queries) + len(up2.queries) > seen

    assert up.wait_idle(WAIT_S) and up2.wait_idle(WAIT_S)  # the fake's own TCP sockets
    assert open_fds() == before


def test_works_under_uvloop(up: FakeUpstream) -> None:
    up.large_answer("big.test", 120)
    up2 = closed_port()

    async def run() -> tuple[DNSRecord, DNSRecord]:
        forwarder = Forwarder(upstream_config(up2, up), edns_udp_size=EDNS_SIZE)
        return (
            await resolve(forwarder, make_query("example.com")),
            await resolve(forwarder, make_query("big.test")),
        )

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        small, big = runner.run(run())
    assert addresses(small) == ["192.0.2.1"]
    assert len(big.rr) == 120


# ---- resilience ----------------------------------------------------------------------------


async def test_in_flight_bound_answers_at_once(up: FakeUpstream) -> None:
    up.drop = True
    forwarder = Forwarder(
        upstream_config(up, timeout=2.0), edns_udp_size=EDNS_SIZE, max_in_flight=2
    )
    waiting = [asyncio.create_task(forwarder.resolve(make_query("example.com"))) for _ in range(2)]
    assert await asyncio.to_thread(up.wait_for_queries, 2, WAIT_S)
    started = time.monotonic()
    with pytest.raises(UpstreamBusyError):
        await resolve(forwarder, make_query("example.com"))
    assert time.monotonic() - started < 0.1
    assert forwarder.stats.overloaded == 1 and up.count() == 2
    for task in waiting:
        task.cancel()
    await asyncio.wait(waiting, timeout=WAIT_S)
    up.drop = False
    assert addresses(await resolve(forwarder, make_query("example.com"))) == ["192.0.2.1"]


async def test_failed_upstream_is_probed_and_comes_back(
    up: FakeUpstream, up2: FakeUpstream
) -> None:
    up.drop = True
    forwarder = Forwarder(upstream_config(up, up2), edns_udp_size=EDNS_SIZE, probe_interval_s=0.2)
    assert addresses(await resolve(forwarder, make_query("example.com"))) == ["192.0.2.2"]
    assert addresses(await resolve(forwarder, make_query("example.com"))) == ["192.0.2.2"]
    up.drop = False  # recovered; only a probe can tell
    seen = up.count()
    await asyncio.sleep(0.25)  # let the probe interval pass
    await resolve(forwarder, make_query("example.com"))  # traffic starts the due probe
    assert await asyncio.to_thread(up.wait_for_queries, seen + 1, WAIT_S)
    probe = up.queries[-1]
    assert (probe.qname, probe.qtype) == ("", "NS")  # `. NS`: nothing of any client
    for _ in range(50):  # the probe's answer lands in the background
        if addresses(await resolve(forwarder, make_query("example.com"))) == ["192.0.2.1"]:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the recovered upstream never came back first")
    assert forwarder.stats.probes >= 1


async def test_probe_of_a_still_dead_upstream_keeps_it_last(
    up: FakeUpstream, up2: FakeUpstream
) -> None:
    up.drop = True
    forwarder = Forwarder(
        upstream_config(up, up2, timeout=0.2), edns_udp_size=EDNS_SIZE, probe_interval_s=0.1
    )
    await resolve(forwarder, make_query("example.com"))
    for _ in range(3):
        await asyncio.sleep(0.15)
        started = time.monotonic()
        assert addresses(await resolve(forwarder, make_query("example.com"))) == ["192.0.2.2"]
        assert time.monotonic() - started < 0.15  # the probe never delays a client query
    forwarder.close()


@pytest.mark.parametrize("kind", CRAFTED)
async def test_crafted_reply_is_a_failure(up: FakeUpstream, up2: FakeUpstream, kind: str) -> None:
    up.crafted = kind
    forwarder = Forwarder(upstream_config(up, up2), edns_udp_size=EDNS_SIZE)
    started = time.monotonic()
    assert addresses(await resolve(forwarder, make_query("example.com"))) == ["192.0.2.2"]
    assert time.monotonic() - started < 0.25  # rejected at once, not waited out
    assert forwarder.stats.failures == 1 and forwarder.stats.timeouts == 0


# Answers a client's parser refuses, or comes to refuse once the cache rewrites TTLs (the last
# one: the second owner name is the first record's TTL). Found by fuzzing (test_fuzz_wire).
CRAFTED_NAMES_AND_RDATA = (
    "a_rdlength_0",
    "aaaa_rdlength_4",
    "owner_pointer_into_header",
    "owner_over_255_via_pointer",
    "soa_name_over_255_via_pointer",
    "pointer_into_a_ttl",
)


def crafted_names_and_rdata(raw: bytes, kind: str) -> bytes:
    """Right ID and question, then one of CRAFTED_NAMES_AND_RDATA; other kinds as before."""
    if kind not in CRAFTED_NAMES_AND_RDATA:
        return _FAKE_UPSTREAM_CRAFTED(raw, kind)
    buffer = DNSBuffer()
    DNSRecord.parse(raw).q.pack(buffer)
    question = bytes(buffer.data)
    long_labels = (b"\x3f" + b"a" * 63) * 3 + b"\x3f" + b"b" * 63  # 256 octets with any suffix
    rr = struct.Struct("!HHIH")
    an, ns, rcode = 1, 0, 0
    if kind == "a_rdlength_0":
        records = b"\xc0\x0c" + rr.pack(1, 1, 300, 0)
    elif kind == "aaaa_rdlength_4":
        records = b"\xc0\x0c" + rr.pack(28, 1, 300, 4) + b"\xc0\x00\x02\x01"
    elif kind == "owner_pointer_into_header":
        records = b"\xc0\x00" + rr.pack(1, 1, 300, 4) + b"\xc0\x00\x02\x01"
    elif kind == "owner_over_255_via_pointer":
        records = long_labels[:-64] + b"\x3e" + b"b" * 62 + b"\xc0\x0c"
        records += rr.pack(1, 1, 300, 4) + b"\xc0\x00\x02\x01"
    elif kind == "soa_name_over_255_via_pointer":
        rdata = long_labels[:-64] + b"\x3e" + b"b" * 62 + b"\xc0\x0c" + b"\x00" + bytes(20)
        records = b"\xc0\x0c" + rr.pack(6, 1, 300, len(rdata)) + rdata
        an, ns, rcode = 0, 1, 3
    else:  # pointer_into_a_ttl: the first record's TTL reads as the name "a."
        ttl_offset = 12 + len(question) + 2 + 4
        records = b"\xc0\x0c" + rr.pack(1, 1, 0x01610000, 4) + b"\xc0\x00\x02\x01"
        records += bytes([0xC0, ttl_offset]) + rr.pack(1, 1, 300, 4) + b"\xc0\x00\x02\x02"
        an = 2
    header = raw[:2] + struct.pack("!HHHHH", 0x8180 | rcode, 1, an, ns, 0)
    return header + question + records


_FAKE_UPSTREAM_CRAFTED = tests.fake_upstream._crafted


@pytest.mark.parametrize("kind", CRAFTED_NAMES_AND_RDATA)
async def test_reply_with_bad_names_or_rdata_is_a_failure(
    up: FakeUpstream, up2: FakeUpstream, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tests.fake_upstream, "_crafted", crafted_names_and_rdata)
    up.crafted = kind
    forwarder = Forwarder(upstream_config(up, up2), edns_udp_size=EDNS_SIZE)
    assert addresses(await resolve(forwarder, make_query("example.com"))) == ["192.0.2.2"]
    assert forwarder.stats.failures == 1 and forwarder.stats.timeouts == 0
    forwarder.close()
