"""The control API's tokens and the CLI that calls it (issue #21, probe findings).

Two tokens with one secret are refused at load; the CLI prints every string a
client or the server supplied on one line with terminal escapes escaped; an
UNAVAILABLE answer from our own server (the state store) is not mistaken for
an unreachable gateway.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.control.auth import load_tokens
from gateway.errors import ConfigError
from tests.test_process_ports import second_gateway

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
