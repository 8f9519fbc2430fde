"""deploy/prometheus/gateway-alerts.yml through Prometheus's own checker: `promtool check
rules` (syntax, PromQL, templates) and `promtool test rules` (each alert fires on synthetic
series, and stays quiet where it should: deploy/prometheus/gateway-alerts.test.yml).

promtool comes from Debian's prometheus package, unpacked into the venv by
deploy/prometheus/install-promtool.sh (.ci/run runs it). Without it these tests are
skipped on a developer's machine and fail in CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import queries

pytestmark = pytest.mark.integration

PROMETHEUS = queries.ROOT / "prometheus"


def promtool() -> str:
    found = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.executable).parent))
    if found is None:
        message = "promtool not found: run deploy/prometheus/install-promtool.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_rules() -> None:
    result = run("check", "rules", "gateway-alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries.load_rules())} rules found" in result.stdout


def test_each_alert_fires_on_synthetic_series_in_promtools_unit_tests() -> None:
    result = run("test", "rules", "gateway-alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = (PROMETHEUS / "gateway-alerts.test.yml").read_text()
    alerts = [rule["alert"] for rule in queries.load_rules() if "alert" in rule]
    assert alerts == [
        "GatewayRollbackHappened",
        "GatewayShadowCircuitOpen",
        "GatewayQueueNearFull",
        "GatewayErrorRateJump",
        "GatewayDriftHigh",
    ]
    for alert in alerts:
        assert f"alertname: {alert}" in tested, f"{alert} has no promtool test"


def test_promtool_fails_a_broken_rule(tmp_path: Path) -> None:
    # The checker is real: a rule file with a PromQL error is refused.
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: sum by (x (y)\n")
    result = subprocess.run([promtool(), "check", "rules", str(broken)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
