"""deploy/prometheus: the configuration and rules pass Prometheus' own checks, every alert has a
unit test that fires it and one that does not, and the SLO rules match their spec."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

from tests.deploy.expressions import PROMETHEUS_DIR, RULE_TESTS_DIR, rule_files, rules


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_shipped_config(promtool):
    checked = run(promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    # Warnings about the targets files are expected: `up` writes them into its home, not here.
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_promtool_accepts_the_rules(promtool):
    checked = run(promtool, "check", "rules", *map(str, rule_files()))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_rule_unit_tests_pass(promtool):
    test_files = sorted(RULE_TESTS_DIR.glob("*.yml"))
    assert test_files
    tested = run(promtool, "test", "rules", *map(str, test_files))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_case_that_fires_and_one_that_does_not():
    fired, quiet = set(), set()
    for path in RULE_TESTS_DIR.glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert alerts - fired == set(), "alerts no unit test fires"
    assert alerts - quiet == set(), "alerts with no unit test where they stay quiet"


def test_slo_rules_are_generated_from_slos_yml():
    checked = run(sys.executable, str(PROMETHEUS_DIR / "slo_rules.py"), "--check")
    assert checked.returncode == 0, checked.stderr


def test_the_dashboards_error_ratio_counts_the_availability_slos_errors():
    spec = yaml.safe_load((PROMETHEUS_DIR / "slos.yml").read_text())
    (availability,) = [s for s in spec["slos"] if s["sli"] == "server_errors"]
    (errors,) = [r for r in rules() if r.get("record") == "model_version:request_errors:rate1m"]
    codes = re.search(r'code=~"([^"]+)"', errors["expr"]).group(1)
    assert codes.split("|") == availability["error_codes"]
