"""Startup mistakes in settings, specs and tokens: one `gateway:` line naming where, what and why (issue #21).

Every wrong-typed or out-of-range value of every setting is refused, naming
its file or environment variable, the setting and the value; through the CLI
that is exit 2 and exactly one `gateway:` line on stderr, never a traceback.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import subprocess
import sys
import time
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config._parse import Schema
from gateway.config.settings import GatewaySettings, load_settings
from gateway.config.spec import ModelSpec, load_model_spec
from gateway.control.auth import load_tokens, parse_tokens
from gateway.errors import ConfigError
from tests.onnx_models import write_identity_model
from tests.support import ROOT, gateway_command

SECRET = "s3cret-token-0123456789"


# ---------------------------------------------------------------- the CLI, as a subprocess


def serve(repo: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = gateway_command(
        "serve", "--models", str(repo), "--port", "0", "--metrics-port", "-1", "--provider", "cpu", *args
    )
    if "--http-port" not in args:
        command += ["--http-port", "-1"]
    if "--workers" not in args:
        command += ["--workers", "1"]  # one process: the path where tracebacks escaped
    if "--control-port" not in args:
        command += ["--control-port", "-1"]
    if "--state-dir" not in args:
        command += ["--state-dir", str(repo.parent / "state")]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, **(env or {})}
    )


def one_gateway_line(result: subprocess.CompletedProcess[str]) -> str:
    """The startup was refused with exit 2 and one `gateway:` line, no traceback; that line."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("gateway:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "listening on" not in result.stdout
    return lines[0]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    write_identity_model(root / "ident" / "1" / "model.onnx", "FP32")
    return root


SPEC_CASES = {
    "compare output names no output": ('[compare]\noutput = "nope"\n', ["compare.output", "'nope'", "outputs: y"]),
    "compare output not a string": ("[compare]\noutput = 5\n", ["compare.output", "expected a string", "got 5"]),
    "integer setting = inf": ("max_batch_size = inf\n", ["max_batch_size", "expected an integer", "got inf"]),
    "fractional integer": ("max_batch_size = 2.9\n", ["max_batch_size", "expected an integer", "got 2.9"]),
    "integer as a string": ('max_batch_size = "256"\n', ["max_batch_size", "expected an integer", "got '256'"]),
    "number for a bool": ("[batching]\nenabled = 5\n", ["batching.enabled", "expected true or false", "got 5"]),
    "nan interval": ("[policy]\ninterval_s = nan\n", ["policy.interval_s", "finite", "got nan"]),
    "negative gate requests": ("[policy]\ngate_requests = -5\n", ["policy.gate_requests", "must be", "got -5"]),
}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_a_bad_spec_value_is_one_line_naming_file_key_value_and_expectation(repo: Path, case: str) -> None:
    text, expected = SPEC_CASES[case]
    spec_file = repo / "ident" / "model.toml"
    spec_file.write_text(text)
    line = one_gateway_line(serve(repo))
    assert str(spec_file) in line
    for part in expected:
        assert part in line, line


def test_a_missing_compare_output_is_refused_by_every_worker_the_same_way(repo: Path) -> None:
    (repo / "ident" / "model.toml").write_text('[compare]\noutput = "nope"\n')
    line = one_gateway_line(serve(repo, "--workers", "2"))
    assert "model.toml" in line and "compare.output" in line and "'nope'" in line


def test_config_file_errors_name_the_file(repo: Path) -> None:
    config = repo.parent / "gateway.toml"
    config.write_text("[serve]\nworkers = inf\n")
    line = one_gateway_line(serve(repo, "--config", str(config)))
    assert str(config) in line and "workers" in line and "got inf" in line
    config.write_text("[serve]\ngrace_s = -1\n")
    line = one_gateway_line(serve(repo, "--config", str(config)))
    assert str(config) in line and "grace_s" in line and "got -1" in line


