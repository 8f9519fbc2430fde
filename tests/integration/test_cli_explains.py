"""A CLI that explains itself (issue 20, items 3-5 and 7), as a subprocess against a real gateway.

Tables fit 80 columns in a pipe, progress lines end with newlines when not on a
terminal, `--json` output has real types, a rollout that holds says which checks it
waits on and how many more samples each needs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
import tritonclient.grpc as tc

from tests.support import MODELS, ROOT, Process, gateway_command, gateway_process

# Accuracy needs labels and none are sent: it never decides, so a rollout holds at step 1.
# "hold" waits ten minutes before its timeout; "pause" gives up after 3 s and pauses,
# leaving an audit record with the evidence.
HOLD = "\n[policy]\ninterval_s = 0.5\nstep_min_duration_s = 0.5\nmax_duration_s = 600\nmax_accuracy_drop = 0.01\n"
PAUSE = "\n[policy]\ninterval_s = 0.5\nstep_min_duration_s = 0.5\nmax_duration_s = 3\nmax_accuracy_drop = 0.01\n"


def cli(server: Process, *args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    """The CLI with stdout a pipe (never a terminal), at `columns` columns."""
    env = {**os.environ, "GATEWAY_CONTROL": server.control, "COLUMNS": str(columns)}
    env.pop("GATEWAY_TOKEN", None)
    return subprocess.run(gateway_command(*args), capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


def long_lines(text: str, width: int = 80) -> list[str]:
    return [line for line in text.splitlines() if len(line) > width]


def rfc3339(text: str) -> datetime:
    assert text.endswith("Z"), text
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    return parsed


def infer(server: Process, model: str, count: int, prefix: str) -> None:
    client = tc.InferenceServerClient(server.address)
    pixels = tc.InferInput("pixels", [2, 64], "FP32")
    pixels.set_data_from_numpy(np.zeros((2, 64), np.float32))
    for i in range(count):
        client.infer(model, [pixels], request_id=f"{prefix}-{i}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    repo = tmp_path_factory.mktemp("repo")
    for name, policy in (("hold", HOLD), ("pause", PAUSE), ("digits", "")):
        shutil.copytree(MODELS / "digits", repo / name)
        spec = repo / name / "model.toml"
        spec.write_text(spec.read_text() + policy)
    with gateway_process("--models", str(repo), "--workers", "1") as running:
        for name in ("hold", "pause"):
            infer(running, name, 100, name)
            started = cli(running, "rollout", "start", name, "2", "--reason", "no labels")
            assert started.returncode == 0, started.stderr
        yield running


def wait_paused(server: Process, model: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        data = json.loads(cli(server, "report", model, "--json").stdout)
        if data["release"]["phase"] == "paused":
            return
        infer(server, model, 5, f"{model}-more")
    raise AssertionError(f"{model} did not pause")


def test_status_says_why_a_rollout_holds_in_80_columns(server: Process) -> None:
    infer(server, "hold", 50, "hold-status")
    result = cli(server, "status")
    assert result.returncode == 0, result.stderr
    assert not long_lines(result.stdout), result.stdout
    text = result.stdout
    assert "hold stable 1 · canary 2 at 1% · rollout progressing step 1" in text, text
    assert "next: hold (inconclusive:" in text and "accuracy" in text, text
    accuracy = next(line for line in text.splitlines() if line.strip().startswith("accuracy "))
    # The check's state, the samples it has and roughly how many more it needs.
    assert "inconclusive" in accuracy and "vs -0.01" in accuracy, accuracy
    assert "0 samples, ~" in accuracy and "more" in accuracy, accuracy


def test_report_fits_80_columns_in_a_pipe_and_names_its_units(server: Process) -> None:
    infer(server, "hold", 50, "hold-report")
    narrow = cli(server, "report", "hold")
    assert narrow.returncode == 0, narrow.stderr
    assert not long_lines(narrow.stdout), narrow.stdout
    for label in ("requests/rows", "labelled rows", "compared rows", "95% CI", "p99 ms"):
        assert label in narrow.stdout, narrow.stdout
    assert "requests/rows: calls, and the rows they carried; labelled and compared: rows too" in narrow.stdout
    # One column per version: the requests row carries both versions' counts, calls and rows.
    requests = next(line for line in narrow.stdout.splitlines() if line.strip().startswith("requests/rows "))
    assert len(requests.split()) == 3, requests
    assert "next: hold (inconclusive:" in narrow.stdout
    wide = cli(server, "report", "hold", columns=200)
    header = next(line for line in wide.stdout.splitlines() if "version" in line and "role" in line)
    assert "labelled rows" in header and "compared rows" in header, wide.stdout


def test_report_json_has_numbers_nulls_percent_and_rfc3339(server: Process) -> None:
    result = cli(server, "report", "hold", "--json")
    assert result.returncode == 0, result.stderr
    assert "NaN" not in result.stdout and "Infinity" not in result.stdout
    data = json.loads(result.stdout)
    release = data["release"]
    assert release["canary_weight_percent"] == 1 and release["step"] == 1 and isinstance(release["revision"], int)
    by_role = {v["role"]: v for v in data["versions"]}
    for version in by_role.values():
        for count in ("requests", "rows", "errors", "labelled_rows", "compared_rows"):
            assert isinstance(version[count], int) and not isinstance(version[count], bool), (count, version)
        assert version["accuracy"] is None and version["accuracy_low"] is None  # no labels: null, not "NaN"
    assert by_role["stable"]["requests"] > 0 and isinstance(by_role["stable"]["p50_ms"], float)
    # Two rows a request here: rows answered (the unit of labelled rows) are twice the calls.
    assert by_role["stable"]["rows"] == 2 * (by_role["stable"]["requests"] - by_role["stable"]["errors"])
    units = {"requests": "calls", "errors": "calls", "rows": "rows", "labelled_rows": "rows", "compared_rows": "rows"}
    assert data["units"] == units
    rollout: dict[str, Any] = data["rollout"]
    assert rollout["phase"] == "progressing" and rollout["step"] == 1 and rollout["next"] == "hold"
    rfc3339(rollout["last_change"]["at"])
    accuracy = next(c for c in rollout["checks"] if c["check"] == "accuracy")
    assert accuracy["verdict"] == "inconclusive" and accuracy["value"] is None and accuracy["samples"] == 0
    assert isinstance(accuracy["needed"], int) and accuracy["bound"] == -0.01


def test_audit_json_nests_evidence_and_the_text_shows_interval_and_bound(server: Process) -> None:
    wait_paused(server, "pause")
    result = cli(server, "audit", "pause", "--json")
    assert result.returncode == 0, result.stderr
    assert "NaN" not in result.stdout
    records = [json.loads(line) for line in result.stdout.splitlines()]
    for record in records:
        assert isinstance(record["id"], int) and isinstance(record["revision"], int)
        rfc3339(record["at"])
    start = next(r for r in records if r["action"] == "start_rollout")
    assert start["evidence"] is None and isinstance(start["after"], dict)
    assert start["after"]["canary_weight_percent"] == 1 and start["after"]["rollout"]["step"] == 1
    rfc3339(start["after"]["rollout"]["started_at"])
    paused = records[-1]
    assert (paused["action"], paused["actor"]) == ("pause", "controller"), paused
    assert isinstance(paused["evidence"], list)
    accuracy = next(c for c in paused["evidence"] if c["check"] == "accuracy")
    assert accuracy["verdict"] == "inconclusive" and accuracy["value"] is None and accuracy["bound"] == -0.01
    text = cli(server, "audit", "pause").stdout.splitlines()[-1]
    assert "accuracy inconclusive — [" in text and "] vs -0.01" in text, text


def test_feedback_progress_is_one_line_per_update_in_a_pipe(server: Process, tmp_path: Path) -> None:
    infer(server, "digits", 3, "fb")
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(f'{{"request_id": "fb-{i}", "labels": [1, 2]}}\n' for i in range(3)))
    result = cli(server, "feedback", "send", "digits", str(labels), "--batch", "1")
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stdout
    lines = result.stdout.splitlines()
    assert lines[:3] == [f"sent {n} labels ({n} joined)" for n in (1, 2, 3)], lines
    assert lines[3].startswith("sent 3 labels: 3 joined"), lines


def every_command(group: click.Group, path: tuple[str, ...] = ("gateway",)) -> Iterator[tuple[str, click.Command]]:
    """The command tree, walked: (the command line, the command) for the group and each command under it."""
    yield " ".join(path), group
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from every_command(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


# A default, an environment variable, a range or "required" in the one style click writes them.
HINT_PART = re.compile(r"(default: .+|env var: [A-Z_]+|required|[0-9.]*[<>]?=?x[<>]?=?[0-9.]*)")


def test_every_command_has_an_example_and_every_option_help_in_one_style() -> None:
    from gateway.cli.main import main

    commands = dict(every_command(main))
    for expected in ("gateway status", "gateway promote", "gateway rollback", "gateway demo", "gateway serve"):
        assert expected in commands, sorted(commands)
    for line, command in commands.items():
        context = click.Context(command, info_name=line)
        assert "Example" in command.get_help(context), f"{line} --help has no example"
        for param in command.params:
            if not isinstance(param, click.Option) or param.hidden:
                continue
            record = param.get_help_record(context)
            assert record is not None and param.help, f"{line} {param.opts[0]} has no help text"
            hint = re.search(r"\[([^\[\]]*)\]\s*$", record[1])
            if hint:  # a trailing [...] says defaults, ranges, environment variables only, as click does
                for part in hint.group(1).split("; "):
                    assert HINT_PART.fullmatch(part), f"{line} {param.opts[0]}: {record[1]!r}"


def test_help_prints_examples_from_the_command_line() -> None:
    for args in (("status",), ("rollout", "pause"), ("models", "unload"), ("serve",)):
        result = subprocess.run(gateway_command(*args, "--help"), capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert result.returncode == 0 and "Example" in result.stdout, result.stdout


def test_serve_log_format_json_one_object_a_line_ending_with_stopped(tmp_path: Path) -> None:
    debug = ("--log-format", "json", "--log-level", "DEBUG")
    with gateway_process("--load", "digits", "--workers", "1", *debug) as running:
        infer(running, "digits", 250, "log")  # one call in 100 is logged at DEBUG
        assert running.stop() == 0
        deadline = time.monotonic() + 10
        while not running.lines or ("stopped" not in running.lines[-1] and time.monotonic() < deadline):
            time.sleep(0.1)
        lines = [line for line in running.lines if not line.startswith("listening on ")]
    records = [json.loads(line) for line in lines]
    assert records, running.lines
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        rfc3339(record["time"])
    assert any(r["message"].startswith("loaded digits version 1") for r in records), records
    assert (records[-1]["message"], records[-1]["level"]) == ("stopped", "INFO"), records[-1]
    requests = [r for r in records if r.get("method") == "/inference.GRPCInferenceService/ModelInfer"]
    assert len(requests) == 2, [r["message"] for r in records]
    assert all(r["level"] == "DEBUG" and r["status"] == "OK" and r["sampled_1_in"] == 100 for r in requests)
    assert all(isinstance(r["ms"], float) and r["ms"] > 0 for r in requests), requests


def test_worker_processes_log_json_too_and_say_which_worker(tmp_path: Path) -> None:
    # Each worker process sets up its own logging: it used to write text whatever --log-format said.
    with gateway_process("--load", "digits", "--workers", "2", "--log-format", "json") as running:
        assert running.stop() == 0
        lines = [line for line in running.lines if not line.startswith("listening on ")]
    records = [json.loads(line) for line in lines]
    loaded = [r for r in records if r["message"].startswith("loaded digits version 1")]
    assert sorted(r["worker"] for r in loaded) == [0, 1], records
