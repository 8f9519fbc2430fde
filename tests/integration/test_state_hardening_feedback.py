"""Feedback loses nothing: checked whole before joining, predictions kept for a corrected
resend, files sent whole in batches under the message cap, true counts with several
workers, resends counted as already labelled (#21 item 11)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import click
import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.cli.release import read_feedback
from gateway.protocol.pb import release_pb2 as rpb
from gateway.protocol.pb import release_pb2_grpc as rgrpc
from gateway.release.store import SqliteStore
from tests.support import ROOT, Running, gateway_command, gateway_in_thread, gateway_process

MAX_ITEMS = 10_000  # gateway.release.feedback.MAX_FEEDBACK_ITEMS


@pytest.fixture(scope="module")
def running(repo: Path) -> Iterator[Running]:
    with gateway_in_thread(repo, controller=False) as gateway:
        yield gateway


def predict(address: str, request_id: str, rows: int = 1) -> None:
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
    request = service_pb2.ModelInferRequest(model_name="digits", id=request_id)
    request.inputs.add(name="pixels", datatype="FP32", shape=[rows, 64])
    request.raw_input_contents.append(np.zeros((rows, 64), np.float32).tobytes())
    stub.ModelInfer(request, timeout=10)


def control_of(running: Running) -> rgrpc.ReleaseServiceStub:
    return rgrpc.ReleaseServiceStub(grpc.insecure_channel(running.control))


def submit(control: rgrpc.ReleaseServiceStub, *items: tuple[str, list[float]]) -> rpb.SubmitFeedbackResponse:
    feedback = [rpb.Feedback(request_id=rid, labels=labels) for rid, labels in items]
    return control.SubmitFeedback(rpb.SubmitFeedbackRequest(model="digits", items=feedback), timeout=30)


def cli(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATEWAY_CONTROL": address, "COLUMNS": "300"}
    env.pop("GATEWAY_TOKEN", None)
    return subprocess.run(gateway_command(*args), capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def test_labels_that_do_not_fit_keep_the_prediction_for_a_corrected_resend(running: Running) -> None:
    control = control_of(running)
    predict(running.address, "fit-1", rows=2)
    predict(running.address, "fit-ok")
    reply = submit(control, ("fit-ok", [1.0]), ("fit-1", [1.0, 2.0, 3.0]))
    assert (reply.joined, reply.rejected) == (1, 1)
    assert "fit-1" in reply.errors[0] and "3 labels" in reply.errors[0] and "2 rows" in reply.errors[0]
    corrected = submit(control, ("fit-1", [1.0, 2.0]))
    assert (corrected.joined, corrected.unknown, corrected.rejected) == (1, 0, 0)


def test_a_bad_item_refuses_the_whole_call_before_any_join(running: Running) -> None:
    control = control_of(running)
    for rid in ("mid-a", "mid-c"):
        predict(running.address, rid)
    for bad, field in ((("mid-b", []), "items[1].labels"), (("", [1.0]), "items[1].request_id")):
        with pytest.raises(grpc.RpcError) as caught:
            submit(control, ("mid-a", [1.0]), bad, ("mid-c", [2.0]))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (caught.value.details() or "")
    with pytest.raises(grpc.RpcError) as caught:
        submit(control, ("mid-a", [1.0]), ("mid-c", [float("nan")]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[1].labels" in (caught.value.details() or "")
    # Nothing was consumed: both still join.
    reply = submit(control, ("mid-a", [1.0]), ("mid-c", [2.0]))
    assert (reply.joined, reply.unknown) == (2, 0)


def test_too_many_items_in_one_call_are_refused_naming_the_cap(running: Running) -> None:
    control = control_of(running)
    predict(running.address, "cap-0")
    items = [("cap-0", [1.0])] + [(f"cap-x{i}", [1.0]) for i in range(MAX_ITEMS)]
    with pytest.raises(grpc.RpcError) as caught:
        submit(control, *items)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items" in (caught.value.details() or "") and str(MAX_ITEMS) in (caught.value.details() or "")
    assert submit(control, ("cap-0", [1.0])).joined == 1


def test_a_resend_is_counted_as_already_labelled(running: Running, tmp_path: Path) -> None:
    for i in range(3):
        predict(running.address, f"again-{i}")
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"request_id": f"again-{i}", "label": 1}) + "\n" for i in range(3)))
    first = cli(running.control, "feedback", "send", "digits", str(labels))
    assert first.returncode == 0, first.stderr
    assert "3 joined, 0 unknown or expired, 0 already labelled" in first.stdout
    second = cli(running.control, "feedback", "send", "digits", str(labels))
    assert second.returncode == 0, second.stderr
    assert "0 joined, 0 unknown or expired, 3 already labelled" in second.stdout


def test_a_string_of_labels_is_refused_not_split_and_nothing_is_sent(running: Running, tmp_path: Path) -> None:
    predict(running.address, "str-ok")
    predict(running.address, "str-bad")
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"request_id": "str-ok", "label": 1}\n{"request_id": "str-bad", "labels": "12"}\n')
    result = cli(running.control, "feedback", "send", "digits", str(labels))
    assert result.returncode == 2, result
    assert "labels.jsonl:2" in result.stderr and "array" in result.stderr
    # The file was checked whole before anything was sent: the good line's prediction is still there.
    assert submit(control_of(running), ("str-ok", [1.0]), ("str-bad", [1.0])).joined == 2


def test_a_file_over_the_message_cap_is_sent_whole_in_batches(running: Running, tmp_path: Path) -> None:
    """600 label sets of 2,000 labels: ~10 MB encoded, more than twice the control API's
    4 MiB message cap at the default batch. Every one is sent; the real ones join."""
    for i in range(3):
        predict(running.address, f"big-{i}")
    labels = tmp_path / "labels.jsonl"
    with labels.open("w") as out:
        for i in range(600):
            out.write(json.dumps({"request_id": f"big-unknown-{i}", "labels": [i % 10] * 2000}) + "\n")
        for i in range(3):
            out.write(json.dumps({"request_id": f"big-{i}", "label": 4}) + "\n")
    result = cli(running.control, "feedback", "send", "digits", str(labels), "--batch", "10000")
    assert result.returncode == 0, result.stderr
    assert "sent 603 labels: 3 joined, 600 unknown or expired" in result.stdout


def test_every_worker_is_live_in_the_store_once_the_gateway_is_listening(repo: Path, tmp_path: Path) -> None:
    # Worker 0 waits for the workers the store lists as live; a worker that served
    # before it was listed had its labels counted unknown (they arrived < 0.5 s after ready).
    state = tmp_path / "s"
    args = ("--models", str(repo), "--workers", "2", "--state-dir", str(state), "--replica-id", "here")
    with gateway_process(*args):
        store = SqliteStore(state / "state.db")
        try:
            assert store.live_workers() >= {"here/0", "here/1"}
        finally:
            store.close()


def test_several_workers_report_true_counts(repo: Path, tmp_path: Path) -> None:
    with gateway_process("--models", str(repo), "--workers", "2", "--state-dir", str(tmp_path / "s")) as server:
        for i in range(60):
            # A connection each, so the kernel spreads them over both workers.
            channel = grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = service_pb2.ModelInferRequest(model_name="digits", id=f"w-{i}")
            request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
            request.raw_input_contents.append(np.zeros((1, 64), np.float32).tobytes())
            stub.ModelInfer(request, timeout=10)
            channel.close()
        labels = tmp_path / "labels.jsonl"
        lines = [json.dumps({"request_id": f"w-{i}", "label": 1}) for i in range(60)]
        labels.write_text("\n".join([*lines, json.dumps({"request_id": "w-none", "label": 1})]) + "\n")
        first = cli(server.control, "feedback", "send", "digits", str(labels))
        assert first.returncode == 0, first.stderr
        log = "".join(server.lines[-60:])
        assert "sent 61 labels: 60 joined, 1 unknown or expired, 0 already labelled" in first.stdout, (
            first.stdout + "\n--- gateway log ---\n" + log
        )
        second = cli(server.control, "feedback", "send", "digits", str(labels))
        assert "sent 61 labels: 0 joined, 1 unknown or expired, 60 already labelled" in second.stdout, second.stdout


# -- the file reader, over any JSON value a "labels" or "label" field may hold ------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(value=JSON, key=st.sampled_from(["label", "labels"]))
def test_the_reader_takes_numbers_only_and_never_splits_a_string(
    value: object, key: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("fb") / "labels.jsonl"
    try:
        line = json.dumps({"request_id": "r", key: value})
    except ValueError:
        return
    path.write_text(line + "\n")
    try:
        [(request_id, labels)] = list(read_feedback(path))
        assert request_id == "r"
    except click.BadParameter as exc:
        assert "labels.jsonl:1" in str(exc)
        return
    given_values = value if key == "labels" else [value]
    assert isinstance(given_values, list) and len(labels) == len(given_values)
    for label, original in zip(labels, given_values, strict=True):
        assert not isinstance(original, (bool, list)) and original is not None
        assert label == float(original)
        assert np.isfinite(label)
