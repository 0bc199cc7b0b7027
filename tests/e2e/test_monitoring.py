"""The shipped monitoring against a real Prometheus scraping a real node: the rule file passes
promtool's check and its own unit tests (monitoring/alerts.test.yml: every alert against
synthetic series, before and after its `for:`); every dashboard query and alert expression
evaluates through Prometheus' HTTP API; every metric name they use is on the node's /metrics;
the dashboard's panels have data; the certificate alert fires for a certificate 7 days from its
notAfter; and the not-ready and feed-disconnected alerts fire when the node's NATS server and
then the node itself go away.

The node runs two workers, DoT and DoH, a feed and the DDNS refresher (`feed.refresher`), so
every family the dashboard draws is on its page. Prometheus loads a copy of
monitoring/alerts.yml with each `for:` set to 0 s: the production durations (minutes) are what
an operator wants, and a test that waited for them would take minutes; the expressions are the
shipped ones.
"""

from __future__ import annotations

import contextlib
import datetime
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.certificates import SERVER_NAME, write_pair
from tests.e2e.harness import REGISTERED, UNREGISTERED, Server, running_server
from tests.e2e.nats import NatsCluster, nats_cluster
from tests.e2e.prometheus import PROMTOOL, Prometheus, require_prometheus, running_prometheus
from tests.e2e.test_fleet import wait_health
from tests.e2e.test_sync_api import call
from tests.fake_upstream import FakeUpstream
from tests.monitoring import (
    ALERT_TESTS,
    ALERTS,
    alert_rules,
    dashboard,
    exposed_names,
    panel_queries,
    unknown_names,
)
from tests.ports import free_port

SCRAPED_S = 20.0  # Prometheus scrapes the node (every 1 s) and has two samples for rate()
FIRING_S = 30.0  # a change on the node shows as a firing alert (scrape + evaluation, 1 s each)


@dataclass
class Watched:
    nats: NatsCluster
    node: Server
    prometheus: Prometheus


def rules_without_for(directory: Path) -> Path:
    """monitoring/alerts.yml with every `for:` at 0 s (see the module docstring)."""
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    for group in document["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    path = directory / "alerts.yml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def watched(tmp_path: Path, upstream: FakeUpstream) -> Iterator[Watched]:
    require_prometheus()
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(nats_cluster(tmp_path / "nats", size=1))
        feed = {"servers": cluster.urls, "bucket": "monitoring", "replicas": 1, "refresher": True}
        # Within SmartdnsCertificateExpiring's 14 days, outside its critical 3.
        soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=7)
        pair = write_pair(tmp_path, stem="tls-", not_after=soon)
        encrypted = {
            "server_name": SERVER_NAME,
            "cert_file": str(pair.cert_file),
            "key_file": str(pair.key_file),
            "dot_listen": [f"127.0.0.1:{free_port()}"],
            "doh_listen": [f"127.0.0.1:{free_port()}"],
        }
        override = {"server": {"workers": 2}, "feed": feed, "encrypted": encrypted}
        (tmp_path / "node").mkdir()
        node = stack.enter_context(running_server(tmp_path / "node", upstream.address, override))
        wait_health(node, "ok")
        rules = rules_without_for(tmp_path)
        target = node.config["sync"]["listen"]
        prometheus = stack.enter_context(running_prometheus(tmp_path / "prom", [target], rules))
        yield Watched(cluster, node, prometheus)


def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s"
        time.sleep(0.1)  # polling Prometheus, which changes state once a second


def has_data(prometheus: Prometheus, expr: str) -> bool:
    reply = prometheus.query(expr)
    return reply["status"] == "success" and bool(reply["data"]["result"])


def test_promtool_checks_the_rules() -> None:
    require_prometheus()
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_runs_the_rules_unit_tests() -> None:
    require_prometheus()
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_prometheus_evaluates_everything_and_the_alerts_fire(watched: Watched) -> None:
    node, prometheus = watched.node, watched.prometheus
    # Traffic, so the query, cache and upstream series move: answered, forwarded, refused.
    for _ in range(3):
        node.query("www.netflix.com", source=REGISTERED)
        node.query("example.org", source=REGISTERED)
        node.query("example.org", source=UNREGISTERED)
    assert call(node, "GET", "/v1/status")[0] == 200

    status, page = call(node, "GET", "/metrics", token=None)
    assert status == 200
    exposed = exposed_names(str(page))
    rules = alert_rules()
    queries = panel_queries(dashboard())
    exprs = [rule.expr for rule in rules] + [query.expr for query in queries]
    assert not unknown_names(exprs, exposed)

    until(lambda: has_data(prometheus, 'rate(up{job="smartdns"}[4s])'), SCRAPED_S, "two scrapes")
    for expr in exprs:
        reply = prometheus.query(expr)
        assert reply["status"] == "success", (expr, reply)
    # A panel without data has a wrong label or selector even when its names exist.
    empty = [q.panel for q in queries if not has_data(prometheus, q.expr)]
    assert not empty, f"panels without data: {empty}"

    until(
        lambda: "SmartdnsCertificateExpiring" in prometheus.firing(),
        FIRING_S,
        "SmartdnsCertificateExpiring firing",
    )
    assert not {"SmartdnsNodeNotReady", "SmartdnsFeedDisconnected"} & prometheus.firing()
    watched.nats.kill()
    until(
        lambda: "SmartdnsFeedDisconnected" in prometheus.firing(),
        FIRING_S,
        "SmartdnsFeedDisconnected firing",
    )
    assert "SmartdnsNodeNotReady" not in prometheus.firing()  # degraded, still serving
    node.stop()
    until(
        lambda: "SmartdnsNodeNotReady" in prometheus.firing(),
        FIRING_S,
        "SmartdnsNodeNotReady firing",
    )
