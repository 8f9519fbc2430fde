"""Malformed requests get INVALID_ARGUMENT or NOT_FOUND naming the problem; the server stays up."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.support import gateway_in_thread, gateway_process, varint

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


def _many_inputs(r: Request, data: st.DataObject) -> None:
    # Empty tensors after a valid one: the raw count no longer matches, but the
    # tensor count must be refused first, before anything is built per tensor.
    for _ in range(data.draw(st.integers(256, 20_000))):
        r.inputs.add()


def _many_outputs(r: Request, data: st.DataObject) -> None:
    for _ in range(data.draw(st.integers(257, 20_000))):
        r.outputs.add(name="label")


def _many_parameters(r: Request, data: st.DataObject) -> None:
    for i in range(data.draw(st.integers(65, 2_000))):
        r.parameters[f"p{i}"].bool_param = True


def _deep_rank(r: Request, data: st.DataObject) -> None:
    r.inputs[0].shape.extend([1] * data.draw(st.integers(15, 200_000)))


def _long_id(r: Request, data: st.DataObject) -> None:
    alphabet = st.sampled_from(["x", "\u00e9", "\u20ac", "\U0001f600"])
    r.id = data.draw(st.text(alphabet, min_size=65, max_size=300).filter(lambda s: len(s.encode()) > 256))
    if data.draw(st.booleans()):
        r.id *= data.draw(st.integers(1, 100_000))


def _long_name(r: Request, data: st.DataObject) -> None:
    r.inputs[0].name = data.draw(st.sampled_from(["x", "pixels"])) * data.draw(st.integers(100, 500_000))


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
    # Fewer values than [2, 64] holds are refused against the model ("expected 128"), more already
    # by the scan before parsing ("more than the 128 its shape [2, 64] holds").
    Mutation("typed count", _typed_count, INVALID, ("pixels", "fp32_contents", "128")),
    Mutation("unknown model", _unknown_model, NOT_FOUND, ("model",)),
    Mutation("unknown version", _unknown_version, NOT_FOUND, ("version",)),
    Mutation("unknown output", _unknown_output, INVALID, ("requested output",)),
    Mutation("bad timeout", _bad_timeout, INVALID, ("timeout_us",)),
    # Structure caps (issue #21): refused by count, naming the field, the cap and its setting.
    Mutation("many inputs", _many_inputs, INVALID, ("inputs: more than the limit of 256", "max_inputs")),
    Mutation("many outputs", _many_outputs, INVALID, ("outputs: more than the limit of 256", "max_outputs")),
    Mutation("many parameters", _many_parameters, INVALID, ("parameters: more than the limit of 64", "max_parameters")),
    Mutation("deep rank", _deep_rank, INVALID, ("inputs[0].shape: more than the limit of 16", "max_rank")),
    Mutation("long id", _long_id, INVALID, ("id: more than the limit of 256 bytes", "max_id_bytes")),
    Mutation("long name", _long_name, INVALID, ("unknown input", "characters)")),
]
# Every message quotes a bounded part of the request: it travels in the trailing
# metadata, which gRPC caps (a longer one reached the client as RESOURCE_EXHAUSTED).
MAX_DETAILS = 1024


@pytest.fixture(scope="module")
def stub() -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with gateway_in_thread() as running, grpc.insecure_channel(running.address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


SEEN: dict[str, int] = {}
# Mutations whose expected message quotes a size that depends on the batch.
FIXED_BATCH = {"byte size": 1, "typed count": 2}


@settings(max_examples=160, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
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
    assert len(details) <= MAX_DETAILS, (mutation.name, details[:200])
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


# --- hostile structure against a real server process: memory and latency stay bounded ----------


def _field_tag(name: str) -> bytes:
    number = RequestClass.DESCRIPTOR.fields_by_name[name].number
    return bytes([(number << 3) | 2])  # length-delimited; the numbers here fit one byte


def many_empty_tensors(count: int) -> bytes:
    """A valid request (typed contents, so no raw count to mismatch) followed by `count`
    empty input tensors, serialized directly at two bytes each: 2 M of them are the 4 MB
    request that froze the event loop for ~9 s and kept ~460 MB (issue #21)."""
    request = valid(batch=1)
    del request.raw_input_contents[:]
    request.inputs[0].contents.fp32_contents.extend([1.0] * 64)
    return request.SerializeToString() + (_field_tag("inputs") + b"\0") * count


def many_outputs(count: int) -> bytes:
    return valid(batch=1).SerializeToString() + (_field_tag("outputs") + b"\x07\x0a\x05label") * count


def deep_rank(rank: int) -> bytes:
    request = valid(batch=1)
    request.inputs[0].shape.extend([1] * rank)
    return bytes(request.SerializeToString())


def long_id(size: int) -> bytes:
    request = valid(batch=1)
    request.id = "i" * size
    return bytes(request.SerializeToString())


def group_first(count: int) -> bytes:
    """An empty unknown field in the group wire format (field 15), then `count` empty tensors: the
    scan used to stop at the group and leave the whole message to protobuf (3 GB for 64 MiB)."""
    return b"\x7b\x7c" + many_empty_tensors(count)


def many_contents_entries(count: int) -> bytes:
    """digits' input "pixels" [1, 64] with `count` empty bytes_contents entries as its typed contents
    (2 bytes each on the wire, ~35 parsed: 64 MiB of them took 1.1 GB and seconds to parse)."""
    contents = b"\x42\x00" * count  # field 8 (bytes_contents), empty
    tensor = b"\x0a\x06pixels\x12\x04FP32\x1a\x02\x01\x40" + b"\x2a" + varint(len(contents)) + contents
    return b"\x0a\x06digits" + b"\x2a" + varint(len(tensor)) + tensor


HOSTILE: list[tuple[str, bytes, str]] = [
    ("2 M empty tensors", many_empty_tensors(2_000_000), "max_inputs"),
    ("1 M requested outputs", many_outputs(1_000_000), "max_outputs"),
    ("a 2 M-rank shape", deep_rank(2_000_000), "max_rank"),
    ("a 1 MB id", long_id(1 << 20), "max_id_bytes"),
    ("a group, then 2 M empty tensors", group_first(2_000_000), "group wire format"),
    ("2 M empty bytes_contents entries", many_contents_entries(2_000_000), "encoded one by one"),
]


def _send_hostile(address: str, rounds: int, outcomes: list[tuple[str, grpc.StatusCode, str]]) -> None:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda raw: raw,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        for _ in range(rounds):
            for name, raw, setting in HOSTILE:
                try:
                    call(raw, timeout=30)
                except grpc.RpcError as error:
                    details = error.details() or ""
                    outcomes.append((name, error.code(), details if setting not in details else setting))
                else:
                    outcomes.append((name, grpc.StatusCode.OK, "answered"))


def _hostile_senders(
    address: str, rounds: int, outcomes: list[tuple[str, grpc.StatusCode, str]], wait: bool = False
) -> list[threading.Thread]:
    """Three threads at once, each sending every HOSTILE request `rounds` times."""
    senders = [threading.Thread(target=_send_hostile, args=(address, rounds, outcomes)) for _ in range(3)]
    for sender in senders:
        sender.start()
    for sender in senders if wait else ():
        sender.join()
    return senders


def test_hostile_structure_neither_freezes_the_server_nor_grows_its_memory() -> None:
    """Requests with millions of tensors, outputs or dimensions, or megabyte ids, are refused
    by count at once: a well-formed request sent meanwhile still answers promptly, and the
    server's memory stays flat (once ~460 MB kept and ~9 s of frozen event loop each)."""
    with (
        gateway_process("--workers", "1", "--load", "digits") as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(20):
            stub.ModelInfer(valid(batch=2), timeout=10)
        # Warm the hostile path once (grpc's and the allocator's buffers for three large
        # messages at a time), then measure.
        _hostile_senders(server.address, 1, [], wait=True)
        baseline = rss_kib(server.proc.pid)
        outcomes: list[tuple[str, grpc.StatusCode, str]] = []
        senders = _hostile_senders(server.address, 4, outcomes)
        latencies: list[float] = []
        while any(s.is_alive() for s in senders):
            start = time.perf_counter()
            assert stub.ModelInfer(valid(batch=2), timeout=30).id == "ok"
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)
        grown = rss_kib(server.proc.pid) - baseline
        assert len(outcomes) == 3 * 4 * len(HOSTILE)
        for name, code, details in outcomes:
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details[:200])
        assert {details for _, _, details in outcomes} == {setting for _, _, setting in HOSTILE}
        # Generous: 2 cores shared with other work; a frozen loop took ~9 s per request.
        assert latencies and max(latencies) < 3.0, sorted(latencies)[-5:]
        assert grown < 64 * 1024, f"RSS grew by {grown} KiB"
