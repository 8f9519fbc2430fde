"""Composition root: builds the gateway from settings, serves, drains.

Only this module (and the CLI) wires concrete parts together; everything else
receives what it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from gateway.config.settings import GatewaySettings, usable_cores
from gateway.control.auth import Authenticator, AuthInterceptor, check_bind, load_tokens
from gateway.control.servicer import ReleaseServicer
from gateway.dataplane import DataPlane
from gateway.errors import ConfigError, StoreUnavailable
from gateway.protocol.capture import CaptureWriter
from gateway.protocol.limits import WireLimits, infer_parsers
from gateway.protocol.pb import inference_pb2 as pb
from gateway.protocol.pb import inference_pb2_grpc as pb_grpc
from gateway.protocol.pb import release_pb2_grpc
from gateway.protocol.pb.pool import POOL
from gateway.protocol.servicer import InferenceServicer
from gateway.protocol.status import ErrorMappingInterceptor
from gateway.protocol.streams import StreamGuard
from gateway.release.controller import Controller
from gateway.release.feedback import RECEIVER, join_shared
from gateway.release.loader import ModelLoader
from gateway.release.metrics import ReleaseMetrics
from gateway.release.model_sync import IntentStore, run_id
from gateway.release.operations import ReleaseOps
from gateway.release.plane import ReleasePlane
from gateway.release.store import SqliteStore
from gateway.server.ports import check_ports
from gateway.server.statelock import lock_state_dir
from gateway.serving.metrics import QUEUE_SAMPLE_S, GatewayMetrics
from gateway.serving.providers import ProviderChooser, cuda_options
from gateway.serving.registry import ExecutorFactory, Registry, executor_factory, load_model
from gateway.serving.repository import Repository

log = logging.getLogger(__name__)

SHARE_EVERY_S = 0.5
# The server pings a connection idle this long, and drops it when no answer comes in
# KEEPALIVE_TIMEOUT_S: a vanished client's streams do not stay open until the idle limit.
KEEPALIVE_TIME_S = 60
KEEPALIVE_TIMEOUT_S = 20
# Calls still running when a connection reaches max_connection_age_s get this long to end.
CONNECTION_AGE_GRACE_S = 60

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def build_registry(
    settings: GatewaySettings, pool: ThreadPoolExecutor, metrics: GatewayMetrics
) -> tuple[Registry, ModelLoaderParts]:
    repository = Repository(settings.models)
    names = list(settings.load) or repository.model_names()
    if not names:
        raise ConfigError(f"models: no models under {repository.root} (expected <name>/<version>/model.onnx)")
    chooser = ProviderChooser(
        settings.provider,
        cuda_options(
            settings.cuda_device, settings.cuda_mem_limit_mb, settings.cudnn_conv_algo_search, settings.cuda_graphs
        ),
    )
    if not settings.intra_op_threads:
        # onnxruntime sizes its pool by the machine, not by this process's CPU
        # mask (taskset, cpusets): give it the cores we may actually use.
        settings = dataclasses.replace(settings, intra_op_threads=usable_cores())
    registry = Registry()
    make_executor = executor_factory(pool, batching=settings.batching == "spec")
    for name in names:
        registry.add(load_model(repository, name, settings, chooser, make_executor, metrics))
    if chooser.cuda_reason and settings.provider == "auto":
        log.info("running on the CPU: %s", chooser.cuda_reason)
    return registry, ModelLoaderParts(repository, settings, chooser, make_executor)


def inference_options(s: GatewaySettings) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.max_send_message_length", s.max_message_bytes),
        # SO_REUSEPORT only groups the workers of one supervisor (gateway.server.ports): a
        # single serving process binds alone, so a second one on its port fails.
        ("grpc.so_reuseport", 1 if s.worker_index >= 0 else 0),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_S * 1000),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
    ]
    if s.max_connection_idle_s > 0:
        options.append(("grpc.max_connection_idle_ms", round(s.max_connection_idle_s * 1000)))
    if s.max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", round(s.max_connection_age_s * 1000)))
        options.append(("grpc.max_connection_age_grace_ms", CONNECTION_AGE_GRACE_S * 1000))
    return options


def server_credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    """TLS for both ports when a certificate is configured; mutual TLS when a client CA is too."""
    if settings.tls_cert is None and settings.tls_key is None:
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise ConfigError("tls_cert and tls_key: set both, or neither")
    try:
        pair = (settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())
        ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    except OSError as exc:
        raise ConfigError(f"tls: cannot read {exc.filename}: {exc.strerror}") from None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def bind(server: aio.Server, host: str, port: int, setting: str, settings: GatewaySettings) -> int:
    address = format_address(host, port)
    credentials = server_credentials(settings)
    try:
        bound = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError as exc:
        raise ConfigError(f"{setting}: cannot listen on {address}: {exc}") from None
    if bound == 0:
        raise ConfigError(f"{setting}: cannot listen on {address}")
    return int(bound)


@dataclass(frozen=True, slots=True)
class ModelLoaderParts:
    repository: Repository
    settings: GatewaySettings
    chooser: ProviderChooser
    make_executor: ExecutorFactory


class Gateway:
    """One serving process: the inference port, health, reflection and metrics."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.port = 0
        self.metrics_port = -1
        # Threads start lazily; every batcher caps its own batches in flight
        # (`instances`), so the pool never queues one version behind another.
        self._pool = ThreadPoolExecutor(max_workers=256, thread_name_prefix="ort")
        self._server: aio.Server | None = None
        self._streams: StreamGuard | None = None
        self._health = health_aio.HealthServicer()
        self._stopped = asyncio.Event()
        self._metrics_httpd: object | None = None
        self.registry: Registry | None = None
        self.dataplane: DataPlane | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[None]] = []
        self.controller: Controller | None = None
        self._draining = False
        self._control: aio.Server | None = None
        self.control_port = -1
        self.releases: ReleasePlane | None = None
        self.store: SqliteStore | None = None
        self.capture: CaptureWriter | None = None

    async def start(self) -> int:
        s = self.settings
        metrics_registry = CollectorRegistry()
        self.metrics = GatewayMetrics(metrics_registry)
        self.release_metrics = ReleaseMetrics(metrics_registry)
        # Loading blocks this loop (session build, warm-up), which is fine: nothing
        # is served before it ends, and batchers must be created on this loop.
        self.registry, parts = build_registry(s, self._pool, self.metrics)
        registry = self.registry
        self.releases = releases = ReleasePlane(registry)
        self.dataplane = DataPlane(registry, releases)
        releases.primary = self.dataplane
        self.store = SqliteStore(s.state_dir / "state.db")
        if s.capture_dir is not None:
            self.capture = CaptureWriter(
                s.capture_dir, s.capture_fraction, s.capture_file_mb << 20, s.capture_max_mb << 20
            )
        self.ops = ReleaseOps(releases, self.store, self.capture)
        self.ops.restore()
        self.loader = ModelLoader(
            parts.repository,
            parts.settings,
            parts.chooser,
            parts.make_executor,
            self.metrics,
            registry,
            releases,
            self.ops,
        )
        loop = asyncio.get_running_loop()
        if s.worker_index >= 0:
            # Run-time loads/unloads reach every worker through the store (gateway.release.model_sync).
            await self.loader.join(IntentStore(self.store.path, run_id()), str(s.worker_index))
            self._background.append(loop.create_task(self.loader.follow()))
        self._background.append(loop.create_task(self._follow_store(self.store)))
        if s.worker_index >= 0:
            worker = str(s.worker_index)
            store = self.store
            releases.peers = lambda model: store.peer_evidence(model, worker)
            self._background.append(loop.create_task(self._share_evidence(store, worker)))
            if worker != RECEIVER:  # worker 0 joins labels as they arrive; the others, as it shares them
                self._background.append(loop.create_task(join_shared(releases, store, worker)))
        if s.controller:
            self.controller = Controller(self.ops)
            self._background.append(loop.create_task(self.controller.run()))
        self._sampler = asyncio.get_running_loop().create_task(self._sample_queues())
        self._streams = StreamGuard(s.max_streams, s.stream_idle_s)
        server = aio.server(
            migration_thread_pool=None,
            options=inference_options(s),
            # The guard sits inside the error mapping: it ends streams with its own status.
            interceptors=[ErrorMappingInterceptor(infer_parsers(WireLimits.from_settings(s))), self._streams],
            # Streams have their own cap (the guard's), so unary calls always keep max_inflight.
            maximum_concurrent_rpcs=s.max_inflight + s.max_streams,
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            InferenceServicer(self.dataplane, registry, self.capture, WireLimits.from_settings(s)), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
            pool=POOL,
        )
        self.port = bind(server, s.host, s.port, "port", s)
        await server.start()
        self._server = server
        if s.metrics_port >= 0:
            try:
                httpd, _ = start_http_server(s.metrics_port, addr=s.host, registry=metrics_registry)
            except OSError as exc:
                raise ConfigError(f"metrics_port: cannot listen on {s.host}:{s.metrics_port}: {exc.strerror}") from None
            self._metrics_httpd = httpd
            self.metrics_port = httpd.server_port
        if s.control_port >= 0:
            await self._start_control(releases)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        # Everything loaded so far (modules, sessions, descriptors) lives as long as
        # the process: keep it out of full collections, which would otherwise walk
        # ~100k startup objects every time and stall the loop for milliseconds.
        gc.freeze()
        return self.port

    async def _start_control(self, releases: ReleasePlane) -> None:
        s = self.settings
        tokens = load_tokens(s.tokens_file, os.environ)
        check_bind(s.control_host, tokens)
        if not tokens:
            log.info("control API without tokens: loopback only, every caller may change releases")
        control = aio.server(
            migration_thread_pool=None,
            options=[("grpc.so_reuseport", 0)],
            interceptors=[AuthInterceptor(Authenticator(tokens)), ErrorMappingInterceptor()],
        )
        release_pb2_grpc.add_ReleaseServiceServicer_to_server(  # type: ignore[no-untyped-call]
            ReleaseServicer(releases, self.ops, self.loader, share_feedback=s.worker_index >= 0), control
        )
        self.control_port = bind(control, s.control_host, s.control_port, "control_port", s)
        await control.start()
        self._control = control

    async def _share_evidence(self, store: SqliteStore, worker: str) -> None:
        """Several workers: publish this one's counts (labels are shared by gateway.release.feedback)."""
        assert self.releases is not None
        plane = self.releases
        while True:
            await asyncio.sleep(SHARE_EVERY_S)
            try:
                snapshots = {m: plane.evidence[m].snapshot() for m in plane.table.models()}
                await asyncio.to_thread(store.put_evidence, worker, snapshots)
            except StoreUnavailable:
                pass  # the store logs its failures itself, rate-limited
            except Exception:
                log.exception("sharing evidence through the store failed")

    async def _follow_store(self, store: SqliteStore) -> None:
        """Serve changes other processes (workers, the controller) made, within about a second."""
        seen = await asyncio.to_thread(store.changes)
        while True:
            await asyncio.sleep(0.5)
            try:
                now = await asyncio.to_thread(store.changes)
                if now != seen:
                    seen = now
                    self.ops.sync()
            except StoreUnavailable:
                pass  # the store logs its failures itself, rate-limited
            except Exception:
                log.exception("reading the release store failed")

    async def _sample_queues(self) -> None:
        """Copy queue depths and release-plane counters into Prometheus, periodically."""
        while True:
            for v in self.registry or ():
                self.metrics.set_queue_depth(v.name, v.version, v.executor.queue_depth())
            if self.releases is not None:
                for model in self.releases.table.models():
                    self.release_metrics.sync(self.releases.report(model, local=True))
            if self.capture is not None:
                self.capture.flush()  # so a replay can read what was captured a moment ago
            await asyncio.sleep(QUEUE_SAMPLE_S)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop taking work, answer what is in flight, then stop (within the grace period)."""
        if self._draining:
            return await self.wait_stopped()
        self._draining = True
        grace = self.settings.grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._streams is not None:
            # Open streams end at their next wait for a message, so nothing is left
            # running when grpc shuts down (it would answer new calls CANCELLED meanwhile).
            self._streams.close()
        if self.dataplane is not None:
            self.dataplane.draining = True
            # New calls now get UNAVAILABLE while those in flight are answered.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.dataplane.wait_idle(), max(0.0, deadline - time.monotonic()))
        if self._streams is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._streams.wait_closed(), max(0.0, deadline - time.monotonic()))
        if self._server is not None:
            await self._server.stop(max(0.0, deadline - time.monotonic()))
        if self._control is not None:
            await self._control.stop(0.5)
        if self.releases is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.releases.idle(), max(0.1, deadline - time.monotonic()))
        if self.registry is not None:
            await self.registry.close()
        if self._sampler is not None:
            self._sampler.cancel()
        for task in self._background:
            task.cancel()
        if self.store is not None:
            self.store.close()
        if self.capture is not None:
            self.capture.close()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()  # type: ignore[attr-defined]
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def install_signal_handlers(self, signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._draining:
            return
        log.info("%s received: draining (grace %.1f s)", sig.name, self.settings.grace_s)
        asyncio.get_running_loop().create_task(self.drain())


async def run(settings: GatewaySettings) -> None:
    """Serve until SIGTERM/SIGINT, printing the address line scripts wait for."""
    # Held until this process ends: one gateway (and one controller) per state directory.
    state_lock = lock_state_dir(settings.state_dir)
    try:
        check_ports(settings)
        await _serve(settings)
    finally:
        state_lock.release()


async def _serve(settings: GatewaySettings) -> None:
    gateway = Gateway(settings)
    gateway.install_signal_handlers()
    port = await gateway.start()
    extras = ""
    if gateway.metrics_port >= 0:
        extras += f", metrics on {format_address(settings.host, gateway.metrics_port)}"
    if gateway.control_port >= 0:
        extras += f", control on {format_address(settings.control_host, gateway.control_port)}"
    log.info("serving %d model versions%s", sum(1 for _ in gateway.registry or ()), extras)
    print(f"listening on {format_address(settings.host, port)}", flush=True)
    await gateway.wait_stopped()


__all__ = ["Gateway", "run"]
