"""Load generation for `gateway bench`: gRPC or REST clients in several processes, and the in-process ORT loop.

The gRPC side sends one preserialized ModelInferRequest as bytes and takes
the response as bytes, so the clients spend their CPU on gRPC alone, never on
protobuf. The REST side writes one prebuilt HTTP request as bytes on keep-alive
connections (loadtests/httpclient.py) and checks each answer's status. Both
parse and check only the first answer in full (its outputs and shapes).
Closed loop: a fixed number of requests in flight. Open loop:
Poisson arrivals, latency measured from the scheduled send time, so a slow
server cannot hide its queueing by slowing the client down (coordinated
omission).

Client processes are spawned once per bench and reused for every point; each
point synchronises them on one absolute CLOCK_MONOTONIC window, which is
shared by every process on the machine.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np

from gateway.percentiles import quantile
from gateway.protocol.pb import inference_pb2 as pb
from gateway.types import TensorSpec
from loadtests.httpclient import HttpClient, HttpFailure, request_bytes
from loadtests.restcall import RestCall, check_rest_answer
from loadtests.signature import ModelSignature, check_response, feeds

INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
Mode = Literal["closed", "open"]

# Room for the processes to reach the start line after "go"; warm-up absorbs any excess.
START_MARGIN_S = 0.05
SETUP_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------- statistics


def merge_samples(parts: Sequence[Sequence[float] | np.ndarray]) -> np.ndarray:
    """All processes' samples in one ascending array: percentiles of the union, never of percentiles."""
    if not parts:
        return np.empty(0)
    merged = np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])
    merged.sort()
    return merged


def latency_summary_ms(samples_s: np.ndarray) -> dict[str, float]:
    ordered = samples_s if _is_sorted(samples_s) else np.sort(samples_s)
    ms = 1000.0
    return {
        "p50_ms": quantile(ordered, 0.50) * ms,
        "p90_ms": quantile(ordered, 0.90) * ms,
        "p99_ms": quantile(ordered, 0.99) * ms,
        "max_ms": float(ordered[-1]) * ms if len(ordered) else math.nan,
        "mean_ms": float(ordered.mean()) * ms if len(ordered) else math.nan,
    }


def _is_sorted(values: np.ndarray) -> bool:
    return len(values) < 2 or bool(np.all(values[:-1] <= values[1:]))


def arrival_times(begin: float, rate: float, seed: int) -> Iterator[float]:
    """Poisson arrivals after `begin`: exponential gaps with mean 1/rate, the same for the same seed."""
    rng = random.Random(seed)
    scheduled = begin
    while True:
        scheduled += rng.expovariate(rate)
        yield scheduled


# --------------------------------------------------------------------------- one point


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadSpec:
    """One measurement point, as every client process receives it."""

    address: str
    payload: bytes
    rows: int
    outputs: tuple[TensorSpec, ...]
    mode: Mode
    offered: float  # closed: concurrency; open: requests per second
    duration_s: float
    warmup_s: float
    channels: int
    request_timeout_s: float
    seed: int = 0
    max_outstanding: int = 4096  # per process, open loop: beyond it arrivals are dropped and counted
    # Set: the point runs over REST, `address` is the REST binding's and `payload` is unused.
    rest: RestCall | None = None


@dataclass(slots=True)
class WorkerResult:
    latencies: array.array[float] = field(default_factory=lambda: array.array("d"))
    completed_in_window: int = 0  # OK responses that arrived inside the window: the throughput
    errors: dict[str, int] = field(default_factory=dict)
    warmup_errors: dict[str, int] = field(default_factory=dict)  # not measured, but a sign of trouble
    scheduled: int = 0  # open loop: arrivals inside the window
    dropped: int = 0  # open loop: arrivals not sent because too many were outstanding
    send_lag_s: float = 0.0  # open loop: summed lateness of actual sends behind the schedule
    cpu_s: float = 0.0
    late_start_s: float = 0.0
    problem: str | None = None

    def error(self, code: str, measured: bool = True) -> None:
        errors = self.errors if measured else self.warmup_errors
        errors[code] = errors.get(code, 0) + 1


