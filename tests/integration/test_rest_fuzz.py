"""Hostile REST bodies never get a 500, never stop the server, never grow its memory.

Hypothesis sends a few hundred bodies to one real `gateway serve` process:
random bytes, broken JSON, any JSON value where the protocol wants a particular
one, wrong shapes and datatypes, bodies over the cap (declared or streamed),
deep nesting and binary framing that does not add up. Each must be answered
with a 4xx naming the problem (or a 200, where hypothesis happened to write a
valid request). Afterwards the process still answers and its peak memory stayed
within a bound far below what parsing the hostile bodies unchecked would take.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.onnx_models import write_identity_model
from tests.support import MODELS, Process, gateway_process

# The body cap of the fuzzed gateway (--max-message-bytes): small, so oversized bodies are cheap to send.
CAP = 256 * 1024
CASES = 300
MAX_VALUES = 20_000
# What the server's peak memory may grow by over the whole run. Unchecked, one 256 KiB body of
# `[[[[...` recursing in a parser, or of `0,0,...` becoming ints, costs far more.
GROWTH_BYTES = 150 << 20
PATHS = ["/v2/models/digits/infer", "/v2/models/ident/infer", "/v2/models/ident/versions/1/infer"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    root = tmp_path_factory.mktemp("rest-fuzz")
    write_identity_model(root / "ident" / "1" / "model.onnx", "FP32")
    (root / "ident" / "model.toml").write_text("max_batch_size = 4\n")
    shutil.copytree(MODELS / "digits", root / "digits")
    # Few enough values that the "many values" bodies below pass and cross the cap.
    env = {"GATEWAY_MAX_CONTENTS_VALUES": str(MAX_VALUES)}
    with gateway_process("--models", str(root), "--workers", "1", "--max-message-bytes", str(CAP), env=env) as process:
        yield process


def memory_kb(process: Process, field: str) -> int:
    text = Path(f"/proc/{process.proc.pid}/status").read_text()
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert found is not None
    return int(found.group(1))


json_values = st.recursive(
    # Python json writes any integer and NaN, which the gateway must refuse as JSON cannot carry them.
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
datatypes = st.sampled_from(["FP32", "FP16", "INT64", "BOOL", "BYTES", "BF16", "UINT8", "fp32", "", "FP33"])
shapes = st.lists(st.integers(-3, 2**64), max_size=20) | json_values


@st.composite
def tensors(draw: st.DrawFn) -> dict[str, Any]:
    tensor: dict[str, Any] = {
        "name": draw(st.sampled_from(["x", "pixels", "y", ""]) | json_values),
        "datatype": draw(datatypes | json_values),
        "shape": draw(shapes),
    }
    if draw(st.booleans()):
        tensor["data"] = draw(st.lists(st.floats(allow_nan=False, width=32), max_size=70) | json_values)
    if draw(st.booleans()):
        tensor["parameters"] = draw(st.dictionaries(st.sampled_from(["binary_data_size", "x"]), json_values))
    return tensor


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    request: dict[str, Any] = {"inputs": draw(st.lists(tensors(), max_size=3) | json_values)}
    for field in ("id", "parameters", "outputs"):
        if draw(st.booleans()):
            request[field] = draw(json_values)
    return request


def as_body(document: Any) -> tuple[bytes, dict[str, str]]:
    return json.dumps(document).encode(), {"content-type": "application/json"}


def nested(depth: int) -> tuple[bytes, dict[str, str]]:
    data = "[" * depth + "1" + "]" * depth
    text = '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": ' + data + "}]}"
    return text.encode(), {}


def broken(document: dict[str, Any], cut: int, junk: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(document).encode()
    cut = cut % (len(text) + 1)
    return text[:cut] + junk + text[cut:], {}


def framed(document: dict[str, Any], length: int, tail: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(document).encode()
    return text + tail, {"inference-header-content-length": str(length)}


bodies = st.one_of(
    st.binary(max_size=300).map(lambda b: (b, {})),
    st.builds(as_body, requests()),
    st.builds(as_body, json_values),
    st.builds(broken, requests(), st.integers(0, 10_000), st.binary(min_size=1, max_size=5)),
    st.builds(framed, requests(), st.integers(-5, 100_000), st.binary(max_size=64)),
    st.builds(nested, st.integers(10, 20_000)),
    st.integers(CAP + 1, 2 * CAP).map(lambda n: (b"[" * n, {})),  # over the cap, declared
    st.integers(CAP + 1, 2 * CAP).map(lambda n: (b"0," * (n // 2), {"content-length": ""})),  # streamed
    st.integers(1, CAP // 2 - 64).map(lambda n: (b'{"inputs": [' + b"0," * n + b"0]}", {})),  # many values
)


def send(client: httpx.Client, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    if headers.get("content-length") == "":  # no length declared: the body arrives chunked
        headers = {k: v for k, v in headers.items() if k != "content-length"}
        return client.post(path, content=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]))
    return client.post(path, content=body, headers=headers)


def test_hostile_bodies_get_4xx_and_the_server_stays_up_and_small(server: Process) -> None:
    client = httpx.Client(base_url=f"http://{server.http}", timeout=60)
    assert client.get("/v2/health/ready").status_code == 200
    baseline = memory_kb(server, "VmRSS")
    seen: dict[int, int] = {}

    @given(path=st.sampled_from(PATHS), case=bodies)
    @settings(max_examples=CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def one(path: str, case: tuple[bytes, dict[str, str]]) -> None:
        body, headers = case
        reply = send(client, path, body, headers)
        seen[reply.status_code] = seen.get(reply.status_code, 0) + 1
        assert reply.status_code in (200, 400, 404, 413), (reply.status_code, reply.text[:300], body[:200])
        if reply.status_code != 200:
            error = reply.json()["error"]
            assert isinstance(error, str) and error

    one()
    assert sum(seen.values()) >= 200 and seen.get(400, 0) > 100, seen
    assert seen.get(413, 0) > 0, seen
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    peak = memory_kb(server, "VmHWM")
    assert (peak - baseline) * 1024 < GROWTH_BYTES, (baseline, peak)
    assert not any("Traceback" in line or "unexpected error" in line for line in server.lines), server.lines[-20:]
