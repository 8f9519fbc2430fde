"""Starting real gateways for tests: in a background thread or as a subprocess.

Nothing here fakes the server: both ways run the same Gateway the CLI runs,
on 127.0.0.1 with a port the OS picks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gateway.config.settings import GatewaySettings
from gateway.server import launch
from gateway.server.gateway import Gateway
from gateway.server.launch import Launched

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
T = TypeVar("T")


@dataclass
class Running:
    gateway: Gateway
    loop: asyncio.AbstractEventLoop
    address: str
    port: int

    @property
    def control(self) -> str:
        return f"127.0.0.1:{self.gateway.control_port}"

    @property
    def http(self) -> str:
        """HOST:PORT of the REST binding."""
        return f"127.0.0.1:{self.gateway.http_port}"

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's own loop (to inspect or steer it)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@contextmanager
def gateway_in_thread(models: Path = MODELS, **settings: Any) -> Iterator[Running]:
    settings.setdefault("port", 0)
    # Every test gateway serves REST too, on a free port (never the default 8000).
    settings.setdefault("http_port", 0)
    settings.setdefault("metrics_port", -1)
    settings.setdefault("control_port", 0)
    settings.setdefault("dashboard_port", -1)
    settings.setdefault("state_dir", Path(tempfile.mkdtemp(prefix="gateway-state-")))
    settings.setdefault("provider", "cpu")
    config = GatewaySettings(models=models, **settings)
    loop = asyncio.new_event_loop()
    gateway = Gateway(config)
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(gateway.start())
        except BaseException as exc:  # report start failures to the test thread
            failure.append(exc)
            started.set()
            return
        started.set()
        loop.run_until_complete(gateway.wait_stopped())

    thread = threading.Thread(target=run, name="gateway", daemon=True)
    thread.start()
    started.wait(60)
    if failure:
        raise failure[0]
    try:
        yield Running(gateway, loop, f"127.0.0.1:{gateway.port}", gateway.port)
    finally:
        if not gateway._stopped.is_set():
            asyncio.run_coroutine_threadsafe(gateway.drain(2.0), loop).result(30)
        thread.join(30)
        loop.close()


@dataclass
class Process:
    """A `gateway serve` subprocess started by `gateway_process` (through gateway.server.launch)."""

    launched: Launched

    @property
    def proc(self) -> subprocess.Popen[str]:
        return self.launched.proc

    @property
    def address(self) -> str:
        return self.launched.address

    @property
    def port(self) -> int:
        return self.launched.port

    @property
    def http(self) -> str:
        """HOST:PORT of the REST binding (empty when off)."""
        return self.launched.http

    @property
    def dashboard(self) -> str:
        """The dashboard's URL (empty when off)."""
        return self.launched.dashboard

    @property
    def lines(self) -> list[str]:
        """Every line of output so far (the reader thread keeps adding)."""
        return self.launched.output.lines()

    @property
    def control(self) -> str:
        for line in self.lines:
            if found := launch.CONTROL.search(line):
                return found.group(1)
        raise AssertionError("the gateway did not report a control address")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def gateway_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


@contextmanager
def gateway_process(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Iterator[Process]:
    """`gateway serve ...` as a subprocess; waits for its `listening on` line."""
    if "--state-dir" not in args:
        args = ("--state-dir", tempfile.mkdtemp(prefix="gateway-state-"), *args)
    serve_args = ["--port", "0", "--http-port", "0", "--metrics-port", "-1", "--control-port", "0", "--provider", "cpu"]
    # Off unless a test asks for it: the default port (8004) may be taken by another gateway.
    serve_args += ["--dashboard-port", "-1"] if "--dashboard-port" not in args else []
    serve_args += args
    try:
        launched = launch.start(
            launch.serve_command(serve_args), env={**os.environ, **(env or {})}, cwd=ROOT, timeout_s=timeout
        )
    except launch.LaunchError as exc:
        raise AssertionError(f"gateway did not start: {exc}") from None
    try:
        yield Process(launched)
    finally:
        launched.stop()


def poll_until(
    fetch: Callable[[], T], done: Callable[[T], bool], step: Callable[[], object], timeout: float, what: str
) -> T:
    """`fetch()` until `done` says so, calling `step()` (e.g. send traffic) between looks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fetch()
        if done(value):
            return value
        step()
    raise AssertionError(f"{what} did not get there in {timeout:g} s: {fetch()}")


def varint(value: int) -> bytes:
    """A protobuf base-128 varint, for tests that write hostile messages byte by byte."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
