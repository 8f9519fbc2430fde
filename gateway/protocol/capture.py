"""Capturing live traffic with the stable version's answers, and reading it back.

A capture file is a header line followed by records, each:

    u32 record length | f64 seconds since capture start | f64 server seconds |
    u32 request length | request (ModelInferRequest bytes) |
    u32 response length | response (ModelInferResponse bytes)

little-endian. Files rotate at `file_bytes`; the oldest are deleted beyond
`max_bytes`, so a capture never fills the disk. Writes are buffered and
happen on the event loop (page-cache writes take microseconds).
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gateway.errors import ConfigError, InvalidInput
from gateway.protocol import codec
from gateway.protocol.pb import inference_pb2 as pb
from gateway.types import WireRequest

MAGIC = b"GATEWAY-CAPTURE 1\n"
_HEAD = struct.Struct("<Idd")
_LEN = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Record:
    at: float  # seconds since the capture started (for original pacing)
    server_s: float  # how long the gateway took to answer
    request: bytes
    response: bytes


class CaptureWriter:
    def __init__(
        self,
        directory: Path,
        fraction: float,
        file_bytes: int = 16 << 20,
        max_bytes: int = 256 << 20,
        rng: random.Random | None = None,
    ) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"capture_fraction: must be in (0, 1], got {fraction}")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"capture_dir: cannot create {directory}: {exc}") from None
        self.directory = directory
        self.fraction = fraction
        self.file_bytes = file_bytes
        self.max_bytes = max_bytes
        self.rng = rng or random.Random()
        self.started = time.monotonic()
        self.records = 0
        self._file: BinaryIO | None = None
        self._written = 0

    def wanted(self) -> bool:
        return self.fraction >= 1.0 or self.rng.random() < self.fraction

    def record(self, request: bytes, response: bytes, server_s: float) -> None:
        if self._file is None or self._written >= self.file_bytes:
            self._rotate()
        assert self._file is not None
        body = _HEAD.size - 4 + _LEN.size + len(request) + _LEN.size + len(response)
        self._file.write(_HEAD.pack(body, time.monotonic() - self.started, server_s))
        self._file.write(_LEN.pack(len(request)))
        self._file.write(request)
        self._file.write(_LEN.pack(len(response)))
        self._file.write(response)
        self._written += 4 + body
        self.records += 1

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
        name = time.strftime("capture-%Y%m%d-%H%M%S") + f"-{time.monotonic_ns() % 1_000_000:06d}.gwcap"
        self._file = (self.directory / name).open("wb")
        self._file.write(MAGIC)
        self._written = len(MAGIC)
        files = sorted(self.directory.glob("*.gwcap"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for old in files[:-1]:
            if total <= self.max_bytes:
                break
            total -= old.stat().st_size
            old.unlink()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def newest(self, model: str) -> Iterator[WireRequest]:
        """The model's captured requests, decoded, newest file first: the release gate's
        source (gateway.release.gate.CapturedRequests), so the release plane never
        decodes protobuf. Flushes now, on the event loop that writes; the iterator
        reads lazily, and may run in another thread."""
        self.flush()
        return _decoded(self.directory, model)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_capture(path: Path) -> Iterator[Record]:
    """Records of one capture file; a torn last record (a crash mid-write) is skipped."""
    with path.open("rb") as handle:
        if handle.read(len(MAGIC)) != MAGIC:
            raise InvalidInput(f"{path} is not a gateway capture file")
        while True:
            head = handle.read(_HEAD.size)
            if len(head) < _HEAD.size:
                return
            length, at, server_s = _HEAD.unpack(head)
            body = handle.read(length - (_HEAD.size - 4))
            if len(body) < length - (_HEAD.size - 4):
                return
            (n_req,) = _LEN.unpack_from(body, 0)
            request = body[4 : 4 + n_req]
            (n_resp,) = _LEN.unpack_from(body, 4 + n_req)
            response = body[8 + n_req : 8 + n_req + n_resp]
            yield Record(at, server_s, request, response)


def _decoded(directory: Path, model: str) -> Iterator[WireRequest]:
    if not directory.is_dir():
        return
    for path in reversed(capture_files([directory])):
        for record in read_capture(path):
            request = pb.ModelInferRequest.FromString(record.request)
            if request.model_name == model:
                yield codec.decode_infer(request, None)


def capture_files(paths: list[Path]) -> list[Path]:
    """Files named, and every *.gwcap in directories named, oldest first."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.glob("*.gwcap"), key=lambda p: p.stat().st_mtime)
        else:
            files.append(path)
    return files
