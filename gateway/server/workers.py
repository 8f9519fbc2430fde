"""`gateway serve --workers N [--executors 1]`: N serving processes on one port (and one REST port).

Python's gRPC server is bound by one core's worth of Python, so the gateway
scales across cores with one process per core sharing the port through
SO_REUSEPORT (the kernel spreads connections; clients need several channels).
The supervisor reserves the port, starts the workers, prints the address once
all are ready, serves the merged Prometheus metrics of all of them, restarts a
worker that dies (backing off, and giving up when one keeps failing), and
forwards SIGTERM/SIGINT so each drains. It also holds the state directory's
lock for all of its workers.

With `--executors 1` it first starts the executor process (gateway.serving.remote:
it owns the model sessions and batches every worker's requests), waits until it
accepts front ends, then starts the workers, which run their models through it.
It restarts a dead executor like a worker (the workers connect again by
themselves), and on SIGTERM drains the workers first, then the executor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from typing import Any

from gateway.config.settings import GatewaySettings, usable_cores
from gateway.errors import ConfigError, GatewayError
from gateway.logformat import configure_logging
from gateway.server.ports import bind_failure, check_ports, reserve_shared
from gateway.server.statelock import lock_state_dir
from gateway.serving.providers import cuda_prerequisites

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
START_TIMEOUT_S = 300.0
# A worker that dies is restarted after RESTART_BACKOFF_S, doubled for each failure
# in a row up to RESTART_BACKOFF_MAX_S. RESTART_LIMIT failures in a row (a worker
# that served RESTART_STABLE_S before dying starts a new row) stop the gateway: a
# worker that cannot start would otherwise restart forever, with worker 0's control
# API and controller down all the while.
RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
RESTART_LIMIT = 5
RESTART_STABLE_S = 60.0
# The exit code of a worker whose startup failed (its reason went to the supervisor).
WORKER_START_FAILED = 3
# The supervisor's exit code when it gave up on a worker.
GAVE_UP = 1
# The executor's index among the supervised processes (workers are 0..N-1).
EXECUTOR = -1


def executor_count(settings: GatewaySettings) -> int:
    """Executor processes to start: auto is one on a GPU host (the workers' requests batch
    together on the device) and none on a CPU host, where a worker's own batcher answers
    sooner (docs/executors.md: the round trip adds ~0.15 ms there and buys no device time)."""
    if settings.executor_address or settings.executors == "off":
        return 0  # a front end of a supervisor that runs the executor
    if settings.executors == "auto":
        return 1 if settings.provider != "cpu" and cuda_prerequisites().usable else 0
    return int(settings.executors)


def worker_count(settings: GatewaySettings) -> int:
    """0 means automatic: one per core on the CPU, one per GPU (one CUDA context per process)."""
    if settings.workers:
        return settings.workers
    if executor_count(settings):
        return usable_cores()  # front ends: decoding and encoding take every core
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
    from gateway.server import gateway as server

    _die_with_parent()
    configure_logging(settings.log_level, settings.log_format, worker=index)

    async def run() -> bool:
        gateway = server.Gateway(settings)
        gateway.install_signal_handlers()
        try:
            await gateway.start()
        except Exception as exc:
            reason = str(exc) if isinstance(exc, GatewayError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, GatewayError):
                logging.getLogger(__name__).exception("worker %d could not start", index)
            events.put(("error", index, reason))
            return False
        events.put(("ready", index, f"{gateway.control_port} {gateway.dashboard_port}"))
        await gateway.wait_stopped()
        return True

    _run_or_exit(settings, run)


def _run_or_exit(settings: GatewaySettings, run: Callable[[], Coroutine[Any, Any, bool]]) -> None:
    """Run a child process's start-and-serve coroutine on its loop; exit WORKER_START_FAILED
    when it could not start (it has told the supervisor why)."""
    if settings.loop == "uvloop":
        import uvloop

        started = uvloop.run(run())
    else:
        import asyncio

        started = asyncio.run(run())
    if not started:
        sys.exit(WORKER_START_FAILED)


def _executor_main(settings: GatewaySettings, address: str, events: Queue[tuple[str, int, str]]) -> None:
    """The executor process: the models' sessions and batchers, fed by every worker."""
    from prometheus_client import CollectorRegistry

    from gateway.serving.metrics import GatewayMetrics
    from gateway.serving.remote import executor as remote

    _die_with_parent()
    # A group of its own: a Ctrl-C at a terminal (or `timeout`) signals the whole foreground
    # group, and the executor must outlive the workers' drain; the supervisor stops it after.
    os.setpgrp()
    configure_logging(settings.log_level, settings.log_format)

    async def run() -> bool:
        # Its batchers' batch sizes, queue and compute times go to the multiprocess
        # directory (MULTIPROC_ENV), merged with the workers' metrics by the supervisor.
        metrics = GatewayMetrics(CollectorRegistry())
        try:
            await remote.serve(settings, address, lambda: events.put(("ready", EXECUTOR, "")), metrics=metrics)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, GatewayError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, GatewayError):
                logging.getLogger(__name__).exception("the executor could not start")
            events.put(("error", EXECUTOR, reason))
            return False
        return True

    _run_or_exit(settings, run)


