"""What the query path counts: transports, outcomes, and the per-process counters.

Pure; no I/O. `node.metrics` renders these; labels come only from these enums.
"""

from __future__ import annotations

import enum
from collections import Counter


class Transport(enum.Enum):
    UDP = "udp"
    TCP = "tcp"

    # Identity hash (members are singletons): Enum's own __hash__ is Python code, and
    # these are dict keys on the per-query path.
    __hash__ = object.__hash__


class Outcome(enum.Enum):
    """How a query ended; the verdicts plus the ways a packet can fail."""

    UNBLOCK = "unblock"
    NODATA = "nodata"
    NXDOMAIN = "nxdomain"  # a local NXDOMAIN (the canary name)
    FORWARD = "forward"
    REFUSE = "refuse"
    DROP = "drop"
    MALFORMED = "malformed"  # FORMERR, NOTIMP or BADVERS
    UNREADABLE = "unreadable"  # dropped: runt or QR set
    SERVFAIL = "servfail"  # forwarding failed
    RATE_LIMITED = "rate_limited"  # dropped: over rate_limit.client_qps or refused_qps (UDP)
    TRUNCATED = "truncated"  # over rate_limit.client_qps: answered with TC set (UDP)
    INTERNAL_ERROR = "internal_error"  # an unexpected exception, answered with SERVFAIL

    # Identity hash (members are singletons): Enum's own __hash__ is Python code, and
    # these are dict keys on the per-query path.
    __hash__ = object.__hash__


class Metrics:
    """Counters of one process. Plain Counter increments: a few tens of ns per query.

    `sync_requests` is keyed by (method, route template, status): the template
    (`/v1/accounts/{account}`), never the path, so no account id becomes a label.
    """

    __slots__ = ("queries", "sync_requests")

    def __init__(self) -> None:
        self.queries: Counter[tuple[Transport, Outcome]] = Counter()
        self.sync_requests: Counter[tuple[str, str, int]] = Counter()
