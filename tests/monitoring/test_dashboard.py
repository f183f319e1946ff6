"""deploy/prometheus/grafana-dashboard.json: a Grafana dashboard model whose every query
promtool parses."""

from __future__ import annotations

from pathlib import Path

from .conftest import run_promtool
from .promql import dashboard, dashboard_queries, metric_names, write_rules


def test_dashboard_is_a_grafana_model() -> None:
    model = dashboard()
    assert model["uid"] == "certman-overview" and model["title"] == "certman"
    assert isinstance(model["schemaVersion"], int)
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in model["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
    names = [v["name"] for v in model["templating"]["list"]]
    assert names == ["datasource", "edge"]


def test_every_dashboard_query_parses(promtool: str, tmp_path: Path) -> None:
    queries = dashboard_queries(dashboard())
    assert len(queries) >= 40
    rules = write_rules(tmp_path / "dashboard-rules.yml", queries)
    checked = run_promtool(promtool, "check", "rules", str(rules))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(queries)} rules found" in checked.stdout


def test_a_broken_query_fails_the_check(promtool: str, tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "broken.yml", {"q": "sum by (le (rate(x[5m]))"})
    assert run_promtool(promtool, "check", "rules", str(rules)).returncode != 0


def test_metric_names_are_found_in_queries() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le) (rate(a_bucket{job="x", le=~"1|2"}[5m])))'
        " / on (instance) group_left b_total offset 1h > bool 3 and time() - c"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
