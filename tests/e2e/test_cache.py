"""The answer cache against the real server: hits, TTL countdown and clamp, negative entries,
short-lived failures, eviction, coalescing, policy before cache, CNAME chains into zones."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import pytest
import yaml

from tests.e2e.harness import REGISTERED, UNREGISTERED, Server, running_server
from tests.fake_upstream import FakeUpstream

RELOAD_TIMEOUT_S = 10.0
PROXIES_US = ["198.51.100.10", "198.51.100.11"]


def _addresses(reply: dns.message.Message) -> list[str]:
    return sorted(
        rdata.to_text()
        for rrset in reply.answer
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        for rdata in rrset
    )


def _ttls(reply: dns.message.Message) -> list[int]:
    return [rrset.ttl for rrset in (*reply.answer, *reply.authority)]


def _wait_until(predicate: object, timeout_s: float, step_s: float = 0.1) -> float:
    """Poll `predicate()` until true; the seconds it took. Fails after `timeout_s`."""
    assert callable(predicate)
    started = time.monotonic()
    for _ in range(int(timeout_s / step_s) + 1):
        if predicate():
            return time.monotonic() - started
        time.sleep(step_s)
    raise AssertionError(f"not true within {timeout_s} s")


def test_hit_after_miss_counts_ttl_down_without_second_upstream_query(
    server: Server, upstream: FakeUpstream
) -> None:
    first = server.query("example.org", "A")
    assert _addresses(first) == ["192.0.2.1"] and _ttls(first) == [300]
    time.sleep(1.1)  # let the clock move a whole second: the TTL must count down
    wire = dns.message.make_query("ExAmPlE.oRg", "A").to_wire()
    reply_wire = server.raw_udp(wire)
    assert reply_wire is not None
    second = dns.message.from_wire(reply_wire)
    assert reply_wire[:2] == wire[:2] and reply_wire[12 : len(wire)] == wire[12:]  # ID, 0x20
    assert _addresses(second) == ["192.0.2.1"]
    assert 296 <= _ttls(second)[0] <= 299
    assert upstream.count("example.org", "A") == 1
    over_tcp = server.query("example.org", "A", tcp=True)
    assert _addresses(over_tcp) == ["192.0.2.1"] and _ttls(over_tcp)[0] <= 299
    assert upstream.count("example.org", "A") == 1


def test_upstream_opt_is_never_passed_through(server: Server, upstream: FakeUpstream) -> None:
    server.query("example.org", "MX", use_edns=0)  # the fake's OPT says 1232 and carries DO=0
    cached = server.query("example.org", "MX", use_edns=0, payload=4096)
    plain = server.query("example.org", "MX")
    assert cached.edns == 0 and cached.payload == 1232 and not cached.options
    assert plain.edns == -1 and len(plain.additional) == 0
    assert upstream.count("example.org", "MX") == 1


def test_do_bit_is_part_of_the_key(server: Server, upstream: FakeUpstream) -> None:
    server.query("example.org", "AAAA")
    signed = server.query("example.org", "AAAA", use_edns=0, want_dnssec=True)
    assert _addresses(signed) == ["2001:db8::1"]
    assert upstream.count("example.org", "AAAA") == 2
    assert upstream.queries[-1].dnssec_ok


def test_ttls_clamped_to_min_and_max(tmp_path: Path, upstream: FakeUpstream) -> None:
    upstream.add("short.example.org", "A", ["short.example.org. 2 IN A 192.0.2.2"])
    override = {"cache": {"min_ttl": 30, "max_ttl": 100}}
    with running_server(tmp_path, upstream.address, override) as server:
        assert _ttls(server.query("example.org", "A")) == [100]  # upstream said 300
        assert _ttls(server.query("short.example.org", "A")) == [30]  # upstream said 2
        assert _ttls(server.query("example.org", "A"))[0] <= 100


def test_nxdomain_and_nodata_are_cached(tmp_path: Path, upstream: FakeUpstream) -> None:
    with running_server(tmp_path, upstream.address, {"cache": {"negative_ttl": 60}}) as server:
        for name, qtype, rcode in (
            ("nosuch.example.org", "A", dns.rcode.NXDOMAIN),
            ("example.org", "TXT", dns.rcode.NOERROR),  # NODATA
        ):
            for _ in range(3):
                reply = server.query(name, qtype)
                assert reply.rcode() == rcode and not reply.answer
                (soa,) = reply.authority
                assert soa.rdtype == dns.rdatatype.SOA and soa.ttl <= 60  # min(300, 300, 60)
            assert upstream.count(name, qtype) == 1


@pytest.mark.slow
def test_servfail_is_remembered_only_a_few_seconds(server: Server, upstream: FakeUpstream) -> None:
    upstream.set_rcode("flaky.example.org", "SERVFAIL")
    started = time.monotonic()
    assert server.query("flaky.example.org").rcode() == dns.rcode.SERVFAIL
    upstream.clear_rcode("flaky.example.org")
    upstream.add("flaky.example.org", "A", ["flaky.example.org. 300 IN A 192.0.2.77"])
    assert server.query("flaky.example.org").rcode() == dns.rcode.SERVFAIL  # remembered
    assert upstream.count("flaky.example.org") == 1
    _wait_until(lambda: _addresses(server.query("flaky.example.org")) == ["192.0.2.77"], 10.0)
    assert 4.0 <= time.monotonic() - started <= 8.0  # FAILURE_TTL_S is 5 s


def test_eviction_at_max_entries_keeps_the_hot_name(tmp_path: Path, upstream: FakeUpstream) -> None:
    with running_server(tmp_path, upstream.address, {"cache": {"max_entries": 10}}) as server:
        for index in range(30):
            assert server.query("example.org").answer  # the hot name, asked between the others
            assert server.query(f"n{index}.example.org").rcode() == dns.rcode.NXDOMAIN
        assert upstream.count("example.org", "A") == 1
        assert upstream.count("n29.example.org") == 1
        server.query("n29.example.org")
        assert upstream.count("n29.example.org") == 1  # still cached
        server.query("n0.example.org")
        assert upstream.count("n0.example.org") == 2  # evicted long ago


def test_ten_identical_concurrent_misses_make_one_upstream_query(
    server: Server, upstream: FakeUpstream
) -> None:
    upstream.add("busy.example.org", "A", ["busy.example.org. 300 IN A 192.0.2.99"])
    upstream.delay_s = 0.25  # every query is in flight together (the timeout is 0.5 s)
    with ThreadPoolExecutor(max_workers=10) as pool:
        replies = list(pool.map(lambda _: server.query("busy.example.org"), range(10)))
    assert all(_addresses(reply) == ["192.0.2.99"] for reply in replies)
    assert upstream.count("busy.example.org") == 1


def test_deregistration_beats_the_cache(server: Server, upstream: FakeUpstream) -> None:
    assert server.query("example.org").answer
    assert server.cli("registrations", "remove", "demo", REGISTERED).returncode == 0
    _wait_until(lambda: server.query("example.org").rcode() == dns.rcode.REFUSED, 2.0)
    assert server.query("example.org", source=UNREGISTERED).rcode() == dns.rcode.REFUSED


def _reload(server: Server, change: dict[str, object]) -> None:
    config = yaml.safe_load(server.config_path.read_text())
    for section, values in change.items():
        assert isinstance(values, dict)
        config.setdefault(section, {}).update(values)
    server.config_path.write_text(yaml.safe_dump(config))
    server.notifications.clear()
    server.signal(signal.SIGHUP)
    server.wait_notification("READY=1", RELOAD_TIMEOUT_S)


def test_zone_added_by_reload_beats_a_cached_answer_and_the_cache_survives(
    server: Server, upstream: FakeUpstream
) -> None:
    upstream.add("www.example.org", "A", ["www.example.org. 300 IN A 192.0.2.80"])
    assert _addresses(server.query("www.example.org")) == ["192.0.2.80"]
    assert _addresses(server.query("example.org", "AAAA")) == ["2001:db8::1"]
    zones = yaml.safe_load(server.config_path.read_text())["unblock"]["zones"]
    _reload(server, {"unblock": {"zones": {**zones, "us": [*zones["us"], "www.example.org"]}}})
    assert _addresses(server.query("www.example.org")) == PROXIES_US
    assert _addresses(server.query("example.org", "AAAA")) == ["2001:db8::1"]
    assert upstream.count("example.org", "AAAA") == 1  # the cache kept its entries


# ---- CNAME chains into unblock zones -------------------------------------------------------


@pytest.fixture
def chains(upstream: FakeUpstream) -> FakeUpstream:
    """alias.example.org -> www.netflix.com (us: IPv4 proxies only);
    hop.example.org -> mid.example.net -> cdn.bbc.co.uk (uk: IPv4 and IPv6 proxies)."""
    for qtype, real in (
        ("A", "www.netflix.com. 300 IN A 203.0.113.5"),
        ("AAAA", "www.netflix.com. 300 IN AAAA 2001:db8:bad::5"),
        ("HTTPS", "www.netflix.com. 300 IN HTTPS 1 . ipv4hint=203.0.113.5"),
    ):
        upstream.add(
            "alias.example.org", qtype, ["alias.example.org. 120 IN CNAME www.netflix.com.", real]
        )
    for qtype, real in (
        ("A", "cdn.bbc.co.uk. 300 IN A 203.0.113.6"),
        ("AAAA", "cdn.bbc.co.uk. 300 IN AAAA 2001:db8:bad::6"),
    ):
        upstream.add(
            "hop.example.org",
            qtype,
            [
                "hop.example.org. 120 IN CNAME mid.example.net.",
                "mid.example.net. 120 IN CNAME cdn.bbc.co.uk.",
                real,
            ],
        )
    upstream.add(
        "other.example.org",
        "A",
        [
            "other.example.org. 120 IN CNAME real.example.net.",
            "real.example.net. 60 IN A 192.0.2.5",
        ],
    )
    return upstream


def _chain(reply: dns.message.Message) -> list[tuple[str, str]]:
    return [
        (rrset.name.to_text(), rrset[0].to_text())
        for rrset in reply.answer
        if rrset.rdtype == dns.rdatatype.CNAME
    ]


@pytest.mark.parametrize("tcp", [False, True])
def test_cname_into_unblock_zone_gets_the_proxy_for_a(
    server: Server, chains: FakeUpstream, tcp: bool
) -> None:
    for _ in range(2):  # the miss, then the cached answer: both cut at the zone
        reply = server.query("Alias.Example.ORG", "A", tcp=tcp)
        assert reply.rcode() == dns.rcode.NOERROR
        assert _chain(reply) == [("Alias.Example.ORG.", "www.netflix.com.")]
        assert _addresses(reply) == PROXIES_US
        owners = {rrset.name.to_text() for rrset in reply.answer if rrset.rdtype == 1}
        assert owners == {"www.netflix.com."}
    assert chains.count("alias.example.org", "A") == 1


def test_cname_into_zone_without_ipv6_gets_no_address_for_aaaa(
    server: Server, chains: FakeUpstream
) -> None:
    for _ in range(2):
        reply = server.query("alias.example.org", "AAAA")
        assert reply.rcode() == dns.rcode.NOERROR
        assert _chain(reply) == [("alias.example.org.", "www.netflix.com.")]
        assert _addresses(reply) == []
        (soa,) = reply.authority
        assert soa.name.to_text() == "netflix.com."
        assert soa[0].mname.to_text() == "smartdns.invalid."


def test_cname_into_zone_gets_no_https_records(server: Server, chains: FakeUpstream) -> None:
    reply = server.query("alias.example.org", "HTTPS")
    assert reply.rcode() == dns.rcode.NOERROR
    assert _chain(reply) == [("alias.example.org.", "www.netflix.com.")]
    assert [rrset for rrset in reply.answer if rrset.rdtype != dns.rdatatype.CNAME] == []
    assert "203.0.113.5" not in reply.to_text()


def test_longer_chain_into_an_ipv6_region(server: Server, chains: FakeUpstream) -> None:
    a = server.query("hop.example.org", "A")
    assert _chain(a) == [
        ("hop.example.org.", "mid.example.net."),
        ("mid.example.net.", "cdn.bbc.co.uk."),
    ]
    assert _addresses(a) == ["198.51.100.20"]
    aaaa = server.query("hop.example.org", "AAAA")
    assert _addresses(aaaa) == ["2001:db8:20::1"]


def test_chain_outside_the_zones_and_unregistered_resolve_pass_unchanged(
    tmp_path: Path, chains: FakeUpstream
) -> None:
    with running_server(tmp_path, chains.address, {"unregistered": "resolve"}) as server:
        other = server.query("other.example.org", "A")
        assert _addresses(other) == ["192.0.2.5"] and len(_chain(other)) == 1
        # SPEC 2: `resolve` forwards and never unblocks
        foreign = server.query("alias.example.org", "A", source=UNREGISTERED)
        assert _addresses(foreign) == ["203.0.113.5"]
        # ...while a registered client asking for the same cached answer gets the proxy
        assert _addresses(server.query("alias.example.org", "A")) == PROXIES_US
        assert chains.count("alias.example.org", "A") == 1
