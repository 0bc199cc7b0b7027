"""policy: SPEC 2's table, row by row, the names answered locally, and the CNAME cut."""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass
from types import MappingProxyType

import pytest

from smartdns.config.model import Region, UnblockConfig, Unregistered
from smartdns.core.policy import (
    ChainCut,
    NameKind,
    QueryFacts,
    Verdict,
    cut_chain,
    decide,
    local_names,
)
from smartdns.core.wire import CnameLink, encode_name
from smartdns.core.zones import ZoneMatcher

A, NS, MX, TXT, AAAA, SVCB, HTTPS, ANY = 1, 2, 15, 16, 28, 64, 65, 255
IN, CH, HS = 1, 3, 4
V = Verdict
K = NameKind
REFUSE, DROP, RESOLVE = Unregistered.REFUSE, Unregistered.DROP, Unregistered.RESOLVE

# (authorized, kind of name, qtype, qclass, unregistered) -> verdict: one line per cell of
# SPEC 2's table and of its local names
ROWS = [
    # authorized, in an unblock zone
    (True, K.UNBLOCK, A, IN, REFUSE, V.UNBLOCK),
    (True, K.UNBLOCK_V4, A, IN, REFUSE, V.UNBLOCK),
    (True, K.UNBLOCK, ANY, IN, REFUSE, V.UNBLOCK),  # RFC 8482: the A answer
    (True, K.UNBLOCK_V4, ANY, IN, REFUSE, V.UNBLOCK),
    (True, K.UNBLOCK, AAAA, IN, REFUSE, V.UNBLOCK),  # the region's IPv6 proxies
    (True, K.UNBLOCK_V4, AAAA, IN, REFUSE, V.NODATA),  # none: NODATA, IPv4 via the proxy
    (True, K.UNBLOCK, HTTPS, IN, REFUSE, V.NODATA),
    (True, K.UNBLOCK, SVCB, IN, REFUSE, V.NODATA),
    (True, K.UNBLOCK_V4, HTTPS, IN, REFUSE, V.NODATA),
    (True, K.UNBLOCK_V4, SVCB, IN, REFUSE, V.NODATA),
    (True, K.UNBLOCK, MX, IN, REFUSE, V.FORWARD),  # other types: forwarded
    (True, K.UNBLOCK, TXT, IN, REFUSE, V.FORWARD),
    (True, K.UNBLOCK_V4, NS, IN, REFUSE, V.FORWARD),
    (True, K.UNBLOCK, A, HS, REFUSE, V.FORWARD),  # another class is no unblock answer
    # authorized, anything else
    (True, K.PLAIN, A, IN, REFUSE, V.FORWARD),
    (True, K.PLAIN, HTTPS, IN, REFUSE, V.FORWARD),
    (True, K.PLAIN, A, HS, REFUSE, V.FORWARD),
    # resolver.arpa and below: NODATA for every type, never forwarded
    (True, K.RESOLVER, SVCB, IN, REFUSE, V.NODATA),
    (True, K.RESOLVER, A, IN, RESOLVE, V.NODATA),
    (True, K.RESOLVER, ANY, IN, REFUSE, V.NODATA),
    (True, K.RESOLVER, SVCB, HS, REFUSE, V.REFUSE),
    # _dns.resolver.arpa with encrypted.ddr: SVCB designates this node, the rest NODATA
    (True, K.DESIGNATED, SVCB, IN, REFUSE, V.DESIGNATE),
    (True, K.DESIGNATED, HTTPS, IN, REFUSE, V.NODATA),
    (True, K.DESIGNATED, A, IN, REFUSE, V.NODATA),
    (True, K.DESIGNATED, SVCB, HS, REFUSE, V.REFUSE),
    (False, K.DESIGNATED, SVCB, IN, REFUSE, V.REFUSE),
    # the canary: NXDOMAIN for every type
    (True, K.CANARY, A, IN, REFUSE, V.NXDOMAIN),
    (True, K.CANARY, AAAA, IN, DROP, V.NXDOMAIN),
    (True, K.CANARY, TXT, HS, REFUSE, V.REFUSE),
    # CHAOS before authorization: no banner for anyone
    (True, K.UNBLOCK, TXT, CH, REFUSE, V.REFUSE),
    (True, K.RESOLVER, TXT, CH, REFUSE, V.REFUSE),
    (False, K.PLAIN, TXT, CH, RESOLVE, V.REFUSE),
    (False, K.PLAIN, TXT, CH, DROP, V.REFUSE),
    # not authorized: per `unregistered`, whatever the name
    (False, K.PLAIN, A, IN, REFUSE, V.REFUSE),
    (False, K.PLAIN, A, IN, DROP, V.DROP),
    (False, K.PLAIN, A, IN, RESOLVE, V.FORWARD),
    (False, K.UNBLOCK, A, IN, RESOLVE, V.FORWARD),  # forwarded, never unblocked
    (False, K.RESOLVER, SVCB, IN, REFUSE, V.REFUSE),
    (False, K.RESOLVER, SVCB, IN, DROP, V.DROP),
    (False, K.CANARY, A, IN, REFUSE, V.REFUSE),
    (False, K.CANARY, A, IN, RESOLVE, V.FORWARD),
]


