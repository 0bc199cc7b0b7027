"""atheris (libFuzzer) harness over the query path: wire.parse_query and Pipeline.handle.

    pip install atheris
    python fuzz/make_corpus.py fuzz/corpus
    python fuzz/fuzz_pipeline.py fuzz/corpus -max_total_time=1800

Input: one selector byte, then the packet. The selector picks the source (bits 0-2, see
HOSTS), the transport (bit 3: TCP) and, for forwarded queries, the kind of upstream answer
(bits 4-6, see UPSTREAM_ANSWERS); bit 7 makes it an encrypted peer naming a device ID (bit 3
then picks the registered or an unknown ID; SPEC 2a). No network: forwarded queries go to a
Forwarder whose `resolve` returns a canned answer built for the question at once, awaited on
one event loop. Like the real Forwarder, it only returns answers a full parser (dnslib)
accepts. Each input gets a fresh Pipeline from daemon.build_settings, so no cache state
carries over.

Checked on every input: parse_query returns a Query or raises WireError; handle never raises;
its result is None or bytes that dnspython parses as a response (QR set) with the query's ID,
echoing the question byte for byte, and a UDP reply fits the client's limit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import struct
import sys
from collections.abc import Coroutine
from pathlib import Path
from types import MappingProxyType
from typing import Any

import atheris
import dns.exception
import dns.message

with atheris.instrument_imports(include=["smartdns"]):
    from smartdns.config.model import (
        Config,
        HostPort,
        Region,
        ServerConfig,
        UnblockConfig,
        Unregistered,
        UpstreamConfig,
    )
    from smartdns.core.clients import AuthorizedClients, device_digest
    from smartdns.core.counters import Metrics, Transport
    from smartdns.core.peer import Peer, stream_peer, udp_peer
    from smartdns.core.wire import ForwardedAnswer, Query, parse_query, parse_upstream_answer
    from smartdns.errors import UpstreamError, WireError
    from smartdns.node.daemon import build_settings
    from smartdns.serve.pipeline import Pipeline
    from smartdns.upstream.forwarder import Forwarder

EDNS_UDP_SIZE = 1232
HOSTS = (
    "127.0.0.1",  # registered /32
    "2001:db8:1::53",  # inside a registered /48
    "::ffff:127.0.0.1",  # IPv4-mapped form of the registered address
    "fe80::1%eth0",  # registered link-local /64, with a zone index
    "127.0.0.2",  # not registered
    "2001:db8:2::1",  # not registered
    "::ffff:10.0.0.1",  # not registered, mapped
    "not an address",  # unparseable: unauthorized
)
UNBLOCK = UnblockConfig(
    ttl=60,
    regions=MappingProxyType(
        {
            "us": Region(ipv4=(ipaddress.IPv4Address("198.51.100.10"),) * 2),
            "uk": Region(
                ipv4=(ipaddress.IPv4Address("198.51.100.20"),),
                ipv6=(ipaddress.IPv6Address("2001:db8:20::1"),),
            ),
        }
    ),
    zones=MappingProxyType(
        {"netflix.com": "us", "hulu.com": "us", "bbc.co.uk": "uk", "a.b.bbc.co.uk": "us"}
    ),
)
_RR = struct.Struct("!HHIH")
_POINTER = b"\xc0\x0c"


def _a(count: int) -> bytes:
    return b"".join(
        _POINTER + _RR.pack(1, 1, 300, 4) + bytes([192, 0, 2, i & 255]) for i in range(count)
    )


def _soa() -> bytes:
    # MNAME and RNAME spelled out: pointing them below the qname would exceed 255 octets for
    # long qnames (see test_upstream_soa_name_over_255_octets_is_unparseable)
    names = b"\x02ns\x07example\x00\x01h\x07example\x00"
    rdata = names + struct.pack("!5I", 1, 3600, 600, 86400, 300)
    return _POINTER + _RR.pack(6, 1, 300, len(rdata)) + rdata


_OPT = b"\x00" + _RR.pack(41, 1232, 0, 0)
# (rcode, ancount, nscount, arcount, records): what the upstream says after the question.
UPSTREAM_ANSWERS: tuple[tuple[int, int, int, int, bytes], ...] = (
    (0, 1, 0, 0, _a(1)),
    (3, 0, 1, 0, _soa()),  # NXDOMAIN with SOA
    (0, 120, 0, 0, _a(120)),  # over any UDP limit: truncated
    (0, 1, 0, 2, _a(1) + _OPT + _a(1)),  # records after the upstream's OPT are cut
    (0, 0, 1, 1, _soa() + _OPT),  # NODATA with OPT
    (0, 2, 0, 0, _a(1)),  # lies about its counts: SERVFAIL
    # a pointer past the question: for short names beyond the message, for long ones into
    # the middle of a label; the Forwarder's full parse must turn both into SERVFAIL
    (0, 1, 0, 0, b"\xc0\xff" + _RR.pack(1, 1, 300, 4) + b"\x01\x02\x03\x04"),
)  # kind 7: no upstream answered (UpstreamError)


class CannedForwarder(Forwarder):
    """Answers every query at once from UPSTREAM_ANSWERS; `kind` is set per input."""

    kind = 0

    async def resolve(self, query: Query) -> ForwardedAnswer:
        if self.kind >= len(UPSTREAM_ANSWERS):
            raise UpstreamError("no upstream answered")
        rcode, ancount, nscount, arcount, records = UPSTREAM_ANSWERS[self.kind]
        question = query.qname + struct.pack("!HH", query.qtype, query.qclass)
        flags = 0x8180 | rcode
        header = struct.pack("!6H", 0x4242, flags, 1, ancount, nscount, arcount)
        response = header + question + records
        try:  # what the real Forwarder requires of every answer, parsed once
            return parse_upstream_answer(response, len(question))
        except WireError:
            raise UpstreamError("unparseable upstream answer") from None


# a closed port: nothing is ever sent there, CannedForwarder.resolve answers instead
UPSTREAM = UpstreamConfig(servers=(HostPort("127.0.0.1", 9),), timeout=0.1, attempts=1)
FORWARDER = CannedForwarder(UPSTREAM, edns_udp_size=EDNS_UDP_SIZE)
CONFIG = Config(
    path=Path("fuzz.yaml"),
    server=ServerConfig(edns_udp_size=EDNS_UDP_SIZE),
    unregistered=Unregistered.REFUSE,
    unblock=UNBLOCK,
    upstream=UPSTREAM,
)
REGISTERED_DEVICE = device_digest("registereddevice0000000001")
CLIENTS = AuthorizedClients.from_prefixes(
    [
        (4, int(ipaddress.IPv4Address("127.0.0.1")), 32),
        (6, int(ipaddress.IPv6Address("2001:db8:1::")), 48),
        (6, int(ipaddress.IPv6Address("fe80::")), 64),
    ],
    [REGISTERED_DEVICE],
)
DEVICES = (device_digest("unknowndevice00000000000001"), REGISTERED_DEVICE)
LOOP = asyncio.new_event_loop()
FORWARD_TIMEOUT_S = 5.0  # the canned upstream answers at once; this only catches a hang


def build_pipeline() -> Pipeline:
    """A fresh pipeline per input, as the daemon builds it but with the canned forwarder:
    nothing (cache, upstream health) carries over from one input to the next, so every
    input behaves the same whenever it runs."""
    settings = dataclasses.replace(build_settings(CONFIG), forwarder=FORWARDER)
    return Pipeline(settings, CLIENTS, Metrics())


def run_to_completion(coroutine: Coroutine[Any, Any, bytes | None]) -> bytes | None:
    """Await a forwarded reply on the harness's event loop."""
    return LOOP.run_until_complete(asyncio.wait_for(coroutine, FORWARD_TIMEOUT_S))


