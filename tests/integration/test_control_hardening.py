"""The control API's tokens and the CLI that calls it (issue #21, probe findings).

Two tokens with one secret are refused at load; the CLI prints every string a
client or the server supplied on one line with terminal escapes escaped; an
UNAVAILABLE answer from our own server (the state store) is not mistaken for
an unreachable gateway.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from rich.console import Console

from gateway.cli.release import _release_line, describe_audit
from gateway.control.auth import load_tokens
from gateway.control.client import EXIT_REFUSED, EXIT_UNREACHABLE
from gateway.errors import ConfigError
from gateway.logthrottle import one_line
from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from gateway.release.store import SqliteStore
from tests.integration.test_process_ports import second_gateway
from tests.support import MODELS, ROOT, gateway_command, gateway_in_thread

READ_SECRET = "read-secret-0123456789"
SHARED_SECRET = "shared-secret-0123456789"


def tokens_file(tmp_path: Path, *tokens: tuple[str, str, str]) -> Path:
    path = tmp_path / "tokens.toml"
    path.write_text("".join(f"[[tokens]]\nname = '{n}'\nrole = '{r}'\ntoken = '{t}'\n" for n, r, t in tokens))
    return path


# ---------------------------------------------------------------- finding 5: one secret, two tokens


@pytest.mark.parametrize("order", [("deploy", "viewer"), ("viewer", "deploy")])
def test_two_tokens_with_one_secret_in_the_file_are_refused_naming_both(tmp_path: Path, order: tuple[str, str]) -> None:
    roles = {"deploy": "write", "viewer": "read"}
    path = tokens_file(tmp_path, *((name, roles[name], SHARED_SECRET) for name in order))
    with pytest.raises(ConfigError) as caught:
        load_tokens(path, {})
    message = str(caught.value)
    assert "'deploy'" in message and "'viewer'" in message and "same secret" in message
    assert SHARED_SECRET not in message  # a secret never appears in a message


def test_two_tokens_with_one_secret_in_the_variable_are_refused_naming_both() -> None:
    env = {"GATEWAY_CONTROL_TOKENS": f"deploy:write:{SHARED_SECRET},viewer:read:{SHARED_SECRET}"}
    with pytest.raises(ConfigError, match="'deploy' and 'viewer' have the same secret") as caught:
        load_tokens(None, env)
    assert SHARED_SECRET not in str(caught.value)


def test_a_file_token_and_a_variable_token_with_one_secret_are_refused(tmp_path: Path) -> None:
    path = tokens_file(tmp_path, ("deploy", "write", SHARED_SECRET))
    with pytest.raises(ConfigError, match="'deploy' and 'viewer' have the same secret"):
        load_tokens(path, {"GATEWAY_CONTROL_TOKENS": f"viewer:read:{SHARED_SECRET}"})


def test_tokens_with_their_own_secrets_still_load(tmp_path: Path) -> None:
    path = tokens_file(tmp_path, ("deploy", "write", SHARED_SECRET), ("viewer", "read", READ_SECRET))
    assert [(t.name, t.role) for t in load_tokens(path, {})] == [("deploy", "write"), ("viewer", "read")]


def test_serve_refuses_a_shared_secret_with_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tokens_file(tmp_path, ("deploy", "write", SHARED_SECRET), ("viewer", "read", SHARED_SECRET))
    code, output = second_gateway(
        "--port", "0", "--control-port", "0", "--workers", "1", "--state-dir", str(tmp_path / "state"),
        "--tokens-file", str(path),
    )  # fmt: skip
    assert code == 2, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.startswith("gateway:")]
    assert len(lines) == 1, output
    assert "'deploy' and 'viewer'" in lines[0] and SHARED_SECRET not in output


# ---------------------------------------------------------------- finding 4: the store's UNAVAILABLE is no lost gateway


def cli(control: str, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATEWAY_CONTROL": control, "COLUMNS": "10000"}  # no wrapping: one record, one line
    env.pop("GATEWAY_TOKEN", None)
    if token is not None:
        env["GATEWAY_TOKEN"] = token
    return subprocess.run(gateway_command(*args), capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


async def _query_only(store: SqliteStore, on: bool) -> None:
    """The store's own connection turned read-only, as a remount or a lost permission would."""
    with store._lock:
        store._db.execute(f"PRAGMA query_only = {int(on)}")


