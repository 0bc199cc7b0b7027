"""Aggregate counters and their Prometheus text exposition. Labels come only from enums, code
constants and config, never from a client, a name or an account; each event is counted in
exactly one place. No I/O: `render` formats numbers it is handed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Final, NamedTuple, Protocol, runtime_checkable

from smartdns.core.counters import (
    Authorization,
    Handshake,
    Metrics,
    Outcome,
    StatusClass,
    Transport,
)

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


class WorkerSample(NamedTuple):
    """One worker process as /metrics shows it; `worker` is its index from the config."""

    worker: int
    up: bool
    queries: int  # answered by its current process
    restarts: int
    unconfirmed: int = 0  # restarts for not confirming a registration change in time


class ForwarderStatsLike(Protocol):
    """What `render` reads from upstream.ForwarderStats (aggregate, whole process)."""

    @property
    def queries_sent(self) -> int: ...
    @property
    def answers(self) -> int: ...
    @property
    def timeouts(self) -> int: ...
    @property
    def failures(self) -> int: ...
    @property
    def mismatched(self) -> int: ...
    @property
    def rate_limited(self) -> int: ...
    @property
    def tcp_retries(self) -> int: ...


@runtime_checkable
class CacheStatsLike(Protocol):
    """The hook for the answer cache: counters since start and `len()` = entries held."""

    @property
    def hits(self) -> int: ...
    @property
    def misses(self) -> int: ...
    @property
    def stale_served(self) -> int: ...
    @property
    def evictions(self) -> int: ...
    def __len__(self) -> int: ...


class RegistrationStatsLike(Protocol):
    """Counts from the registrations database (registry.StoreStatus); no addresses."""

    @property
    def accounts(self) -> int: ...
    @property
    def entries(self) -> int: ...
    @property
    def snapshot_version(self) -> int: ...
    @property
    def devices(self) -> int: ...


class DdnsSample(NamedTuple):
    """The DDNS refresher's aggregate figures (SPEC 3): no hostname, no address."""

    hostnames: int  # distinct hostnames kept resolved
    addresses: int  # addresses authorized through them
    lookups: Mapping[str, int]  # by outcome (core.chain.LookupOutcome values)
    rejected: int  # resolved addresses the registration rules refused
    expired: int  # hostnames withdrawn because lookups still failed when the grace ended
    latency_bounds_s: Sequence[float]
    latency_buckets: Sequence[int]  # per bound, then one over the last (not cumulative)
    latency_sum_s: float


class TlsSample(NamedTuple):
    """DoT and DoH as /metrics shows them (SPEC 2a): sums over the workers, labels from enums."""

    certificate_expiry_s: float | None  # until the served certificate's notAfter; None: none
    open: Mapping[Transport, int]  # connections open now
    accepted: Mapping[Transport, int]  # connections made (handshake done, under the cap)
    shed: Mapping[Transport, int]  # idle connections closed to make room at the cap
    handshakes: Mapping[Handshake, int]  # by outcome


ENCRYPTED_TRANSPORTS: Final = (Transport.DOT, Transport.DOH)

_Sample = tuple[dict[str, str], int | float]


