"""SPEC 2's behaviour table against the real server, over UDP, TCP and DoH, from data; then the
conformance cases, each from a registered and an unregistered source."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
import yaml

from tests.certificates import SERVER_NAME, write_pair
from tests.e2e.doh_client import MEDIA_TYPE, H2Client
from tests.e2e.harness import REGISTERED, REGISTERED_V6, UNREGISTERED, Server, running_server
from tests.fake_upstream import FakeUpstream
from tests.ports import free_port

CASES: list[dict[str, Any]] = yaml.safe_load(
    (Path(__file__).parents[1] / "data" / "behaviour.yaml").read_text()
)
# a designated resolver's SVCB RDATA (RFC 9461) in RFC 3597 form, as the fake upstream reads it
_DDR_RDATA = dns.rdata.from_text(
    "IN", "SVCB", '1 dns.upstream.example. alpn="dot" ipv4hint=192.0.2.53'
)
DDR = f"\\# {len(_DDR_RDATA.to_wire())} {_DDR_RDATA.to_wire().hex()}"
SOURCES = {"registered": REGISTERED, "unregistered": UNREGISTERED, "registered_v6": REGISTERED_V6}


@dataclass(frozen=True)
class TableServer:
    server: Server
    upstream: FakeUpstream
    doh_port: int
    ca_file: Path

    def query(self, name: str, qtype: str, source: str, transport: str) -> dns.message.Message:
        if transport != "doh":
            return self.server.query(name, qtype, source=source, tcp=transport == "tcp")
        client = H2Client(self.doh_port, self.ca_file, source=source)
        try:
            wire = dns.message.make_query(name, qtype).to_wire()
            return client.request(
                "POST", "/dns-query", wire, [("content-type", MEDIA_TYPE)]
            ).message()
        finally:
            client.close()


@pytest.fixture(scope="module")
def table_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TableServer]:
    with FakeUpstream() as upstream:
        upstream.add("example.org", "A", ["example.org. 300 IN A 192.0.2.1"])
        upstream.add("example.org", "AAAA", ["example.org. 300 IN AAAA 2001:db8::1"])
        upstream.add("www.netflix.com", "MX", ["www.netflix.com. 300 IN MX 10 mx.netflix.com."])
        upstream.add("www.netflix.com", "TXT", ['www.netflix.com. 300 IN TXT "real-txt"'])
        # what an upstream would say for the names the node answers itself: never asked
        upstream.add("_dns.resolver.arpa", "SVCB", [f"_dns.resolver.arpa. 300 IN SVCB {DDR}"])
        upstream.add("resolver.arpa", "A", ["resolver.arpa. 300 IN A 192.0.2.53"])
        upstream.add(
            "use-application-dns.net", "A", ["use-application-dns.net. 300 IN A 192.0.2.8"]
        )
        # chains from a forwarded name into local names, with the real records behind them
        cname = "tv.example.org. 300 IN CNAME www.netflix.com."
        upstream.add("tv.example.org", "A", [cname, "www.netflix.com. 300 IN A 192.0.2.66"])
        upstream.add("tv.example.org", "AAAA", [cname, "www.netflix.com. 300 IN AAAA 2001:db8::66"])
        upstream.add(
            "ddr.example.org",
            "SVCB",
            [
                "ddr.example.org. 300 IN CNAME _dns.resolver.arpa.",
                f"_dns.resolver.arpa. 300 IN SVCB {DDR}",
            ],
        )
        state = tmp_path_factory.mktemp("table")
        pair = write_pair(state)
        doh_port = free_port()
        override = {
            "encrypted": {
                "server_name": SERVER_NAME,
                "cert_file": str(pair.cert_file),
                "key_file": str(pair.key_file),
                "doh_listen": [f"127.0.0.1:{doh_port}", f"[::1]:{doh_port}"],
                "dot_listen": [],
            }
        }
        with running_server(state, upstream.address, override) as server:
            yield TableServer(server, upstream, doh_port, pair.ca_file)


def _case_id(case: dict[str, Any]) -> str:
    return f"{case['client']}-{case['name']}-{case['qtype']}"


@pytest.mark.parametrize("transport", ["udp", "tcp", "doh"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_behaviour(table_server: TableServer, case: dict[str, Any], transport: str) -> None:
    upstream = table_server.upstream
    before = upstream.count(case["name"].lower(), case["qtype"])
    reply = table_server.query(case["name"], case["qtype"], SOURCES[case["client"]], transport)

    assert dns.rcode.to_text(reply.rcode()) == case["rcode"]
    assert reply.question[0].name.to_text() == dns.name.from_text(case["name"]).to_text()
    answers = sorted(rdata.to_text() for rrset in reply.answer for rdata in rrset)
    assert answers == sorted(case["answer"])
    if "ttl" in case:
        assert all(rrset.ttl == case["ttl"] for rrset in reply.answer)
    if "soa" in case:
        (soa,) = reply.authority
        assert soa.rdtype == dns.rdatatype.SOA and soa.name.to_text() == case["soa"] + "."
        assert soa[0].mname.to_text() == "smartdns.invalid." and soa[0].minimum == 60
    for flag in case.get("flags", []):
        assert reply.flags & dns.flags.from_text(flag), flag
    assert reply.flags & dns.flags.RA
    # Local answers never reach the upstream. A forwarded one reaches it exactly once: whichever
    # transport (or client) asks first, the others are answered from the cache.
    after = upstream.count(case["name"].lower(), case["qtype"])
    if case.get("forwarded", False):
        assert after == 1
    else:
        assert after == before


# ---- conformance cases (RFC 1035, RFC 6891), from a registered and an unregistered source ---

DNSKEYS = [
    "dnssec.example.org. 3600 IN DNSKEY 257 3 8 " + base64.b64encode(bytes([i]) * 260).decode()
    for i in range(1, 5)
]  # four 2048-bit-sized keys: well over 512 octets, as DNSKEY answers are


@pytest.fixture(scope="module")
def conformance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with FakeUpstream() as upstream:
        upstream.add("example.org", "A", ["example.org. 300 IN A 192.0.2.1"])
        upstream.add("example.org", "666", ["example.org. 300 IN TYPE666 \\# 2 abcd"])
        upstream.add("dnssec.example.org", "DNSKEY", DNSKEYS)
        with running_server(tmp_path_factory.mktemp("conformance"), upstream.address) as server:
            yield server


def _with_bits(message: dns.message.Message, byte: int, bits: int) -> bytes:
    wire = bytearray(message.to_wire())
    wire[byte] |= bits
    return bytes(wire)


def _ask(server: Server, wire: bytes, source: str) -> dns.message.Message:
    reply = server.raw_udp(wire, source=source)
    assert reply is not None
    parsed = dns.message.from_wire(reply)
    assert reply[:2] == wire[:2]
    return parsed


CONFORMANCE: dict[str, Any] = {
    "plain_query_without_opt": lambda: dns.message.make_query("example.org", "A"),
    "edns_version_0": lambda: dns.message.make_query("example.org", "A", use_edns=0),
    "unknown_option_100": lambda: dns.message.make_query(
        "example.org", "A", use_edns=0, options=[dns.edns.GenericOption(100, b"x")]
    ),
    "unknown_edns_flag_0x0080": lambda: dns.message.make_query(
        "example.org", "A", use_edns=0, ednsflags=0x0080
    ),
    "do_bit": lambda: dns.message.make_query("example.org", "A", use_edns=0, want_dnssec=True),
    "nsid_ecs_expire_cookie_together": lambda: dns.message.make_query(
        "example.org",
        "A",
        use_edns=0,
        options=[
            dns.edns.GenericOption(dns.edns.NSID, b""),
            dns.edns.ECSOption("198.51.100.0", 24),
            dns.edns.GenericOption(9, b""),
            dns.edns.CookieOption(b"\x01" * 8, b""),
        ],
    ),
    "unknown_type_666": lambda: dns.message.make_query("example.org", "TYPE666"),
}


@pytest.mark.parametrize("case", sorted(CONFORMANCE))
def test_conformance_registered(conformance: Server, case: str) -> None:
    query = CONFORMANCE[case]()
    reply = _ask(conformance, query.to_wire(), REGISTERED)
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer
    assert reply.edns == query.edns and not reply.options
    if query.edns >= 0:
        assert reply.payload == 1232
        assert bool(reply.ednsflags & dns.flags.DO) == bool(query.ednsflags & dns.flags.DO)
        assert reply.ednsflags & ~dns.flags.DO == 0  # the unknown flag is not echoed


@pytest.mark.parametrize("case", sorted(CONFORMANCE))
def test_conformance_unregistered_is_refused(conformance: Server, case: str) -> None:
    query = CONFORMANCE[case]()
    reply = _ask(conformance, query.to_wire(), UNREGISTERED)
    assert reply.rcode() == dns.rcode.REFUSED and not reply.answer
    assert reply.edns == query.edns


@pytest.mark.parametrize("source", [REGISTERED, UNREGISTERED])
def test_conformance_edns_version_1_gets_badvers(conformance: Server, source: str) -> None:
    reply = conformance.query("example.org", "A", use_edns=1, source=source)
    assert reply.rcode() == dns.rcode.BADVERS and reply.edns == 0 and not reply.answer


@pytest.mark.parametrize("source", [REGISTERED, UNREGISTERED])
def test_conformance_opcode_15_gets_notimp(conformance: Server, source: str) -> None:
    query = dns.message.make_query("example.org", "A")
    reply = _ask(conformance, _with_bits(query, 2, 15 << 3), source)
    assert reply.rcode() == dns.rcode.NOTIMP and not reply.answer


@pytest.mark.parametrize("source", [REGISTERED, UNREGISTERED])
def test_conformance_z_bit_is_ignored(conformance: Server, source: str) -> None:
    reply = _ask(
        conformance, _with_bits(dns.message.make_query("example.org", "A"), 3, 0x40), source
    )
    expected = dns.rcode.NOERROR if source == REGISTERED else dns.rcode.REFUSED
    assert reply.rcode() == expected and bool(reply.answer) == (source == REGISTERED)
    assert not reply.flags & 0x40  # Z is zero in replies (RFC 1035 §4.1.1)


def test_conformance_edns_512_dnskey_answer_truncated_then_complete_over_tcp(
    conformance: Server,
) -> None:
    udp = conformance.query(
        "dnssec.example.org", "DNSKEY", use_edns=0, payload=512, want_dnssec=True
    )
    assert udp.flags & dns.flags.TC and not udp.answer and udp.edns == 0
    tcp = conformance.query(
        "dnssec.example.org", "DNSKEY", use_edns=0, payload=512, want_dnssec=True, tcp=True
    )
    assert not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == len(DNSKEYS)
    refused = conformance.query(
        "dnssec.example.org", "DNSKEY", use_edns=0, payload=512, source=UNREGISTERED
    )
    assert refused.rcode() == dns.rcode.REFUSED and not refused.flags & dns.flags.TC


def test_canary_forwarded_when_switched_off_and_resolve_mode_forwards_strangers(
    tmp_path: Path,
) -> None:
    """`unblock.canary_nxdomain: false` lets the canary through to the upstream; under
    `unregistered: resolve` the local names are, like every name, forwarded for strangers."""
    with FakeUpstream() as upstream:
        upstream.add(
            "use-application-dns.net", "A", ["use-application-dns.net. 300 IN A 192.0.2.8"]
        )
        upstream.add("_dns.resolver.arpa", "SVCB", [f"_dns.resolver.arpa. 300 IN SVCB {DDR}"])
        override = {"unblock": {"canary_nxdomain": False}, "unregistered": "resolve"}
        with running_server(tmp_path, upstream.address, override) as server:
            canary = server.query("use-application-dns.net", "A")
            assert canary.rcode() == dns.rcode.NOERROR
            assert [r.to_text() for rrset in canary.answer for r in rrset] == ["192.0.2.8"]
            local = server.query("_dns.resolver.arpa", "SVCB")
            assert local.rcode() == dns.rcode.NOERROR and not local.answer
            assert upstream.count("_dns.resolver.arpa", "SVCB") == 0
            stranger = server.query("_dns.resolver.arpa", "SVCB", source=UNREGISTERED)
            assert stranger.rcode() == dns.rcode.NOERROR and stranger.answer
            assert upstream.count("use-application-dns.net", "A") == 1
            assert upstream.count("_dns.resolver.arpa", "SVCB") == 1
