"""Runs on the CUDA execution provider through IO binding, with reusable host buffers per batch bucket.

Written to onnxruntime's documented Python API (IOBinding, OrtValue, RunOptions;
"Using CUDA Graphs" in the CUDA EP docs). This project's machines have no GPU,
so the CUDA path itself has not run here: the same code runs on the CPU in the
tests by naming the "cpu" device (`IoBindingRunner`), which covers the
padding, buffer reuse, graph-id bookkeeping and threading, not CUDA.

Two modes, chosen by the session's own provider options:

- Plain: each run binds its inputs and lets onnxruntime allocate the outputs
  on the host (a fresh binding per run: a reused one keeps the previous run's
  output shapes and fails on a different batch). When page-locked host memory
  is available, inputs are first staged into a pinned buffer of their bucket,
  reused across runs, so the host-to-device copy is a direct DMA. (onnxruntime
  hands out pinned memory only through an EP registered as a library; see
  `pinned_memory_info`. Without it inputs are bound where they are: staging
  them in pageable memory would only add a copy.)
- CUDA graphs (provider option `enable_cuda_graph`): a graph replays fixed
  shapes at fixed device addresses, so each bucket owns device buffers for
  every input and output, bound once, and its own graph id (`gpu_graph_id`).
  A batch is padded to its bucket in the staging buffer, copied in place into
  the bound device input, replayed, and its outputs copied back and trimmed.
  Batches larger than every bucket run with graph id -1 (no capture: the
  default id 0 would capture, or worse replay, a graph of another shape).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort

from gateway.config.settings import GatewaySettings
from gateway.errors import ConfigError
from gateway.serving.cuda.buckets import bucket_for, unpad_outputs
from gateway.serving.providers import CUDA, cuda_options
from gateway.types import TensorSpec

GRAPH_ID = "gpu_graph_id"
# The CUDA EP docs: "If the gpu_graph_id is set to -1, cuda graph capture/replay is disabled in that run."
NO_GRAPH = "-1"
# Runs per bucket in warm_up. The docs say the first run of a graph id captures it; onnxruntime's code
# has also waited for up to two ordinary runs first (memory patterns settle). Three covers both, so no
# request pays for a capture.
WARMUP_RUNS = 3

_T = TypeVar("_T")


def cuda_provider_options(settings: GatewaySettings) -> dict[str, str]:
    """CUDA execution provider options from the gateway's settings, as onnxruntime takes them (strings).

    device_id, gpu_mem_limit (the arena's cap in bytes; 0 MiB: no cap),
    cudnn_conv_algo_search and enable_cuda_graph.
    """
    if settings.cuda_device < 0:
        raise ConfigError(f"cuda_device: must be >= 0, got {settings.cuda_device}")
    if settings.cuda_mem_limit_mb < 0:
        raise ConfigError(f"cuda_mem_limit_mb: must be >= 0, got {settings.cuda_mem_limit_mb}")
    # GatewaySettings has already refused any other cudnn_conv_algo_search; one source of truth for the strings.
    return cuda_options(
        settings.cuda_device, settings.cuda_mem_limit_mb, settings.cudnn_conv_algo_search, settings.cuda_graphs
    )


def session_uses_cuda_graphs(session: Any) -> bool:
    """Whether the session's CUDA EP was created with enable_cuda_graph (it reports its options as strings)."""
    options = session.get_provider_options().get(CUDA, {})
    return str(options.get("enable_cuda_graph", "0")).lower() in ("1", "true")


def pinned_memory_info(device_id: int) -> Any | None:
    """Page-locked host memory of CUDA device `device_id`, where this onnxruntime can allocate it.

    onnxruntime 1.31's Python API has no "cuda_pinned" device name (OrtDevice.make refuses it); host
    memory the GPU can DMA from is reached through the OrtEpDevice of an execution provider registered
    as a library, as `memory_info(OrtDeviceMemoryType.HOST_ACCESSIBLE)`. None when there is none:
    callers then use ordinary (pageable) numpy buffers.
    """
    get_ep_devices = getattr(ort, "get_ep_devices", None)
    memory_type = getattr(ort, "OrtDeviceMemoryType", None)
    if get_ep_devices is None or memory_type is None:
        return None
    try:
        for ep_device in get_ep_devices():
            if ep_device.ep_name != CUDA:
                continue
            device_memory = ep_device.memory_info(memory_type.DEFAULT)
            if device_memory is not None and device_memory.device_id != device_id:
                continue
            host_memory = ep_device.memory_info(memory_type.HOST_ACCESSIBLE)
            if host_memory is not None:
                return host_memory
    except Exception:  # an onnxruntime without EP devices, or a half-registered library: no pinned memory
        return None
    return None


def host_buffer(shape: Sequence[int], dtype: np.dtype[Any], memory_info: Any | None) -> tuple[np.ndarray, Any | None]:
    """A zeroed host array; backed by `memory_info`'s allocator (e.g. pinned) when it gives a writable view.

    Returns the array and the OrtValue that owns its memory (keep it alive as long as the array), or
    None for a plain numpy array. Any failure falls back to numpy: pinned memory is an optimisation.
    """
    if memory_info is not None:
        try:
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, memory_info=memory_info)
            array = value.numpy()
        except Exception:  # no shared allocator for it, or an onnxruntime without memory_info
            pass
        else:
            # Only a view of the OrtValue's own memory is of use; numpy() of device memory is a copy.
            if array.ctypes.data == value.data_ptr() and array.flags.writeable and array.shape == tuple(shape):
                array[...] = 0
                return array, value
    return np.zeros(tuple(shape), dtype=dtype), None


