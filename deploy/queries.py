"""Every PromQL expression in the dashboard and the rules, and the metric names they read.

For the checks in CI: that each expression parses, and that each metric a panel or an
alert reads is one a running gateway exports (tests/unit/test_deploy_*.py,
tests/integration/test_deploy_metrics.py). `python -m deploy.queries` lists them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser
import yaml

ROOT = Path(__file__).resolve().parent
DASHBOARD = ROOT / "grafana" / "gateway-dashboard.json"
RULES = ROOT / "prometheus" / "gateway-alerts.yml"

# Grafana's variables, replaced by values of the same kind so that a query parses as
# PromQL: a duration, a model name, a version regex.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$model": "digits",
    "$version": ".*",
}
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")
# A template variable's query: Grafana's label_values(selector, label), whose selector is PromQL.
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


@dataclass(frozen=True, slots=True)
class Query:
    where: str  # the panel or rule it comes from, for messages
    expr: str  # as written (a dashboard's with Grafana's variables)

    @property
    def promql(self) -> str:
        """The expression as Prometheus would get it (Grafana's variables replaced)."""
        text = self.expr
        for name, value in GRAFANA_VARIABLES.items():
            text = text.replace(name, value)
        if leftover := _VARIABLE.search(text):
            raise ValueError(f"{self.where}: unknown Grafana variable {leftover.group(0)} in {self.expr!r}")
        return text


def dashboard_queries(path: Path = DASHBOARD) -> list[Query]:
    board: dict[str, Any] = json.loads(path.read_text())
    found = []
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = _LABEL_VALUES.match(variable["query"])
        if match is None:
            raise ValueError(f"variable {variable['name']}: not a label_values(selector, label) query")
        found.append(Query(f"variable {variable['name']}", match["selector"]))
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            found.append(Query(f"panel {panel['title']!r} ({target['refId']})", target["expr"]))
    return found


def load_rules(path: Path = RULES) -> list[dict[str, Any]]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def rule_queries(path: Path = RULES) -> list[Query]:
    return [Query(f"rule {rule.get('alert') or rule['record']}", rule["expr"]) for rule in load_rules(path)]


def recorded_names(path: Path = RULES) -> set[str]:
    """The series the rules record: read by other rules, not exported by the gateway."""
    return {rule["record"] for rule in load_rules(path) if "record" in rule}


def metric_names(query: Query) -> set[str]:
    """The metric names an expression selects (raises ValueError when it does not parse)."""
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(query.promql), visit)
    return names


def exported_names_needed() -> dict[str, list[str]]:
    """Each metric name the dashboard and the rules read that a gateway must export,
    with where it is read (recorded series left out)."""
    recorded = recorded_names()
    needed: dict[str, list[str]] = {}
    for query in dashboard_queries() + rule_queries():
        for name in sorted(metric_names(query) - recorded):
            needed.setdefault(name, []).append(query.where)
    return needed


if __name__ == "__main__":
    for metric, where in sorted(exported_names_needed().items()):
        print(f"{metric}: {', '.join(where)}")
