"""Long-lived calls: how many streams one process keeps open, and for how long idle.

gRPC's `maximum_concurrent_rpcs` counts an open stream like a unary call for as
long as it stays open, so a few idle ModelStreamInfer streams used to hold every
slot and lock every other caller out. Streams get a cap of their own here (the
server adds it to `max_inflight`, so unary calls keep all of theirs); a stream
that waits longer than the idle limit for its client's next message is ended;
and a drain ends every stream at its next wait for a message, instead of
leaving open streams to grpc's shutdown, which answers calls arriving meanwhile
with CANCELLED.

Request-streaming calls (ModelStreamInfer, reflection) are ended only while
they wait for the client, never in the middle of a request. Server-push calls
(health Watch) have a cap of their own (max_watchers), so watchers can never
take the slots ModelStreamInfer needs (8 Watch calls once locked every stream
out at max_streams 8), and are ended by a drain. They are never ended for
idling: a watcher only waits for news by design (load balancers and grpc's
client-side health checking hold one Watch per connection, for as long as the
connection lives), so its silence says nothing about whether it is still wanted.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from gateway.protocol.wrapping import WrappingInterceptor

DRAIN_MESSAGE = "the server is shutting down; retry on another replica"
# A health watcher gets this long to receive NOT_SERVING before a drain ends its stream.
WATCH_FLUSH_S = 0.5


class StreamEnded(Exception):
    """The guard ends this stream: with `code` and `message` for the client."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Stream:
    """One open stream: its handler task, and whether it waits for the client now."""

    __slots__ = ("ended", "push", "task", "waiting")

    def __init__(self, task: asyncio.Task[Any] | None, push: bool) -> None:
        self.task = task
        self.push = push
        self.waiting = False
        self.ended: StreamEnded | None = None

    def end(self, reason: StreamEnded) -> None:
        # Only while it waits for a message: a request being answered is never cut.
        if self.waiting and self.ended is None and self.task is not None:
            self.ended = reason
            self.task.cancel()

    def take_cancel(self) -> StreamEnded | None:
        """After a CancelledError: our own ending (the cancel is consumed), or None (the client's)."""
        if self.ended is not None and self.task is not None:
            self.task.uncancel()
        return self.ended


class StreamGuard(WrappingInterceptor):
    """Caps open streams, ends idle ones, and ends all of them on drain."""

    def __init__(self, max_streams: int, idle_s: float, max_watchers: int) -> None:
        super().__init__()
        self.max_streams = max_streams
        self.max_watchers = max_watchers
        self.idle_s = idle_s
        self._open: set[_Stream] = set()
        self._watchers = 0  # of the open streams, those that push (health Watch)
        self._closing = False
        self._none_open = asyncio.Event()
        self._none_open.set()

    @property
    def open_streams(self) -> int:
        """Open request-streaming calls (ModelStreamInfer, reflection): what max_streams caps."""
        return len(self._open) - self._watchers

    @property
    def open_watchers(self) -> int:
        """Open server-push calls (health Watch): what max_watchers caps."""
        return self._watchers

    def close(self) -> None:
        """Drain: refuse new streams; end each open one at its next wait for a message."""
        self._closing = True
        loop = asyncio.get_running_loop()
        for stream in list(self._open):
            if stream.push:
                loop.call_later(WATCH_FLUSH_S, stream.end, _draining())
            else:
                stream.end(_draining())

    async def wait_closed(self) -> None:
        await self._none_open.wait()

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.stream_stream is not None:
            wrapped = grpc.stream_stream_rpc_method_handler(
                self._guard_requests(handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        elif handler.unary_stream is not None and not inspect.isasyncgenfunction(handler.unary_stream):
            # Health Watch writes with context.write and waits forever between changes.
            wrapped = grpc.unary_stream_rpc_method_handler(
                self._guard_push(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        else:
            wrapped = handler
        return wrapped

    def _admit(self, push: bool) -> _Stream:
        if self._closing:
            raise _draining()
        if push and self._watchers >= self.max_watchers:
            raise StreamEnded(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._watchers} health watchers are open on this server process, the most max_watchers "
                "allows: close unused Watch calls, or raise max_watchers (GATEWAY_MAX_WATCHERS)",
            )
        if not push and self.open_streams >= self.max_streams:
            raise StreamEnded(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.open_streams} streams are open on this server process, the most max_streams allows: "
                "close idle streams, or raise --max-streams",
            )
        stream = _Stream(asyncio.current_task(), push)
        self._open.add(stream)
        self._watchers += push
        self._none_open.clear()
        return stream

    def _release(self, stream: _Stream) -> None:
        if stream in self._open:
            self._open.remove(stream)
            self._watchers -= stream.push
        if not self._open:
            self._none_open.set()

    def _guard_requests(self, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        async def guarded(request_iterator: AsyncIterator[Any], context: aio.ServicerContext[Any, Any]) -> Any:
            try:
                stream = self._admit(push=False)
            except StreamEnded as refused:
                await _end(context, refused)
                return
            try:
                async for response in behavior(self._messages(request_iterator, stream), context):
                    yield response
            except StreamEnded as ended:
                await _end(context, ended)
            finally:
                self._release(stream)

        return guarded

    async def _messages(self, requests: AsyncIterator[Any], stream: _Stream) -> AsyncIterator[Any]:
        """The client's messages, ending the stream when it idles too long or the server drains."""
        loop = asyncio.get_running_loop()
        iterator = requests.__aiter__()
        while True:
            if self._closing:
                raise _draining()
            timer = loop.call_later(self.idle_s, stream.end, self._idle()) if self.idle_s > 0 else None
            stream.waiting = True
            try:
                message = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                ended = stream.take_cancel()
                if ended is None:
                    raise
                raise ended from None
            finally:
                stream.waiting = False
                if timer is not None:
                    timer.cancel()
            yield message
            # Not held through the wait for the next one (up to stream_idle_s).
            del message

    def _idle(self) -> StreamEnded:
        return StreamEnded(
            grpc.StatusCode.UNAVAILABLE,
            f"stream closed: no message for {self.idle_s:g} s (stream_idle_s); "
            "send more often, or open a new stream when there is work",
        )

    def _guard_push(self, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def guarded(request: Any, context: aio.ServicerContext[Any, Any]) -> None:
            try:
                stream = self._admit(push=True)
            except StreamEnded as refused:
                await _end(context, refused)
                return
            stream.waiting = True  # it only waits for news: a drain may end it at any time
            try:
                await behavior(request, context)
            except asyncio.CancelledError:
                ended = stream.take_cancel()
                if ended is None:
                    raise
                await _end(context, ended)
            finally:
                self._release(stream)

        return guarded


async def _end(context: aio.ServicerContext[Any, Any], ended: StreamEnded) -> None:
    try:
        await context.abort(ended.code, ended.message)
    except aio.AbortError:
        raise
    except Exception:  # the call ended first (its client went away): nobody to tell
        return


def _draining() -> StreamEnded:
    return StreamEnded(grpc.StatusCode.UNAVAILABLE, DRAIN_MESSAGE)