@dataclass(slots=True)
class PointResult:
    mode: Mode
    offered: float
    duration_s: float
    completed: int
    errors: dict[str, int]
    warmup_errors: dict[str, int]
    throughput_rps: float
    rows_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    client_cpu_s: float
    client_cpu_share: float
    processes: int
    channels: int
    scheduled: int = 0
    dropped: int = 0
    success_ratio: float = 1.0
    send_lag_ms: float = 0.0
    late_start_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def merge_results(spec: LoadSpec, parts: Sequence[WorkerResult], client_cores: int) -> PointResult:
    merged = merge_samples([p.latencies for p in parts])
    errors: dict[str, int] = {}
    warmup_errors: dict[str, int] = {}
    for part in parts:
        for merged_into, source in ((errors, part.errors), (warmup_errors, part.warmup_errors)):
            for code, count in source.items():
                merged_into[code] = merged_into.get(code, 0) + count
    completed_in_window = sum(p.completed_in_window for p in parts)
    cpu = sum(p.cpu_s for p in parts)
    scheduled = sum(p.scheduled for p in parts)
    completed = len(merged)
    throughput = completed_in_window / spec.duration_s
    sent = scheduled - sum(p.dropped for p in parts)
    latency = latency_summary_ms(merged)
    return PointResult(
        mode=spec.mode,
        offered=spec.offered,
        duration_s=spec.duration_s,
        completed=completed,
        errors=errors,
        warmup_errors=warmup_errors,
        throughput_rps=throughput,
        rows_per_s=throughput * spec.rows,
        p50_ms=latency["p50_ms"],
        p90_ms=latency["p90_ms"],
        p99_ms=latency["p99_ms"],
        max_ms=latency["max_ms"],
        mean_ms=latency["mean_ms"],
        client_cpu_s=cpu,
        client_cpu_share=cpu / (spec.duration_s * max(1, client_cores)),
        processes=len(parts),
        channels=spec.channels,
        scheduled=scheduled,
        dropped=sum(p.dropped for p in parts),
        success_ratio=(completed / scheduled) if scheduled else (1.0 if not errors else 0.0),
        send_lag_ms=(sum(p.send_lag_s for p in parts) / sent * 1000.0) if sent > 0 else 0.0,
        late_start_s=max((p.late_start_s for p in parts), default=0.0),
    )


# --------------------------------------------------------------------------- client process


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


Send = Callable[[], Awaitable[Any]]


class _Recorder:
    def __init__(self, spec: LoadSpec, window: tuple[float, float], check: Callable[[Any], str | None]) -> None:
        self.spec = spec
        self.start, self.end = window
        self.result = WorkerResult()
        self.verified = False
        self._check = check

    def verify(self, data: Any) -> None:
        self.verified = True
        try:
            self.result.problem = self._check(data)
        except Exception as exc:  # an unparseable response is a finding, not a crash
            self.result.problem = f"response does not parse: {exc}"


@dataclass(slots=True)
class _Transport:
    """How one process sends the point's requests, over gRPC or REST, and what a failure looks like."""

    sends: list[Send]  # closed loop: one per slot; open loop: the ones arrivals take in turn
    failure: type[Exception]
    code: Callable[[Any], str]  # a failure's error code, as the report counts it
    check: Callable[[Any], str | None]  # what is wrong with an answer (None: nothing)
    close: Callable[[], Awaitable[None]]


def _make_channels(spec: LoadSpec, index: int, count: int) -> list[Any]:
    from grpc import aio

    channels = []
    for k in range(count):
        options = [
            # Own subchannels and a distinct argument per channel: each gets its own TCP
            # connection, which the kernel spreads over SO_REUSEPORT server processes.
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.primary_user_agent", f"gateway-bench/p{index}c{k}"),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        channels.append(aio.insecure_channel(spec.address, options=options))
    return channels


def _grpc_code(exc: Any) -> str:
    return str(exc.code().name)


def _check_grpc(spec: LoadSpec, data: bytes) -> str | None:
    return check_response(pb.ModelInferResponse.FromString(data), spec.outputs, spec.rows)


async def _grpc_transport(spec: LoadSpec, index: int, slots: int) -> _Transport:
    from grpc import aio

    count = max(1, min(spec.channels, slots)) if spec.mode == "closed" else max(1, spec.channels)
    channels = _make_channels(spec, index, count)

    async def close() -> None:
        for channel in channels:
            await channel.close()

    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), SETUP_TIMEOUT_S)
    except BaseException:
        await close()
        raise
    # The request as bytes, bound once: a call is then one C-level call, no protobuf.
    calls: list[Send] = [
        partial(
            c.unary_unary(INFER_PATH, request_serializer=None, response_deserializer=None),
            spec.payload,
            timeout=spec.request_timeout_s,
        )
        for c in channels
    ]
    sends = [calls[i % len(calls)] for i in range(slots)] if spec.mode == "closed" else calls
    return _Transport(sends, aio.AioRpcError, _grpc_code, partial(_check_grpc, spec), close)


def _http_code(exc: Any) -> str:
    return str(exc.code)


