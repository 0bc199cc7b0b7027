"""The seam between the query path and whatever resolves its cache misses.

A resolver returns the upstream answer already parsed and validated (wire.ForwardedAnswer),
so the pipeline never parses it again. `Forwarder` is the one implementation today.
"""

from __future__ import annotations

from typing import Final, Protocol

from smartdns.core.wire import ForwardedAnswer, Query
from smartdns.errors import UpstreamError

DEADLINE_S: Final = 4.0  # SPEC 2: the client gets SERVFAIL if nothing has answered within 4 s


class UpstreamBusyError(UpstreamError):
    """Refused for lack of local capacity (rate bound, in-flight bound, no sockets): says
    nothing about the upstreams, so it is neither remembered as a failure nor held against
    an upstream's health."""


class Resolver(Protocol):
    async def resolve(self, query: Query) -> ForwardedAnswer:
        """The answer to `query`'s question, parsed and checked as wire.parse_upstream_answer
        does. Raises UpstreamBusyError when out of local capacity, UpstreamError when no
        usable answer came within DEADLINE_S."""
        ...
