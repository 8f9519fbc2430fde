"""A minimal HTTP/1.1 keep-alive client for load generation: one request, prebuilt as bytes, sent again and again.

Why not httpx or aiohttp: a load generator must cost far less CPU per request
than the server it measures, and a general client builds headers, cookies,
URL objects and response objects in Python for every request. Here the whole
request (request line, headers, body) is one bytes object written as is, and
the response is framed by httptools' C parser (llhttp, already installed as
uvicorn's parser), which calls back into Python only for the headers, the body
and the end of each message. Each connection carries one request at a time, as
HTTP/1.1 does without pipelining, so c requests in flight are c connections.

A request that takes longer than its timeout is failed by a watchdog that
looks over every connection a few times a second (no timer per request) and
closes the connection it was on; the next request opens a new one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import httptools

# The Triton binary extension's response header: how many leading bytes of the body are JSON.
HEADER_LENGTH = b"inference-header-content-length"
# Pause after a failed connect, so a slot whose server is gone does not spin on the CPU it shares.
CONNECT_BACKOFF_S = 0.01


class HttpFailure(Exception):
    """A request that got no 200: `code` is "HTTP 503", "CONNECTION_LOST", "DEADLINE_EXCEEDED", ..."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """A 200 response: its body and, for a binary-extension answer, the length of its JSON part."""

    body: bytes
    json_length: int | None


def request_bytes(address: str, path: str, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A complete POST request to `path` on `address` (HOST:PORT), ready to write as is."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {address}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Connection(asyncio.Protocol):
    """One keep-alive connection: `send` writes the request and returns a future of its answer."""

    def __init__(self, request: bytes) -> None:
        self._loop = asyncio.get_running_loop()  # made by create_connection's factory, on the loop
        self._request = request
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[HttpAnswer] | None = None
        self._chunks: list[bytes] = []
        self._json_length: int | None = None
        self.sent_at = 0.0
        self.closed = False

    @property
    def waiting(self) -> bool:
        return self._waiter is not None

    def send(self) -> asyncio.Future[HttpAnswer]:
        assert self._transport is not None and self._waiter is None
        waiter = self._waiter = self._loop.create_future()
        self.sent_at = time.monotonic()
        self._transport.write(self._request)
        return waiter

    def abort(self, code: str) -> None:
        """Fail the request in flight with `code` and drop the connection."""
        self._fail(code)
        if self._transport is not None:
            self._transport.abort()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are no subclasses of asyncio.Transport, though they are one in all but name.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.abort(f"BAD_RESPONSE ({exc})")

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail("CONNECTION_LOST")

    # httptools callbacks (it calls only those the protocol object defines)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == len(HEADER_LENGTH) and name.lower() == HEADER_LENGTH:
            self._json_length = int(value)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        waiter, self._waiter = self._waiter, None
        body = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        json_length, self._json_length = self._json_length, None
        self._chunks = []
        if not self._parser.should_keep_alive():
            self.closed = True  # the server closes it after this answer; the next request opens another
        if waiter is None or waiter.done():
            return
        status = self._parser.get_status_code()
        if status == 200:
            waiter.set_result(HttpAnswer(body, json_length))
        else:
            waiter.set_exception(HttpFailure(f"HTTP {status}"))

    def _fail(self, code: str) -> None:
        self.closed = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(HttpFailure(code))


class HttpClient:
    """Every connection of one client process to one server, and the watchdog that times their requests out."""

    def __init__(self, address: str, request: bytes, timeout_s: float) -> None:
        host, _, port = address.rpartition(":")
        self._host, self._port = host.strip("[]"), int(port)
        self._request = request
        self._timeout_s = timeout_s
        self._connections: set[_Connection] = set()
        self._watchdog: asyncio.Task[None] | None = None

    async def connect(self) -> _Connection:
        """A new connection; HttpFailure("CONNECT_FAILED ...") when the server cannot be reached."""
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_connection(lambda: _Connection(self._request), self._host, self._port)
        except OSError as exc:
            await asyncio.sleep(CONNECT_BACKOFF_S)
            raise HttpFailure(f"CONNECT_FAILED ({exc.strerror or exc})") from None
        self._connections.add(connection)
        if self._watchdog is None:
            self._watchdog = loop.create_task(self._watch())
        return connection

    def slot(self) -> Slot:
        return Slot(self)

    def pool(self) -> Pool:
        return Pool(self)

    async def _watch(self) -> None:
        period = min(0.1, self._timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            late = time.monotonic() - self._timeout_s
            for connection in list(self._connections):
                if connection.closed and not connection.waiting:
                    self._connections.discard(connection)
                elif connection.waiting and connection.sent_at < late:
                    connection.abort("DEADLINE_EXCEEDED")

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for connection in self._connections:
            connection.abort("CANCELLED")
        self._connections.clear()


class Slot:
    """One request at a time on one connection, reopened when it is lost (the closed loop's unit)."""

    def __init__(self, client: HttpClient) -> None:
        self._client = client
        self._connection: _Connection | None = None

    async def open(self) -> None:
        self._connection = await self._client.connect()

    async def call(self) -> HttpAnswer:
        connection = self._connection
        if connection is None or connection.closed:
            connection = self._connection = await self._client.connect()
        return await connection.send()


class Pool:
    """Idle connections handed to requests as they come (the open loop's): a new one when none is idle."""

    def __init__(self, client: HttpClient) -> None:
        self._client = client
        self._idle: list[_Connection] = []

    async def open(self, count: int) -> None:
        self._idle += await asyncio.gather(*(self._client.connect() for _ in range(count)))

    async def call(self) -> HttpAnswer:
        idle = self._idle
        connection = None
        while idle:
            connection = idle.pop()
            if not connection.closed:
                break
            connection = None
        if connection is None:
            connection = await self._client.connect()
        try:
            return await connection.send()
        finally:
            if not connection.closed:  # a lost or timed-out one is closed: never handed out again
                idle.append(connection)