@pytest.mark.parametrize(
    ("authorized", "kind", "qtype", "qclass", "unregistered", "verdict"),
    ROWS,
    ids=[f"{'auth' if r[0] else 'unauth'}-{r[1].value}-{r[2]}-{r[3]}-{r[4].value}" for r in ROWS],
)
def test_decide(
    authorized: bool,
    kind: NameKind,
    qtype: int,
    qclass: int,
    unregistered: Unregistered,
    verdict: Verdict,
) -> None:
    assert decide(QueryFacts(authorized, kind, qtype, qclass), unregistered) is verdict


def _unblock(canary: bool = True, **zones: str) -> UnblockConfig:
    return UnblockConfig(
        regions=MappingProxyType(
            {
                "us": Region(ipv4=(ipaddress.IPv4Address("198.51.100.10"),)),
                "uk": Region(
                    ipv4=(ipaddress.IPv4Address("198.51.100.20"),),
                    ipv6=(ipaddress.IPv6Address("2001:db8::20"),),
                ),
            }
        ),
        zones=MappingProxyType(zones),
        canary_nxdomain=canary,
    )


def test_local_names_cover_zones_resolver_arpa_and_the_canary() -> None:
    names = local_names(_unblock(**{"netflix.com": "us", "bbc.co.uk": "uk"}))
    assert names == {
        encode_name("netflix.com"): K.UNBLOCK_V4,
        encode_name("bbc.co.uk"): K.UNBLOCK,
        encode_name("resolver.arpa"): K.RESOLVER,
        encode_name("use-application-dns.net"): K.CANARY,
    }


def test_ddr_designates_dns_resolver_arpa_only_when_asked() -> None:
    assert encode_name("_dns.resolver.arpa") not in local_names(_unblock())
    names = local_names(_unblock(), designated=True)
    assert names[encode_name("_dns.resolver.arpa")] is K.DESIGNATED
    assert names[encode_name("resolver.arpa")] is K.RESOLVER


def test_canary_is_forwarded_when_switched_off_and_special_names_beat_a_zone() -> None:
    names = local_names(_unblock(canary=False, **{"resolver.arpa": "us"}))
    assert encode_name("use-application-dns.net") not in names
    assert names[encode_name("resolver.arpa")] is K.RESOLVER


@dataclass(frozen=True)
class Zone:
    kind: NameKind


ZONES = ZoneMatcher(
    {
        encode_name("netflix.com"): Zone(K.UNBLOCK_V4),
        encode_name("bbc.co.uk"): Zone(K.UNBLOCK),
        encode_name("resolver.arpa"): Zone(K.RESOLVER),
        encode_name("use-application-dns.net"): Zone(K.CANARY),
    }
)


def _chain(*names: str) -> list[CnameLink]:
    wires = [encode_name(name) for name in names]
    return [CnameLink(owner, 300, target) for owner, target in itertools.pairwise(wires)]


CHAIN = _chain("alias.example.org", "cdn.example.net", "www.netflix.com", "edge.example.com")

# (qtype, qclass, chain) -> (links kept, the zone's kind, verdict) or None (passed on as is)
CUTS = [
    (A, IN, CHAIN, (2, K.UNBLOCK_V4, V.UNBLOCK)),  # cut at the first target in a zone
    (ANY, IN, CHAIN, (2, K.UNBLOCK_V4, V.UNBLOCK)),
    (AAAA, IN, CHAIN, (2, K.UNBLOCK_V4, V.NODATA)),  # no IPv6 proxies: the zone's SOA
    (HTTPS, IN, CHAIN, (2, K.UNBLOCK_V4, V.NODATA)),
    (SVCB, IN, CHAIN, (2, K.UNBLOCK_V4, V.NODATA)),
    (AAAA, IN, _chain("a.example.org", "www.bbc.co.uk"), (1, K.UNBLOCK, V.UNBLOCK)),
    (MX, IN, CHAIN, None),  # forwarded types are not cut
    (A, HS, CHAIN, None),
    (A, IN, _chain("a.example.org", "b.example.net"), None),  # never enters a zone
    (A, IN, [], None),
    (SVCB, IN, _chain("a.example.org", "_dns.resolver.arpa"), (1, K.RESOLVER, V.NODATA)),
    (MX, IN, _chain("a.example.org", "resolver.arpa"), (1, K.RESOLVER, V.NODATA)),
    (A, IN, _chain("a.example.org", "use-application-dns.net"), (1, K.CANARY, V.NXDOMAIN)),
    # past a forwarded zone target, a later local name still cuts
    (
        MX,
        IN,
        _chain("a.example.org", "www.netflix.com", "x.resolver.arpa"),
        (2, K.RESOLVER, V.NODATA),
    ),
]


@pytest.mark.parametrize(("qtype", "qclass", "chain", "cut"), CUTS)
def test_cut_chain(
    qtype: int,
    qclass: int,
    chain: list[CnameLink],
    cut: tuple[int, NameKind, Verdict] | None,
) -> None:
    result = cut_chain(QueryFacts(True, K.PLAIN, qtype, qclass), chain, ZONES)
    if cut is None:
        assert result is None
    else:
        assert isinstance(result, ChainCut)
        assert (result.links, result.zone.kind, result.verdict) == cut


def test_unauthorized_chains_are_never_cut() -> None:
    assert cut_chain(QueryFacts(False, K.PLAIN, A, IN), CHAIN, ZONES) is None