def test_environment_errors_name_the_variable(repo: Path) -> None:
    line = one_gateway_line(serve(repo, env={"GATEWAY_GRACE_S": "abc"}))
    assert "GATEWAY_GRACE_S" in line and "'abc'" in line and "expected a number" in line
    line = one_gateway_line(subprocess_with_port_from_env(repo, "abc"))
    assert "GATEWAY_PORT" in line and "'abc'" in line and "expected an integer" in line


def subprocess_with_port_from_env(repo: Path, port: str) -> subprocess.CompletedProcess[str]:
    command = gateway_command(
        "serve", "--models", str(repo), "--metrics-port", "-1", "--control-port", "-1", "--workers", "1",
        "--http-port", "-1",
    )  # fmt: skip
    env = {**os.environ, "GATEWAY_PORT": port}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def test_a_malformed_tokens_file_is_one_line_naming_the_file(repo: Path) -> None:
    tokens = repo.parent / "tokens.toml"
    tokens.write_text('tokens = "ci:write:0123456789abcdef"\n')
    line = one_gateway_line(serve(repo, "--control-port", "0", "--tokens-file", str(tokens)))
    assert str(tokens) in line and "[[tokens]]" in line


def test_a_token_with_surrounding_spaces_is_refused_naming_the_token(repo: Path) -> None:
    tokens = repo.parent / "tokens.toml"
    tokens.write_text(f'[[tokens]]\nname = "ci"\nrole = "write"\ntoken = " {SECRET} "\n')
    line = one_gateway_line(serve(repo, "--control-port", "0", "--tokens-file", str(tokens)))
    assert "'ci'" in line and "spaces" in line and str(tokens) in line
    assert SECRET not in line  # a secret never appears in a message


# ---------------------------------------------------------------- tokens, in-process


@pytest.mark.parametrize(
    "text",
    [
        "[[token]]\nname = 'ci'\nrole = 'write'\ntoken = 'x'\n",  # a typo would leave the API open
        "tokens = []\n",
        "tokens = [1]\n",
        f"[[tokens]]\nname = 'ci'\nrole = 'write'\ntoken = '{SECRET}'\nrol = 'read'\n",
        "[[tokens]]\nname = 'ci'\nrole = 'write'\ntoken = 12345678901234567890\n",
        f"[[tokens]]\nname = 'ci'\nrole = 'write'\ntoken = '{SECRET}\u00e9'\n",
    ],
)
def test_malformed_tokens_files_are_refused_naming_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=str(path)) as caught:
        load_tokens(path, {})
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("secret", [f" {SECRET}", f"{SECRET} ", f"\t{SECRET}"])
def test_tokens_with_surrounding_whitespace_are_refused(tmp_path: Path, secret: str) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(f"[[tokens]]\nname = 'deploy'\nrole = 'read'\ntoken = {json.dumps(secret)}\n")
    with pytest.raises(ConfigError, match="token 'deploy' has spaces"):
        load_tokens(path, {})
    if secret[0].isspace():  # the variable's items are trimmed at their ends, not after "role:"
        with pytest.raises(ConfigError, match="GATEWAY_CONTROL_TOKENS: token 'deploy' has spaces"):
            parse_tokens(f"deploy:read:{secret}", "GATEWAY_CONTROL_TOKENS")


def test_a_good_tokens_file_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(f"[[tokens]]\nname = 'ci'\nrole = 'write'\ntoken = '{SECRET}'\n")
    assert [(t.name, t.role, t.secret) for t in load_tokens(path, {})] == [("ci", "write", SECRET.encode())]


# ---------------------------------------------------------------- every setting, in-process

