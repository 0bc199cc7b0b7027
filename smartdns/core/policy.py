"""The one place that decides what a query gets (SPEC 2's table). Pure: no I/O, no clock."""

from __future__ import annotations

import enum

from smartdns.config.model import Unregistered
from smartdns.core.wire import (
    QCLASS_CHAOS,
    QCLASS_IN,
    QTYPE_A,
    QTYPE_AAAA,
    QTYPE_ANY,
    QTYPE_HTTPS,
    QTYPE_SVCB,
)


class Verdict(enum.Enum):
    UNBLOCK = "unblock"  # proxy addresses from the zone's region
    NODATA = "nodata"  # NOERROR, no answer, synthesized SOA
    FORWARD = "forward"  # upstream through the cache
    REFUSE = "refuse"
    DROP = "drop"

    # Identity hash (members are singletons): Enum's own __hash__ is Python code, and
    # these are dict keys on the per-query path.
    __hash__ = object.__hash__


_UNREGISTERED = {
    Unregistered.REFUSE: Verdict.REFUSE,
    Unregistered.DROP: Verdict.DROP,
    Unregistered.RESOLVE: Verdict.FORWARD,  # forwarded, never unblocked
}


def decide(
    authorized: bool,
    in_unblock_zone: bool,
    region_has_ipv6: bool,
    qtype: int,
    qclass: int,
    unregistered: Unregistered,
) -> Verdict:
    """Verdict for a well-formed query.

    CHAOS comes first (no version banner for anyone), then authorization, then the zone
    table: A and ANY (RFC 8482 minimal answer) get the proxies; AAAA gets the region's IPv6
    proxies or NODATA so the device falls back to IPv4 through the proxy; HTTPS and SVCB get
    NODATA because their ipv4hint/ipv6hint would bypass the proxy. Other types and classes
    are forwarded.
    """
    if qclass == QCLASS_CHAOS:
        return Verdict.REFUSE
    if not authorized:
        return _UNREGISTERED[unregistered]
    if in_unblock_zone and qclass == QCLASS_IN:
        if qtype in (QTYPE_A, QTYPE_ANY):
            return Verdict.UNBLOCK
        if qtype == QTYPE_AAAA:
            return Verdict.UNBLOCK if region_has_ipv6 else Verdict.NODATA
        if qtype in (QTYPE_HTTPS, QTYPE_SVCB):
            return Verdict.NODATA
    return Verdict.FORWARD
