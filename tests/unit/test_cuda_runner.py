"""The IO-binding runner without a GPU: CUDA options, the refusal on a CPU session, and the
bucket/graph/staging logic run on onnxruntime's CPU device (graph ids are ignored there).

Nothing here exercises CUDA itself; see gateway/serving/cuda/runner.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from gateway.config.settings import GatewaySettings
from gateway.errors import ConfigError
from gateway.serving.cuda.runner import (
    GRAPH_ID,
    CudaRunner,
    IoBindingRunner,
    cuda_provider_options,
    host_buffer,
    pinned_memory_info,
    session_uses_cuda_graphs,
)
from gateway.serving.providers import CUDA
from tests.onnx_models import write_mixed_dtype_model
from tests.support import MODELS

MLP = MODELS / "mlp" / "1" / "model.onnx"
CONVNET = MODELS / "convnet" / "1" / "model.onnx"


def cpu_session(path: Path) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def mlp() -> Any:
    return cpu_session(MLP)


@pytest.fixture(scope="module")
def host_memory() -> Any:
    """Stands in for pinned memory: host memory from a shared onnxruntime allocator, reached the same way."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_DEVICE_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    try:
        ort.create_and_register_allocator(info, None)
    except Exception as exc:  # registered already by an earlier module in this process
        if "already" not in str(exc).lower():
            raise
    return info


@pytest.fixture
def graph_runner(mlp: Any) -> Iterator[IoBindingRunner]:
    runner = IoBindingRunner(mlp, device="cpu", buckets=[4, 8, 16], graphs=True)
    yield runner
    runner.close()


def features(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).random((rows, 784), dtype=np.float32)}


def reference(session: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    outputs: list[np.ndarray] = session.run(None, feeds)
    return outputs


# -- provider options and refusals -----------------------------------------------------------


def test_provider_options_from_settings() -> None:
    assert cuda_provider_options(GatewaySettings()) == {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC"}
    tuned = GatewaySettings(
        cuda_device=1, cuda_mem_limit_mb=2048, cudnn_conv_algo_search="EXHAUSTIVE", cuda_graphs=True
    )
    assert cuda_provider_options(tuned) == {
        "device_id": "1",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "gpu_mem_limit": str(2048 * 1024 * 1024),
        "enable_cuda_graph": "1",
    }
    assert cuda_provider_options(GatewaySettings(cudnn_conv_algo_search="DEFAULT"))["cudnn_conv_algo_search"] == (
        "DEFAULT"
    )


def test_provider_options_refuse_bad_settings() -> None:
    with pytest.raises(ConfigError, match="cuda_device: must be >= 0"):
        cuda_provider_options(GatewaySettings(cuda_device=-1))
    with pytest.raises(ConfigError, match="cuda_mem_limit_mb: must be >= 0"):
        cuda_provider_options(GatewaySettings(cuda_mem_limit_mb=-5))
    with pytest.raises(ConfigError, match="cudnn_conv_algo_search"):
        GatewaySettings(cudnn_conv_algo_search="FASTEST")  # type: ignore[arg-type]


def test_a_cpu_session_is_refused_with_the_reason(mlp: Any) -> None:
    with pytest.raises(ConfigError, match=f"CudaRunner needs a session on {CUDA}, but this one runs on CPU"):
        CudaRunner(mlp, buckets=[8])


def test_graphs_are_read_from_the_session_provider_options(mlp: Any) -> None:
    assert not session_uses_cuda_graphs(mlp)

    class Reported:
        def __init__(self, value: str) -> None:
            self.value = value

        def get_provider_options(self) -> dict[str, dict[str, str]]:
            return {CUDA: {"device_id": "0", "enable_cuda_graph": self.value}}

    assert session_uses_cuda_graphs(Reported("1"))
    assert not session_uses_cuda_graphs(Reported("0"))


def test_no_pinned_memory_without_a_cuda_device() -> None:
    assert pinned_memory_info(0) is None
    array, owner = host_buffer((4, 3), np.dtype(np.float32), None)
    assert owner is None and array.shape == (4, 3) and not array.any()


def test_graphs_need_buckets_and_fixed_shapes(mlp: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one bucket"):
        IoBindingRunner(mlp, device="cpu", graphs=True)
    with pytest.raises(ConfigError, match="bucket sizes must be >= 1"):
        IoBindingRunner(mlp, device="cpu", buckets=[0, 8])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "ragged",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "width"])],
    )
    path = tmp_path / "ragged.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    with pytest.raises(ConfigError, match="input 'x' does not have them"):
        IoBindingRunner(cpu_session(path), device="cpu", buckets=[8], graphs=True)
    # Without graphs such a model still runs, unbucketed.
    ragged = IoBindingRunner(cpu_session(path), device="cpu", buckets=[8])
    x = np.arange(10, dtype=np.float32).reshape(2, 5)
    np.testing.assert_array_equal(ragged.run({"x": x})[0], x)


