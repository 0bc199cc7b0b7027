"""The shipped monitoring (monitoring/alerts.yml, monitoring/dashboard.json) read for the tests:
every alert rule, every dashboard query with Grafana's variables filled in, and the metric
names a PromQL expression refers to, so a typo in a name fails a test instead of drawing an
empty panel or an alert that can never fire.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "monitoring" / "alerts.yml"
ALERT_TESTS = REPO / "monitoring" / "alerts.test.yml"  # promtool test rules
DASHBOARD = REPO / "monitoring" / "dashboard.json"

# What Grafana puts in place of its variables when it sends a panel's query; the test's
# Prometheus scrapes every second, so 4 s holds the two samples rate() needs.
GRAFANA_VARIABLES = {
    "$__rate_interval": "4s",
    "$__interval": "1s",
    "$__range": "1m",
    "${instance}": ".*",
    "$instance": ".*",
}
# Series Prometheus makes itself for every target; the node does not expose them.
PROMETHEUS_SERIES = frozenset({"up"})

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_OFFSET = re.compile(r"\boffset\s+-?\w+")
# An identifier not inside a number and not called (a function or an aggregation).
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "inf", "nan"})


@dataclass(frozen=True)
class AlertRule:
    name: str
    expr: str
    for_: str | None
    labels: dict[str, str]
    annotations: dict[str, str]


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    expr: str  # with GRAFANA_VARIABLES substituted


def alert_rules(path: Path = ALERTS) -> list[AlertRule]:
    document: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [
        AlertRule(
            rule["alert"],
            rule["expr"],
            rule.get("for"),
            dict(rule.get("labels", {})),
            dict(rule.get("annotations", {})),
        )
        for group in document["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def alerts_under_test(path: Path = ALERT_TESTS) -> set[str]:
    """The alert names the promtool unit tests evaluate."""
    document: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return {case["alertname"] for test in document["tests"] for case in test["alert_rule_test"]}


def dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


def panels(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that is not a row, also those inside collapsed rows."""
    for panel in document["panels"]:
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def panel_queries(document: dict[str, Any]) -> list[PanelQuery]:
    return [
        PanelQuery(panel["title"], substitute(target["expr"]))
        for panel in panels(document)
        for target in panel.get("targets", [])
    ]


def substitute(expr: str) -> str:
    """The query as Grafana sends it; a variable left over is a test failure, not a guess."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects: what is left once strings, label matchers, ranges,
    grouping clauses, offsets, keywords and called names (functions, aggregations) are gone."""
    text = _STRING.sub('""', expr)
    for pattern in (_MATCHERS, _RANGE, _GROUPING, _OFFSET):
        text = pattern.sub(" ", text)
    return {name for name in _IDENTIFIER.findall(text) if name not in _KEYWORDS}


def exposed_names(exposition: str) -> set[str]:
    """The sample names of a Prometheus text page (histograms as _bucket, _sum, _count)."""
    return {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in exposition.splitlines()
        if line and not line.startswith("#")
    }


def unknown_names(exprs: Iterable[str], exposed: set[str]) -> dict[str, set[str]]:
    """Expression → the names in it that neither the node nor Prometheus provides."""
    known = exposed | PROMETHEUS_SERIES
    found = {expr: metric_names(expr) - known for expr in exprs}
    return {expr: names for expr, names in found.items() if names}
