"""The front end's side: a connection to an executor process, and an Executor per version on it.

`RemoteExecutor` has the interface of the in-process executors (gateway.serving.executor),
so a LoadedVersion can hold one unchanged. A request's feeds are copied once, into a
free slot of this front end's arena; a record goes to the executor, and the reply
(read by the loop's reader callback) settles the request's future with the outputs,
copied out of the slot, or with the error the executor's batcher raised.

A slot is owned by exactly one party at a time: by `submit` until its record is
sent, then by the call table until the executor's final reply for it (or the
executor's death) frees it. A cancelled request keeps its slot until the executor
says it dropped the request (or ran it): the executor may still be reading it.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.errors import Draining, InvalidInput, Overloaded
from gateway.serving.executor import Executor
from gateway.serving.remote import records as rec
from gateway.serving.remote.arena import Arena, SlotPool
from gateway.serving.remote.channel import Channel, socket_path
from gateway.serving.statistics import Duration, VersionStats
from gateway.types import RunTiming, Tensors, TensorSpec

DEFAULT_SLOTS = 256


class ExecutorLost(Draining):
    """The executor process is gone (it died or closed the connection): answered UNAVAILABLE,
    as Draining is, since another try may reach a restarted executor."""


@dataclass(frozen=True, slots=True)
class RemoteVersion:
    """A version as the executor described it at the handshake."""

    id: int
    model: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(slots=True)
class _Untracked:
    """The owner of a call no version counts (a load)."""

    in_flight: int = 0


@dataclass(slots=True, eq=False)
class _Call:
    future: asyncio.Future[list[np.ndarray]]
    slot: int
    owner: RemoteExecutor | _Untracked
    timing: RunTiming | None
    cancelled: bool = field(default=False)


def _specs(described: Sequence[Sequence[Any]]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(str(name), str(datatype), tuple(shape)) for name, datatype, shape in described)


def _version(v: dict[str, Any]) -> RemoteVersion:
    return RemoteVersion(int(v["id"]), v["model"], v["version"], _specs(v["inputs"]), _specs(v["outputs"]))


class RemoteConnection:
    """This front end's link to one executor process: its arena, socket and calls in flight."""

    def __init__(self, sock: socket.socket, arena: Arena, hello: dict[str, Any]) -> None:
        self.arena = arena
        self.slots = SlotPool(arena.slots)
        self.executor_pid = int(hello["pid"])
        self.versions: dict[tuple[str, str], RemoteVersion] = {}
        for v in hello["versions"]:
            info = _version(v)
            self.versions[(info.model, info.version)] = info
        self.lost = False
        # Called once when the executor goes (not on close()): the link connects again.
        self.on_lost: Callable[[], None] | None = None
        self._calls: dict[int, _Call] = {}
        self._seq = 0
        self.channel = Channel(sock, self._on_record, self._on_close)

    @classmethod
    async def connect(cls, address: str, slots: int = DEFAULT_SLOTS, slot_bytes: int = 0) -> RemoteConnection:
        """Connect to the executor listening at `address` (@name: abstract namespace) and hand it an arena.

        `slot_bytes` 0 takes the executor's size (the largest valid request or answer of any
        version it serves)."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        arena: Arena | None = None
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, socket_path(address))
            data = await loop.sock_recv(sock, 1 << 20)
            if not data or data[0] != rec.HELLO:
                raise ConnectionError(f"no executor at {address} (got {data[:16]!r})")
            hello = json.loads(data[1:])
            arena = Arena.create(slots, slot_bytes or int(hello["slot_bytes"]))
            # The one record with a descriptor; a fresh socket's buffer is empty, so it never blocks.
            socket.send_fds(sock, [rec.encode_arena(arena.slots, arena.slot_bytes)], [arena.fd])
            return cls(sock, arena, hello)
        except BaseException:
            sock.close()
            if arena is not None:
                arena.close()
            raise

    def executor(self, model: str, version: str) -> RemoteExecutor:
        info = self.versions.get((model, version))
        if info is None:
            raise KeyError(f"the executor does not serve {model} version {version}")
        executor = RemoteExecutor(self, info)
        self.hold(info.id, True)
        return executor

    def hold(self, version_id: int, held: bool) -> None:
        """Tell the executor an executor of this version was made (or closed): it retires a
        version no front end holds."""
        if not self.lost and not self.channel.closed:
            self.channel.send(rec.encode_hold(version_id, held))

    async def load(self, model: str) -> list[RemoteVersion]:
        """Have the executor serve `model` as its files are now (built afresh only if they changed
        since its last load there); its versions replace this connection's view of the model.

        Raises the executor's ModelLoadError (naming the file), or ExecutorLost."""
        if self.lost:
            raise ExecutorLost(f"the executor process (pid {self.executor_pid}) is gone")
        slot = self.slots.take()
        if slot is None:
            raise Overloaded(f"all {self.arena.slots} shared-memory slots are in use: try again later")
        try:
            name = np.frombuffer(model.encode("utf-8"), np.uint8)
            rec.write_tensors(self.arena.view, self.arena.base(slot), self.arena.slot_bytes, [name])
        except BaseException:
            self.slots.free(slot)
            raise
        seq = self.next_seq()
        (described,) = await self.start_call(_Untracked(), slot, rec.encode_load(slot, seq), seq, None).future
        versions = [_version(v) for v in json.loads(described.tobytes())]
        for key in [k for k in self.versions if k[0] == model]:
            del self.versions[key]
        for info in versions:
            self.versions[(info.model, info.version)] = info
        return versions

    def in_flight(self) -> int:
        return len(self._calls)

    # -- calls ---------------------------------------------------------------------------

    def next_seq(self) -> int:
        """A request's number, unique on this connection (it names the request in replies and cancels)."""
        self._seq += 1
        return self._seq

    def start_call(
        self, owner: RemoteExecutor | _Untracked, slot: int, record: bytes, seq: int, timing: RunTiming | None
    ) -> _Call:
        """Send a request whose inputs are in `slot`: from here the call table owns the slot."""
        call = _Call(asyncio.get_running_loop().create_future(), slot, owner, timing)
        self._calls[seq] = call
        owner.in_flight += 1
        self.channel.send(record)
        return call

    def cancel_call(self, seq: int) -> None:
        """Ask the executor to drop a request; its slot stays taken until the executor's final reply."""
        call = self._calls.get(seq)
        if call is not None and not call.cancelled:
            call.cancelled = True
            self.channel.send(rec.encode_cancel(call.slot, seq))

    def _on_record(self, data: memoryview) -> None:
        reply = rec.decode_reply(data)
        call = self._calls.pop(reply.seq, None)
        if call is None:
            return
        try:
            call.owner.in_flight -= 1
            if call.future.done():
                return
            arena = self.arena
            base = arena.base(call.slot)
            if reply.code == rec.OK:
                views = rec.read_tensors(arena.view, base, arena.slot_bytes, reply.tensors)
                # Copied out: the slot is reused as soon as this returns.
                call.future.set_result([np.array(v) for v in views])
                del views
                if call.timing is not None:
                    _fill(call.timing, reply)
            else:
                message = rec.read_message(arena.view, base, reply.message_bytes)
                call.future.set_exception(rec.error_for(reply.code, message))
        except ValueError as exc:
            call.future.set_exception(rec.error_for(rec.INTERNAL, f"a bad reply from the executor: {exc}"))
        finally:
            self.slots.free(call.slot)

    def _on_close(self) -> None:
        """The executor is gone: every call in flight fails now, and its slot is free again."""
        self._fail_calls()
        if self.on_lost is not None:
            self.on_lost()

    def _fail_calls(self) -> None:
        self.lost = True
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call.owner.in_flight -= 1
            self.slots.free(call.slot)
            if not call.future.done():
                call.future.set_exception(ExecutorLost(f"the executor process (pid {self.executor_pid}) is gone"))

    async def close(self) -> None:
        """Disconnect: calls in flight fail as if the executor had gone, and the arena is unmapped."""
        if not self.channel.closed:
            self.channel.close()
            self._fail_calls()
        self.arena.close()