def front_end(settings: GatewaySettings, address: str, front_ends: int) -> GatewaySettings:
    """A worker's settings when its models run in the executor at `address`, with `front_ends` in all."""
    return dataclasses.replace(
        settings,
        executors="off",
        executor_address=address,
        executor_front_ends=front_ends,
        provider="cpu",
        cuda_graphs=False,
        intra_op_threads=1,
    )


def process_name(index: int) -> str:
    return "the executor" if index == EXECUTOR else f"worker {index}"


def describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-exitcode).name}"
    if exitcode == WORKER_START_FAILED:
        return "could not start (see its log above)"
    return f"exited with code {exitcode} (see its log above)"


class Supervisor:
    def __init__(self, settings: GatewaySettings, count: int) -> None:
        threads = settings.intra_op_threads or max(1, usable_cores() // count)
        self.count = count
        check_ports(settings, inference=False)
        # Held while the supervisor runs: restarted workers rejoin the port, and no
        # other gateway can (gateway.server.ports).
        self._reserved: socket.socket = reserve_shared(settings.host, settings.port)
        port = self._reserved.getsockname()[1]
        # The REST port likewise: every worker serves HTTP on it too.
        self._reserved_http: socket.socket | None = None
        http_port = settings.http_port
        if http_port >= 0:
            try:
                self._reserved_http = reserve_shared(settings.host, http_port, "http_port")
            except ConfigError:
                self._reserved.close()
                raise
            http_port = self._reserved_http.getsockname()[1]
        self.settings = settings
        self.worker_settings = dataclasses.replace(
            settings, port=port, http_port=http_port, metrics_port=-1, workers=1, intra_op_threads=threads
        )
        # Release state, evidence and labels are shared through the store; worker 0
        # serves the control API and runs the controller on everyone's evidence.
        self.first_worker_settings = self.worker_settings
        self.worker_settings = dataclasses.replace(
            self.worker_settings, control_port=-1, dashboard_port=-1, controller=False
        )
        self.executors = executor_count(settings)
        # Unique per gateway (the supervisor's pid), in the abstract namespace: no file to leave.
        self.executor_address = f"@gateway-{os.getpid()}-exec0"
        self.executor_settings = dataclasses.replace(
            settings, intra_op_threads=settings.intra_op_threads or usable_cores()
        )
        if self.executors:
            # Front ends keep a CPU session of each version for its signature (and a shadow's
            # direct run); the executor owns the device and the threads.
            self.first_worker_settings = front_end(self.first_worker_settings, self.executor_address, count)
            self.worker_settings = front_end(self.worker_settings, self.executor_address, count)
        self._executor_stopping = False
        self._ctx = multiprocessing.get_context("spawn")
        self._events: Queue[tuple[str, int, str]] = self._ctx.Queue()
        self._procs: dict[int, BaseProcess] = {}
        self._stopping = False
        self.control_port = -1
        self.dashboard_port = -1
        self.exit_code = 0
        # Per worker: when it became ready, failures in a row, why it last failed to
        # start, and when a pending restart is due.
        self._ready_at: dict[int, float] = {}
        self._failures: dict[int, int] = {}
        self._start_errors: dict[int, str] = {}
        self._restart_at: dict[int, float] = {}

    def _spawn(self, index: int) -> None:
        if index == EXECUTOR:
            proc = self._ctx.Process(
                target=_executor_main,
                args=(self.executor_settings, self.executor_address, self._events),
                name="gateway-exec0",
            )
            proc.start()
            self._procs[index] = proc
            log.info("executor started (pid %s) at %s", proc.pid, self.executor_address)
            return
        settings = self.first_worker_settings if index == 0 else self.worker_settings
        settings = dataclasses.replace(settings, worker_index=index)
        proc = self._ctx.Process(target=_worker_main, args=(settings, index, self._events), name=f"gateway-w{index}")
        proc.start()
        self._procs[index] = proc
        log.info("worker %d started (pid %s)", index, proc.pid)

    def _on_event(self, kind: str, index: int, message: str) -> None:
        if kind == "error":
            self._start_errors[index] = message
            return
        self._ready_at[index] = time.monotonic()
        control, _, dashboard = message.partition(" ")
        if index == 0 and control not in ("", "-1"):
            self.control_port = int(control)
            # A restarted worker 0 serves the control API where it was announced,
            # even when --control-port 0 let the first one pick the port.
            self.first_worker_settings = dataclasses.replace(self.first_worker_settings, control_port=self.control_port)
        if index == 0 and dashboard not in ("", "-1"):
            self.dashboard_port = int(dashboard)  # the dashboard likewise
            self.first_worker_settings = dataclasses.replace(
                self.first_worker_settings, dashboard_port=self.dashboard_port
            )

    def _read_events(self) -> None:
        while True:
            try:
                kind, index, message = self._events.get_nowait()
            except queue.Empty:
                return
            self._on_event(kind, index, message)

    def _wait_ready(self, indices: set[int]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        waiting = set(indices)
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConfigError(f"{', '.join(map(process_name, sorted(waiting)))} did not become ready in time")
            try:
                kind, index, message = self._events.get(timeout=min(remaining, 1.0))
            except Exception:
                dead = [i for i in waiting if not self._procs[i].is_alive()]
                if dead:
                    raise ConfigError(f"{process_name(dead[0])} exited during startup (see its log above)") from None
                continue
            if kind == "error":
                raise ConfigError(message)
            self._on_event(kind, index, message)
            waiting.discard(index)

    def run(self) -> int:
        from gateway.server.gateway import dashboard_url, format_address

        try:
            if self.executors:
                # The workers connect to it as they build their models: it listens first.
                self._spawn(EXECUTOR)
                self._wait_ready({EXECUTOR})
            for index in range(self.count):
                self._spawn(index)
            self._wait_ready(set(range(self.count)))
            # Inside the try: a metrics port taken while the workers started must
            # stop them too, or they serve on with nobody to announce or stop them.
            metrics = self._serve_metrics()
        except ConfigError:
            self._terminate(signal.SIGKILL)
            raise
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if self.worker_settings.http_port >= 0:
            metrics = f", http on {format_address(self.settings.host, self.worker_settings.http_port)}{metrics}"
        if self.control_port >= 0:
            metrics += f", control on {format_address(self.settings.control_host, self.control_port)}"
        if self.dashboard_port >= 0:
            metrics += f", dashboard on {dashboard_url(self.settings, self.dashboard_port)}"
        executor = " and an executor process" if self.executors else ""
        log.info("%d workers%s serving%s", self.count, executor, metrics)
        print(f"listening on {format_address(self.settings.host, self.worker_settings.port)}", flush=True)
        return self._supervise()

    def _serve_metrics(self) -> str:
        if self.settings.metrics_port < 0:
            return ""
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server

        from gateway.server.gateway import format_address

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        host, port = self.settings.host, self.settings.metrics_port
        try:
            httpd, _ = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:  # free when checked before the workers started, but not now
            raise bind_failure(host, port, "metrics_port", exc) from None
        return f", metrics on {format_address(self.settings.host, httpd.server_port)}"

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self._stopping:
            workers = len(set(self._procs) - {EXECUTOR})
            log.info("%s received: draining %d workers", signal.Signals(signum).name, workers)
            self._stop()

    def _stop(self) -> None:
        """Drain the workers; the executor drains once they are gone (they may still need it)."""
        self._stopping = True
        self._restart_at.clear()
        self._terminate(signal.SIGTERM, workers_only=True)
        self._stop_executor_when_alone()

    def _stop_executor_when_alone(self) -> None:
        if self._executor_stopping or set(self._procs) - {EXECUTOR}:
            return
        self._executor_stopping = True
        proc = self._procs.get(EXECUTOR)
        if proc is not None and proc.is_alive() and proc.pid is not None:
            log.info("the workers have stopped: draining the executor")
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)

    def _terminate(self, sig: int, workers_only: bool = False) -> None:
        for index, proc in self._procs.items():
            if workers_only and index == EXECUTOR:
                continue
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    def _supervise(self) -> int:
        from prometheus_client import multiprocess

        grace_end: float | None = None
        while self._procs or self._restart_at:
            if self._stopping and grace_end is None:
                grace_end = time.monotonic() + self.settings.grace_s + 5.0
            timeout = self._next_wake(grace_end)
            sentinels = [p.sentinel for p in self._procs.values()]
            ready = wait(sentinels, timeout=timeout) if sentinels else []
            if not sentinels:
                time.sleep(timeout)
            self._read_events()
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
                    self._read_events()  # its start error, if that is why it exited
                    self._on_exit(index, proc.exitcode)
            if self._stopping:
                self._stop_executor_when_alone()
            now = time.monotonic()
            for index, due in list(self._restart_at.items()):
                if due <= now:
                    del self._restart_at[index]
                    self._spawn(index)
        return self.exit_code

    def _next_wake(self, grace_end: float | None) -> float:
        wake = [time.monotonic() + 1.0, *self._restart_at.values()]
        if grace_end is not None:
            wake.append(grace_end)
        return max(0.0, min(wake) - time.monotonic())

    def _on_exit(self, index: int, exitcode: int | None) -> None:
        """Log why a worker ended; restart it after a backoff, or give up on the gateway."""
        now = time.monotonic()
        ready_at = self._ready_at.pop(index, None)
        served = 0.0 if ready_at is None else now - ready_at
        failures = 1 if served >= RESTART_STABLE_S else self._failures.get(index, 0) + 1
        self._failures[index] = failures
        error = self._start_errors.pop(index, None)
        reason = f"could not start: {error}" if error is not None else describe_exit(exitcode)
        if failures >= RESTART_LIMIT:
            log.error(
                "%s %s; it failed %d times in a row: giving up, stopping the gateway",
                process_name(index),
                reason,
                failures,
            )
            self.exit_code = GAVE_UP
            self._stop()
            return
        delay = min(RESTART_BACKOFF_S * 2 ** (failures - 1), RESTART_BACKOFF_MAX_S)
        log.error(
            "%s %s; restarting it in %.1f s (failure %d in a row, giving up at %d)",
            process_name(index),
            reason,
            delay,
            failures,
            RESTART_LIMIT,
        )
        self._restart_at[index] = now + delay


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