async def _http_transport(spec: LoadSpec, slots: int) -> _Transport:
    rest = spec.rest
    assert rest is not None
    client = HttpClient(
        spec.address, request_bytes(spec.address, rest.path, rest.body, rest.headers), spec.request_timeout_s
    )

    async def close() -> None:
        client.close()
        await asyncio.sleep(0)  # let the transports finish closing

    sends: list[Send]
    try:
        if spec.mode == "closed":
            # HTTP/1.1 carries one request at a time: a connection per request in flight.
            opened = [client.slot() for _ in range(slots)]
            await asyncio.wait_for(asyncio.gather(*(s.open() for s in opened)), SETUP_TIMEOUT_S)
            sends = [s.call for s in opened]
        else:
            pool = client.pool()
            await asyncio.wait_for(pool.open(max(1, spec.channels)), SETUP_TIMEOUT_S)
            sends = [pool.call]
    except BaseException:
        await close()
        raise
    check = partial(check_rest_answer, outputs=spec.outputs, rows=spec.rows)
    return _Transport(sends, HttpFailure, _http_code, check, close)


async def _closed_slot(send: Send, transport: _Transport, rec: _Recorder) -> None:
    start, end, result = rec.start, rec.end, rec.result
    failure, code = transport.failure, transport.code
    samples = result.latencies
    now = time.monotonic
    while True:
        t0 = now()
        if t0 >= end:
            return
        try:
            data = await send()
        except failure as exc:
            t1 = now()
            if t1 < end:
                result.error(code(exc), measured=t1 >= start)
            continue
        t1 = now()
        if not rec.verified:
            rec.verify(data)
        if start <= t1 < end:
            samples.append(t1 - t0)
            result.completed_in_window += 1


async def _open_sender(transport: _Transport, rate: float, seed: int, begin: float, rec: _Recorder) -> None:
    spec, start, end = rec.spec, rec.start, rec.end
    timeout, result = spec.request_timeout_s, rec.result
    sends, failure, code = transport.sends, transport.failure, transport.code
    now = time.monotonic
    pending: set[asyncio.Task[None]] = set()

    async def one(send: Send, scheduled: float, counted: bool) -> None:
        try:
            data = await send()
        except failure as exc:
            result.error(code(exc), measured=counted)
            return
        t1 = now()
        if not rec.verified:
            rec.verify(data)
        if start <= t1 < end:
            result.completed_in_window += 1
        if counted:
            result.latencies.append(t1 - scheduled)

    sent = 0
    for scheduled in arrival_times(begin, rate, seed):
        if scheduled >= end:
            break
        delay = scheduled - now()
        if delay > 0:
            await asyncio.sleep(delay)
        counted = scheduled >= start
        if counted:
            result.scheduled += 1
        if len(pending) >= spec.max_outstanding:
            if counted:
                result.dropped += 1
            continue
        if counted:
            result.send_lag_s += max(0.0, now() - scheduled)
        task = asyncio.create_task(one(sends[sent % len(sends)], scheduled, counted))
        sent += 1
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        _, late = await asyncio.wait(pending, timeout=timeout + 1.0)
        for task in late:
            task.cancel()


async def _measure_cpu(rec: _Recorder) -> None:
    await asyncio.sleep(max(0.0, rec.start - time.monotonic()))
    before = _cpu_seconds()
    await asyncio.sleep(max(0.0, rec.end - time.monotonic()))
    rec.result.cpu_s = _cpu_seconds() - before


async def _run_point(spec: LoadSpec, index: int, processes: int, conn: multiprocessing.connection.Connection) -> None:
    slots = split_evenly(int(spec.offered), processes)[index] if spec.mode == "closed" else 0
    if spec.rest is None:
        transport = await _grpc_transport(spec, index, slots)
    else:
        transport = await _http_transport(spec, slots)
    try:
        conn.send(("ready", None))
        # Blocking here is harmless: nothing else runs on this loop until "go".
        if not conn.poll(SETUP_TIMEOUT_S):
            raise TimeoutError("no 'go' from the bench")
        _, begin = conn.recv()
        begin = float(begin)
        window = (begin + spec.warmup_s, begin + spec.warmup_s + spec.duration_s)
        rec = _Recorder(spec, window, transport.check)
        rec.result.late_start_s = max(0.0, time.monotonic() - begin)
        await asyncio.sleep(max(0.0, begin - time.monotonic()))
        tasks = [asyncio.create_task(_measure_cpu(rec))]
        if spec.mode == "closed":
            tasks += [asyncio.create_task(_closed_slot(send, transport, rec)) for send in transport.sends]
        else:
            rate = spec.offered / processes
            tasks.append(asyncio.create_task(_open_sender(transport, rate, spec.seed * 1_000_003 + index, begin, rec)))
        limit = window[1] - time.monotonic() + spec.request_timeout_s + 2.0
        _, late = await asyncio.wait(tasks, timeout=limit)
        for task in late:
            task.cancel()
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        conn.send(("result", rec.result))
    finally:
        await transport.close()


