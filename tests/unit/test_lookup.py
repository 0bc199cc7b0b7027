"""Hostname lookups (upstream.lookup) against a fake authority on 127.0.0.1."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Iterator

import pytest

from smartdns.config.model import DdnsConfig, HostPort, UpstreamConfig
from smartdns.core.chain import LookupOutcome, Resolution
from smartdns.upstream.forwarder import Forwarder
from smartdns.upstream.lookup import FORWARDER_MAX_QPS, HostnameLookup, forwarder_config
from tests.fake_authority import NEGATIVE_TTL, FakeAuthority

WAIT_S = 10.0


@pytest.fixture
def authority() -> Iterator[FakeAuthority]:
    with FakeAuthority() as fake:
        yield fake


def lookup_for(*servers: FakeAuthority, in_flight: int = 8, timeout: float = 0.3) -> HostnameLookup:
    ddns = DdnsConfig(resolvers=tuple(HostPort(s.host, s.port) for s in servers))
    config = forwarder_config(ddns, UpstreamConfig(timeout=timeout, attempts=1))
    return HostnameLookup(Forwarder(config, edns_udp_size=1232), in_flight)


async def resolve(lookup: HostnameLookup, name: str) -> Resolution:
    async with asyncio.timeout(WAIT_S):
        return await lookup.resolve(name)


def texts(resolution: Resolution) -> set[str]:
    return {str(ipaddress.ip_address(packed)) for packed in resolution.addresses}


def test_forwarder_config_uses_the_ddns_resolvers_only() -> None:
    resolvers = (HostPort("192.0.2.53", 53),)
    upstream = UpstreamConfig(servers=(HostPort("198.51.100.1", 53),), timeout=0.7, attempts=3)
    config = forwarder_config(DdnsConfig(resolvers=resolvers), upstream)
    assert config == UpstreamConfig(resolvers, 0.7, 3, FORWARDER_MAX_QPS)


async def test_a_and_aaaa_resolved(authority: FakeAuthority) -> None:
    authority.set_addresses("home.example.net", ["192.0.2.7", "2001:db8::7"], ttl=42)
    result = await resolve(lookup_for(authority), "home.example.net")
    assert result.outcome is LookupOutcome.ADDRESSES
    assert texts(result) == {"192.0.2.7", "2001:db8::7"}
    assert result.ttl == 42
    assert authority.count("home.example.net", "A") == 1
    assert authority.count("home.example.net", "AAAA") == 1


async def test_chain_followed_by_the_authority(authority: FakeAuthority) -> None:
    authority.set_cname("home.example.net", "box.dyn.example", ttl=300)
    authority.set_cname("box.dyn.example", "real.dyn.example", ttl=20)
    authority.set_addresses("real.dyn.example", ["192.0.2.8"], ttl=90)
    result = await resolve(lookup_for(authority), "home.example.net")
    assert (result.outcome, texts(result), result.ttl) == (
        LookupOutcome.ADDRESSES,
        {"192.0.2.8"},
        20,
    )
    assert authority.count() == 2  # the chain came in one answer per type


async def test_chain_leaving_the_answer_is_asked_for(authority: FakeAuthority) -> None:
    authority.follow_cnames = False
    authority.set_cname("home.example.net", "box.dyn.example", ttl=15)
    authority.set_cname("box.dyn.example", "real.dyn.example", ttl=300)
    authority.set_addresses("real.dyn.example", ["192.0.2.9", "2001:db8::9"], ttl=90)
    result = await resolve(lookup_for(authority), "home.example.net")
    assert (result.outcome, texts(result), result.ttl) == (
        LookupOutcome.ADDRESSES,
        {"192.0.2.9", "2001:db8::9"},
        15,
    )
    assert authority.count("box.dyn.example", "A") == 1
    assert authority.count("real.dyn.example", "AAAA") == 1


async def test_endless_chain_fails(authority: FakeAuthority) -> None:
    authority.follow_cnames = False
    for i in range(10):
        authority.set_cname(f"n{i}.example.net", f"n{i + 1}.example.net")
    result = await resolve(lookup_for(authority), "n0.example.net")
    assert result.outcome is LookupOutcome.FAILED
    assert authority.count(qtype="A") == 4  # MAX_QUERIES_PER_FAMILY, then it gives up


async def test_nxdomain_and_nodata_are_answers(authority: FakeAuthority) -> None:
    authority.set_addresses("empty.example.net", [])
    lookup = lookup_for(authority)
    assert await resolve(lookup, "gone.example.net") == Resolution(
        LookupOutcome.NXDOMAIN, (), NEGATIVE_TTL
    )
    assert await resolve(lookup, "empty.example.net") == Resolution(
        LookupOutcome.NODATA, (), NEGATIVE_TTL
    )


async def test_one_family_suffices(authority: FakeAuthority) -> None:
    authority.set_addresses("v6.example.net", ["2001:db8::6"], ttl=33)
    result = await resolve(lookup_for(authority), "v6.example.net")
    assert (result.outcome, texts(result), result.ttl) == (
        LookupOutcome.ADDRESSES,
        {"2001:db8::6"},
        33,
    )


async def test_dead_authority_fails_within_the_timeout(authority: FakeAuthority) -> None:
    authority.set_addresses("home.example.net", ["192.0.2.7"])
    authority.drop = True
    started = time.monotonic()
    result = await resolve(lookup_for(authority, timeout=0.2), "home.example.net")
    assert result.outcome is LookupOutcome.FAILED
    assert time.monotonic() - started < 1.0


async def test_second_resolver_answers_when_the_first_is_dead(authority: FakeAuthority) -> None:
    with FakeAuthority() as second:
        second.set_addresses("home.example.net", ["192.0.2.7"])
        authority.drop = True
        result = await resolve(lookup_for(authority, second), "home.example.net")
    assert texts(result) == {"192.0.2.7"}


async def test_truncated_answer_retried_over_tcp(authority: FakeAuthority) -> None:
    authority.set_addresses("home.example.net", ["192.0.2.7", "2001:db8::7"])
    authority.truncate_udp = True
    result = await resolve(lookup_for(authority), "home.example.net")
    assert texts(result) == {"192.0.2.7", "2001:db8::7"}
    assert authority.count() == 4  # each type: UDP (truncated), then TCP


async def test_queries_in_flight_stay_within_the_bound(authority: FakeAuthority) -> None:
    names = [f"h{i}.example.net" for i in range(40)]
    for name in names:
        authority.set_addresses(name, ["192.0.2.1"])
    authority.delay_s = 0.05
    lookup = lookup_for(authority, in_flight=5)
    async with asyncio.timeout(WAIT_S):
        results = await asyncio.gather(*(lookup.resolve(name) for name in names))
    assert all(result.outcome is LookupOutcome.ADDRESSES for result in results)
    assert authority.max_in_flight == 5