def _fill(timing: RunTiming, reply: rec.Reply) -> None:
    timing.rows, timing.requests = reply.rows, reply.requests
    timing.enqueued, timing.dequeued = reply.enqueued, reply.dequeued
    timing.started_ns, timing.ended_ns = reply.started_ns, reply.ended_ns


class RemoteExecutor:
    """One version run by the executor process: the Executor interface over a RemoteConnection."""

    def __init__(self, connection: RemoteConnection, version: RemoteVersion) -> None:
        self.connection = connection
        self.version = version
        self.in_flight = 0  # this version's requests sent and not yet answered
        self._closed = False

    def queue_depth(self) -> int:
        """This front end's requests at the executor, queued or running (its queue is shared)."""
        return self.in_flight

    def busy(self) -> bool:
        return self.in_flight > 0

    async def submit(
        self,
        feeds: Tensors,
        batch: int,
        deadline: float | None,
        timeout_s: float | None,
        timing: RunTiming | None = None,
        *,
        shadow: bool = False,
    ) -> list[np.ndarray]:
        """`shadow`: a shadow copy, which the executor runs only while no primary request is in it."""
        connection = self.connection
        if self._closed:
            raise Draining("the model is unloading")
        if connection.lost:
            raise ExecutorLost(f"the executor process (pid {connection.executor_pid}) is gone")
        try:
            arrays = [feeds[spec.name] for spec in self.version.inputs]
        except KeyError as exc:
            raise InvalidInput(f"missing input {exc.args[0]!r}") from None
        slot = connection.slots.take()
        if slot is None:
            raise Overloaded(f"all {connection.arena.slots} shared-memory slots are in use: try again later")
        arena = connection.arena
        try:
            rec.write_tensors(arena.view, arena.base(slot), arena.slot_bytes, arrays)
            seq = connection.next_seq()
            record = rec.encode_request(
                slot, seq, self.version.id, len(arrays), batch, deadline, timeout_s, timing is not None, shadow
            )
        except rec.SlotTooSmall as exc:
            connection.slots.free(slot)
            raise InvalidInput(
                f"the request's inputs need {exc.needed} bytes, more than an executor slot's {exc.size}: "
                "send fewer rows, or give the executor a larger slot size"
            ) from None
        except BaseException:
            connection.slots.free(slot)
            raise
        # From here the call table owns the slot: the reply (or the executor's end) frees it.
        call = connection.start_call(self, slot, record, seq, timing)
        try:
            return await call.future
        except asyncio.CancelledError:
            connection.cancel_call(seq)  # the executor drops it if not yet dispatched, then replies
            raise
        finally:
            del call

    def for_shadows(self) -> Executor:
        """This version's runner for shadow copies: the same connection, at the lower priority."""
        return ShadowRunner(self)

    async def pull_statistics(self, stats: VersionStats) -> None:
        """Put the executor's counts of this version's runs into `stats`: its model runs,
        their compute times by batch size, and the queue times of every front end's requests
        (the batches it ran hold them all). Requests answered stay this front end's own."""
        connection = self.connection
        if connection.lost:
            raise ExecutorLost(f"the executor process (pid {connection.executor_pid}) is gone")
        slot = connection.slots.take()
        if slot is None:
            raise Overloaded(f"all {connection.arena.slots} shared-memory slots are in use: try again later")
        seq = connection.next_seq()
        call = connection.start_call(self, slot, rec.encode_stats(slot, seq, self.version.id), seq, None)
        counters, batches = await call.future
        execution_count, compute_count, compute_ns, queue_count, queue_ns = (int(v) for v in counters)
        stats.execution_count = execution_count
        stats.compute_infer = Duration(compute_count, compute_ns)
        stats.queue = Duration(queue_count, queue_ns)
        stats.by_batch_size = {int(size): Duration(int(count), int(ns)) for size, count, ns in batches}

    @property
    def closed(self) -> bool:
        return self._closed

    def attach(self, connection: RemoteConnection, version: RemoteVersion) -> None:
        """Point at a new connection (the executor restarted), holding the version there."""
        self.connection, self.version = connection, version
        connection.hold(version.id, True)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.connection.hold(self.version.id, False)


class ShadowRunner:
    """A RemoteExecutor's shadow copies: sent marked SHADOW, so the executor serves primaries first.

    It goes through its owner, so it follows the owner to a restarted executor."""

    def __init__(self, owner: RemoteExecutor) -> None:
        self.owner = owner

    async def submit(
        self,
        feeds: Tensors,
        batch: int,
        deadline: float | None,
        timeout_s: float | None,
        timing: RunTiming | None = None,
    ) -> list[np.ndarray]:
        return await self.owner.submit(feeds, batch, deadline, timeout_s, timing, shadow=True)

    def queue_depth(self) -> int:
        return self.owner.queue_depth()

    def busy(self) -> bool:
        return self.owner.busy()

    async def close(self) -> None:
        """The owner's to close (it is the version's executor)."""