# Every numeric setting and values outside its valid range. A new numeric setting
# must be added here: its range is part of reviewing it (issue #21, item 17).
OUT_OF_RANGE: dict[str, list[Any]] = {
    # gateway settings
    "port": [-1, 65536],
    "http_port": [-2, 65536],
    "metrics_port": [-2, 65536],
    "control_port": [-2, 65536],
    "dashboard_port": [-2, 65536],
    "workers": [-1, 1_000_000],
    "executor_front_ends": [-1, 1_000_000],
    "max_message_bytes": [0, 1023, 1 << 31],
    "max_inflight": [0, -5, 1 << 31],
    "max_inputs": [0],
    "max_outputs": [0],
    "max_parameters": [0],
    "max_rank": [0],
    "max_id_bytes": [0],
    "max_contents_values": [0],
    "max_streams": [0, 1 << 31],
    "max_watchers": [0, 1 << 31],
    "stream_idle_s": [-1, 1e10],
    "max_connection_idle_s": [-1],
    "max_connection_age_s": [-0.5],
    "grace_s": [-1, -0.5],
    "cuda_device": [-1],
    "cuda_mem_limit_mb": [-1],
    "intra_op_threads": [-1],
    "worker_index": [-2],
    "capture_fraction": [0, -0.1, 1.5],
    "capture_file_mb": [0],
    "capture_max_mb": [0],
    # model spec
    "max_batch_size": [-1],
    "batching.max_queue_delay_us": [-1],
    "batching.preferred_batch_sizes": [[0], [-4]],
    "batching.max_queue_size": [0],
    "batching.instances": [0],
    "batching.default_timeout_us": [-1],
    "compare.atol": [-0.001],
    "compare.rtol": [-1],
    "release.canary_weight_bp": [-1, 10_001],
    "release.canary_compare_fraction": [-0.1, 1.1],
    "release.shadows": [{"2": 1.5}, {"2": -1}],
    "policy.interval_s": [0, -1],
    "policy.step_weights": [[], [0], [101], [50, 10]],
    "policy.threshold": [0],
    "policy.min_samples": [0],
    "policy.max_latency_ratio": [-1],
    "policy.max_error_increase": [1.5],
    "policy.min_agreement": [-0.1, 1.1],
    "policy.max_accuracy_drop": [1.5],
    "policy.max_duration_s": [0],
    "policy.latency_quantile": [0.4, 1.0],
    "policy.step_min_samples": [-1],
    "policy.step_min_duration_s": [-1, 1000],  # 1000 s for 5 steps is more than max_duration_s (3600 s)
    "policy.alpha": [0, 1, 1.5],
    "policy.shadow_intervals": [-1],
    "policy.gate_requests": [-5, 0, 1_000_000_000],
    "policy.gate_max_latency_ratio": [0],
    "policy.gate_min_agreement": [1.1],
    "limits.max_elements": [0],
    "limits.max_request_bytes": [0],
    "policy.max_drift": [-0.1, 1.5],
    "monitor.sample": [0, 1.5],
    "monitor.max_drift": [0, -1],
    "monitor.alpha": [0, 1, 1.5],
    "monitor.window_rows": [9],
    "monitor.bins": [1, 101],
    "monitor.range_margin": [-1],
}


