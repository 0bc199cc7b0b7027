"""What the query path counts: transports, outcomes, and the per-process counters.

Pure; no I/O. `node.metrics` renders these; labels come only from these enums.
"""

from __future__ import annotations

import enum
from collections import Counter


class Transport(enum.Enum):
    UDP = "udp"
    TCP = "tcp"
    DOT = "dot"  # DNS over TLS (RFC 7858)
    DOH = "doh"  # DNS over HTTPS (RFC 8484)

    # Identity hash (members are singletons): Enum's own __hash__ is Python code, and
    # these are dict keys on the per-query path.
    __hash__ = object.__hash__


class Outcome(enum.Enum):
    """How a query ended; the verdicts plus the ways a packet can fail."""

    UNBLOCK = "unblock"
    NODATA = "nodata"
    NXDOMAIN = "nxdomain"  # a local NXDOMAIN (the canary name)
    DESIGNATE = "designate"  # this node's encrypted endpoints for _dns.resolver.arpa (DDR)
    FORWARD = "forward"
    REFUSE = "refuse"
    DROP = "drop"
    MALFORMED = "malformed"  # FORMERR, NOTIMP or BADVERS
    UNREADABLE = "unreadable"  # dropped: runt or QR set
    SERVFAIL = "servfail"  # forwarding failed
    RATE_LIMITED = "rate_limited"  # over rate_limit.client_qps or refused_qps: dropped (UDP),
    # or REFUSED when a device ID is over client_qps (SPEC 2a)
    TRUNCATED = "truncated"  # over rate_limit.client_qps: answered with TC set (UDP)
    INTERNAL_ERROR = "internal_error"  # an unexpected exception, answered with SERVFAIL

    # Identity hash (members are singletons): Enum's own __hash__ is Python code, and
    # these are dict keys on the per-query path.
    __hash__ = object.__hash__


class Authorization(enum.Enum):
    """How a query's client was found authorized (SPEC 2a), or that it was not."""

    ADDRESS = "address"  # its source address lies in a registered prefix
    DEVICE_ID = "device_id"  # it named a registered device ID (DoT server name, DoH path)
    NONE = "none"  # neither: `unregistered` applies

    __hash__ = object.__hash__


class Handshake(enum.Enum):
    """How a TLS handshake ended (DoT, DoH; SPEC 2a)."""

    OK = "ok"
    FAILED = "failed"  # a TLS error, a server name that is not ours, or the client gave up
    TIMEOUT = "timeout"  # not finished within encrypted.handshake_timeout
    RATE_LIMITED = "rate_limited"  # over the per-source handshake rate: closed before it began

    __hash__ = object.__hash__


class StatusClass(enum.Enum):
    """The class of a DoH response's HTTP status: the only thing about a DoH request that is
    counted (SPEC 7: never a path, a header or a device ID)."""

    SUCCESS = "2xx"
    CLIENT_ERROR = "4xx"
    SERVER_ERROR = "5xx"

    __hash__ = object.__hash__

    @classmethod
    def of(cls, status: int) -> StatusClass:
        if status < 300:
            return cls.SUCCESS
        return cls.CLIENT_ERROR if status < 500 else cls.SERVER_ERROR


class Metrics:
    """Counters of one process. Plain Counter increments: a few tens of ns per query.

    `sync_requests` is keyed by (method, route template, status): the template
    (`/v1/accounts/{account}`), never the path, so no account id becomes a label.
    `doh_responses` counts DoH responses by status class.
    """

    __slots__ = ("authorizations", "doh_responses", "queries", "sync_requests")

    def __init__(self) -> None:
        self.queries: Counter[tuple[Transport, Outcome]] = Counter()
        self.authorizations: Counter[Authorization] = Counter()
        self.doh_responses: Counter[StatusClass] = Counter()
        self.sync_requests: Counter[tuple[str, str, int]] = Counter()
