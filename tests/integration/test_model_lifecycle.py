"""A model load at run time is all-or-nothing (issue #21 item 8): a spec that fails
validation, or a swap that fails half-way, leaves the served model exactly as it was."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from gateway.protocol.pb import release_pb2 as rpb
from gateway.release.store import SqliteStore
from tests.integration.test_model_lifecycle_repository import control, digits_answer
from tests.support import MODELS, Running, gateway_in_thread


async def _task_count() -> int:
    """Batcher loops running on the gateway's event loop (one per batching version)."""
    return sum("_dispatch_forever" in getattr(t.get_coro(), "__qualname__", "") for t in asyncio.all_tasks())


@pytest.fixture
def lifecycle(tmp_path: Path) -> Iterator[tuple[Running, Path]]:
    root = tmp_path / "repo"
    shutil.copytree(MODELS / "digits", root / "digits")
    shutil.copytree(MODELS / "digits", root / "other")
    with gateway_in_thread(root, load=("digits",), controller=False) as running:
        yield running, root


BAD_SPECS = {
    "compare names no output": ('[compare]\noutput = "nope"\n', "nope"),
    "canary names no version": ('[release]\nstable = "1"\ncanary = "9"\ncanary_weight_bp = 500\n', "'9'"),
    "shadow names no version": ('[release]\nstable = "1"\nshadows = { "7" = 0.5 }\n', "'7'"),
    "canary is the stable": ('[release]\nstable = "2"\ncanary = "2"\ncanary_weight_bp = 500\n', "stable"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_a_spec_that_fails_validation_leaves_the_served_model_exactly_as_it_was(
    lifecycle: tuple[Running, Path], case: str
) -> None:
    running, root = lifecycle
    stub = control(running)
    before = digits_answer(running)
    release_before = stub.GetRelease(rpb.GetReleaseRequest(model="digits"))
    entry_before = running.gateway.registry.entry("digits")  # type: ignore[union-attr]
    tasks_before = running.call(_task_count())
    spec, named = BAD_SPECS[case]
    (root / "digits" / "model.toml").write_text("max_batch_size = 256\n" + spec)

    with pytest.raises(grpc.RpcError) as failure:
        stub.LoadModel(rpb.ModelRequest(model="digits"))
    code, details = failure.value.code(), failure.value.details()
    assert code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT), (code, details)
    assert named in details and "model.toml" in details, details

    # The previous model serves on, unchanged, with its release and executors.
    assert running.gateway.registry.entry("digits") is entry_before  # type: ignore[union-attr]
    assert stub.GetRelease(rpb.GetReleaseRequest(model="digits")) == release_before
    np.testing.assert_array_equal(digits_answer(running), before)
    client = tc.InferenceServerClient(running.address)
    assert client.is_model_ready("digits") and client.is_server_ready()
    assert running.call(_task_count()) == tasks_before  # nothing half-built was left running


def test_a_good_reload_drains_and_closes_the_old_executors(lifecycle: tuple[Running, Path]) -> None:
    running, _ = lifecycle
    stub = control(running)
    old = running.gateway.registry.entry("digits")  # type: ignore[union-attr]
    tasks_before = running.call(_task_count())
    status = stub.LoadModel(rpb.ModelRequest(model="digits"))
    assert list(status.versions) == ["1", "2", "3"]
    assert running.gateway.registry.entry("digits") is not old  # type: ignore[union-attr]
    assert all(getattr(v.executor, "_closed", False) for v in old.versions.values())
    digits_answer(running)
    assert running.call(_task_count()) == tasks_before == 3  # the old batchers' loops ended


def test_a_load_that_fails_after_the_swap_puts_everything_back(lifecycle: tuple[Running, Path]) -> None:
    """The release store refuses the new model's first release (another process holds its
    write lock): the load fails as a whole, and the model is not served half-loaded."""
    running, _ = lifecycle
    stub = control(running)
    store = running.gateway.store
    assert isinstance(store, SqliteStore)
    tasks_before = running.call(_task_count())
    blocker = sqlite3.connect(str(store.path), isolation_level=None, timeout=1.0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(grpc.RpcError) as failure:
            stub.LoadModel(rpb.ModelRequest(model="other"), timeout=60)
        assert failure.value.code() != grpc.StatusCode.OK
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    client = tc.InferenceServerClient(running.address)
    assert not client.is_model_ready("other")
    assert {m["name"] for m in client.get_model_repository_index(as_json=True)["models"]} == {"digits"}
    with pytest.raises(grpc.RpcError) as missing:
        stub.GetRelease(rpb.GetReleaseRequest(model="other"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert running.call(_task_count()) == tasks_before
    digits_answer(running)
    # With the store writable again the same load succeeds.
    assert list(stub.LoadModel(rpb.ModelRequest(model="other")).versions) == ["1", "2", "3"]
    assert client.is_model_ready("other")
