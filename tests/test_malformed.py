"""Malformed requests get INVALID_ARGUMENT or NOT_FOUND naming the problem; the server stays up."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.support import gateway_in_thread, gateway_process

Request: TypeAlias = Any  # tritonclient ships no type hints
RequestClass = service_pb2.ModelInferRequest
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def valid(batch: int = 2) -> Request:
    request = RequestClass(model_name="digits", model_version="1", id="ok")
    request.inputs.add(name="pixels", datatype="FP32", shape=[batch, 64])
    request.raw_input_contents.append(np.ones((batch, 64), np.float32).tobytes())
    return request


@dataclass(frozen=True)
class Mutation:
    """A way to break a valid request, the code it must get and words its message must contain."""

    name: str
    apply: Callable[[Request, st.DataObject], None]
    code: grpc.StatusCode
    words: tuple[str, ...]


def _shape(shape: list[int]) -> Callable[[Request, st.DataObject], None]:
    def apply(r: Request, data: st.DataObject) -> None:
        del r.inputs[0].shape[:]
        r.inputs[0].shape.extend(shape)

    return apply


def _wrong_rank(r: Request, data: st.DataObject) -> None:
    extra = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    r.inputs[0].shape.extend(extra)


def _wrong_dim(r: Request, data: st.DataObject) -> None:
    r.inputs[0].shape[1] = data.draw(st.integers(0, 10_000).filter(lambda d: d != 64))


def _negative_dim(r: Request, data: st.DataObject) -> None:
    r.inputs[0].shape[data.draw(st.integers(0, 1))] = data.draw(st.integers(-(2**40), -1))


def _too_big_batch(r: Request, data: st.DataObject) -> None:
    r.inputs[0].shape[0] = data.draw(st.integers(257, 2**40))


def _wrong_dtype(r: Request, data: st.DataObject) -> None:
    r.inputs[0].datatype = data.draw(
        st.sampled_from(["INT64", "FP16", "FP64", "BYTES", "BOOL", "fp32", ""]) | st.text(max_size=12)
    )


def _byte_size(r: Request, data: st.DataObject) -> None:
    delta = data.draw(st.integers(-512, 512).filter(lambda d: d != 0))
    raw = r.raw_input_contents[0]
    r.raw_input_contents[0] = raw[:delta] if delta < 0 else raw + b"\0" * delta


def _unknown_input(r: Request, data: st.DataObject) -> None:
    r.inputs[0].name = data.draw(st.text(min_size=1, max_size=20).filter(lambda s: s != "pixels"))


def _duplicate_input(r: Request, data: st.DataObject) -> None:
    r.inputs.add().CopyFrom(r.inputs[0])
    r.raw_input_contents.append(r.raw_input_contents[0])


def _missing_input(r: Request, data: st.DataObject) -> None:
    del r.inputs[:]
    del r.raw_input_contents[:]


def _raw_count(r: Request, data: st.DataObject) -> None:
    r.raw_input_contents.append(data.draw(st.binary(max_size=16)))


def _typed_count(r: Request, data: st.DataObject) -> None:
    del r.raw_input_contents[:]
    n = data.draw(st.integers(0, 300).filter(lambda n: n != 128))
    r.inputs[0].contents.fp32_contents.extend([1.0] * n)


def _unknown_model(r: Request, data: st.DataObject) -> None:
    r.model_name = data.draw(
        st.sampled_from(["../digits", "digits/1", "..", "/etc/passwd", "nope"]) | st.text(max_size=30)
    )


def _unknown_version(r: Request, data: st.DataObject) -> None:
    r.model_version = data.draw(
        st.sampled_from(["0", "4", "../1", "1/../2"]) | st.from_regex(r"[0-9]{2,5}", fullmatch=True)
    )


def _unknown_output(r: Request, data: st.DataObject) -> None:
    r.outputs.add(
        name=data.draw(st.text(min_size=1, max_size=20).filter(lambda s: s not in ("label", "probabilities")))
    )


def _bad_timeout(r: Request, data: st.DataObject) -> None:
    choice = data.draw(st.sampled_from(["negative", "string", "double"]))
    param = r.parameters["timeout_us"]
    if choice == "negative":
        param.int64_param = data.draw(st.integers(-(2**62), 0))
    elif choice == "string":
        param.string_param = "soon"
    else:
        param.double_param = 1.5


MUTATIONS = [
    Mutation("wrong rank", _wrong_rank, INVALID, ("pixels", "shape")),
    Mutation("wrong dim", _wrong_dim, INVALID, ("pixels", "dimension 1 must be 64")),
    Mutation("negative dim", _negative_dim, INVALID, ("pixels", "negative")),
    Mutation("batch too large", _too_big_batch, INVALID, ("pixels", "max_batch_size 256")),
    Mutation("zero batch", _shape([0, 64]), INVALID, ("pixels", "batch")),
    Mutation("wrong dtype", _wrong_dtype, INVALID, ("pixels", "datatype must be FP32")),
    Mutation("byte size", _byte_size, INVALID, ("pixels", "bytes, expected 256")),
    Mutation("unknown input", _unknown_input, INVALID, ("unknown input",)),
    Mutation("duplicate input", _duplicate_input, INVALID, ("pixels", "more than once")),
    Mutation("missing input", _missing_input, INVALID, ("no inputs",)),
    Mutation("raw count", _raw_count, INVALID, ("raw_input_contents", "2 entries for 1 inputs")),
    Mutation("typed count", _typed_count, INVALID, ("pixels", "fp32_contents", "expected 128")),
    Mutation("unknown model", _unknown_model, NOT_FOUND, ("model",)),
    Mutation("unknown version", _unknown_version, NOT_FOUND, ("version",)),
    Mutation("unknown output", _unknown_output, INVALID, ("requested output",)),
    Mutation("bad timeout", _bad_timeout, INVALID, ("timeout_us",)),
]


@pytest.fixture(scope="module")
def stub() -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with gateway_in_thread() as running, grpc.insecure_channel(running.address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


SEEN: dict[str, int] = {}
# Mutations whose expected message quotes a size that depends on the batch.
FIXED_BATCH = {"byte size": 1, "typed count": 2}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_malformed_requests_are_refused_with_a_named_problem(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, data: st.DataObject
) -> None:
    mutation = data.draw(st.sampled_from(MUTATIONS))
    request = valid(batch=data.draw(st.integers(1, 4)))
    if mutation.name in FIXED_BATCH:
        request = valid(batch=FIXED_BATCH[mutation.name])
    mutation.apply(request, data)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=10)
    error = caught.value
    assert error.code() == mutation.code, (mutation.name, error.details())
    details = error.details() or ""
    for word in mutation.words:
        assert word in details, (mutation.name, details)
    SEEN[mutation.name] = SEEN.get(mutation.name, 0) + 1


def test_after_malformed_requests_the_server_still_answers(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    # Runs after the property test in file order: at least 50 malformed requests were refused.
    assert sum(SEEN.values()) >= 50, SEEN
    response = stub.ModelInfer(valid(batch=3), timeout=10)
    assert response.id == "ok"
    assert list(response.outputs[1].shape) == [3]
    assert stub.ServerLive(service_pb2.ServerLiveRequest()).live


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_message_over_the_size_limit_is_resource_exhausted_and_memory_stays_flat() -> None:
    limit = 256 * 1024
    with (
        gateway_process("--max-message-bytes", str(limit), "--load", "digits") as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(valid(batch=2), timeout=10)
        baseline = rss_kib(server.proc.pid)
        huge = valid(batch=2)
        huge.raw_input_contents[0] = b"\0" * (limit + 1)
        for _ in range(20):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(huge, timeout=10)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        lying = valid(batch=2)
        del lying.inputs[0].shape[:]
        lying.inputs[0].shape.extend([2**31, 2**31])  # claims 2^62 elements: refused before allocation
        for _ in range(200):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(lying, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert stub.ModelInfer(valid(batch=2), timeout=10).id == "ok"
        grown = rss_kib(server.proc.pid) - baseline
        assert grown < 20 * 1024, f"RSS grew by {grown} KiB"
