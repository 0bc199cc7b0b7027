"""Tests for smartdns.node.tls_stats: reports added up over processes, a retired process's
counters kept and its gauges dropped, and the /metrics view."""

from __future__ import annotations

from smartdns.core.counters import Handshake, Transport
from smartdns.node.metrics import TlsSample
from smartdns.node.tls_stats import TlsTotals


def report(open_dot: int, accepted: int, not_after: float | None) -> dict[str, object]:
    return {
        "open": {"dot": open_dot},
        "accepted": {"dot": accepted, "doh": 1},
        "shed": {"doh": 2},
        "handshakes": {"ok": accepted, "timeout": 1},
        "not_after": not_after,
    }


def test_running_processes_are_summed_and_the_earliest_certificate_counts() -> None:
    totals = TlsTotals()
    totals.add(report(2, 5, 2_000.0))
    totals.add(report(1, 3, 1_500.0))
    assert totals.sample(1_000.0) == TlsSample(
        certificate_expiry_s=500.0,
        open={Transport.DOT: 3},
        accepted={Transport.DOT: 8, Transport.DOH: 2},
        shed={Transport.DOH: 4},
        handshakes={Handshake.OK: 8, Handshake.TIMEOUT: 2},
    )


def test_a_retired_process_keeps_its_counters_not_its_gauges() -> None:
    retired = TlsTotals()
    retired.add(report(7, 4, 100.0), gauges=False)
    totals = retired.counters()
    totals.add(report(1, 1, 3_000.0))
    sample = totals.sample(1_000.0)
    assert sample is not None
    assert sample.open == {Transport.DOT: 1}
    assert sample.accepted[Transport.DOT] == 5
    assert sample.certificate_expiry_s == 2_000.0
    assert retired.open == {}


def test_no_report_no_sample() -> None:
    totals = TlsTotals()
    totals.add(None)
    totals.add({})
    assert totals.sample(0.0) is None
