"""The shipped alert rules, checked and unit-tested by Prometheus's own promtool against deploy/tests fixtures."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from .conftest import ROOT

RULES = ROOT / "deploy" / "prometheus-alerts.yml"
FIXTURES = ROOT / "deploy" / "tests" / "alerts.test.yml"


def promtool() -> str:
    """promtool's path. Missing: a skip on a developer's machine, a failure in CI (which installs it)."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (CI installs the Debian package prometheus in .ci/run)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def test_alert_rules_are_valid():
    run = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_alert_rules_fire_and_stay_quiet_as_the_fixtures_say():
    run = subprocess.run(
        [promtool(), "test", "rules", str(FIXTURES)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    print(run.stdout, run.stderr)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_every_shipped_alert_has_a_firing_and_a_quiet_fixture():
    alerts = set(re.findall(r"^\s*- alert:\s*(\S+)", RULES.read_text(encoding="utf-8"), re.M))
    fires, quiet = set(), set()
    for case in re.split(r"^\s*- interval:", FIXTURES.read_text(encoding="utf-8"), flags=re.M)[1:]:
        for name, expected in re.findall(r"alertname:\s*(\S+)\s*\n\s*exp_alerts:(.*)", case):
            (quiet if expected.strip() == "[]" else fires).add(name)
    assert len(alerts) >= 9
    assert alerts - fires == set(), "alerts without a fixture that makes them fire"
    assert alerts - quiet == set(), "alerts without a fixture that must not fire"
