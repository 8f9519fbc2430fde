"""The executor's side: front ends connect, and their requests go to each version's executor.

Each request record becomes numpy views of its slot (no copy) submitted to the
version's executor, the same DynamicBatcher a worker runs in-process: its batching,
bounded queue, deadlines and cancellation hold across the process boundary
unchanged. The outputs are written back into the request's slot, then the reply
is sent; after it the slot is the front end's again, so nothing of this process
touches a slot after replying.

A front end that goes away (end of file, kill -9 included) has its requests
cancelled and its arena unmapped once no run still reads from it.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import logging
import math
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from gateway.errors import InvalidInput, ModelExecutionError, ModelNotFound, ShadowLate, ShadowShed
from gateway.serving.executor import Executor
from gateway.serving.remote import records as rec
from gateway.serving.remote.arena import Arena, round_to_page
from gateway.serving.remote.channel import Channel, recv_with_fds, socket_path
from gateway.serving.remote.priority import ShadowGate
from gateway.serving.repository import check_name
from gateway.serving.statistics import VersionStats
from gateway.types import RunTiming, TensorSpec

if TYPE_CHECKING:
    from gateway.serving.remote.catalog import Catalog

log = logging.getLogger(__name__)

# A slot for tensors with a variable dimension other than the batch: their size is
# not known from the signature, so the slot takes this (or max_request_bytes, if smaller).
DYNAMIC_SLOT_BYTES = 16 << 20
HANDSHAKE_TIMEOUT_S = 10.0
# How long a departed front end's arena may stay mapped while runs still read it.
RELEASE_WAIT_S = 60.0


@dataclass(frozen=True, slots=True)
class Served:
    """One model version this executor runs, under the id front ends name it by."""

    id: int
    model: str
    version: str
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]
    executor: Executor
    # Counted by the version's batcher for every front end's requests (answered to STATS).
    stats: VersionStats = field(default_factory=VersionStats)

    def describe(self) -> dict[str, object]:
        def tensors(specs: Sequence[TensorSpec]) -> list[list[object]]:
            return [[s.name, s.datatype, list(s.shape)] for s in specs]

        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "inputs": tensors(self.inputs),
            "outputs": tensors(self.outputs),
        }


def tensors_bytes(specs: Sequence[TensorSpec], rows: int) -> int | None:
    """Bytes of the table and data for `specs` at `rows` rows; None when a size is not fixed."""
    tensors = []
    for spec in specs:
        shape = [rows if (i == 0 and d < 0) else d for i, d in enumerate(spec.shape)]
        if min(shape, default=0) < 0:
            return None
        tensors.append((len(shape), math.prod(shape) * spec.dtype.itemsize))
    return rec.layout(tensors)[1]


def slot_bytes_for(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], rows: int, max_request: int) -> int:
    """A slot that holds the largest valid request's inputs and its outputs.

    A request's rows are at most max_batch_size (validation refuses more), so for
    a signature whose only variable dimension is the batch this is exact."""
    sizes = [tensors_bytes(inputs, rows), tensors_bytes(outputs, rows)]
    fallback = min(DYNAMIC_SLOT_BYTES, max_request + 64 * 1024)
    return round_to_page(max(fallback if s is None else s for s in sizes))


class ExecutorServer:
    def __init__(self, catalog: Catalog, slot_bytes: int) -> None:
        self.catalog = catalog
        self.slot_bytes = slot_bytes
        self.connections: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.gate = ShadowGate()  # primaries first: when shadow copies may run

    async def serve(self, listener: socket.socket) -> None:
        """Accept front ends until cancelled."""
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        while True:
            sock, _ = await loop.sock_accept(listener)
            self._spawn(self._handshake(sock))

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handshake(self, sock: socket.socket) -> None:
        """Send the versions, take the front end's arena; then the connection runs on callbacks."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        fds: list[int] = []
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                await loop.sock_sendall(sock, self._hello())
                data, fds = await recv_with_fds(sock, rec.RECORD_BYTES, 1)
            if not fds:
                raise ValueError("the arena record came without its descriptor")
            slots, slot_bytes = rec.decode_arena(data)
            fd = fds.pop()
            arena = Arena.attach(fd, slots, slot_bytes)  # owns fd from here, closed on failure too
        except (OSError, ValueError, TimeoutError) as exc:
            log.warning("a front end's handshake failed: %s", exc)
            for fd in fds:
                os.close(fd)
            sock.close()
            return
        self.connections.add(Connection(self, sock, arena))

    def _hello(self) -> bytes:
        """The versions served now (run-time loads included), for a front end that connects."""
        versions = [v.describe() for v in self.catalog.current_versions()]
        return (
            bytes([rec.HELLO])
            + json.dumps({"pid": os.getpid(), "slot_bytes": self.slot_bytes, "versions": versions}).encode()
        )

    def lost(self, connection: Connection) -> None:
        self.connections.discard(connection)
        self.catalog.drop(connection)
        self._spawn(connection.release())

    async def close(self) -> None:
        """Disconnect every front end (their requests are cancelled) and wait until their arenas are unmapped."""
        for connection in list(self.connections):
            connection.channel.close()
            self.lost(connection)
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class Connection:
    """One front end: its arena, its socket, and its requests being served (by sequence number)."""

    def __init__(self, server: ExecutorServer, sock: socket.socket, arena: Arena) -> None:
        self.server = server
        self.arena = arena
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self._loop = asyncio.get_running_loop()
        self.channel = Channel(sock, self._on_record, self._on_close)

    def _on_record(self, data: memoryview) -> None:
        kind = data[0]
        if kind == rec.REQUEST:
            self._request(rec.decode_request(data))
        elif kind == rec.CANCEL:
            task = self.tasks.get(rec.decode_request(data).seq)
            if task is not None:
                task.cancel()  # the batcher drops it if not yet dispatched; the task then replies CANCELLED
        elif kind == rec.STATS:
            self._statistics(rec.decode_request(data))
        elif kind == rec.HOLD:
            self.server.catalog.hold(self, rec.decode_request(data).version)
        elif kind == rec.RELEASE:
            self.server.catalog.release(self, rec.decode_request(data).version)
        elif kind == rec.LOAD:
            self._load(rec.decode_request(data))

    def _load(self, request: rec.Request) -> None:
        """Load a model (its name in the slot) at run time; the reply's one uint8 tensor is the
        JSON list of its versions (as in HELLO). Cancelled with the front end's other requests."""
        if request.slot >= self.arena.slots:
            log.warning("a front end named slot %d of %d: ignored", request.slot, self.arena.slots)
            return
        task = self._loop.create_task(self._run_load(request))
        self.tasks[request.seq] = task
        task.add_done_callback(lambda _: self.tasks.pop(request.seq, None))

    async def _run_load(self, request: rec.Request) -> None:
        arena = self.arena
        try:
            (name,) = rec.read_tensors(arena.view, arena.base(request.slot), arena.slot_bytes, 1)
            model = name.tobytes().decode("utf-8")
            del name  # a view of the slot
            served = await self.server.catalog.load(check_name("model", model))
            described = json.dumps([v.describe() for v in served]).encode()
            rec.write_tensors(
                arena.view, arena.base(request.slot), arena.slot_bytes, [np.frombuffer(described, np.uint8)]
            )
        except (ValueError, UnicodeDecodeError, rec.SlotTooSmall) as exc:
            self._error(request, InvalidInput(f"bad load record: {exc}"))
            return
        except Exception as exc:
            self._error(request, exc)
            return
        if not self.channel.closed:
            self.channel.send(rec.encode_reply(request.slot, request.seq, rec.OK, 1))

    def _served(self, request: rec.Request) -> Served | None:
        """The version a record names, or None (a slot out of range is ignored, an unknown
        version answered NOT_FOUND)."""
        if request.slot >= self.arena.slots:
            log.warning("a front end named slot %d of %d: ignored", request.slot, self.arena.slots)
            return None
        served = self.server.catalog.get(request.version)
        if served is None:
            self._error(request, ModelNotFound(f"the executor has no version with id {request.version}"))
        return served

    def _statistics(self, request: rec.Request) -> None:
        """A version's counters, as two int64 tensors in the request's slot (a rare call: no task)."""
        served = self._served(request)
        if served is None:
            return
        s = served.stats
        counters = np.array(
            [s.execution_count, s.compute_infer.count, s.compute_infer.ns, s.queue.count, s.queue.ns], np.int64
        )
        sizes = sorted(s.by_batch_size.items())
        batches = np.array([(size, d.count, d.ns) for size, d in sizes], np.int64).reshape(len(sizes), 3)
        try:
            rec.write_tensors(
                self.arena.view, self.arena.base(request.slot), self.arena.slot_bytes, [counters, batches]
            )
        except rec.SlotTooSmall as exc:
            self._error(request, ModelExecutionError(f"the statistics cannot be returned: {exc}"))
            return
        self.channel.send(rec.encode_reply(request.slot, request.seq, rec.OK, 2))

    def _request(self, request: rec.Request) -> None:
        served = self._served(request)
        if served is None:
            return
        try:
            arena = self.arena
            arrays = rec.read_tensors(arena.view, arena.base(request.slot), arena.slot_bytes, request.tensors)
            if len(arrays) != len(served.inputs):
                raise ValueError(f"{len(arrays)} inputs for a model with {len(served.inputs)}")
        except ValueError as exc:
            self._error(request, InvalidInput(f"bad request record: {exc}"))
            return
        feeds = {spec.name: a for spec, a in zip(served.inputs, arrays, strict=True)}
        if request.flags & rec.SHADOW:
            task = self._loop.create_task(self._run_shadow(request, served.executor, feeds))
        else:
            self.server.gate.primary_started()  # until its task ends (_ended)
            task = self._loop.create_task(self._run(request, served.executor, feeds))
        self.tasks[request.seq] = task
        task.add_done_callback(functools.partial(self._ended, request))

    def _ended(self, request: rec.Request, task: asyncio.Task[None]) -> None:
        """A request's task ended. A cancelled one (perhaps before it ever ran) replies here."""
        self.tasks.pop(request.seq, None)
        if not request.flags & rec.SHADOW:
            self.server.gate.primary_ended()
        if task.cancelled():
            self._reply(request, rec.CANCELLED, "cancelled")

    async def _run_shadow(self, request: rec.Request, executor: Executor, feeds: dict[str, np.ndarray]) -> None:
        """A shadow copy: it waits for its turn (no primary in the executor), then runs as any request."""
        gate = self.server.gate
        try:
            await gate.admit(rec.optional_time(request.deadline))
        except BaseException as exc:
            # No frame of a refused or cancelled shadow may keep views of the slot (see release).
            del feeds
            if not isinstance(exc, (ShadowShed, ShadowLate)):
                raise
            self._error(request, exc)
            return
        run = self._run(request, executor, feeds)
        del feeds  # the run's own frame lets go of them when it ends
        try:
            await run
        finally:
            gate.done()

    async def _run(self, request: rec.Request, executor: Executor, feeds: dict[str, np.ndarray]) -> None:
        timing = RunTiming() if request.flags & rec.TRACED else None
        try:
            outputs = await executor.submit(
                feeds, request.rows, rec.optional_time(request.deadline), rec.optional_time(request.timeout), timing
            )
        except Exception as exc:
            self._error(request, exc)
            return
        finally:
            del feeds  # the views of the slot: the arena is unmapped once none is left
        try:
            rec.write_tensors(self.arena.view, self.arena.base(request.slot), self.arena.slot_bytes, outputs)
        except (rec.SlotTooSmall, TypeError) as exc:
            self._error(request, ModelExecutionError(f"the outputs cannot be returned: {exc}"))
            return
        stamps = (0, 0, 0.0, 0.0, 0, 0)
        if timing is not None:
            t = timing
            stamps = (t.rows, t.requests, t.enqueued, t.dequeued, t.started_ns, t.ended_ns)
        self.channel.send(rec.encode_reply(request.slot, request.seq, rec.OK, len(outputs), 0, stamps))

    def _error(self, request: rec.Request, exc: BaseException) -> None:
        code = rec.error_code(exc)
        if code == rec.INTERNAL:
            log.error("a request failed in the executor: %r", exc)
        self._reply(request, code, str(exc))

    def _reply(self, request: rec.Request, code: int, message: str) -> None:
        if self.channel.closed:
            return
        length = rec.write_message(self.arena.view, self.arena.base(request.slot), self.arena.slot_bytes, message)
        self.channel.send(rec.encode_reply(request.slot, request.seq, code, 0, length))

    def _on_close(self) -> None:
        self.server.lost(self)

    async def _cancel_requests(self) -> None:
        """Cancel every request of this front end and wait until each has ended.

        Its own coroutine: a cancelled task keeps its CancelledError, whose traceback holds
        the batcher's frame and so the request's views of the slot; no local may outlive this."""
        tasks = list(self.tasks.values())
        log.info("a front end left; cancelling its %d requests", len(tasks))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def release(self) -> None:
        """After the front end left: cancel its requests, then unmap its arena once no run reads it."""
        await self._cancel_requests()
        # A batch already dispatched may still hold views of the slots (a run on a thread):
        # it ends by itself, and the mapping is released after it. Nothing signals when a
        # pool thread drops its last view: a short poll, once per departed front end.
        loop = self._loop
        give_up = loop.time() + RELEASE_WAIT_S
        next_collect = loop.time() + 0.05
        while not self.arena.close():
            if loop.time() > give_up:
                log.warning("a departed front end's arena is still referenced after %.0f s", RELEASE_WAIT_S)
                return
            if loop.time() >= next_collect:
                # Views held only by reference cycles (an error's traceback and a frame) last
                # until a collection: run one (rare: once a second at most, and only while a
                # departed front end's arena waits to be unmapped).
                gc.collect()
                next_collect = loop.time() + 1.0
                continue
            await asyncio.sleep(0.01)
        log.info("a departed front end's arena is unmapped")


def listen(address: str) -> socket.socket:
    """A listening record socket; an address starting with @ is in the abstract namespace (no file)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(socket_path(address))
    sock.listen(128)
    return sock
