"""Alert rules: the shipped PrometheusRule passes promtool's checks and unit tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, which

RULE_TESTS = REPO / "monitoring" / "rules" / "tests"
ALERTS = {"ClipforgeTrainingStalled", "ClipforgeNonFiniteLoss", "ClipforgeThroughputDropped",
          "ClipforgeCheckpointTooOld", "ClipforgeLoaderBound", "ClipforgeGPUsUnderused",
          "ClipforgeDownloadSuccessLow"}


def shipped_rules(tmp_path: Path) -> Path:
    """The rule groups inside k8s/base/monitoring/prometheusrule.yaml, as a Prometheus rule file."""
    doc = yaml.safe_load((REPO / "k8s/base/monitoring/prometheusrule.yaml").read_text())
    assert doc["kind"] == "PrometheusRule"
    path = tmp_path / "rules" / "clipforge.rules.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
    return path


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([which("promtool"), *args], capture_output=True, text=True, timeout=120)


def test_rules_inside_the_prometheusrule_pass_promtool_check(tmp_path):
    result = promtool("check", "rules", str(shipped_rules(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_every_alert_has_severity_summary_description_and_runbook(tmp_path):
    groups = yaml.safe_load(shipped_rules(tmp_path).read_text())["groups"]
    rules = {r["alert"]: r for g in groups for r in g["rules"]}
    assert set(rules) == ALERTS
    runbook = (REPO / "docs" / "monitoring.md").read_text()
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert f"### {name}" in runbook, f"docs/monitoring.md has no runbook section for {name}"
        assert f"docs/monitoring.md#{name.lower()}" in rule["annotations"]["description"], name


@pytest.mark.parametrize("test_file", sorted(p.name for p in RULE_TESTS.glob("*.yaml")))
def test_each_alert_fires_on_its_trigger_and_not_on_healthy_series(tmp_path, test_file):
    """promtool unit tests, run against the rules shipped in the PrometheusRule."""
    rules = shipped_rules(tmp_path)
    spec = yaml.safe_load((RULE_TESTS / test_file).read_text())
    spec["rule_files"] = [str(rules)]
    tested = {t["alertname"] for case in spec["tests"] for t in case.get("alert_rule_test", [])}
    assert tested == ALERTS, f"alerts without a unit test: {ALERTS - tested}"
    local = tmp_path / test_file
    local.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = promtool("test", "rules", str(local))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_alert_fails_its_unit_test(tmp_path):
    """The unit tests can fail: loosen one threshold and the healthy series start alerting."""
    rules = shipped_rules(tmp_path)
    rules.write_text(rules.read_text().replace("> 0.3", "> 0.01"))
    spec = yaml.safe_load((RULE_TESTS / "clipforge.test.yaml").read_text())
    spec["rule_files"] = [str(rules)]
    local = tmp_path / "broken.test.yaml"
    local.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = promtool("test", "rules", str(local))
    assert result.returncode != 0 and "ClipforgeLoaderBound" in result.stdout + result.stderr


def test_generated_files_are_up_to_date():
    """The PrometheusRule, dashboard JSON and ConfigMap match their sources."""
    result = subprocess.run([sys.executable, str(REPO / "monitoring" / "render.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

