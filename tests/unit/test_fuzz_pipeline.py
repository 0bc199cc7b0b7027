"""Property tests over Pipeline.handle, built as daemon.build_settings builds it, forwarding to a
FakeUpstream on 127.0.0.1: whatever arrives, the reply is nothing or a DNS response with the
query's ID; handle never raises. Bounded and derandomized for CI.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import dns.exception
import dns.flags
import dns.message
import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartdns.config.model import (
    Config,
    HostPort,
    Region,
    ServerConfig,
    UnblockConfig,
    Unregistered,
    UpstreamConfig,
)
from smartdns.core.clients import AuthorizedClients
from smartdns.core.counters import Metrics, Outcome, Transport
from smartdns.core.peer import Peer, stream_peer, udp_peer
from smartdns.core.wire import Query, parse_query
from smartdns.errors import WireError
from smartdns.node.daemon import build_settings
from smartdns.serve.pipeline import Pipeline
from tests.fake_upstream import FakeUpstream
from tests.unit.test_fuzz_wire import CI, mutated_queries, packets, valid_queries

FORWARD_TIMEOUT_S = 5.0  # the Forwarder's own deadline is 4 s; this only catches a hang
EDNS_UDP_SIZE = 1232
REGISTERED = ["127.0.0.1", "::ffff:127.0.0.1", "2001:db8:1::53", "fe80::1%lo"]
UNREGISTERED = ["127.0.0.2", "2001:db8:2::1", "::ffff:10.0.0.1", "", "not an address"]
UNBLOCK = UnblockConfig(
    ttl=60,
    regions=MappingProxyType(
        {
            "us": Region(ipv4=(ipaddress.IPv4Address("198.51.100.10"),)),
            "uk": Region(
                ipv4=(ipaddress.IPv4Address("198.51.100.20"),),
                ipv6=(ipaddress.IPv6Address("2001:db8:20::1"),),
            ),
        }
    ),
    zones=MappingProxyType({"netflix.com": "us", "bbc.co.uk": "uk"}),
)
CLIENTS = AuthorizedClients.from_prefixes(
    [
        (4, int(ipaddress.IPv4Address("127.0.0.1")), 32),
        (6, int(ipaddress.IPv6Address("2001:db8:1::")), 48),
        (6, int(ipaddress.IPv6Address("fe80::")), 64),
    ]
)


@dataclass
class Harness:
    upstream: FakeUpstream
    runner: asyncio.Runner
    config: Config

    def pipeline(self, unregistered: Unregistered) -> Pipeline:
        """A fresh pipeline per example (no cache or health carried over, so a failure
        reproduces), exactly as the daemon builds it, with this unregistered policy."""
        config = dataclasses.replace(self.config, unregistered=unregistered)
        return Pipeline(build_settings(config), CLIENTS, Metrics())


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    with FakeUpstream() as upstream, asyncio.Runner() as runner:
        upstream.add("example.org", "A", ["example.org. 300 IN A 192.0.2.1"])
        upstream.add("example.org", "TXT", ['example.org. 300 IN TXT "hello"'])
        upstream.add("www.netflix.com", "MX", ["www.netflix.com. 300 IN MX 10 mx.example.org."])
        upstream.large_answer("big.example.org", 150)
        config = Config(
            path=Path("fuzz.yaml"),
            server=ServerConfig(edns_udp_size=EDNS_UDP_SIZE),
            unblock=UNBLOCK,
            upstream=UpstreamConfig(
                servers=(HostPort("127.0.0.1", upstream.port),),
                # loopback answers in well under a millisecond; the fake stays silent for
                # names dnslib cannot parse, and each of those costs one timeout
                timeout=0.05,
                attempts=1,
                max_qps=100_000,
            ),
        )
        yield Harness(upstream, runner, config)


def _handle(harness: Harness, packet: bytes, peer: Peer, policy: Unregistered) -> bytes | None:
    reply = harness.pipeline(policy).handle(packet, peer)
    if reply is None or isinstance(reply, bytes):
        return reply

    async def wait() -> bytes | None:
        return await asyncio.wait_for(reply, FORWARD_TIMEOUT_S)

    return harness.runner.run(wait())


def _check_reply(packet: bytes, reply: bytes, peer: Peer) -> dns.message.Message:
    try:
        message = dns.message.from_wire(reply)
    except dns.exception.DNSException as error:  # pragma: no cover - the failure message
        raise AssertionError(f"reply does not parse ({error!r}): {reply.hex()}") from error
    assert message.flags & dns.flags.QR
    assert reply[:2] == packet[:2]
    try:
        query: Query | None = parse_query(packet)
    except WireError:
        query = None
    if query is not None:
        assert reply[12 : 12 + len(query.question)] == query.question  # echoed byte for byte
        limit = peer.reply_limit
        assert len(reply) <= (min(query.udp_size or 512, EDNS_UDP_SIZE) if limit is None else limit)
    return message


peer_kinds = st.sampled_from([udp_peer, stream_peer])


def _peers(hosts: list[str]) -> st.SearchStrategy[Peer]:
    return st.builds(lambda make, host: make(host), peer_kinds, st.sampled_from(hosts))


policies = st.sampled_from(list(Unregistered))
upstream_modes = st.sampled_from(["normal", "normal", "normal", "garbage", "truncate_udp"])


@CI
@given(packets, _peers(REGISTERED + UNREGISTERED), policies, upstream_modes)
def test_handle_replies_with_a_response_or_nothing(
    harness: Harness, packet: bytes, peer: Peer, policy: Unregistered, mode: str
) -> None:
    harness.upstream.garbage = mode == "garbage"
    harness.upstream.truncate_udp = mode == "truncate_udp"
    try:
        reply = _handle(harness, packet, peer, policy)
    finally:
        harness.upstream.garbage = harness.upstream.truncate_udp = False
    if reply is not None:
        _check_reply(packet, reply, peer)


def _forwardable_names() -> st.SearchStrategy[bytes]:
    names = ["example.org", "EXAMPLE.org", "big.example.org", "www.netflix.com", "nx.test"]
    return st.builds(
        lambda name, qtype, use_edns, payload, qid: bytes(
            dns.message.make_query(
                name, qtype, use_edns=use_edns, payload=payload, id=qid
            ).to_wire()
        ),
        st.sampled_from(names),
        st.sampled_from(["A", "TXT", "MX", "AAAA"]),
        st.sampled_from([-1, 0]),
        st.sampled_from([512, 1232, 4096]),
        st.integers(0, 0xFFFF),
    )


@CI
@given(_forwardable_names(), _peers(REGISTERED))
def test_forwarded_answers_are_responses_within_the_client_limit(
    harness: Harness, packet: bytes, peer: Peer
) -> None:
    reply = _handle(harness, packet, peer, Unregistered.REFUSE)
    assert reply is not None
    message = _check_reply(packet, reply, peer)
    assert message.rcode() in (0, 2, 3)  # NOERROR, SERVFAIL (the fake's unknowns), NXDOMAIN


@CI
@given(st.one_of(valid_queries(), mutated_queries), st.sampled_from(UNREGISTERED))
def test_unregistered_never_forwarded_under_refuse(
    harness: Harness, packet: bytes, host: str
) -> None:
    pipeline = harness.pipeline(Unregistered.REFUSE)
    reply = pipeline.handle(packet, udp_peer(host))
    assert reply is None or isinstance(reply, bytes)  # never a pending forward
    assert pipeline.metrics.queries[Transport.UDP, Outcome.FORWARD] == 0
    if reply is not None:
        message = _check_reply(packet, reply, udp_peer(host))
        assert message.rcode() != 0  # REFUSED, FORMERR, NOTIMP, BADVERS: never an answer
