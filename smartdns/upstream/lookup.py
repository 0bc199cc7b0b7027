"""Hostname lookups for DDNS registrations: A and AAAA through `ddns.resolvers`, CNAMEs followed.

The socket exchange is the forwarder's (fresh ID and port, health order, retries, timeouts,
TCP on TC), with its own Forwarder on the DDNS resolvers and never the answer cache. Keeps no
names; never logs.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Final

from smartdns.config.model import DdnsConfig, UpstreamConfig
from smartdns.core.chain import (
    MAX_CNAME_LINKS,
    ChainAnswer,
    ChainKind,
    Resolution,
    combine,
    read_chain,
)
from smartdns.core.wire import FLAG_RD, QCLASS_IN, QTYPE_A, QTYPE_AAAA, Query, encode_name
from smartdns.errors import UpstreamError, WireError
from smartdns.upstream.forwarder import Forwarder

MAX_QUERIES_PER_FAMILY: Final = 4  # the first question and up to three CNAME targets
# Per-query bound of the DDNS forwarder. The refresher paces lookups itself (each one is two
# queries, plus CNAME targets), so this bound only stops a runaway, never normal work.
FORWARDER_MAX_QPS: Final = 100_000


def forwarder_config(ddns: DdnsConfig, upstream: UpstreamConfig) -> UpstreamConfig:
    """The DDNS forwarder's settings: `ddns.resolvers`, with upstream's timeout and attempts."""
    return UpstreamConfig(
        servers=ddns.resolvers,
        timeout=upstream.timeout,
        attempts=upstream.attempts,
        max_qps=FORWARDER_MAX_QPS,
    )


class HostnameLookup:
    """Resolves a hostname's A and AAAA records (SPEC 3) with at most `max_in_flight` DNS
    queries outstanding; satisfies the refresher's HostnameResolver protocol."""

    def __init__(self, forwarder: Forwarder, max_in_flight: int) -> None:
        self._forwarder = forwarder
        self._slots = asyncio.Semaphore(max_in_flight)

    def close(self) -> None:
        self._forwarder.close()

    async def resolve(self, hostname: str) -> Resolution:
        """A and AAAA at once; see chain.combine for how the halves make one Resolution."""
        qname = encode_name(hostname)
        v4, v6 = await asyncio.gather(
            self._resolve_family(qname, QTYPE_A), self._resolve_family(qname, QTYPE_AAAA)
        )
        return combine(v4, v6)

    async def _resolve_family(self, qname: bytes, qtype: int) -> ChainAnswer | None:
        """One type, following the chain; None when it failed.

        A resolver normally follows the chain itself; an authority (or a resolver that
        stopped) returns only the CNAMEs it holds, and the target is asked next, up to
        MAX_QUERIES_PER_FAMILY questions and MAX_CNAME_LINKS links in all. The TTL is the
        smallest along the whole chain, so a short-lived CNAME is refreshed in time.
        """
        name, links, ttl = qname, 0, -1
        for _ in range(MAX_QUERIES_PER_FAMILY):
            try:
                async with self._slots:
                    forwarded = await self._forwarder.resolve(_question(name, qtype))
                answer = read_chain(forwarded, name, qtype, MAX_CNAME_LINKS - links)
            except (UpstreamError, WireError):
                return None
            links += answer.links
            if answer.kind is ChainKind.CNAME:
                name = answer.target
                ttl = answer.ttl if ttl < 0 else min(ttl, answer.ttl)
                continue
            if answer.kind is ChainKind.ADDRESSES and ttl >= 0:
                return answer._replace(ttl=min(ttl, answer.ttl), links=links)
            return answer._replace(links=links)
        return None  # still a CNAME after the last question


def _question(qname: bytes, qtype: int) -> Query:
    """A Query the forwarder accepts: it uses only qname, qtype, qclass, CD and DO."""
    question = qname + struct.pack("!HH", qtype, QCLASS_IN)
    return Query(0, FLAG_RD, question, qname, qtype, QCLASS_IN, False, 0, False)
