"""The queries of deploy/prometheus/ and the metric names they use."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .conftest import DEPLOY, alert_exprs

# Grafana's variables, replaced by what they stand for in a plain query.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$edge": ".*"}
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan",
}  # fmt: skip
_LABEL_VALUES = re.compile(r"label_values\((.*),\s*\w+\)$")


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    return loaded


def dashboard_queries(model: dict[str, Any]) -> dict[str, str]:
    """``panel<id>_<refId>`` (or ``var_<name>``) -> the query, Grafana's variables replaced."""
    queries: dict[str, str] = {}
    for panel in model["panels"]:
        for target in panel.get("targets", []):
            queries[f"panel{panel['id']}_{target['refId']}"] = target["expr"]
    for variable in model["templating"]["list"]:
        if variable["type"] == "query":
            found = _LABEL_VALUES.match(variable["query"]["query"])
            assert found, variable["query"]
            queries[f"var_{variable['name']}"] = found.group(1)
    for key, expr in queries.items():
        for name, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(name, value)
        assert "$" not in expr, f"{key}: a variable the test does not know: {expr}"
        queries[key] = expr
    return queries


def alert_queries() -> dict[str, str]:
    return alert_exprs((DEPLOY / "alerts.yml").read_text())


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, label matchers, ranges and
    grouping clauses taken out first; an identifier followed by ``(`` is a function)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        if match.group(2) is None and match.group(1) not in _KEYWORDS:
            names.add(match.group(1))
    return names


def recording_rules(queries: dict[str, str]) -> str:
    """A rules file with one recording rule per query, for ``promtool check rules``."""
    lines = ["groups:", "  - name: certman-dashboard", "    rules:"]
    for key, expr in sorted(queries.items()):
        lines.append(f"      - record: certman_dashboard:{key}")
        lines.append(f"        expr: {json.dumps(expr)}")
    return "\n".join(lines) + "\n"


def write_rules(path: Path, queries: dict[str, str]) -> Path:
    path.write_text(recording_rules(queries))
    return path