@dataclass(eq=False, slots=True)
class _Slot:
    """Buffers for one bucket: staging on the host and, with graphs, the bound device values."""

    size: int
    host: dict[str, np.ndarray]
    owners: list[Any]  # OrtValues that own `host`'s memory (pinned), kept alive with it
    filled: int = 0  # rows staged last time: everything after them is still zero
    binding: Any = None
    device_inputs: dict[str, Any] = field(default_factory=dict)
    device_outputs: list[Any] = field(default_factory=list)
    run_options: Any = None


def _input(arg: Any) -> TensorSpec:
    spec = TensorSpec.from_onnx(arg)
    if spec is None:
        raise ConfigError(f"input {arg.name!r} has type {arg.type}, which the gateway does not serve")
    return spec


def _to_host(value: Any) -> np.ndarray:
    """The OrtValue's contents in host memory that no later run writes to."""
    array: np.ndarray = value.numpy()
    # numpy() of device memory is already a fresh copy; of host memory it is a view of the bound buffer.
    return array.copy() if array.ctypes.data == value.data_ptr() else array


class IoBindingRunner:
    """IO-bound runs with per-bucket buffers and optional graphs, on any onnxruntime device.

    `CudaRunner` is this on "cuda"; the tests run it on "cpu", where graph ids are simply ignored.
    `run` may be called from several threads. With graphs every run goes to one thread of its
    own, one at a time: the CUDA EP docs say Run() may not be invoked from multiple threads on a
    session using CUDA graphs.
    """

    def __init__(
        self,
        session: Any,
        *,
        device: str,
        device_id: int = 0,
        buckets: Sequence[int] = (),
        graphs: bool = False,
        host_memory: Any | None = None,
    ) -> None:
        self.session = session
        self.device = device
        self.device_id = device_id
        self.buckets = tuple(sorted(set(buckets)))
        if any(b < 1 for b in self.buckets):
            raise ConfigError(f"bucket sizes must be >= 1, got {list(buckets)}")
        self.inputs = [_input(arg) for arg in session.get_inputs()]
        self.output_names = [arg.name for arg in session.get_outputs()]
        self._host_memory = host_memory
        self.graphs = graphs
        # Buckets apply only where every input has a variable batch dimension and fixed others.
        self._bucketed = bool(self.buckets) and all(i.trailing is not None for i in self.inputs)
        if graphs:
            if not self.buckets:
                raise ConfigError("CUDA graphs need at least one bucket size (preferred_batch_sizes)")
            fixed = next((i for i in self.inputs if i.trailing is None), None)
            if fixed is not None:
                raise ConfigError(
                    f"CUDA graphs need a variable batch dimension and fixed other dimensions; "
                    f"input {fixed.name!r} does not have them"
                )
        self._no_graph = ort.RunOptions()
        self._no_graph.add_run_config_entry(GRAPH_ID, NO_GRAPH)
        self._graph_slots: dict[int, _Slot] = {}
        self._free: dict[int, list[_Slot]] = {}
        self._free_lock = threading.Lock()
        self._graph_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cuda-graphs") if graphs else None
        # Staging pays only when the copy out of it is faster (pinned) or when graphs need fixed buffers.
        self.pinned = self._bucketed and self._probe_pinned()

    def _probe_pinned(self) -> bool:
        first = self.inputs[0]
        assert first.trailing is not None
        _, owner = host_buffer((1, *first.trailing), first.dtype, self._host_memory)
        return owner is not None

    # -- running ----------------------------------------------------------------------

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Every output, in the session's output order, for exactly the rows of `feeds`."""
        if self._graph_thread is not None:
            return self._on_graph_thread(self._run_graphs, feeds)
        if not self.pinned:
            return self._run_unstaged(feeds)
        rows = self._rows(feeds)
        size = self._bucket(rows)
        if size is None:
            return self._run_unstaged(feeds)
        slot = self._acquire(size)
        try:
            return self._run_staged(slot, feeds, rows)
        finally:
            with self._free_lock:
                self._free[size].append(slot)

    def warm_up(self) -> None:
        """With graphs, capture every bucket's graph now rather than on the first request of each size."""
        if self._graph_thread is None:
            return
        for size in self.buckets:
            zeros = {i.name: np.zeros((size, *(i.trailing or ())), dtype=i.dtype) for i in self.inputs}
            for _ in range(WARMUP_RUNS):
                self.run(zeros)

    def close(self) -> None:
        if self._graph_thread is not None:
            self._graph_thread.shutdown(wait=True)

    def _on_graph_thread(
        self, function: Callable[[Mapping[str, np.ndarray]], _T], feeds: Mapping[str, np.ndarray]
    ) -> _T:
        assert self._graph_thread is not None
        return self._graph_thread.submit(function, feeds).result()

    def _bucket(self, rows: int) -> int | None:
        """The bucket a batch of `rows` runs in; None when it is larger than every bucket."""
        size = bucket_for(rows, self.buckets)
        return size if size in self.buckets else None

    def _rows(self, feeds: Mapping[str, np.ndarray]) -> int:
        """The batch's rows, after checking the feeds fit the staging buffers (bucketed models only)."""
        unknown = set(feeds) - {spec.name for spec in self.inputs}
        if unknown:
            raise ValueError(f"unknown input {sorted(unknown)[0]!r}")
        rows: int | None = None
        for spec in self.inputs:
            array = feeds.get(spec.name)
            if array is None:
                raise ValueError(f"input {spec.name!r} is missing")
            if array.ndim == 0 or (rows is not None and array.shape[0] != rows):
                raise ValueError(f"input {spec.name!r} has shape {array.shape}: every input needs the same batch")
            if spec.trailing is not None and array.shape[1:] != spec.trailing:
                raise ValueError(f"input {spec.name!r} has shape {array.shape}, expected [batch, *{spec.trailing}]")
            rows = array.shape[0]
        return rows or 0

    def _run_unstaged(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        # A fresh binding per run: one reused after a run keeps that run's output shapes and fails on another batch.
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding, self._no_graph)
        outputs: list[np.ndarray] = binding.copy_outputs_to_cpu()
        return outputs

    def _acquire(self, size: int) -> _Slot:
        # Several batches of one bucket may run at once (the GPU overlaps them): one slot each, reused after.
        with self._free_lock:
            free = self._free.setdefault(size, [])
            if free:
                return free.pop()
        return self._new_slot(size)

    def _new_slot(self, size: int) -> _Slot:
        host: dict[str, np.ndarray] = {}
        owners: list[Any] = []
        for spec in self.inputs:
            assert spec.trailing is not None
            array, owner = host_buffer((size, *spec.trailing), spec.dtype, self._host_memory)
            host[spec.name] = array
            if owner is not None:
                owners.append(owner)
        return _Slot(size, host, owners)

    def _run_staged(self, slot: _Slot, feeds: Mapping[str, np.ndarray], rows: int) -> list[np.ndarray]:
        """Stage the rows in the slot's pinned buffers and bind exactly those rows (no padding without graphs)."""
        binding = self.session.io_binding()
        for name, array in feeds.items():
            staged = slot.host[name][:rows]
            np.copyto(staged, array, casting="no")
            # Bound as host memory by address: onnxruntime copies it to the device inside the run, and the
            # driver sees page-locked memory and DMAs it directly.
            binding.bind_input(name, "cpu", 0, staged.dtype, list(staged.shape), staged.ctypes.data)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding, self._no_graph)
        outputs: list[np.ndarray] = binding.copy_outputs_to_cpu()
        return outputs

    # -- CUDA graphs (on the graph thread only) ------------------------------------------

    def _run_graphs(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        rows = self._rows(feeds)
        size = self._bucket(rows)
        if size is None:
            return self._run_unstaged(feeds)
        slot = self._graph_slots.get(size)
        if slot is None:
            slot = self._graph_slots[size] = self._bind_graph_slot(size)
        for name, array in feeds.items():
            host = slot.host[name]
            np.copyto(host[:rows], array, casting="no")
            if slot.filled > rows:
                host[rows : slot.filled] = 0  # padding is zeros, as gateway.serving.cuda.buckets.pad_batch makes it
            # The graph reads the address it was captured with: copy into that buffer, never rebind.
            slot.device_inputs[name].update_inplace(host)
        slot.filled = rows
        self.session.run_with_iobinding(slot.binding, slot.run_options)
        return unpad_outputs([_to_host(value) for value in slot.device_outputs], rows)

    def _bind_graph_slot(self, size: int) -> _Slot:
        slot = self._new_slot(size)
        binding = self.session.io_binding()
        for spec in self.inputs:
            value = ort.OrtValue.ortvalue_from_shape_and_type(
                list(slot.host[spec.name].shape), spec.dtype, self.device, self.device_id
            )
            value.update_inplace(slot.host[spec.name])  # zeros, so the shape run below reads defined memory
            binding.bind_ortvalue_input(spec.name, value)
            slot.device_inputs[spec.name] = value
        # The outputs' shapes at this size, from one run without a graph (onnxruntime allocates them).
        for name in self.output_names:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding, self._no_graph)
        probed = binding.get_outputs()
        binding.clear_binding_outputs()
        for name, seen in zip(self.output_names, probed, strict=True):
            value = ort.OrtValue.ortvalue_from_shape_and_type(
                seen.shape(), seen.element_type(), self.device, self.device_id
            )
            binding.bind_ortvalue_output(name, value)
            slot.device_outputs.append(value)
        slot.binding = binding
        slot.run_options = ort.RunOptions()
        slot.run_options.add_run_config_entry(GRAPH_ID, str(size))  # one graph per bucket; never 0 or -1
        return slot


class CudaRunner(IoBindingRunner):
    """`IoBindingRunner` on the CUDA device of a session created with the CUDA execution provider.

    Graphs are on exactly when the session was created with `enable_cuda_graph`
    (see `cuda_provider_options`); the device is the one the session was given.
    """

    def __init__(self, session: Any, *, buckets: Sequence[int] = ()) -> None:
        providers = list(session.get_providers())
        if not providers or providers[0] != CUDA:
            raise ConfigError(
                f"CudaRunner needs a session on {CUDA}, but this one runs on {', '.join(providers) or 'nothing'} "
                "(onnxruntime fell back: is CUDA usable here? see `gateway serve --provider cuda`)"
            )
        options = session.get_provider_options().get(CUDA, {})
        device_id = int(options.get("device_id", 0))
        super().__init__(
            session,
            device="cuda",
            device_id=device_id,
            buckets=buckets,
            graphs=session_uses_cuda_graphs(session),
            host_memory=pinned_memory_info(device_id),
        )
