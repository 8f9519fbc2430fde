"""`gateway serve --workers N`: N serving processes on one port.

Python's gRPC server is bound by one core's worth of Python, so the gateway
scales across cores with one process per core sharing the port through
SO_REUSEPORT (the kernel spreads connections; clients need several channels).
The supervisor reserves the port, starts the workers, prints the address once
all are ready, serves the merged Prometheus metrics of all of them, restarts a
worker that dies, and forwards SIGTERM/SIGINT so each drains. It also holds
the state directory's lock for all of its workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from typing import Any

from gateway.config import GatewaySettings, usable_cores
from gateway.errors import ConfigError
from gateway.ports import check_ports, reserve_shared
from gateway.providers import cuda_prerequisites
from gateway.statelock import lock_state_dir

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
START_TIMEOUT_S = 300.0


def worker_count(settings: GatewaySettings) -> int:
    """0 means automatic: one per core on the CPU, one per GPU (one CUDA context per process)."""
    if settings.workers:
        return settings.workers
    if settings.provider != "cpu" and cuda_prerequisites().usable:
        return 1
    return usable_cores()


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when the supervisor dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _worker_main(settings: GatewaySettings, index: int, events: Queue[tuple[str, int, str]]) -> None:
    from gateway import server

    _die_with_parent()
    logging.basicConfig(
        level=settings.log_level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s w{index} %(name)s: %(message)s",
    )

    async def run() -> None:
        gateway = server.Gateway(settings)
        gateway.install_signal_handlers()
        try:
            await gateway.start()
        except Exception as exc:
            events.put(("error", index, str(exc)))
            return
        events.put(("ready", index, str(gateway.control_port)))
        await gateway.wait_stopped()

    if settings.loop == "uvloop":
        import uvloop

        uvloop.run(run())
    else:
        import asyncio

        asyncio.run(run())


class Supervisor:
    def __init__(self, settings: GatewaySettings, count: int) -> None:
        threads = settings.intra_op_threads or max(1, usable_cores() // count)
        self.count = count
        check_ports(settings, inference=False)
        # Held while the supervisor runs: restarted workers rejoin the port, and no
        # other gateway can (gateway.ports).
        self._reserved: socket.socket = reserve_shared(settings.host, settings.port)
        port = self._reserved.getsockname()[1]
        self.settings = settings
        self.worker_settings = dataclasses.replace(
            settings, port=port, metrics_port=-1, workers=1, intra_op_threads=threads
        )
        # Release state, evidence and labels are shared through the store; worker 0
        # serves the control API and runs the controller on everyone's evidence.
        self.first_worker_settings = self.worker_settings
        self.worker_settings = dataclasses.replace(self.worker_settings, control_port=-1, controller=False)
        self._ctx = multiprocessing.get_context("spawn")
        self._events: Queue[tuple[str, int, str]] = self._ctx.Queue()
        self._procs: dict[int, BaseProcess] = {}
        self._stopping = False
        self.control_port = -1

    def _spawn(self, index: int) -> None:
        settings = self.first_worker_settings if index == 0 else self.worker_settings
        settings = dataclasses.replace(settings, worker_index=index)
        proc = self._ctx.Process(target=_worker_main, args=(settings, index, self._events), name=f"gateway-w{index}")
        proc.start()
        self._procs[index] = proc

    def _wait_ready(self, indices: set[int]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        waiting = set(indices)
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConfigError("workers did not become ready in time")
            try:
                kind, index, message = self._events.get(timeout=min(remaining, 1.0))
            except Exception:
                dead = [i for i in waiting if not self._procs[i].is_alive()]
                if dead:
                    raise ConfigError(f"worker {dead[0]} exited during startup (see its log above)") from None
                continue
            if kind == "error":
                raise ConfigError(message)
            if index == 0 and message not in ("", "-1"):
                self.control_port = int(message)
            waiting.discard(index)

    def run(self) -> int:
        from gateway.server import format_address

        for index in range(self.count):
            self._spawn(index)
        try:
            self._wait_ready(set(self._procs))
        except ConfigError:
            self._terminate(signal.SIGKILL)
            raise
        metrics = self._serve_metrics()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if self.control_port >= 0:
            metrics += f", control on {format_address(self.settings.control_host, self.control_port)}"
        log.info("%d workers serving%s", self.count, metrics)
        print(f"listening on {format_address(self.settings.host, self.worker_settings.port)}", flush=True)
        return self._supervise()

    def _serve_metrics(self) -> str:
        if self.settings.metrics_port < 0:
            return ""
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server

        from gateway.server import format_address

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        httpd, _ = start_http_server(self.settings.metrics_port, addr=self.settings.host, registry=registry)
        return f", metrics on {format_address(self.settings.host, httpd.server_port)}"

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self._stopping:
            self._stopping = True
            log.info("%s received: draining %d workers", signal.Signals(signum).name, len(self._procs))
            self._terminate(signal.SIGTERM)

    def _terminate(self, sig: int) -> None:
        for proc in self._procs.values():
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    def _supervise(self) -> int:
        from prometheus_client import multiprocess

        grace_end: float | None = None
        while self._procs:
            if self._stopping and grace_end is None:
                grace_end = time.monotonic() + self.settings.grace_s + 5.0
            timeout = None if grace_end is None else max(0.0, grace_end - time.monotonic())
            ready = wait([p.sentinel for p in self._procs.values()], timeout=timeout if timeout else 1.0)
            if grace_end is not None and time.monotonic() >= grace_end:
                log.error("workers still running after the grace period: killing them")
                self._terminate(signal.SIGKILL)
            for index, proc in list(self._procs.items()):
                if proc.sentinel not in ready and proc.is_alive():
                    continue
                proc.join()
                del self._procs[index]
                if proc.pid is not None:
                    multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
                if not self._stopping:
                    log.error("worker %d exited with %s: restarting it", index, proc.exitcode)
                    self._spawn(index)
        return 0


def serve_workers(settings: GatewaySettings, count: int) -> int:
    # The supervisor holds the state directory for all of its workers (they share it).
    state_lock = lock_state_dir(settings.state_dir)
    directory = tempfile.mkdtemp(prefix="gateway-metrics-")
    # Set before any worker (or this process) creates a metric: prometheus_client
    # reads it when a metric is created, and spawned workers inherit it.
    os.environ[MULTIPROC_ENV] = directory
    try:
        return Supervisor(settings, count).run()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        state_lock.release()