def check_reply(packet: bytes, query: Query | None, reply: bytes, peer: Peer) -> None:
    """Invariants every reply must satisfy (SPEC 2)."""
    try:
        message = dns.message.from_wire(reply)
    except dns.exception.DNSException as error:
        raise AssertionError(f"reply does not parse: {error!r} {reply.hex()}") from error
    assert message.flags & 0x8000, "QR not set"
    assert reply[:2] == packet[:2], "ID not copied"
    if query is not None:
        question = query.question
        assert reply[12 : 12 + len(question)] == question, "question not echoed"
        limit = peer.reply_limit
        if limit is None:
            limit = min(query.udp_size or 512, EDNS_UDP_SIZE)
        assert len(reply) <= limit, "reply over the client's or the transport's limit"


def test_one_input(data: bytes) -> None:
    if not data:
        return
    selector, packet = data[0], data[1:]
    host = HOSTS[selector & 7]
    if selector & 0x80:
        peer = stream_peer(host, Transport.DOT, DEVICES[selector >> 3 & 1])
    else:
        peer = (stream_peer if selector & 8 else udp_peer)(host)
    FORWARDER.kind = selector >> 4 & 7
    query: Query | None
    try:
        query = parse_query(packet)
    except WireError:
        query = None
    reply = build_pipeline().handle(packet, peer)
    if reply is not None and not isinstance(reply, bytes):
        reply = run_to_completion(reply)
    if reply is not None:
        check_reply(packet, query, reply, peer)


def main(argv: list[str]) -> None:
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
