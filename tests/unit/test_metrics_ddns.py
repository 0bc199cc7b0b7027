"""The DDNS refresher's figures on the /metrics page (node.metrics)."""

from __future__ import annotations

from smartdns.core.counters import Metrics
from smartdns.node.metrics import DdnsSample, render


def test_ddns_families_are_aggregate_with_a_cumulative_histogram() -> None:
    sample = DdnsSample(
        hostnames=3,
        addresses=4,
        lookups={"addresses": 7, "nxdomain": 1, "nodata": 0, "failed": 2},
        rejected=5,
        expired=2,
        latency_bounds_s=(0.01, 0.1),
        latency_buckets=(6, 3, 1),
        latency_sum_s=0.42,
    )
    text = render(
        Metrics(),
        forwarder=None,
        cache=None,
        registrations=None,
        database_up=True,
        ready=True,
        ddns=sample,
    )
    for line in [
        "smartdns_ddns_hostnames 3",
        "smartdns_ddns_addresses 4",
        'smartdns_ddns_lookups_total{outcome="addresses"} 7',
        'smartdns_ddns_lookups_total{outcome="failed"} 2',
        "smartdns_ddns_rejected_addresses_total 5",
        "smartdns_ddns_grace_expired_total 2",
        "# TYPE smartdns_ddns_lookup_seconds histogram",
        'smartdns_ddns_lookup_seconds_bucket{le="0.01"} 6',
        'smartdns_ddns_lookup_seconds_bucket{le="0.1"} 9',
        'smartdns_ddns_lookup_seconds_bucket{le="+Inf"} 10',
        "smartdns_ddns_lookup_seconds_sum 0.42",
        "smartdns_ddns_lookup_seconds_count 10",
    ]:
        assert line in text.splitlines(), line


def test_no_ddns_families_where_the_refresher_does_not_run() -> None:
    text = render(
        Metrics(), forwarder=None, cache=None, registrations=None, database_up=True, ready=True
    )
    assert "smartdns_ddns" not in text