# -- plain IO binding ------------------------------------------------------------------------


def test_plain_runs_equal_session_run(mlp: Any) -> None:
    runner = IoBindingRunner(mlp, device="cpu", buckets=[8, 32])
    assert not runner.pinned and not runner.graphs  # no host-accessible memory given: feeds bound as they are
    for rows in (1, 5, 8, 9, 40):
        feeds = features(rows, seed=rows)
        (logits,) = runner.run(feeds)
        assert logits.shape == (rows, 10)
        np.testing.assert_allclose(logits, reference(mlp, feeds)[0], rtol=1e-5, atol=1e-6)


def test_staged_runs_reuse_their_buffers_and_stay_apart_across_threads(mlp: Any, host_memory: Any) -> None:
    runner = IoBindingRunner(mlp, device="cpu", buckets=[4, 16], host_memory=host_memory)
    assert runner.pinned
    errors: list[str] = []

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for step in range(30):
            rows = int(rng.integers(1, 21))  # in both buckets and past them
            feeds = features(rows, seed=seed * 100 + step)
            (logits,) = runner.run(feeds)
            if logits.shape != (rows, 10) or not np.allclose(logits, reference(mlp, feeds)[0], rtol=1e-5, atol=1e-6):
                errors.append(f"client {seed} step {step}: {rows} rows answered wrong")

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    pooled = [slot for slots in runner._free.values() for slot in slots]
    assert pooled and all(slot.owners for slot in pooled)  # staging came from the given allocator
    assert len(pooled) <= 2 * 6  # at most one slot per bucket per concurrent caller


def test_mixed_dtypes_and_two_outputs(tmp_path: Path, host_memory: Any) -> None:
    write_mixed_dtype_model(tmp_path / "mixed.onnx")
    session = cpu_session(tmp_path / "mixed.onnx")
    rng = np.random.default_rng(3)
    for graphs in (False, True):
        runner = IoBindingRunner(session, device="cpu", buckets=[2, 8], graphs=graphs, host_memory=host_memory)
        for rows in (1, 2, 3, 8, 11):
            feeds: dict[str, np.ndarray] = {
                "ids": rng.integers(-50, 50, (rows, 4), dtype=np.int64),
                "weights": rng.random((rows, 4)).astype(np.float16),
            }
            got = runner.run(feeds)
            want = reference(session, feeds)
            assert [g.shape for g in got] == [(rows,), (rows, 4)]
            assert [g.dtype for g in got] == [np.float32, np.int64]
            np.testing.assert_allclose(got[0], want[0], rtol=1e-3)
            np.testing.assert_array_equal(got[1], want[1])
        runner.close()


def test_feeds_that_do_not_fit_are_refused(mlp: Any, host_memory: Any) -> None:
    runner = IoBindingRunner(mlp, device="cpu", buckets=[8], host_memory=host_memory)
    with pytest.raises(ValueError, match="expected"):
        runner.run({"input": np.zeros((2, 783), np.float32)})
    with pytest.raises(ValueError, match="unknown input 'extra'"):
        runner.run({"input": np.zeros((2, 784), np.float32), "extra": np.zeros((2, 1), np.float32)})
    with pytest.raises(TypeError):  # no silent casts into the staging buffer
        runner.run({"input": np.zeros((2, 784), np.float64)})


# -- CUDA graphs (their bookkeeping, on the CPU) -----------------------------------------------


