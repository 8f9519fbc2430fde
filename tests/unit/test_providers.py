"""Provider selection: what each mode does on this host (with or without a GPU), and the CUDA
options it would pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.serving.providers import CPU, CUDA, ProviderChooser, cuda_options, cuda_prerequisites
from gateway.serving.runtime import OnnxModel
from tests.onnx_models import write_identity_model


def test_cpu_mode_never_tries_cuda() -> None:
    chooser = ProviderChooser("cpu")
    assert chooser.candidates() == [CPU]
    assert chooser.cuda_reason == "provider mode is cpu"


def test_auto_mode_takes_cuda_where_usable_else_falls_back_to_cpu_and_says_why(tmp_path: Path) -> None:
    check = cuda_prerequisites()
    chooser = ProviderChooser("auto")
    write_identity_model(tmp_path / "m.onnx", "FP32")
    model = OnnxModel(tmp_path / "m.onnx", chooser)
    if check.usable:  # a GPU host
        assert model.provider == CUDA and model.on_cuda and not chooser.cuda_reason
    else:  # CI, and any host without a usable GPU
        assert model.provider == CPU and not model.on_cuda
        assert chooser.cuda_reason == check.reason and check.reason


def test_cuda_mode_refuses_with_the_reason_where_cuda_is_not_usable() -> None:
    check = cuda_prerequisites()
    if check.usable:
        assert ProviderChooser("cuda").candidates() == [CUDA, CPU]
        return
    with pytest.raises(ConfigError, match="provider cuda: CUDA is not usable: "):
        ProviderChooser("cuda").candidates()


def test_cuda_options_as_onnxruntime_takes_them() -> None:
    assert cuda_options(1, 0, "EXHAUSTIVE", False) == {"device_id": "1", "cudnn_conv_algo_search": "EXHAUSTIVE"}
    options = cuda_options(0, 2048, "HEURISTIC", True)
    assert options["gpu_mem_limit"] == str(2048 << 20) and options["enable_cuda_graph"] == "1"
    chooser = ProviderChooser("auto", options)
    assert chooser.with_options([CUDA, CPU]) == [(CUDA, options), CPU]
    assert ProviderChooser("auto").with_options([CUDA, CPU]) == [CUDA, CPU]


def test_buckets_do_not_change_cpu_runs(tmp_path: Path) -> None:
    import numpy as np

    write_identity_model(tmp_path / "m.onnx", "FP32")
    model = OnnxModel(tmp_path / "m.onnx", ProviderChooser("cpu"))
    model.use_buckets([8, 16])
    x = np.arange(9, dtype=np.float32).reshape(3, 3)
    np.testing.assert_array_equal(model.run({"x": x})[0], x)
    assert model._cuda is None  # the CUDA runner exists only on the GPU


def test_gpu_batching_defaults_apply_only_on_the_gpu(tmp_path: Path) -> None:
    from gateway.config.spec import BatchingSpec, ModelSpec
    from gateway.serving.builder import gpu_defaults

    write_identity_model(tmp_path / "m.onnx", "FP32")
    model = OnnxModel(tmp_path / "m.onnx", ProviderChooser("cpu"))
    spec = ModelSpec(max_batch_size=100)
    assert gpu_defaults(spec, model) is spec.batching  # CPU: the spec as written
    model.on_cuda = True  # what a CUDA session reports; the defaults only read it
    assert gpu_defaults(spec, model).preferred_batch_sizes == (8, 16, 32, 64)
    assert gpu_defaults(spec, model).instances == 4
    chosen = ModelSpec(max_batch_size=100, batching=BatchingSpec(preferred_batch_sizes=(4,), instances=6))
    assert gpu_defaults(chosen, model).preferred_batch_sizes == (4,)
    assert gpu_defaults(chosen, model).instances == 6