def settings_fields(cls: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted setting name -> its type (from the type hints, as the parser reads them), sections walked."""
    found: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            found.update(settings_fields(hint, f"{prefix}{name}."))
        else:
            found[f"{prefix}{name}"] = hint
    return found


def kind_of(hint: Any) -> str:
    """int, float, bool, tuple[int] (any sequence of ints), ..., Mapping[float], or other (strings, choices, paths)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (tuple, list):
        return f"tuple[{kind_of(args[0])}]"
    if origin in (Mapping, dict):
        return f"Mapping[{kind_of(args[1])}]"
    return hint.__name__ if hint in (int, float, bool, str) else "other"


GATEWAY_FIELDS = {name: kind_of(hint) for name, hint in settings_fields(GatewaySettings).items()}
SPEC_FIELDS = {name: kind_of(hint) for name, hint in settings_fields(ModelSpec).items()}
NUMERIC = ("int", "float", "tuple[int]", "tuple[float]", "Mapping[float]")


def test_every_numeric_setting_has_its_range_reviewed() -> None:
    numeric = {name for name, kind in {**GATEWAY_FIELDS, **SPEC_FIELDS}.items() if kind in NUMERIC}
    missing = sorted(numeric - set(OUT_OF_RANGE))
    assert not missing, f"add the valid range of {missing} to OUT_OF_RANGE (and check it in gateway/config/)"


def toml_value(value: Any) -> str:
    """TOML for a value (tomllib reads but does not write)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # ASCII only below: JSON's escapes are TOML's
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def toml_setting(name: str, value: Any) -> str:
    section, _, key = name.rpartition(".")
    return (f"[{section}]\n" if section else "") + f"{key} = {toml_value(value)}\n"


def check_refused(path: Path, name: str, value: Any, load: Any) -> None:
    path.write_text(toml_setting(name, value))
    with pytest.raises(ConfigError) as caught:
        load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert name in message, message


def load_serve_settings(path: Path) -> GatewaySettings:
    return load_settings(path, env={})


@pytest.mark.parametrize("name", sorted(OUT_OF_RANGE))
def test_every_out_of_range_value_is_refused_naming_file_and_setting(tmp_path: Path, name: str) -> None:
    load = load_serve_settings if name in GATEWAY_FIELDS else load_model_spec
    for value in OUT_OF_RANGE[name]:
        check_refused(tmp_path / "settings.toml", name, value, load)


ASCII = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
NOT_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
FRACTIONAL = st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer())


def wrong_values(kind: str) -> st.SearchStrategy[Any]:
    """Values of the wrong type (or not finite) for a setting of this annotation."""
    tables = st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), min_size=1)
    if kind == "int":
        return st.one_of(FRACTIONAL, NOT_FINITE, st.booleans(), st.integers().map(str), ASCII, tables)
    if kind == "float":
        return st.one_of(NOT_FINITE, st.booleans(), st.floats(allow_nan=False).map(str), ASCII, tables)
    if kind == "bool":
        return st.one_of(st.integers(), st.floats(allow_nan=False), st.sampled_from(["true", "yes", "1"]), tables)
    if kind.startswith("tuple"):
        item = st.one_of(NOT_FINITE, st.booleans(), tables) if kind != "tuple[str]" else st.integers()
        return st.one_of(ASCII, st.integers(), st.lists(item, min_size=1, max_size=3))
    if kind.startswith("Mapping"):
        return st.one_of(ASCII, st.integers(), st.dictionaries(st.sampled_from(["1", "2"]), NOT_FINITE, min_size=1))
    # strings, choices and paths
    return st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(st.integers(), max_size=2))


def right_anyway(name: str, value: Any) -> bool:
    """A value of a type `wrong_values` calls wrong that the setting takes: `executors` is a
    name (auto, off) or a count of executor processes, 0 or 1 (a drawn 0 once failed CI)."""
    return name == "executors" and type(value) is int and value in (0, 1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_wrong_typed_values_of_every_setting_are_refused(tmp_path: Path, data: st.DataObject) -> None:
    fields = {**{n: (k, True) for n, k in GATEWAY_FIELDS.items()}, **{n: (k, False) for n, k in SPEC_FIELDS.items()}}
    name = data.draw(st.sampled_from(sorted(fields)), label="setting")
    kind, gateway = fields[name]
    value = data.draw(wrong_values(kind).filter(lambda v: not right_anyway(name, v)), label="value")
    check_refused(tmp_path / "settings.toml", name, value, load_serve_settings if gateway else load_model_spec)


TEXT_CASES = {"int": ["abc", "2.9", "nan", "1e3", ""], "float": ["abc", "nan", "inf", "-inf", ""], "bool": ["5", "on"]}


@pytest.mark.parametrize("name", sorted(n for n, k in GATEWAY_FIELDS.items() if k in TEXT_CASES))
def test_bad_environment_values_are_refused_naming_the_variable(name: str) -> None:
    variable = f"GATEWAY_{name.upper()}"
    for text in TEXT_CASES[GATEWAY_FIELDS[name]]:
        with pytest.raises(ConfigError) as caught:
            load_settings(env={variable: text})
        assert str(caught.value).startswith(f"{variable}: "), caught.value
        assert repr(text) in str(caught.value)


def test_good_values_still_load(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[serve]\nworkers = 2\ngrace_s = 3\nload = ["a"]\ncontroller = false\nlog_level = "debug"\n')
    loaded = load_settings(config, env={"GATEWAY_PORT": "9001", "GATEWAY_CAPTURE_FRACTION": "0.5"})
    assert (loaded.workers, loaded.grace_s, loaded.load, loaded.controller) == (2, 3.0, ("a",), False)
    assert (loaded.port, loaded.capture_fraction) == (9001, 0.5)
    spec_file = tmp_path / "model.toml"
    spec_file.write_text(
        'max_batch_size = 8\n[batching]\nenabled = false\npreferred_batch_sizes = [4, 8]\n[release]\nstable = "1"\n'
        '[release.shadows]\n"2" = 1\n[policy]\nmax_duration_s = 120\nstep_weights = [10, 50.5]\n'
    )
    spec = load_model_spec(spec_file)
    assert (spec.max_batch_size, spec.batching.enabled, spec.batching.preferred_batch_sizes) == (8, False, (4, 8))
    assert spec.release.shadows == {"2": 1.0} and spec.policy.step_weights == (10.0, 50.5)


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass(frozen=True)
class NewKinds:
    """Field types no setting has yet: each must be read by its type, never as a string."""

    sizes: list[int] = dataclasses.field(default_factory=list)
    color: Color = Color.RED
    ratio: float | None = None


def test_types_come_from_the_type_hints_not_the_annotation_text() -> None:
    schema = Schema.of(NewKinds)
    built = schema.build({"sizes": [1, 2], "color": "blue", "ratio": 2})
    assert (built.sizes, built.color, built.ratio) == ([1, 2], Color.BLUE, 2.0)
    assert schema.read("X_SIZES", "sizes", "3, 4", text=True) == [3, 4]
    assert schema.read("X_COLOR", "color", "red", text=True) is Color.RED
    for key, value, expected in [
        ("sizes", ["1"], "sizes: expected an integer, got ['1']"),
        ("sizes", 5, "sizes: expected an array, got 5"),
        ("color", "green", "color: expected one of red, blue, got 'green'"),
        ("ratio", "x", "ratio: expected a number, got 'x'"),
    ]:
        with pytest.raises(ConfigError) as caught:
            schema.build({key: value})
        assert str(caught.value) == expected


def test_a_field_of_a_type_no_reader_knows_stops_at_import() -> None:
    @dataclasses.dataclass(frozen=True)
    class Unreadable:
        tags: set[str] = dataclasses.field(default_factory=set)

    with pytest.raises(TypeError, match=r"Unreadable.tags: settings of type set\[str\] cannot be read"):
        Schema.of(Unreadable)


# ---------------------------------------------------------------- optional dependencies


def test_bench_without_matplotlib_refuses_before_any_work(tmp_path: Path) -> None:
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("matplotlib is not installed (test stand-in)")\n')
    out = tmp_path / "out"
    pythonpath = os.pathsep.join(filter(None, [str(fake.parent), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "bench", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": pythonpath},
    )
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "needs matplotlib" in result.stderr and "pip install matplotlib" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())  # nothing benchmarked, nothing written
    assert elapsed < 30, elapsed  # python start-up only; the smoke bench itself takes ~12 s


@pytest.mark.parametrize(
    "url", ["sqlite:///x.db", "postgresql://", "postgresql://u:pw-secret@host", "postgresql://h:99999/db", "db"]
)
def test_a_state_url_that_is_not_postgresql_is_refused_without_its_password(tmp_path: Path, url: str) -> None:
    check_refused(tmp_path / "settings.toml", "state_url", url, load_serve_settings)
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"GATEWAY_STATE_URL": url})
    assert "GATEWAY_STATE_URL" in str(caught.value) and "pw-secret" not in str(caught.value)


def test_a_postgresql_state_url_loads() -> None:
    url = "postgresql://gateway:pw@db.example:5432/releases"
    assert load_settings(env={"GATEWAY_STATE_URL": url}).state_url == url
