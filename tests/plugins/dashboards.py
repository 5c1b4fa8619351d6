"""Test helper: the PromQL the chart ships (Grafana dashboard panels, alert rules) and the metric
names it reads.

One place to list those queries, so tests can check them against what operator/metrics.py exports
and the end-to-end tests can evaluate every dashboard query against a real Prometheus scraping the
operator. The files live in the Helm chart (charts/enginebuild/files/); the operator itself never
reads them, so this is no part of the product.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import yaml

CHART_FILES = Path(__file__).resolve().parents[2] / "charts" / "enginebuild" / "files"
DASHBOARD_PATH = CHART_FILES / "dashboard.json"
ALERTS_PATH = CHART_FILES / "alerts.rules.yaml"

# What Grafana substitutes before a query reaches Prometheus, with values that select everything.
# `$__range` is the dashboard's time range (the e2e test's data is minutes old).
GRAFANA_VARIABLES: dict[str, str] = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "1h",
    "namespace": ".*",
    "name": ".*",
}

_PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
     "inf", "nan", "atan2"}
)


def _panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in node.get("panels", []):
        yield panel
        yield from _panels(panel)  # rows may nest panels


def resolve_variables(expr: str, values: dict[str, str] | None = None) -> str:
    """Replace Grafana's `$var` / `${var}` with concrete values, longest names first."""
    values = GRAFANA_VARIABLES if values is None else values
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    if "$" in expr:
        raise ValueError(f"unresolved Grafana variable in {expr!r}")
    return expr


def dashboard_exprs(path: Path = DASHBOARD_PATH, *, resolve: bool = True) -> list[str]:
    """Every panel query (and templating query) of the dashboard; Grafana variables resolved by default."""
    dash = json.loads(Path(path).read_text())
    exprs = [t["expr"] for p in _panels(dash) for t in p.get("targets", []) if t.get("expr")]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query.strip())
            exprs.append(match.group(1) if match else query)  # label_values(expr, label) queries `expr`
    return [resolve_variables(e) for e in exprs] if resolve else exprs


def alert_rules(path: Path = ALERTS_PATH) -> list[dict[str, Any]]:
    doc = yaml.safe_load(Path(path).read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alert_exprs(path: Path = ALERTS_PATH) -> list[str]:
    return [str(rule["expr"]) for rule in alert_rules(path)]


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (function names, label names and keywords excluded)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range / subquery durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def exported_metric_names() -> set[str]:
    """Sample names operator/metrics.py exports (counters `_total`, histograms `_bucket/_sum/_count`)."""
    from prometheus_client import REGISTRY

    from enginebuild_operator import metrics  # noqa: F401 - registers the operator's metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
                "summary": ("_sum", "_count", "")}
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.name.startswith("enginebuild_"):
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names