@pytest.fixture
def digits(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(MODELS / "digits", root / "digits")
    return root


def test_a_store_that_cannot_be_written_is_reported_as_such_not_as_an_unreachable_gateway(
    digits: Path, tmp_path: Path
) -> None:
    with gateway_in_thread(digits, state_dir=tmp_path / "state", controller=False) as running:
        store = running.gateway.store
        assert isinstance(store, SqliteStore)
        running.call(_query_only(store, True))
        try:
            result = cli(running.control, "traffic", "set", "digits", "--canary", "2", "--weight", "10")
        finally:
            running.call(_query_only(store, False))
        assert result.returncode == EXIT_REFUSED, (result.returncode, result.stderr)
        assert result.stderr.count("gateway:") == 1 and "Traceback" not in result.stderr, result.stderr
        assert "cannot reach" not in result.stderr
        assert "state.db" in result.stderr and "cannot be written" in result.stderr, result.stderr
        # Writable again: the same command goes through.
        result = cli(running.control, "traffic", "set", "digits", "--canary", "2", "--weight", "10")
        assert result.returncode == 0, result.stderr


def test_no_gateway_at_the_address_is_still_unreachable() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        result = cli(f"127.0.0.1:{holder.getsockname()[1]}", "status")
    assert result.returncode == EXIT_UNREACHABLE, (result.returncode, result.stderr)
    assert "cannot reach the control API" in result.stderr


# ---------------------------------------------------------------- finding 3: what the CLI prints is one line, escaped

HOSTILE = (
    "ok\n2026-01-01 00:00:00  #999  digits     promote        by admin: forged\x1b[31m red \u202eevil\x07[bold]b[/]"
)
ADMIN_SECRET = "admin-secret-0123456789"


def one_terminal_line(text: str) -> bool:
    """No line break inside, no escape sequence, no bidi override: every character printable."""
    return text.isprintable()


@pytest.fixture
def hostile_gateway(digits: Path, tmp_path: Path) -> Iterator[str]:
    """A gateway whose audit log holds a change by a token named, and with a reason, full of
    line breaks, terminal escapes and rich markup; its control address."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f"[[tokens]]\nname = {json.dumps(HOSTILE)}\nrole = 'write'\ntoken = '{ADMIN_SECRET}'\n")
    with gateway_in_thread(digits, state_dir=tmp_path / "state", controller=False, tokens_file=tokens) as running:
        stub = rgrpc.ReleaseServiceStub(grpc.insecure_channel(running.control))
        request = rpb.SetTrafficRequest(model="digits", canary="2", weight_bp=1000, reason=HOSTILE)
        stub.SetTraffic(request, metadata=(("authorization", f"Bearer {ADMIN_SECRET}"),), timeout=10)
        yield running.control


def test_audit_prints_a_hostile_reason_and_actor_on_one_escaped_line(hostile_gateway: str) -> None:
    result = cli(hostile_gateway, "audit", "digits", token=ADMIN_SECRET)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # Two records (the release's init, then the change): the reason forged no third line.
    assert len(lines) == 2 and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  #\d", s) for s in lines), lines
    assert all(one_terminal_line(line) for line in lines), result.stdout
    change = lines[1]
    assert "\\x1b[31m" in change and "\\u202e" in change and "\\n2026-01-01" in change
    assert "[bold]b[/]" in change  # printed as written, not taken as markup


def test_an_error_that_echoes_a_hostile_value_is_one_escaped_line(hostile_gateway: str) -> None:
    result = cli(hostile_gateway, "traffic", "set", "digits", "--canary", HOSTILE, "--weight", "5", token=ADMIN_SECRET)
    assert result.returncode == EXIT_REFUSED, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gateway: "), result.stderr
    assert one_terminal_line(lines[0]) and "\\x1b[31m" in lines[0], result.stderr


# Every string field a Release or an AuditRecord carries, as hostile as hypothesis can make it.
texts = st.text(st.characters(codec="utf-8"), max_size=40)


@given(model=texts, stable=texts, canary=texts, phase=texts, shadow=texts)
@example(model="m\\", stable="\\[", canary="[b]x\\", phase="", shadow="s\\[")  # rich reads "\[" as an escaped "["
@settings(max_examples=200, deadline=None)
def test_a_release_line_is_one_line_whatever_the_server_sends(
    model: str, stable: str, canary: str, phase: str, shadow: str
) -> None:
    release = rpb.Release(
        model=model, stable=stable, canary=canary, canary_weight_bp=10, shadows={shadow: 0.5}, phase=phase
    )
    out = io.StringIO()
    Console(file=out, width=100_000, highlight=False, color_system=None).print(_release_line(release))
    printed = out.getvalue()
    assert printed.endswith("\n") and one_terminal_line(printed[:-1]), repr(printed)
    for text in (model, stable, canary, shadow):
        assert one_line(text) in printed  # shown, escaped, never read as markup


@given(model=texts, action=texts, actor=texts, reason=texts, stable=texts, phase=texts, check=texts)
@settings(max_examples=200, deadline=None)
def test_an_audit_line_is_one_line_whatever_the_server_sends(
    model: str, action: str, actor: str, reason: str, stable: str, phase: str, check: str
) -> None:
    record = rpb.AuditRecord(
        id=1,
        at=0.0,
        model=model,
        action=action,
        actor=actor,
        outcome="refused",
        reason=reason,
        after_json=json.dumps({"stable": stable, "canary": stable, "rollout": {"phase": phase}}),
        evidence_json=json.dumps([{"check": check, "verdict": check, "value": None}]),
    )
    line = describe_audit(record)
    assert one_terminal_line(line), repr(line)
    for text in (model, action, actor, reason):
        assert one_line(text) in line
