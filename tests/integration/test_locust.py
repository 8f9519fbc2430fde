"""loadtests/locustfile.py against a real gateway: the headless smoke runs CI can afford.

Locust runs as a subprocess only: importing it here would monkey-patch this
pytest process with gevent. Behaviour only, never timings.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, Process, gateway_command, gateway_process

LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
KEYS = 64  # with a 50 % canary, all keys on one version by chance: 2 in 2**64

# Locust comes with the test extra; its absence is a broken setup, not a reason to skip.
# (Checked without importing it: importing locust would gevent-patch this pytest process.)
assert importlib.util.find_spec("locust") is not None, "locust is missing: pip install -e '.[test]'"


@pytest.fixture(scope="module")
def gateway() -> Iterator[Process]:
    with gateway_process("--load", "digits", "--workers", "1") as running:
        yield running


def run_locust(
    gateway: Process, prefix: Path, *extra: str, seconds: int = 4, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [
        *(sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"),
        *("-u", "4", "-r", "4", "-t", f"{seconds}s", "--host", gateway.address),
        *("--only-summary", "--csv", str(prefix), *extra),
    ]
    # The locustfile reads LOCUST_* variables: only the test's own count.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**clean, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def stats_rows(prefix: Path) -> dict[str, dict[str, str]]:
    """The `_stats.csv` rows by name ("Aggregated" included)."""
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def test_smoke_run_sends_modelinfer_without_failures_and_keys_stay_sticky(gateway: Process, tmp_path: Path) -> None:
    # A 50 % canary, so the routing keys really split between two versions.
    canary = ("--canary", "2", "--weight", "50", "--reason", "locust smoke", "--control", gateway.control)
    traffic = subprocess.run(
        gateway_command("traffic", "set", "digits", *canary),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert traffic.returncode == 0, traffic.stdout + traffic.stderr

    prefix = tmp_path / "run"
    # Options through the environment here, through flags in the failure test: both ways are read.
    result = run_locust(gateway, prefix, env={"LOCUST_ROUTING_KEYS": str(KEYS), "LOCUST_ROWS": "2"})
    log = result.stdout + result.stderr
    assert result.returncode == 0, log

    rows = stats_rows(prefix)
    aggregated = rows["Aggregated"]
    assert int(aggregated["Request Count"]) > 0, log
    assert int(aggregated["Failure Count"]) == 0, log
    infer = rows["ModelInfer digits"]
    assert infer["Type"] == "grpc"
    assert int(infer["Request Count"]) > 0 and float(infer["Average Content Size"]) > 0, log

    # Both versions answered, and no key changed version while the release held still.
    answers = re.search(r"digits: \d+ answers: (.*)", log)
    assert answers is not None, log
    assert "v1 stable" in answers.group(1) and "v2 canary" in answers.group(1), log
    assert re.search(rf"digits: \d+ of {KEYS} routing keys seen, 0 moves between versions", log), log


def test_unknown_model_is_recorded_as_failures(gateway: Process, tmp_path: Path) -> None:
    prefix = tmp_path / "bad"
    result = run_locust(gateway, prefix, "--model", "nope", "--rows", "3", seconds=2)
    log = result.stdout + result.stderr
    assert result.returncode != 0, log  # Locust exits 1 when any request failed

    rows = stats_rows(prefix)
    aggregated = rows["Aggregated"]
    assert int(aggregated["Failure Count"]) > 0, log
    assert aggregated["Failure Count"] == aggregated["Request Count"], log
    assert "ModelMetadata nope" in rows and "ModelInfer nope" not in rows, log
    failures = Path(f"{prefix}_failures.csv").read_text()
    assert "NOT_FOUND" in failures and "nope" in failures, failures