def test_graph_runs_equal_session_run_and_never_return_padded_rows(mlp: Any, graph_runner: IoBindingRunner) -> None:
    for rows in (1, 3, 4, 5, 16, 17, 2):
        feeds = features(rows, seed=rows)
        (logits,) = graph_runner.run(feeds)
        assert logits.shape == (rows, 10)
        np.testing.assert_allclose(logits, reference(mlp, feeds)[0], rtol=1e-5, atol=1e-6)
    # One bound slot per bucket used, each with its own graph id; 17 rows ran without a graph.
    assert sorted(graph_runner._graph_slots) == [4, 8, 16]
    for size, slot in graph_runner._graph_slots.items():
        assert slot.run_options.get_run_config_entry(GRAPH_ID) == str(size)
        assert [v.shape() for v in slot.device_outputs] == [[size, 10]]
    assert graph_runner._no_graph.get_run_config_entry(GRAPH_ID) == "-1"


def test_graph_padding_is_zeros_after_a_larger_batch(graph_runner: IoBindingRunner) -> None:
    graph_runner.run(features(7))
    graph_runner.run(features(5, seed=1))
    staged = graph_runner._graph_slots[8].host["input"]
    np.testing.assert_array_equal(staged[:5], features(5, seed=1)["input"])
    assert not staged[5:].any()
    # The bound device input holds exactly what was staged (the graph reads it there).
    np.testing.assert_array_equal(graph_runner._graph_slots[8].device_inputs["input"].numpy(), staged)


def test_graph_outputs_are_not_overwritten_by_later_runs(graph_runner: IoBindingRunner) -> None:
    first = graph_runner.run(features(3, seed=10))[0]
    kept = first.copy()
    graph_runner.run(features(3, seed=11))
    np.testing.assert_array_equal(first, kept)


def test_graph_runs_happen_on_one_thread_one_at_a_time(mlp: Any) -> None:
    session = cpu_session(MLP)
    seen: set[int] = set()
    inside = threading.Semaphore(1)
    overlapped: list[bool] = []
    original = session.run_with_iobinding

    def recording(binding: Any, options: Any = None) -> None:
        seen.add(threading.get_ident())
        if not inside.acquire(blocking=False):
            overlapped.append(True)
            return
        try:
            original(binding, options)
        finally:
            inside.release()

    session.run_with_iobinding = recording
    runner = IoBindingRunner(session, device="cpu", buckets=[4, 8], graphs=True)
    runner.warm_up()
    results: dict[int, bool] = {}

    def client(seed: int) -> None:
        feeds = features(seed % 8 + 1, seed=seed)
        results[seed] = bool(np.allclose(runner.run(feeds)[0], reference(mlp, feeds)[0], rtol=1e-5, atol=1e-6))

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    runner.close()
    assert all(results.values()) and len(results) == 16
    assert len(seen) == 1 and threading.get_ident() not in seen
    assert not overlapped


def test_convnet_graphs() -> None:
    session = cpu_session(CONVNET)
    runner = IoBindingRunner(session, device="cpu", buckets=[1, 2, 4], graphs=True)
    images = np.random.default_rng(5).random((3, 1, 28, 28), dtype=np.float32)
    (logits,) = runner.run({"image": images})
    np.testing.assert_allclose(logits, reference(session, {"image": images})[0], rtol=1e-4, atol=1e-5)
    runner.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    buckets=st.lists(st.integers(1, 24), min_size=1, max_size=4, unique=True),
    batches=st.lists(st.integers(1, 30), min_size=1, max_size=6),
    graphs=st.booleans(),
)
def test_any_buckets_any_batches_answer_like_session_run(
    mlp: Any, host_memory: Any, buckets: list[int], batches: list[int], graphs: bool
) -> None:
    runner = IoBindingRunner(mlp, device="cpu", buckets=buckets, graphs=graphs, host_memory=host_memory)
    try:
        for index, rows in enumerate(batches):
            feeds = features(rows, seed=index)
            (logits,) = runner.run(feeds)
            assert logits.shape == (rows, 10)
            np.testing.assert_allclose(logits, reference(mlp, feeds)[0], rtol=1e-5, atol=1e-6)
    finally:
        runner.close()