class _Exposition:
    """Builds Prometheus text format 0.0.4: HELP and TYPE once per family, then its samples."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[_Sample]) -> None:
        self._lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self._lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if labels:
                pairs = ",".join(f'{key}="{_escape_label(val)}"' for key, val in labels.items())
                self._lines.append(f"{name}{{{pairs}}} {_number(value)}")
            else:
                self._lines.append(f"{name} {_number(value)}")

    def single(self, name: str, kind: str, help_text: str, value: int | float) -> None:
        self.family(name, kind, help_text, [({}, value)])

    def histogram(
        self,
        name: str,
        help_text: str,
        bounds: Sequence[float],
        buckets: Sequence[int],
        sum_value: float,
    ) -> None:
        """A histogram from per-bucket counts (the last one above every bound)."""
        self._lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self._lines.append(f"# TYPE {name} histogram")
        total = 0
        for bound, count in zip([*map(repr, map(float, bounds)), "+Inf"], buckets, strict=True):
            total += count
            self._lines.append(f'{name}_bucket{{le="{bound}"}} {total}')
        self._lines.append(f"{name}_sum {_number(float(sum_value))}")
        self._lines.append(f"{name}_count {total}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: int | float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def render(
    metrics: Metrics,
    *,
    forwarder: ForwarderStatsLike | None,
    cache: CacheStatsLike | None,
    registrations: RegistrationStatsLike | None,
    database_up: bool,
    ready: bool,
    workers: Sequence[WorkerSample] = (),
    ddns: DdnsSample | None = None,
    tls: TlsSample | None = None,
) -> str:
    """The whole /metrics page. Query counters list every transport and outcome (zeros too),
    so each series exists from the start; a None source leaves its families out."""
    out = _Exposition()
    queries = metrics.queries.copy()  # one consistent view, taken without awaiting
    out.family(
        "smartdns_queries_total",
        "counter",
        "DNS queries by transport and how they ended.",
        (
            ({"transport": transport.value, "outcome": outcome.value}, queries[transport, outcome])
            for transport in Transport
            for outcome in Outcome
        ),
    )
    authorizations = metrics.authorizations.copy()
    out.family(
        "smartdns_query_authorizations_total",
        "counter",
        "DNS queries by how their client was authorized: address, device_id, or none.",
        (({"by": kind.value}, authorizations[kind]) for kind in Authorization),
    )
    doh_responses = metrics.doh_responses.copy()
    out.family(
        "smartdns_doh_responses_total",
        "counter",
        "DoH responses by HTTP status class (2xx carries a DNS answer of any rcode).",
        (({"status": kind.value}, doh_responses[kind]) for kind in StatusClass),
    )
    if forwarder is not None:
        _render_forwarder(out, forwarder)
    if cache is not None:
        _render_cache(out, cache)
    out.single(
        "smartdns_database_up",
        "gauge",
        "1 when the registrations database answered this scrape, else 0.",
        int(database_up),
    )
    out.single(
        "smartdns_ready",
        "gauge",
        "1 when /healthz answers 200: DNS listeners up and the database answering, else 0.",
        int(ready),
    )
    if registrations is not None:
        _render_registrations(out, registrations)
    if workers:
        _render_workers(out, workers)
    if ddns is not None:
        _render_ddns(out, ddns)
    if tls is not None:
        _render_tls(out, tls)
    out.family(
        "smartdns_sync_requests_total",
        "counter",
        "Sync API requests by method, route template and HTTP status.",
        (
            ({"method": method, "route": route, "status": str(status)}, count)
            for (method, route, status), count in sorted(metrics.sync_requests.items())
        ),
    )
    return out.text()


class FeedStateLike(Protocol):
    """The registration feed's state (registrations.sources.feed.FeedState)."""

    @property
    def connected(self) -> bool: ...
    @property
    def caught_up(self) -> bool: ...
    @property
    def last_revision(self) -> int: ...
    @property
    def lag(self) -> int: ...
    @property
    def applied(self) -> int: ...
    @property
    def rejected(self) -> int: ...
    @property
    def reconciled(self) -> int: ...
    @property
    def received(self) -> int: ...
    @property
    def gaps_detected(self) -> int: ...
    @property
    def gaps_repaired(self) -> int: ...
    @property
    def slow_consumers(self) -> int: ...
    @property
    def client_errors(self) -> int: ...
    @property
    def full_reads(self) -> Mapping[str, int]: ...


