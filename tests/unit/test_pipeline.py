"""pipeline: cache before upstream, coalescing, serve-stale, CNAME chains cut with the zones of
now. A real Forwarder talks to a real FakeUpstream; only the cache's clock is injected."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from smartdns.config.model import (
    CacheConfig,
    Config,
    HostPort,
    RateLimitConfig,
    Region,
    UnblockConfig,
    Unregistered,
    UpstreamConfig,
)
from smartdns.core.answers import Responder, build_local_zones
from smartdns.core.cache import AnswerCache
from smartdns.core.clients import AuthorizedClients, device_digest
from smartdns.core.counters import Authorization, Metrics, Transport
from smartdns.core.peer import Peer, stream_peer, udp_peer
from smartdns.core.ratelimit import RateLimits
from smartdns.node.daemon import build_settings
from smartdns.serve.pipeline import Pipeline, Settings
from smartdns.upstream.forwarder import Forwarder
from tests.fake_upstream import FakeUpstream

WAIT_S = 10.0
CLIENT = "127.0.0.2"
US = Region(ipv4=(ipaddress.IPv4Address("198.51.100.10"),))


def _unblock(*zones: str) -> UnblockConfig:
    return UnblockConfig(
        ttl=60,
        regions=MappingProxyType({"us": US}),
        zones=MappingProxyType(dict.fromkeys(zones, "us")),
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def up() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        server.add("example.org", "A", ["example.org. 300 IN A 192.0.2.1"])
        server.add(
            "alias.example.org",
            "A",
            [
                "alias.example.org. 300 IN CNAME cdn.example.net.",
                "cdn.example.net. 300 IN A 192.0.2.9",
            ],
        )
        yield server


def _pipeline(up: FakeUpstream, clock: Clock, *zones: str) -> Pipeline:
    settings = Settings(
        responder=Responder(1232),
        zones=build_local_zones(_unblock(*zones)),
        unregistered=Unregistered.REFUSE,
        forwarder=Forwarder(
            UpstreamConfig(servers=(HostPort(up.host, up.port),), timeout=0.3, attempts=1),
            edns_udp_size=1232,
        ),
        cache=AnswerCache(CacheConfig()),
    )
    clients = AuthorizedClients.from_prefixes([(4, int(ipaddress.IPv4Address(CLIENT)), 32)])
    return Pipeline(settings, clients, Metrics(), clock=clock)


async def _ask(pipeline: Pipeline, name: str, qtype: str = "A") -> dns.message.Message:
    reply = pipeline.handle(dns.message.make_query(name, qtype).to_wire(), udp_peer(CLIENT))
    if reply is not None and not isinstance(reply, bytes):
        async with asyncio.timeout(WAIT_S):
            reply = await reply
    assert reply is not None
    return dns.message.from_wire(reply)


def _answer(reply: dns.message.Message) -> list[tuple[str, int, str]]:
    return [
        (rrset.name.to_text(), rrset.ttl, rdata.to_text())
        for rrset in reply.answer
        for rdata in rrset
    ]


async def test_hit_is_answered_synchronously_with_ttl_counted_down(up: FakeUpstream) -> None:
    clock = Clock()
    pipeline = _pipeline(up, clock)
    assert _answer(await _ask(pipeline, "example.org")) == [("example.org.", 300, "192.0.2.1")]
    clock.now += 100.5
    wire = dns.message.make_query("Example.Org", "A").to_wire()
    reply = pipeline.handle(wire, udp_peer(CLIENT))
    assert isinstance(reply, bytes)  # no task, no await: the cache answered
    assert reply[:2] == wire[:2] and reply[12 : len(wire)] == wire[12:]
    assert _answer(dns.message.from_wire(reply)) == [("Example.Org.", 200, "192.0.2.1")]
    assert up.count() == 1
    cache = pipeline.settings.cache
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)


async def test_identical_concurrent_misses_share_one_upstream_query(up: FakeUpstream) -> None:
    up.delay_s = 0.1
    pipeline = _pipeline(up, Clock())
    replies = await asyncio.gather(*(_ask(pipeline, "example.org") for _ in range(20)))
    assert all(_answer(reply) == [("example.org.", 300, "192.0.2.1")] for reply in replies)
    assert up.count() == 1


async def test_stale_answer_when_the_upstream_fails(up: FakeUpstream) -> None:
    clock = Clock()
    pipeline = _pipeline(up, clock)
    await _ask(pipeline, "example.org")
    clock.now += 301  # expired, well within serve_stale
    up.drop = True
    reply = await _ask(pipeline, "example.org")
    assert _answer(reply) == [("example.org.", 30, "192.0.2.1")]
    assert pipeline.settings.cache.stale_served == 1
    nothing = await _ask(pipeline, "never.example.org")
    assert nothing.rcode() == dns.rcode.SERVFAIL
    # the failure is remembered: the next query is answered at once, without upstream
    asked = up.count()
    reply = pipeline.handle(dns.message.make_query("example.org", "A").to_wire(), udp_peer(CLIENT))
    assert reply is not None and not isinstance(reply, bytes)
    async with asyncio.timeout(0.1):
        assert _answer(dns.message.from_wire(await reply)) == [("example.org.", 30, "192.0.2.1")]
    assert up.count() == asked


async def test_reload_applies_new_zones_to_a_cached_cname_chain(up: FakeUpstream) -> None:
    pipeline = _pipeline(up, Clock(), "netflix.com")
    plain = await _ask(pipeline, "alias.example.org")
    assert [data for _, _, data in _answer(plain)] == ["cdn.example.net.", "192.0.2.9"]
    pipeline.settings = dataclasses.replace(
        pipeline.settings, zones=build_local_zones(_unblock("netflix.com", "example.net"))
    )
    cut = await _ask(pipeline, "alias.example.org")
    assert _answer(cut) == [
        ("alias.example.org.", 300, "cdn.example.net."),
        ("cdn.example.net.", 60, "198.51.100.10"),
    ]
    assert up.count() == 1


async def test_unreadable_chain_gets_servfail_not_the_real_address(up: FakeUpstream) -> None:
    pipeline = _pipeline(up, Clock(), "example.net")
    up.crafted = "forward_pointer"  # a CNAME whose target cannot be read: an upstream failure
    reply = await _ask(pipeline, "other.example.org")
    assert reply.rcode() == dns.rcode.SERVFAIL and not reply.answer


def _limited(up: FakeUpstream, clock: Clock, client_qps: int, refused_qps: int) -> Pipeline:
    pipeline = _pipeline(up, clock, "netflix.com")
    limits = RateLimits(RateLimitConfig(client_qps=client_qps, refused_qps=refused_qps))
    pipeline.settings = dataclasses.replace(pipeline.settings, limits=limits)
    return pipeline


def _kind(reply: object) -> str:
    if reply is None:
        return "drop"
    assert isinstance(reply, bytes)
    return "tc" if dns.message.from_wire(reply).flags & dns.flags.TC else "answer"


def test_client_over_its_rate_gets_tc_and_drops_alternately_then_recovers(up: FakeUpstream) -> None:
    clock = Clock()
    pipeline = _limited(up, clock, client_qps=3, refused_qps=1)
    wire = dns.message.make_query("www.netflix.com", "A").to_wire()
    replies = [pipeline.handle(wire, udp_peer(CLIENT)) for _ in range(7)]
    kinds = [_kind(reply) for reply in replies]
    assert kinds == ["answer"] * 3 + ["tc", "drop", "tc", "drop"]
    assert pipeline.handle(wire, stream_peer(CLIENT)) is not None  # TCP is not limited
    clock.now += 1.0
    assert isinstance(pipeline.handle(wire, udp_peer(CLIENT)), bytes)


def test_refused_and_error_replies_share_the_refused_rate(up: FakeUpstream) -> None:
    clock = Clock()
    pipeline = _limited(up, clock, client_qps=100, refused_qps=2)
    query = dns.message.make_query("www.netflix.com", "A").to_wire()
    formerr = query[:4] + b"\x00\x02" + query[6:]
    stranger = "127.0.0.9"
    replies = [pipeline.handle(packet, udp_peer(stranger)) for packet in (query, formerr, query)]
    assert [r is not None for r in replies] == [True, True, False]
    assert pipeline.handle(query, stream_peer(stranger)) is not None
    assert pipeline.handle(formerr, udp_peer(CLIENT)) is not None  # authorized: not limited
    clock.now += 1.0
    assert pipeline.handle(query, udp_peer(stranger)) is not None


def _udp(pipeline: Pipeline, wire: bytes, host: str = CLIENT) -> bytes | None:
    reply = pipeline.handle(wire, udp_peer(host))
    assert reply is None or isinstance(reply, bytes)
    return reply


async def test_packet_cache_answers_repeats_with_their_own_id_and_current_ttl(
    up: FakeUpstream,
) -> None:
    clock = Clock()
    pipeline = _pipeline(up, clock, "netflix.com")
    await _ask(pipeline, "example.org")  # fills the answer cache
    first = dns.message.make_query("example.org", "A")
    again = dns.message.make_query("example.org", "A")
    again.id = first.id ^ 0xFFFF
    one, two = _udp(pipeline, first.to_wire()), _udp(pipeline, again.to_wire())
    assert one is not None and two is not None and one[2:] == two[2:]
    assert dns.message.from_wire(two).id == again.id
    assert len(pipeline.settings.packets_for(udp_peer(CLIENT), True)) == 1
    hits = pipeline.settings.cache.hits
    clock.now += 1.0  # the countdown moved: the stored reply is not reused
    later = dns.message.from_wire(_udp(pipeline, first.to_wire()) or b"")
    assert later.answer[0].ttl == 299 and pipeline.settings.cache.hits == hits + 1


def test_packet_cache_never_answers_a_source_that_lost_its_registration(up: FakeUpstream) -> None:
    pipeline = _pipeline(up, Clock(), "netflix.com")
    wire = dns.message.make_query("www.netflix.com", "A").to_wire()
    assert dns.message.from_wire(_udp(pipeline, wire) or b"").answer
    pipeline.clients = AuthorizedClients.from_prefixes([])
    refused = dns.message.from_wire(_udp(pipeline, wire) or b"")
    assert refused.rcode() == dns.rcode.REFUSED and not refused.answer


def test_packet_cache_hits_still_count_against_the_refused_rate(up: FakeUpstream) -> None:
    clock = Clock()
    pipeline = _limited(up, clock, client_qps=100, refused_qps=2)
    wire = dns.message.make_query("www.netflix.com", "A").to_wire()
    replies = [_udp(pipeline, wire, "127.0.0.9") for _ in range(4)]
    assert [reply is not None for reply in replies] == [True, True, False, False]


def test_reload_starts_with_an_empty_packet_cache_and_keeps_the_answer_cache(
    up: FakeUpstream,
) -> None:
    config = Config(
        path=Path("smartdns.yaml"),
        unblock=_unblock("netflix.com"),
        upstream=UpstreamConfig(servers=(HostPort(up.host, up.port),)),
    )
    pipeline = _pipeline(up, Clock())
    pipeline.settings = build_settings(config)
    _udp(pipeline, dns.message.make_query("www.hulu.com", "A").to_wire(), "127.0.0.9")
    assert len(pipeline.settings.packets_for(udp_peer("127.0.0.9"), False)) == 1
    reloaded = build_settings(config, pipeline.settings)
    assert not any(len(packets) for packets in reloaded.packets)
    assert reloaded.cache is pipeline.settings.cache


@pytest.mark.parametrize("peer_of", [udp_peer, stream_peer])
def test_local_names_are_answered_here_for_clients_and_refused_to_strangers(
    up: FakeUpstream, peer_of: Callable[[str], Peer]
) -> None:
    up.add("_dns.resolver.arpa", "SVCB", ["_dns.resolver.arpa. 300 IN SVCB \\# 3 000100"])
    pipeline = _pipeline(up, Clock(), "netflix.com")
    for name, qtype, rcode, owner in (
        ("_dns.resolver.arpa", "SVCB", dns.rcode.NOERROR, "resolver.arpa."),
        ("use-application-dns.net", "A", dns.rcode.NXDOMAIN, "use-application-dns.net."),
    ):
        wire = dns.message.make_query(name, qtype).to_wire()
        reply = pipeline.handle(wire, peer_of(CLIENT))
        assert isinstance(reply, bytes)  # answered at once: no upstream
        local = dns.message.from_wire(reply)
        assert local.rcode() == rcode and not local.answer
        assert [str(rrset.name) for rrset in local.authority] == [owner]
        stranger = pipeline.handle(wire, peer_of("127.0.0.9"))
        assert isinstance(stranger, bytes)
        assert dns.message.from_wire(stranger).rcode() == dns.rcode.REFUSED
    assert up.count() == 0


async def test_each_query_is_counted_once_under_its_outcome(up: FakeUpstream) -> None:
    clock = Clock()
    pipeline = _limited(up, clock, client_qps=100, refused_qps=1)
    unblock = dns.message.make_query("www.netflix.com", "A").to_wire()
    await _ask(pipeline, "example.org")  # a miss: forward
    packets = [
        (unblock, CLIENT),  # unblock
        (unblock, CLIENT),  # the same again, from the packet cache: unblock
        (dns.message.make_query("example.org", "A").to_wire(), CLIENT),  # forward, cache hit
        (unblock[:4] + b"\x00\x02" + unblock[6:], CLIENT),  # malformed
        (unblock[:2] + b"\x79" + unblock[3:], CLIENT),  # opcode 15: malformed (NOTIMP)
        (unblock, "127.0.0.9"),  # refuse
        (unblock, "127.0.0.9"),  # over refused_qps: rate limited
        (b"\x00", CLIENT),  # unreadable
        (dns.message.make_query("version.bind", "TXT", rdclass="CH").to_wire(), CLIENT),
    ]
    for packet, host in packets:
        pipeline.handle(packet, udp_peer(host))
    counted = {outcome.value: n for (_, outcome), n in pipeline.metrics.queries.items()}
    assert counted == {
        "forward": 2,
        "unblock": 2,
        "malformed": 2,
        "refuse": 2,  # the stranger's first query and CHAOS
        "rate_limited": 1,
        "unreadable": 1,
    }
    assert sum(counted.values()) == len(packets) + 1


def test_notimp_for_another_opcode_copies_it(up: FakeUpstream) -> None:
    pipeline = _pipeline(up, Clock())
    query = dns.message.make_query("example.org", "A")
    query.set_opcode(15)
    reply = pipeline.handle(query.to_wire(), udp_peer(CLIENT))
    assert isinstance(reply, bytes)
    parsed = dns.message.from_wire(reply)
    assert parsed.rcode() == dns.rcode.NOTIMP and parsed.opcode() == 15 and parsed.id == query.id


DEVICE = device_digest("k3v9q2m8x4t6w1z5y7r0a2b4")


def _with_device(pipeline: Pipeline, digest: bytes) -> Pipeline:
    pipeline.clients.apply([], [], devices_present=[digest])
    return pipeline


@pytest.mark.parametrize(
    ("host", "device", "rcode", "by"),
    [
        ("127.0.0.9", DEVICE, dns.rcode.NOERROR, Authorization.DEVICE_ID),  # any address
        (CLIENT, device_digest("unknownid0000000000000"), dns.rcode.REFUSED, Authorization.NONE),
        (CLIENT, None, dns.rcode.NOERROR, Authorization.ADDRESS),  # no ID named: the address
        ("127.0.0.9", None, dns.rcode.REFUSED, Authorization.NONE),
    ],
)
def test_a_named_device_id_alone_decides_authorization(
    up: FakeUpstream, host: str, device: bytes | None, rcode: int, by: Authorization
) -> None:
    pipeline = _with_device(_pipeline(up, Clock(), "netflix.com"), DEVICE)
    wire = dns.message.make_query("www.netflix.com", "A").to_wire()
    reply = pipeline.handle(wire, stream_peer(host, Transport.DOT, device))
    assert isinstance(reply, bytes)
    assert dns.message.from_wire(reply).rcode() == rcode
    assert pipeline.metrics.authorizations == {by: 1}


def test_a_device_id_over_its_rate_gets_refused_then_recovers(up: FakeUpstream) -> None:
    clock = Clock()
    pipeline = _with_device(_limited(up, clock, client_qps=3, refused_qps=1), DEVICE)
    wire = dns.message.make_query("www.netflix.com", "A").to_wire()
    rcodes = [
        dns.message.from_wire(_reply_bytes(pipeline, wire, host)).rcode()
        for host in ("127.0.0.9", "127.0.0.10", "::1", "127.0.0.11", "127.0.0.12")
    ]
    assert rcodes == [dns.rcode.NOERROR] * 3 + [dns.rcode.REFUSED] * 2  # per ID, any address
    clock.now += 1.0
    assert dns.message.from_wire(_reply_bytes(pipeline, wire, "::1")).rcode() == dns.rcode.NOERROR


def _reply_bytes(pipeline: Pipeline, wire: bytes, host: str) -> bytes:
    reply = pipeline.handle(wire, stream_peer(host, Transport.DOH, DEVICE))
    assert isinstance(reply, bytes)
    return reply


@pytest.mark.parametrize(
    ("transport", "padded"),
    [(Transport.DOT, True), (Transport.DOH, True), (Transport.TCP, False), (Transport.UDP, False)],
)
def test_replies_are_padded_only_over_encrypted_transports(
    up: FakeUpstream, transport: Transport, padded: bool
) -> None:
    pipeline = _pipeline(up, Clock(), "netflix.com")
    peer = udp_peer(CLIENT) if transport is Transport.UDP else stream_peer(CLIENT, transport)
    for name in ("www.netflix.com", "chaos.example"):  # a local answer and a REFUSED one
        query = dns.message.make_query(name, "A", use_edns=0, pad=128)
        if name.startswith("chaos"):
            query.question[0].rdclass = dns.rdataclass.CH
        reply = pipeline.handle(query.to_wire(), peer)
        assert isinstance(reply, bytes)
        assert (len(reply) % 468 == 0) is padded
        assert dns.message.from_wire(reply).rcode() in (dns.rcode.NOERROR, dns.rcode.REFUSED)


# ---- the packet cache of stream and encrypted peers -------------------------------------------


def _stream(pipeline: Pipeline, wire: bytes, peer: Peer) -> dns.message.Message:
    reply = pipeline.handle(wire, peer)
    assert isinstance(reply, bytes)
    return dns.message.from_wire(reply)


@pytest.mark.parametrize("transport", [Transport.TCP, Transport.DOT, Transport.DOH])
async def test_stream_peers_get_repeats_from_their_packet_cache_with_their_own_id(
    up: FakeUpstream, transport: Transport
) -> None:
    clock = Clock()
    pipeline = _pipeline(up, clock, "netflix.com")
    await _ask(pipeline, "example.org")  # fills the answer cache
    peer = stream_peer(CLIENT, transport)
    packets = pipeline.settings.packets_for(peer, True)
    for name in ("example.org", "www.netflix.com"):  # forwarded, local
        first = dns.message.make_query(name, "A")
        again = dns.message.make_query(name, "A")
        again.id = first.id ^ 0xFFFF
        one, two = (
            _stream(pipeline, first.to_wire(), peer),
            _stream(pipeline, again.to_wire(), peer),
        )
        assert two.id == again.id and one.answer == two.answer and one.answer
    assert len(packets) == 2
    assert len(pipeline.settings.packets_for(udp_peer(CLIENT), True)) == 0  # UDP's is apart
    hits = pipeline.settings.cache.hits
    clock.now += 1.0  # the countdown moved: the stored reply is not reused
    later = _stream(pipeline, dns.message.make_query("example.org", "A").to_wire(), peer)
    assert later.answer[0].ttl == 299 and pipeline.settings.cache.hits == hits + 1


def test_padding_follows_each_querys_own_request_and_its_transport(up: FakeUpstream) -> None:
    """The same question padded and not, over DoT and over TCP: every reply as if built for
    it, though each was stored and then answered from the packet cache."""
    pipeline = _pipeline(up, Clock(), "netflix.com")
    padded = dns.message.make_query("www.netflix.com", "A", use_edns=0, pad=128).to_wire()
    plain = dns.message.make_query("www.netflix.com", "A", use_edns=0).to_wire()
    for _ in range(2):  # stored, then from the cache
        for wire, transport, wanted in (
            (padded, Transport.DOT, True),
            (plain, Transport.DOT, False),
            (padded, Transport.TCP, False),  # RFC 8467: cleartext replies are never padded
        ):
            reply = pipeline.handle(wire, stream_peer(CLIENT, transport))
            assert isinstance(reply, bytes) and (len(reply) % 468 == 0) is wanted


def test_a_cached_reply_never_outlives_the_device_id_that_authorized_it(up: FakeUpstream) -> None:
    """Authorization comes before the packet cache: a withdrawn ID is refused, an ID over its
    rate is refused, and the stranger's repeat is refused from the other cache."""
    clock = Clock()
    pipeline = _with_device(_limited(up, clock, client_qps=3, refused_qps=1), DEVICE)
    wire = dns.message.make_query("www.netflix.com", "A").to_wire()
    peer = stream_peer("127.0.0.9", Transport.DOH, DEVICE)
    assert [_stream(pipeline, wire, peer).rcode() for _ in range(4)] == [dns.rcode.NOERROR] * 3 + [
        dns.rcode.REFUSED
    ]
    clock.now += 1.0
    assert _stream(pipeline, wire, peer).answer
    pipeline.clients.apply([], [], devices_gone=[DEVICE])
    withdrawn = _stream(pipeline, wire, peer)
    assert withdrawn.rcode() == dns.rcode.REFUSED and not withdrawn.answer
    stranger = _stream(pipeline, wire, stream_peer("127.0.0.9", Transport.DOH))
    assert stranger.rcode() == dns.rcode.REFUSED and not stranger.answer