def _run_loop(coroutine: Coroutine[Any, Any, None]) -> None:
    # uvloop cost the clients about a tenth less CPU per request than asyncio's loop here.
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)
    else:
        uvloop.run(coroutine)


def _client_main(index: int, conn: multiprocessing.connection.Connection, cpus: Sequence[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] == "stop":
            return
        _, spec, processes = message
        try:
            _run_loop(_run_point(spec, index, processes, conn))
        except BaseException:
            conn.send(("error", f"client process {index}:\n{traceback.format_exc()}"))


class ClientPool:
    """Client processes, spawned once (pinned to the client CPUs) and reused for every point."""

    def __init__(self, processes: int, cpus: Sequence[int] | None) -> None:
        context = multiprocessing.get_context("spawn")
        self.processes = processes
        self.cpus = list(cpus) if cpus else None
        self._conns: list[multiprocessing.connection.Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        for index in range(processes):
            parent, child = context.Pipe()
            proc = context.Process(
                target=_client_main, args=(index, child, self.cpus), name=f"bench-client-{index}", daemon=True
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    @property
    def client_cores(self) -> int:
        return len(self.cpus) if self.cpus else (os.cpu_count() or 1)

    def _receive(self, conn: multiprocessing.connection.Connection, timeout: float, expect: str) -> Any:
        try:
            if not conn.poll(timeout):
                raise TimeoutError(f"a client process sent no {expect!r} within {timeout:.0f} s")
            kind, payload = conn.recv()
        except (EOFError, OSError) as exc:
            raise RuntimeError(f"a client process died (waiting for {expect!r}): {exc!r}") from None
        if kind == "error":
            raise RuntimeError(payload)
        if kind != expect:
            raise RuntimeError(f"client process sent {kind!r}, expected {expect!r}")
        return payload

    def run(self, spec: LoadSpec, on_window: Callable[[float, float], dict[str, Any]] | None = None) -> PointResult:
        """Run one point on every process; `on_window(start, end)` runs here meanwhile (server-side samples)."""
        for conn in self._conns:
            conn.send(("run", spec, self.processes))
        for conn in self._conns:
            self._receive(conn, SETUP_TIMEOUT_S + 5.0, "ready")
        begin = time.monotonic() + START_MARGIN_S
        for conn in self._conns:
            conn.send(("go", begin))
        start = begin + spec.warmup_s
        end = start + spec.duration_s
        extra = on_window(start, end) if on_window else {}
        limit = max(0.0, end - time.monotonic()) + spec.request_timeout_s + 10.0
        parts = [self._receive(conn, limit, "result") for conn in self._conns]
        point = merge_results(spec, parts, self.client_cores)
        point.extra.update(extra)
        problems = {p.problem for p in parts if p.problem}
        if problems:
            point.extra["response_problem"] = "; ".join(sorted(problems))
        return point

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(("stop", None))
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for conn in self._conns:
            conn.close()

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- in-process onnxruntime


def pin_current_process(cpus: Sequence[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


def ort_points(
    signature: ModelSignature, batches: Sequence[int], *, warmup_s: float, duration_s: float, intra_op_threads: int = 0
) -> list[dict[str, Any]]:
    """session.run in a loop at each batch size in turn: the compute limit, no serving at all.

    Runs in a process pinned to the server's CPUs, with the session options the
    gateway uses, so the comparison is compute against compute plus serving. One
    session serves every batch size, as one gateway session serves every batch.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    session = ort.InferenceSession(str(signature.path), sess_options=options, providers=["CPUExecutionProvider"])
    return [_ort_point(session, signature, b, warmup_s=warmup_s, duration_s=duration_s) for b in batches]


def _ort_point(
    session: Any, signature: ModelSignature, batch: int, *, warmup_s: float, duration_s: float
) -> dict[str, Any]:
    values = feeds(signature, batch)
    names = [o.name for o in signature.outputs]
    now = time.monotonic
    cpu_before = 0.0
    begin = now()
    start, end = begin + warmup_s, begin + warmup_s + duration_s
    samples: list[float] = []
    measuring = False
    while True:
        t0 = now()
        if t0 >= end:
            break
        if not measuring and t0 >= start:
            measuring, cpu_before = True, _cpu_seconds()
        session.run(names, values)
        if measuring:
            samples.append(now() - t0)
    elapsed = sum(samples)
    cpu = _cpu_seconds() - cpu_before
    runs = len(samples)
    return {
        "batch": batch,
        "runs": runs,
        # Back-to-back runs: throughput over the time spent in run(), the purest compute rate.
        "runs_per_s": runs / elapsed if elapsed else 0.0,
        "rows_per_s": runs * batch / elapsed if elapsed else 0.0,
        "server_cpu_s": cpu,
        **latency_summary_ms(np.sort(np.asarray(samples))),
    }
