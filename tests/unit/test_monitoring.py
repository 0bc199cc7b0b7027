"""The shipped monitoring, checked without a Prometheus: alert rules carry a severity, a summary
and a runbook that exists; the dashboard is provisionable; every metric name either refers to
is one the node renders (node.metrics with every source present), and a wrong name is caught.
tests/e2e/test_monitoring.py runs the same files through a real Prometheus and a real node.
"""

from __future__ import annotations

import re

import pytest

from smartdns.core.counters import Metrics
from smartdns.node.metrics import DdnsSample, TlsSample, WorkerSample, render, render_feed
from smartdns.registrations.sources.feed import FeedState
from smartdns.upstream.forwarder import ForwarderStats
from tests.monitoring import (
    REPO,
    alert_rules,
    alerts_under_test,
    dashboard,
    exposed_names,
    metric_names,
    panel_queries,
    panels,
    substitute,
    unknown_names,
)
from tests.unit.test_docs import _anchors
from tests.unit.test_metrics import Cache, Stats

SEVERITIES = {"critical", "warning"}
RUNBOOK = re.compile(r"docs/operations\.md#([a-z0-9-]+)")


def everything_rendered() -> set[str]:
    """Every sample name the node can put on /metrics: all sources present, with workers,
    the DDNS refresher, DoT and DoH, and a feed."""
    ddns = DdnsSample(1, 1, {"failed": 1}, 0, 0, (0.1,), (1, 0), 0.1)
    metrics = Metrics()
    metrics.sync_requests["GET", "/metrics", 200] += 1  # a family without series is not shown
    page = render(
        metrics,
        forwarder=ForwarderStats(),
        cache=Cache(),
        registrations=Stats(),
        database_up=True,
        ready=True,
        workers=[WorkerSample(0, True, 1, 0)],
        ddns=ddns,
        tls=TlsSample(86_400.0, {}, {}, {}, {}),
    )
    return exposed_names(page + render_feed(FeedState()))


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("smartdns_ready == 0", {"smartdns_ready"}),
        ('up{job="smartdns"} == 0 or smartdns_ready == 0', {"up", "smartdns_ready"}),
        (
            'sum by (outcome) (rate(smartdns_queries_total{outcome=~"a|b"}[5m] offset 1h))',
            {"smartdns_queries_total"},
        ),
        (
            "histogram_quantile(0.99, sum by (le) (rate(x_seconds_bucket[$__rate_interval])))",
            {"x_seconds_bucket"},
        ),
        ("a / on(instance) group_left(worker) b > bool 14 * 86400 and c_1e3", {"a", "b", "c_1e3"}),
        ('count(x{name="not_a_metric"}) unless y:recorded', {"x", "y:recorded"}),
    ],
)
def test_metric_names_are_found_in_an_expression(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_every_name_in_alerts_and_dashboard_is_one_the_node_renders() -> None:
    exprs = [rule.expr for rule in alert_rules()] + [q.expr for q in panel_queries(dashboard())]
    rendered = everything_rendered()
    assert not unknown_names(exprs, rendered)


def test_a_misspelt_metric_name_is_caught() -> None:
    rule = next(rule for rule in alert_rules() if rule.name == "SmartdnsFeedDisconnected")
    wrong = rule.expr.replace("smartdns_feed_connected", "smartdns_feed_conected")
    assert unknown_names([wrong], everything_rendered()) == {wrong: {"smartdns_feed_conected"}}


def test_each_alert_has_a_severity_a_summary_and_a_runbook_section() -> None:
    sections = _anchors(REPO / "docs" / "operations.md")
    rules = alert_rules()
    assert {"SmartdnsNodeNotReady", "SmartdnsFeedDisconnected"} <= {rule.name for rule in rules}
    for rule in rules:
        assert rule.labels["severity"] in SEVERITIES, rule.name
        assert rule.annotations["summary"], rule.name
        runbook = RUNBOOK.fullmatch(rule.annotations["runbook_url"])
        assert runbook and runbook.group(1) == rule.name.lower(), rule.name
        assert runbook.group(1) in sections, f"no section {rule.name} in docs/operations.md"


def test_every_alert_has_a_promtool_unit_test() -> None:
    assert alerts_under_test() == {rule.name for rule in alert_rules()}


def test_dashboard_is_provisionable_with_a_datasource_variable() -> None:
    document = dashboard()
    assert document["uid"] and document["title"]
    assert document["schemaVersion"] >= 39
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    top = document["panels"]
    ids = [panel["id"] for panel in top] + [c["id"] for p in top for c in p.get("panels", [])]
    assert len(ids) == len(set(ids))
    for panel in panels(document):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_has_the_rows_an_operator_needs() -> None:
    rows = {panel["title"] for panel in dashboard()["panels"] if panel["type"] == "row"}
    assert rows >= {
        "Queries",
        "Latency",
        "Cache",
        "Upstream health",
        "Registrations and feed",
        "DDNS",
        "Workers",
        "Encrypted DNS",
    }


def test_an_unknown_grafana_variable_is_not_guessed() -> None:
    assert substitute("rate(x[$__rate_interval])") == "rate(x[4s])"
    with pytest.raises(AssertionError):
        substitute('x{job="$job"}')
