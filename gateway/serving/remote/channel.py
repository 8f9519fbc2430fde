"""A record socket on the event loop: callbacks from `add_reader`, no polling, no threads.

Both sides use SOCK_SEQPACKET Unix sockets: each send is one message and each recv
returns exactly one, so fixed-size records need no framing. Records sent in one pass
of the loop go out together, as one message, when the pass ends: every send wakes
the peer (on a busy 2-core host a wake-up often switches to it at once), so sixteen
answers of one batch sent one by one cost sixteen switches and reach the peer one at
a time, while one message carries them all for one. A full send buffer (the peer is
slow) queues messages and waits for `add_writer`, in order.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable

from gateway.serving.remote.records import RECORD_BYTES

# Records a message carries at most (16 KiB: well within a Unix socket's send buffer).
MESSAGE_RECORDS = 256
MESSAGE_BYTES = MESSAGE_RECORDS * RECORD_BYTES
# Messages handled per readable callback before yielding to the loop's other work.
_BURST = 64


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
        self._buffer = bytearray(MESSAGE_BYTES)
        self._view = memoryview(self._buffer)
        self._out = bytearray()  # records of this pass, not yet sent
        self._flush_scheduled = False
        self._pending: deque[bytes] = deque()  # messages the socket had no room for
        self._waiting_room = False  # add_writer is on: _pending goes out when the socket has room
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        view = self._view
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
            for at in range(0, n - RECORD_BYTES + 1, RECORD_BYTES):
                self._on_record(view[at : at + RECORD_BYTES])

    def send(self, record: bytes) -> None:
        """Queue a record; the pass's records go out together when it ends. Dropped once closed."""
        if self.closed:
            return
        self._out += record
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, bytearray()
        if self.closed or not out:
            return
        for at in range(0, len(out), MESSAGE_BYTES):
            self._pending.append(bytes(out[at : at + MESSAGE_BYTES]))
        if not self._waiting_room:
            self._write()

    def _write(self) -> None:
        while self._pending and not self.closed:
            try:
                self.sock.send(self._pending[0])
            except BlockingIOError:
                self._waiting_room = True
                self._loop.add_writer(self._fd, self._writable)
                return
            except OSError:
                self._pending.clear()  # the peer is gone; the reader sees its end of file and cleans up
                return
            self._pending.popleft()

    def _writable(self) -> None:
        self._waiting_room = False
        self._loop.remove_writer(self._fd)
        self._write()

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
