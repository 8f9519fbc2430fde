"""A record socket on the event loop: callbacks from `add_reader`, no polling, no threads.

Both sides use SOCK_SEQPACKET Unix sockets: each send is one record and each recv
returns exactly one, so fixed-size records need no framing. A full send buffer
(the peer is slow) queues records and waits for `add_writer`, in order.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable

from gateway.serving.remote.records import RECORD_BYTES

# Records handled per readable callback before yielding to the loop's other work.
_BURST = 256


class Channel:
    def __init__(
        self,
        sock: socket.socket,
        on_record: Callable[[memoryview], None],
        on_close: Callable[[], None],
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._on_record = on_record
        self._on_close = on_close
        self._buffer = bytearray(RECORD_BYTES)
        self._view = memoryview(self._buffer)
        self._pending: deque[bytes] = deque()
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        for _ in range(_BURST):
            if self.closed:
                return
            try:
                n = self.sock.recv_into(self._buffer)
            except BlockingIOError:
                return
            except OSError:
                n = 0  # reset by a peer that died: the same as its end of file
            if n == 0:
                self._lost()
                return
            self._on_record(self._view[:n])

    def send(self, record: bytes) -> None:
        """Send a record now, or after those already waiting; dropped once the channel is closed."""
        if self.closed:
            return
        if not self._pending:
            try:
                self.sock.send(record)
                return
            except BlockingIOError:
                self._loop.add_writer(self._fd, self._writable)
            except OSError:
                return  # the peer is gone; the reader sees its end of file and cleans up
        self._pending.append(record)

    def _writable(self) -> None:
        while self._pending and not self.closed:
            try:
                self.sock.send(self._pending[0])
            except BlockingIOError:
                return
            except OSError:
                self._pending.clear()
                break
            self._pending.popleft()
        self._loop.remove_writer(self._fd)

    def _lost(self) -> None:
        self.close()
        self._on_close()

    def close(self) -> None:
        """Stop watching and close the socket (the peer sees end of file); no callback."""
        if self.closed:
            return
        self.closed = True
        self._pending.clear()
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self.sock.close()


async def recv_with_fds(sock: socket.socket, size: int, max_fds: int) -> tuple[bytes, list[int]]:
    """One record and the descriptors attached to it, from a non-blocking socket (handshake only)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, size, max_fds)
            return data, fds
        except BlockingIOError:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(sock.fileno(), _settle, ready)
            try:
                await ready
            finally:
                loop.remove_reader(sock.fileno())


def _settle(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def socket_path(address: str) -> str:
    """An address starting with @ is in the abstract namespace: no file, gone with its process."""
    return "\0" + address[1:] if address.startswith("@") else address
