"""Tests for smartdns.node.metrics: the Prometheus text exposition, exactly."""

from __future__ import annotations

from dataclasses import dataclass

from smartdns.core.counters import Handshake, Metrics, Outcome, StatusClass, Transport
from smartdns.node.metrics import CacheStatsLike, TlsSample, _escape_label, render, render_feed
from smartdns.registrations.feed_follow import ResyncCause
from smartdns.registrations.sources.feed import FeedState
from smartdns.upstream.forwarder import ForwarderStats


@dataclass(frozen=True)
class Stats:
    accounts: int = 3
    entries: int = 5
    snapshot_version: int = 9
    devices: int = 2


class Cache:
    hits, misses, stale_served, evictions = 1, 2, 3, 4

    def __len__(self) -> int:
        return 6


def test_empty_page_lists_every_query_series_with_help_and_type() -> None:
    text = render(
        Metrics(), forwarder=None, cache=None, registrations=None, database_up=False, ready=False
    )
    lines = text.splitlines()
    assert lines[:3] == [
        "# HELP smartdns_queries_total DNS queries by transport and how they ended.",
        "# TYPE smartdns_queries_total counter",
        'smartdns_queries_total{transport="udp",outcome="unblock"} 0',
    ]
    assert len([line for line in lines if line.startswith("smartdns_queries_total{")]) == len(
        Transport
    ) * len(Outcome)
    assert "smartdns_database_up 0" in lines
    assert "smartdns_ready 0" in lines
    assert "# TYPE smartdns_sync_requests_total counter" in lines
    assert "cache" not in text and "upstream" not in text and "registered" not in text
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_counts_and_sources_are_rendered() -> None:
    metrics = Metrics()
    metrics.queries[Transport.TCP, Outcome.SERVFAIL] += 2
    metrics.sync_requests["PUT", "/v1/snapshot", 409] += 1
    assert isinstance(Cache(), CacheStatsLike)
    forwarder = ForwarderStats(queries_sent=4, answers=3, timeouts=1, failures=2)
    text = render(
        metrics,
        forwarder=forwarder,
        cache=Cache(),
        registrations=Stats(),
        database_up=True,
        ready=True,
    )
    for line in (
        "smartdns_upstream_queries_sent_total 4",
        "smartdns_upstream_answers_total 3",
        'smartdns_upstream_failures_total{reason="timeout"} 1',
        'smartdns_upstream_failures_total{reason="error"} 2',
        'smartdns_queries_total{transport="tcp",outcome="servfail"} 2',
        'smartdns_sync_requests_total{method="PUT",route="/v1/snapshot",status="409"} 1',
        "# TYPE smartdns_cache_hits_total counter",
        "smartdns_cache_hits_total 1",
        "smartdns_cache_stale_served_total 3",
        "# TYPE smartdns_cache_entries gauge",
        "smartdns_cache_entries 6",
        "smartdns_registered_accounts 3",
        "smartdns_registered_entries 5",
        "smartdns_registered_device_ids 2",
        "smartdns_snapshot_version 9",
        "smartdns_database_up 1",
        "smartdns_ready 1",
    ):
        assert line in text.splitlines(), line


def test_each_family_is_declared_once_and_counters_end_in_total() -> None:
    text = render(
        Metrics(),
        forwarder=None,
        cache=Cache(),
        registrations=Stats(),
        database_up=True,
        ready=True,
    )
    types = [line.split() for line in text.splitlines() if line.startswith("# TYPE ")]
    names = [name for _, _, name, _ in types]
    assert len(names) == len(set(names))
    for _, _, name, kind in types:
        assert name.endswith("_total") == (kind == "counter"), name


def test_label_values_are_escaped() -> None:
    assert _escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_doh_responses_are_counted_by_status_class_only() -> None:
    metrics = Metrics()
    metrics.doh_responses[StatusClass.of(200)] += 3
    metrics.doh_responses[StatusClass.of(415)] += 1
    text = render(
        metrics, forwarder=None, cache=None, registrations=None, database_up=True, ready=True
    )
    assert [line for line in text.splitlines() if "smartdns_doh_responses_total{" in line] == [
        'smartdns_doh_responses_total{status="2xx"} 3',
        'smartdns_doh_responses_total{status="4xx"} 1',
        'smartdns_doh_responses_total{status="5xx"} 0',
    ]


def test_tls_families() -> None:
    tls = TlsSample(
        certificate_expiry_s=-5.5,
        open={Transport.DOT: 2},
        accepted={Transport.DOT: 7, Transport.DOH: 1},
        shed={},
        handshakes={Handshake.RATE_LIMITED: 3},
    )
    text = render(
        Metrics(),
        forwarder=None,
        cache=None,
        registrations=None,
        database_up=True,
        ready=True,
        tls=tls,
    )
    lines = text.splitlines()
    for line in (
        "# TYPE smartdns_tls_certificate_expiry_seconds gauge",
        "smartdns_tls_certificate_expiry_seconds -5.5",
        'smartdns_tls_connections{transport="dot"} 2',
        'smartdns_tls_connections{transport="doh"} 0',
        'smartdns_tls_connections_accepted_total{transport="dot"} 7',
        'smartdns_tls_connections_shed_total{transport="doh"} 0',
        'smartdns_tls_handshakes_total{outcome="rate_limited"} 3',
        'smartdns_tls_handshakes_total{outcome="ok"} 0',
    ):
        assert line in lines, line
    without = render(
        Metrics(), forwarder=None, cache=None, registrations=None, database_up=True, ready=True
    )
    assert "smartdns_tls" not in without


def test_feed_families_show_catch_up_resyncs_gaps_and_slow_consumers() -> None:
    state = FeedState(connected=True, caught_up=True, last_revision=40, lag=7, stale=1)
    state.follow.received = 12
    state.follow.gaps_detected, state.follow.gaps_repaired = 3, 2
    state.follow.rejected = 2
    state.follow.full_reads[ResyncCause.RECREATED] = 1
    state.slow_consumers = 4
    lines = render_feed(state).splitlines()
    for wanted in (
        "smartdns_feed_lag 7",
        "smartdns_feed_received_total 12",
        "smartdns_feed_rejected_total 3",
        "smartdns_feed_gaps_detected_total 3",
        "smartdns_feed_gaps_repaired_total 2",
        "smartdns_feed_slow_consumer_total 4",
        'smartdns_feed_full_reads_total{cause="recreated"} 1',
        'smartdns_feed_full_reads_total{cause="first"} 0',
    ):
        assert wanted in lines