def render_feed(state: FeedStateLike) -> str:
    """The feed's families, appended to the page when `feed` is configured; no labels at all,
    so no account id can reach them."""
    out = _Exposition()
    for name, kind, help_text, value in (
        ("connected", "gauge", "1 while connected to a NATS server of the feed.", state.connected),
        ("caught_up", "gauge", "1 once the bucket's current values are applied.", state.caught_up),
        (
            "last_revision",
            "gauge",
            "Bucket revision of the last change processed.",
            state.last_revision,
        ),
        (
            "lag",
            "gauge",
            "Revisions in the bucket after the last one processed (catch-up remaining).",
            state.lag,
        ),
        ("received_total", "counter", "Messages read from the bucket's stream.", state.received),
        ("applied_total", "counter", "Feed changes that changed the local copy.", state.applied),
        (
            "rejected_total",
            "counter",
            "Feed values skipped whole: invalid, or older than held.",
            state.rejected,
        ),
        (
            "reconciled_total",
            "counter",
            "Local accounts removed as absent from the bucket.",
            state.reconciled,
        ),
        (
            "gaps_detected_total",
            "counter",
            "Messages found missing between two received (each read again).",
            state.gaps_detected,
        ),
        (
            "gaps_repaired_total",
            "counter",
            "Gaps closed by reading again after the last revision applied.",
            state.gaps_repaired,
        ),
        (
            "slow_consumer_total",
            "counter",
            "Messages the NATS client dropped for a full queue (each leads to a re-read).",
            state.slow_consumers,
        ),
        (
            "client_errors_total",
            "counter",
            "Other errors the NATS client reported (each leads to a re-read).",
            state.client_errors,
        ),
    ):
        out.single(f"smartdns_feed_{name}", kind, help_text, int(value))
    out.family(
        "smartdns_feed_full_reads_total",
        "counter",
        "Reads of the whole bucket instead of a resume, by cause.",
        (({"cause": cause}, count) for cause, count in sorted(state.full_reads.items())),
    )
    return out.text()


def _render_registrations(out: _Exposition, registrations: RegistrationStatsLike) -> None:
    out.single(
        "smartdns_registered_accounts", "gauge", "Live registered accounts.", registrations.accounts
    )
    out.single(
        "smartdns_registered_entries",
        "gauge",
        "Registered addresses and prefixes.",
        registrations.entries,
    )
    out.single(
        "smartdns_registered_device_ids",
        "gauge",
        "Registered device IDs (held by accounts; an ID two accounts hold counts twice).",
        registrations.devices,
    )
    out.single(
        "smartdns_snapshot_version",
        "gauge",
        "Version of the last registrations snapshot applied (0 for a new node).",
        registrations.snapshot_version,
    )


def _render_forwarder(out: _Exposition, stats: ForwarderStatsLike) -> None:
    out.single(
        "smartdns_upstream_queries_sent_total",
        "counter",
        "Messages sent to upstream resolvers (UDP and TCP).",
        stats.queries_sent,
    )
    out.single(
        "smartdns_upstream_answers_total",
        "counter",
        "Forwarded queries that got an upstream answer.",
        stats.answers,
    )
    out.family(
        "smartdns_upstream_failures_total",
        "counter",
        "Upstream attempts that failed: no reply in time, or a socket error or unusable reply.",
        [({"reason": "timeout"}, stats.timeouts), ({"reason": "error"}, stats.failures)],
    )
    out.single(
        "smartdns_upstream_mismatched_replies_total",
        "counter",
        "Upstream replies ignored for a wrong ID or question.",
        stats.mismatched,
    )
    out.single(
        "smartdns_upstream_rate_limited_total",
        "counter",
        "Forwarded queries refused by upstream.max_qps.",
        stats.rate_limited,
    )
    out.single(
        "smartdns_upstream_tcp_retries_total",
        "counter",
        "Truncated UDP upstream answers retried over TCP.",
        stats.tcp_retries,
    )


