"""The release CLI's renderings, from protobuf messages: widths, units and JSON types.

The same functions run against a real gateway in tests/integration/test_cli_explains.py;
here the figures are chosen to be as wide as they get (four versions, every figure
present, shadows, long check lines), which a live gateway rarely shows at once.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

from rich.console import Console

from gateway.cli.release import audit_json, describe_audit, report_json, report_table, rollout_lines, wrapped
from gateway.protocol.pb import release_pb2 as rpb


def version(name: str, role: str, **figures: Any) -> rpb.VersionReport:
    full: dict[str, Any] = {
        "requests": 1_234_567,
        "errors": 12_345,
        "error_rate": 0.01,
        "p50_ms": 1234.5678,
        "p99_ms": 98765.4321,
        "labelled": 9_876_543,
        "accuracy": 0.97123,
        "accuracy_low": 0.95312,
        "accuracy_high": 0.98245,
        "compared_rows": 7_654_321,
        "agreement": 0.99123,
        "latency_diff_ms": -1234.5678,
    }
    return rpb.VersionReport(version=name, role=role, **{**full, **figures})


def wide_report() -> rpb.Report:
    release = rpb.Release(
        model="digits", stable="1", canary="2", canary_weight_bp=2500, phase="progressing", step=3, revision=12
    )
    report = rpb.Report(release=release, window_s=600, feedback_joined=10, feedback_unknown=2)
    report.versions.extend(
        [version("1", "stable"), version("2", "canary"), version("3", "shadow"), version("4", "shadow")]
    )
    report.shadows["3"].CopyFrom(rpb.ShadowCounters(mirrored=123456, dropped=1, failed=2, timed_out=3))
    return report


def render(renderable: object, width: int) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width, highlight=False, color_system=None).print(renderable)
    return out.getvalue().splitlines()


def test_four_versions_with_every_figure_fit_80_columns_in_columns_never_folded() -> None:
    lines = render(report_table(wide_report(), width=80), 80)
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    header = next(line for line in lines if line.split()[:1] == ["stable"])
    assert header.split() == ["stable", "canary", "shadow"]  # the fourth in a table of its own, below
    ci = next(line for line in lines if line.strip().startswith("95% CI"))
    assert ci.count("[0.953, 0.982]") == 3, ci
    labelled = next(line for line in lines if line.strip().startswith("labelled rows"))
    assert labelled.split()[2:] == ["9876543"] * 3
    assert sum(1 for line in lines if line.strip().startswith("requests/rows ")) == 2
    assert any(line.startswith("requests/rows: calls, and the rows they carried") for line in lines)


def test_a_wide_terminal_gets_a_row_per_version() -> None:
    lines = render(report_table(wide_report(), width=200), 200)
    header = next(line for line in lines if "version" in line)
    assert header.split()[:4] == ["version", "role", "requests/rows", "errors"]
    assert "labelled rows" in header and "compared rows" in header
    assert sum(1 for line in lines if "1234567" in line) == 4


VIEW: dict[str, Any] = {
    "model": "digits",
    "phase": "progressing",
    "step": 0,
    "last_change": {
        "at": 1795800000.123,
        "actor": "controller",
        "action": "advance",
        "reason": "all checks pass; step 1 held for its minimum, a long explanation that goes on and on",
    },
    "next": "hold",
    "reason": "inconclusive: ...",
    "checks": [
        {
            "check": "latency_paired",
            "verdict": "inconclusive",
            "value": -1.62345,
            "low": -15.4321,
            "high": 10.98765,
            "bound": 1.2,
            "samples": 123456,
            "needed": 1234567,
        },
        {
            "check": "accuracy",
            "verdict": "inconclusive",
            "value": None,
            "low": -1,
            "high": 1,
            "bound": -0.01,
            "samples": 0,
            "needed": 200,
        },
        {"check": "error_rate", "verdict": "pass", "value": 0.0, "low": 0.0, "high": 0.001, "bound": 0.01},
    ],
}


def test_rollout_lines_name_what_it_waits_on_and_wrap_under_80_columns() -> None:
    lines = rollout_lines(VIEW)
    assert "  next: hold (inconclusive: latency_paired, accuracy)" in lines
    assert "    - all checks pass" in lines  # one line per clause of the reason
    accuracy = next(line for line in lines if line.strip().startswith("accuracy "))
    assert "inconclusive — [-1, 1] vs -0.01, 0 samples, ~200 more" in accuracy
    narrow = wrapped(lines, 80)
    assert max(len(line) for line in narrow) <= 80, "\n".join(narrow)
    # A wrapped line goes on indented under its start, never as a line of its own check.
    assert all(not line.startswith("      latency") for line in narrow)


def test_report_json_numbers_nulls_percent_steps() -> None:
    report = wide_report()
    report.versions.append(rpb.VersionReport(version="5", role="shadow", accuracy=math.nan, agreement=math.nan))
    data = report_json(report, VIEW)
    text = json.dumps(data, allow_nan=False)  # raises on NaN or infinity
    assert "NaN" not in text
    assert data["release"]["canary_weight_percent"] == 25 and data["release"]["step"] == 4
    assert data["versions"][0]["requests"] == 1_234_567 and data["versions"][0]["labelled_rows"] == 9_876_543
    empty = data["versions"][-1]
    assert empty["accuracy"] is None and empty["agreement"] is None and empty["p50_ms"] is None
    assert data["rollout"]["step"] == 1 and data["rollout"]["last_change"]["at"] == "2026-11-27T17:20:00.123Z"


def test_audit_json_and_text_carry_each_checks_interval_and_bound() -> None:
    evidence = [
        {
            "check": "accuracy",
            "verdict": "fail",
            "value": -0.0939,
            "low": -0.12,
            "high": -0.07,
            "bound": -0.005,
            "samples": 1400,
            "needed": None,
        },
        {"check": "latency_p99", "verdict": "inconclusive", "value": 1.1, "low": 0.9, "high": math.inf, "bound": 1.2},
    ]
    after = {"stable": "1", "canary": "", "canary_weight_bp": 0, "rollout": {"phase": "rolled_back", "step": 2}}
    record = rpb.AuditRecord(
        id=7,
        at=1795800000.5,
        actor="controller",
        action="rollback",
        model="digits",
        outcome="applied",
        after_json=json.dumps(after),
        reason="accuracy fails",
        evidence_json=json.dumps(evidence),
        revision=9,
    )
    line = describe_audit(record)
    assert "accuracy fail -0.0939 [-0.12, -0.07] vs -0.005" in line, line
    assert "latency_p99 inconclusive 1.1 [0.9, —] vs 1.2" in line, line
    data = audit_json(record)
    json.dumps(data, allow_nan=False)
    assert data["at"] == "2026-11-27T17:20:00.500Z" and data["id"] == 7 and data["before"] is None
    assert data["evidence"][1]["high"] is None and data["evidence"][0]["bound"] == -0.005
    assert data["after"]["canary_weight_percent"] == 0 and data["after"]["rollout"]["step"] is None


def test_an_external_check_shows_its_reading_or_why_it_has_none_in_place_of_an_interval() -> None:
    external = [
        {"check": "p99-prom", "verdict": "fail", "value": 0.4, "low": 0.4, "high": 0.4, "bound": 0.25}
        | {"samples": 1, "needed": None, "kind": "prometheus", "reason": "read 0.4, > max 0.25"},
        {"check": "score", "verdict": "inconclusive", "value": None, "low": None, "high": None, "bound": 0.9}
        | {"samples": 0, "needed": None, "kind": "web", "reason": "no usable reading: HTTP 503\nforged"},
    ]
    lines = rollout_lines({"phase": "progressing", "step": 0, "next": "rollback", "checks": external})
    assert "  next: rollback (fail: p99-prom; inconclusive: score)" in lines
    assert "  p99-prom        fail         read 0.4, > max 0.25" in lines
    # A remote source's words stay on their line: no forged output line.
    assert "  score           inconclusive no usable reading: HTTP 503\\nforged" in lines, lines
    record = rpb.AuditRecord(id=1, at=1795800000.0, actor="controller", action="rollback", model="digits")
    record.evidence_json = json.dumps(external)
    assert "p99-prom fail read 0.4, > max 0.25; score inconclusive no usable reading" in describe_audit(record)
    assert audit_json(record)["evidence"][0]["reason"] == "read 0.4, > max 0.25"
