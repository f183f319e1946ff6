"""deploy/prometheus/: the configuration and the alert rules pass promtool, and every alert's
unit test runs (firing and not firing)."""

from __future__ import annotations

import re
from pathlib import Path

from .conftest import DEPLOY, alert_exprs, run_promtool


def test_promtool_is_the_version_scripts_install_provides(promtool: str) -> None:
    version = run_promtool(promtool, "--version")
    assert version.returncode == 0
    assert "version 2.42." in version.stdout + version.stderr


def test_scrape_configuration_is_valid_and_has_every_role(promtool: str) -> None:
    checked = run_promtool(promtool, "check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "28 rules found" in checked.stdout  # it loaded alerts.yml too
    text = (DEPLOY / "prometheus.yml").read_text()
    jobs = set(re.findall(r"job_name: (\S+)", text))
    assert jobs == {"certman-edge", "certman-pipeline", "certman-worker", "certman-flower"}


def test_alert_rules_are_valid(promtool: str) -> None:
    checked = run_promtool(promtool, "check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_alert_unit_tests_pass(promtool: str) -> None:
    tested = run_promtool(promtool, "test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    alerts = set(alert_exprs((DEPLOY / "alerts.yml").read_text()))
    assert len(alerts) == 28
    tests = (DEPLOY / "alerts_test.yml").read_text()
    quiet = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts: \[\]", tests))
    firing = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels:", tests))
    assert alerts - quiet == set(), "alerts never tested not firing"
    assert alerts - firing == set(), "alerts never tested firing"
    assert (quiet | firing) - alerts == set(), "tests of alerts that do not exist"


def test_a_broken_rule_fails_its_unit_test(promtool: str, tmp_path: Path) -> None:
    """The unit tests can fail: a typo in a metric name makes the exporter alert go silent."""
    text = (DEPLOY / "alerts.yml").read_text()
    assert "expr: certman_store_up == 0" in text
    broken = text.replace("expr: certman_store_up == 0", "expr: certman_store_upp == 0")
    (tmp_path / "alerts.yml").write_text(broken)
    # alerts_test.yml's test of that alert alone (the whole file takes seconds).
    tests = (DEPLOY / "alerts_test.yml").read_text()
    start = tests.index("  # CertmanExporterStoreDown:")
    end = tests.index("  # ", start + 4)
    head = tests[: tests.index("tests:\n") + len("tests:\n")]
    (tmp_path / "alerts_test.yml").write_text(head + tests[start:end])
    tested = run_promtool(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert tested.returncode != 0
    assert "CertmanExporterStoreDown" in tested.stdout + tested.stderr
    # And the same test passes on the rules as shipped.
    (tmp_path / "alerts.yml").write_text(text)
    assert run_promtool(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path).returncode == 0