def _render_cache(out: _Exposition, cache: CacheStatsLike) -> None:
    out.single("smartdns_cache_hits_total", "counter", "Answers served from the cache.", cache.hits)
    out.single(
        "smartdns_cache_misses_total", "counter", "Cache lookups that found nothing.", cache.misses
    )
    out.single(
        "smartdns_cache_stale_served_total",
        "counter",
        "Expired answers served because no upstream answered (RFC 8767).",
        cache.stale_served,
    )
    out.single(
        "smartdns_cache_evictions_total",
        "counter",
        "Entries evicted to stay within cache.max_entries.",
        cache.evictions,
    )
    out.single("smartdns_cache_entries", "gauge", "Answers held in the cache.", len(cache))


def _render_tls(out: _Exposition, tls: TlsSample) -> None:
    if tls.certificate_expiry_s is not None:
        out.single(
            "smartdns_tls_certificate_expiry_seconds",
            "gauge",
            "Seconds until the served certificate's notAfter (negative once expired).",
            tls.certificate_expiry_s,
        )
    for name, kind, help_text, counts in (
        ("connections", "gauge", "Open DoT and DoH connections.", tls.open),
        ("connections_accepted_total", "counter", "Connections made.", tls.accepted),
        (
            "connections_shed_total",
            "counter",
            "Idle connections closed to make room at encrypted.max_connections.",
            tls.shed,
        ),
    ):
        out.family(
            f"smartdns_tls_{name}",
            kind,
            help_text,
            (({"transport": t.value}, counts.get(t, 0)) for t in ENCRYPTED_TRANSPORTS),
        )
    out.family(
        "smartdns_tls_handshakes_total",
        "counter",
        "TLS handshakes by outcome: ok, failed, timeout, or rate_limited (closed before it).",
        (({"outcome": o.value}, tls.handshakes.get(o, 0)) for o in Handshake),
    )


def _render_ddns(out: _Exposition, ddns: DdnsSample) -> None:
    out.single(
        "smartdns_ddns_hostnames",
        "gauge",
        "Distinct registered hostnames kept resolved.",
        ddns.hostnames,
    )
    out.single(
        "smartdns_ddns_addresses",
        "gauge",
        "Addresses authorized through registered hostnames.",
        ddns.addresses,
    )
    out.family(
        "smartdns_ddns_lookups_total",
        "counter",
        "Hostname lookups (A and AAAA together) by outcome.",
        (({"outcome": outcome}, count) for outcome, count in ddns.lookups.items()),
    )
    out.single(
        "smartdns_ddns_rejected_addresses_total",
        "counter",
        "Resolved addresses the registration rules refused (counted when an answer changes).",
        ddns.rejected,
    )
    out.single(
        "smartdns_ddns_grace_expired_total",
        "counter",
        "Hostnames whose addresses were withdrawn: lookups still failed when ddns.grace ended.",
        ddns.expired,
    )
    out.histogram(
        "smartdns_ddns_lookup_seconds",
        "Time a hostname lookup took.",
        ddns.latency_bounds_s,
        ddns.latency_buckets,
        ddns.latency_sum_s,
    )


def _render_workers(out: _Exposition, workers: Sequence[WorkerSample]) -> None:
    out.family(
        "smartdns_worker_up",
        "gauge",
        "1 when the worker process is running with its listeners up.",
        (({"worker": str(w.worker)}, int(w.up)) for w in workers),
    )
    out.family(
        "smartdns_worker_queries_total",
        "counter",
        "Queries handled by the worker's current process (resets when it restarts).",
        (({"worker": str(w.worker)}, w.queries) for w in workers),
    )
    out.family(
        "smartdns_worker_restarts_total",
        "counter",
        "Times the worker process was restarted after exiting.",
        (({"worker": str(w.worker)}, w.restarts) for w in workers),
    )
    out.family(
        "smartdns_worker_unconfirmed_total",
        "counter",
        "Times the worker was restarted for not confirming a registration change in time.",
        (({"worker": str(w.worker)}, w.unconfirmed) for w in workers),
    )
