"""SPEC 2 decided in one place: what a query gets, which names the node answers itself, and
where a forwarded CNAME chain is cut. Pure: no I/O, no clock, no bytes built here.

The decision is a table: CHAOS first (no version banner for anyone), then authorization
(`unregistered` for everyone else), then one row per kind of name, looked up by qtype.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Final, Generic, NamedTuple, Protocol, TypeVar

from smartdns.config.model import UnblockConfig, Unregistered
from smartdns.core.wire import (
    QCLASS_CHAOS,
    QCLASS_IN,
    QTYPE_A,
    QTYPE_AAAA,
    QTYPE_ANY,
    QTYPE_HTTPS,
    QTYPE_SVCB,
    CnameLink,
    encode_name,
)
from smartdns.core.zones import ZoneMatcher


class Verdict(enum.Enum):
    UNBLOCK = "unblock"  # proxy addresses from the zone's region
    NODATA = "nodata"  # NOERROR, no answer, synthesized SOA
    NXDOMAIN = "nxdomain"  # NXDOMAIN, synthesized SOA (the canary name)
    DESIGNATE = "designate"  # this node's SVCB records (RFC 9462 DDR)
    FORWARD = "forward"  # upstream through the cache
    REFUSE = "refuse"
    DROP = "drop"

    # Identity hash (members are singletons): Enum's own __hash__ is Python code, and
    # these are dict keys on the per-query path.
    __hash__ = object.__hash__


class NameKind(enum.Enum):
    """Which row of the table a name falls in (see `local_names`)."""

    PLAIN = "plain"  # no name the node answers itself
    UNBLOCK = "unblock"  # an unblock zone whose region has IPv6 proxies
    UNBLOCK_V4 = "unblock_v4"  # an unblock zone whose region has none
    RESOLVER = "resolver"  # resolver.arpa and below (RFC 9462 §4)
    DESIGNATED = "designated"  # _dns.resolver.arpa itself, with encrypted.ddr (RFC 9462 §4)
    CANARY = "canary"  # use-application-dns.net and below, while canary_nxdomain is true

    __hash__ = object.__hash__


class QueryFacts(NamedTuple):
    """Everything the decision reads about one well-formed query."""

    authorized: bool
    kind: NameKind  # of the query name (PLAIN for unauthorized sources: never matched)
    qtype: int
    qclass: int


class Row(NamedTuple):
    """One kind of name: the verdict by qtype in class IN, the verdict for other IN types,
    and for other classes (CHAOS never gets this far)."""

    by_qtype: Mapping[int, Verdict]
    default: Verdict
    other_class: Verdict


_V = Verdict
_NO_HINTS: Final = {QTYPE_HTTPS: _V.NODATA, QTYPE_SVCB: _V.NODATA}
# A and ANY (RFC 8482 minimal answer) get the proxies; AAAA the region's IPv6 proxies, or
# NODATA so the device falls back to IPv4 through the proxy; HTTPS and SVCB NODATA because
# their ipv4hint/ipv6hint would bypass the proxy; other types are forwarded. The local names
# are never forwarded: a class other than IN is refused there.
TABLE: Final[Mapping[NameKind, Row]] = MappingProxyType(
    {
        NameKind.PLAIN: Row({}, _V.FORWARD, _V.FORWARD),
        NameKind.UNBLOCK: Row(
            {QTYPE_A: _V.UNBLOCK, QTYPE_ANY: _V.UNBLOCK, QTYPE_AAAA: _V.UNBLOCK, **_NO_HINTS},
            _V.FORWARD,
            _V.FORWARD,
        ),
        NameKind.UNBLOCK_V4: Row(
            {QTYPE_A: _V.UNBLOCK, QTYPE_ANY: _V.UNBLOCK, QTYPE_AAAA: _V.NODATA, **_NO_HINTS},
            _V.FORWARD,
            _V.FORWARD,
        ),
        NameKind.RESOLVER: Row({}, _V.NODATA, _V.REFUSE),
        NameKind.DESIGNATED: Row({QTYPE_SVCB: _V.DESIGNATE}, _V.NODATA, _V.REFUSE),
        NameKind.CANARY: Row({}, _V.NXDOMAIN, _V.REFUSE),
    }
)

UNREGISTERED: Final[Mapping[Unregistered, Verdict]] = MappingProxyType(
    {
        Unregistered.REFUSE: _V.REFUSE,
        Unregistered.DROP: _V.DROP,
        Unregistered.RESOLVE: _V.FORWARD,  # forwarded, never unblocked
    }
)

# What a cut chain can end in (a REFUSE for another class leaves the answer as it is).
_LOCAL_ANSWERS: Final = frozenset({_V.UNBLOCK, _V.NODATA, _V.NXDOMAIN, _V.DESIGNATE})

_ROWS: Final = dict(TABLE)  # a plain dict: a MappingProxyType lookup costs more per query
_REFUSE: Final = Verdict.REFUSE

RESOLVER_ARPA: Final = "resolver.arpa"
DDR_NAME: Final = "_dns.resolver.arpa"  # RFC 9462 §4: the one name designated resolvers answer
CANARY_NAME: Final = "use-application-dns.net"


def decide(facts: QueryFacts, unregistered: Unregistered) -> Verdict:
    """The verdict for a well-formed query (SPEC 2's order of checks after parsing)."""
    authorized, kind, qtype, qclass = facts
    if qclass == QCLASS_CHAOS:
        return _REFUSE
    if not authorized:
        return UNREGISTERED[unregistered]
    row = _ROWS[kind]
    if qclass != QCLASS_IN:
        return row.other_class
    return row.by_qtype.get(qtype, row.default)


def local_names(unblock: UnblockConfig, designated: bool = False) -> dict[bytes, NameKind]:
    """Every name the node answers for itself (with what is below it, but for DESIGNATED),
    in wire form, and its row. `resolver.arpa` always; `_dns.resolver.arpa` alone when
    `designated` (encrypted.ddr: names below it stay RESOLVER's); the canary while
    `canary_nxdomain` is true (NXDOMAIN for it means nothing below it exists either,
    RFC 8020). These win over an unblock zone of the same name; a more specific unblock
    zone below them wins as any zone does."""
    names = {
        encode_name(zone): (
            NameKind.UNBLOCK if unblock.regions[region].ipv6 else NameKind.UNBLOCK_V4
        )
        for zone, region in unblock.zones.items()
    }
    names[encode_name(RESOLVER_ARPA)] = NameKind.RESOLVER
    if designated:
        names[encode_name(DDR_NAME)] = NameKind.DESIGNATED
    if unblock.canary_nxdomain:
        names[encode_name(CANARY_NAME)] = NameKind.CANARY
    return names


class Classified(Protocol):
    """A local name's entry in a ZoneMatcher: what it is is all the decision needs."""

    @property
    def kind(self) -> NameKind: ...


Z = TypeVar("Z", bound=Classified)


class ChainCut(NamedTuple, Generic[Z]):
    """Where a forwarded answer's CNAME chain enters a local name: the reply keeps the first
    `links` CNAME records, then carries what `verdict` says for the last target."""

    links: int
    zone: Z
    verdict: Verdict


def cut_chain(
    facts: QueryFacts, chain: Sequence[CnameLink], zones: ZoneMatcher[Z]
) -> ChainCut[Z] | None:
    """Stop a forwarded answer from leaking real addresses (or a designated resolver)
    through a CNAME chain: at the first target whose name the table answers locally for
    this qtype, the chain is cut and that target gets the local answer, as if it had been
    asked. None when the chain never gets there (the answer is passed on as it is).
    Unauthorized sources are never cut: `resolve` forwards them, never unblocked."""
    if not facts.authorized:
        return None
    for links, link in enumerate(chain, 1):
        zone = zones.match(link.target)
        if zone is not None:
            # the target as if it had been asked (authorized: `unregistered` plays no part)
            verdict = decide(facts._replace(kind=zone.kind), Unregistered.REFUSE)
            if verdict in _LOCAL_ANSWERS:
                return ChainCut(links, zone, verdict)
    return None
