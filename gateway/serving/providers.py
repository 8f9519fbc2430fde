"""Choosing onnxruntime execution providers: `auto`, `cuda` or `cpu`.

onnxruntime-gpu lists CUDAExecutionProvider even on a machine without a GPU;
asking for it then logs an error and falls back to the CPU. So `auto` does not
trust the list: it loads the driver and tries the provider on the first
session, quietly, and reports in one line what each model got.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
from dataclasses import dataclass

import onnxruntime as ort

from gateway.config.settings import ProviderMode
from gateway.errors import ConfigError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True, slots=True)
class CudaCheck:
    usable: bool
    reason: str  # why not, when not usable


def cuda_prerequisites() -> CudaCheck:
    """What can be known about CUDA without creating a session."""
    if CUDA not in ort.get_available_providers():
        return CudaCheck(False, "this onnxruntime build has no CUDA execution provider (install onnxruntime-gpu)")
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return CudaCheck(False, "no NVIDIA driver found (libcuda.so.1 cannot be loaded)")
    # CUDA/cuDNN runtime libraries may come from the nvidia-* wheels (the `cuda`
    # extra); preload_dlls finds them there. It prints on failure: keep it quiet.
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
            preload()
    return CudaCheck(True, "")


def cuda_options(device: int, mem_limit_mb: int, conv_algo_search: str, graphs: bool) -> dict[str, str]:
    """CUDA execution provider options, as onnxruntime takes them (strings)."""
    options = {"device_id": str(device), "cudnn_conv_algo_search": conv_algo_search}
    if mem_limit_mb:
        options["gpu_mem_limit"] = str(mem_limit_mb << 20)
    if graphs:
        options["enable_cuda_graph"] = "1"
    return options


class ProviderChooser:
    """Decides providers per session; remembers what the first CUDA attempt taught."""

    def __init__(self, mode: ProviderMode, cuda: dict[str, str] | None = None) -> None:
        self.mode = mode
        self.cuda_options = cuda or {}
        self._cuda: CudaCheck | None = None if mode != "cpu" else CudaCheck(False, "provider mode is cpu")

    def candidates(self) -> list[str]:
        if self._cuda is None:
            self._cuda = cuda_prerequisites()
            if not self._cuda.usable and self.mode == "cuda":
                raise ConfigError(f"provider cuda: CUDA is not usable: {self._cuda.reason}")
        return [CUDA, CPU] if self._cuda.usable else [CPU]

    def with_options(self, providers: list[str]) -> list[str | tuple[str, dict[str, str]]]:
        return [(p, self.cuda_options) if p == CUDA and self.cuda_options else p for p in providers]

    def accept(self, requested: list[str], granted: list[str]) -> None:
        """Check what onnxruntime actually gave a session."""
        if CUDA in requested and CUDA not in granted:
            self._cuda = CudaCheck(
                False,
                "the CUDA execution provider failed to initialise "
                "(CUDA 13 / cuDNN 9 libraries missing? install the `cuda` extra)",
            )
            if self.mode == "cuda":
                raise ConfigError(f"provider cuda: CUDA is not usable: {self._cuda.reason}")

    @property
    def cuda_reason(self) -> str:
        return self._cuda.reason if self._cuda else ""
