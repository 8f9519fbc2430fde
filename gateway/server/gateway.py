"""Composition root: builds the gateway from settings, serves, drains.

Only this module (and the CLI) wires concrete parts together; everything else
receives what it needs. `Gateway.start` is the one factory: it builds the parts
in startup order and, as each one comes up, puts what undoes it on one
AsyncExitStack at its place in the drain order; `drain` (or a failed start)
unwinds that stack. The drain, first to last:

1. health says NOT_SERVING; open streams end at their next wait for a message;
2. the data plane refuses new calls (UNAVAILABLE; 503 over REST) and answers those in flight,
   until it is idle or the grace period ends; so do the streams;
3. the REST server stops listening and closes its connections, then the gRPC inference
   server stops (what is left of the grace period), then the control API;
4. the release plane finishes its shadow copies; the models' executors close;
5. background loops are cancelled; the store and the capture files close;
6. the metrics endpoint shuts down; tracing exports its last spans (a few seconds at most);
   the thread pool shuts down.

A part that starts after its place in that order (the metrics endpoint starts
with the inference server, the control API after it) gets its place reserved
beforehand (`_reserve`).
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
from contextlib import AsyncExitStack

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from opentelemetry.sdk.trace.export import SpanExporter
from prometheus_client import CollectorRegistry, start_http_server

from gateway.config.settings import GatewaySettings, resolved_replica_id
from gateway.control.auth import Authenticator, AuthInterceptor, check_bind, load_tokens
from gateway.control.servicer import ReleaseServicer
from gateway.dashboard.app import build_app as build_dashboard
from gateway.dashboard.data import History, Sources
from gateway.dataplane import DataPlane
from gateway.errors import ConfigError
from gateway.protocol.capture import CaptureWriter
from gateway.protocol.limits import WireLimits, infer_parsers
from gateway.protocol.pb import inference_pb2 as pb
from gateway.protocol.pb import inference_pb2_grpc as pb_grpc
from gateway.protocol.pb import release_pb2_grpc
from gateway.protocol.pb.pool import POOL
from gateway.protocol.servicer import SERIALIZED_RESPONSES, InferenceServicer
from gateway.protocol.status import ErrorMappingInterceptor
from gateway.protocol.streams import StreamGuard
from gateway.protocol.wrapping import HandlerWrapper, SerializedResponses, WrappedRegistration
from gateway.release.controller import Controller
from gateway.release.loader import ModelLoader
from gateway.release.metrics import ReleaseMetrics
from gateway.release.model_sync import IntentStore, run_id
from gateway.release.notify import Notifier, NotifyMetrics
from gateway.release.notify.sender import CLOSE_GRACE_S
from gateway.release.operations import ReleaseOps
from gateway.release.plane import ReleasePlane
from gateway.release.store import STATE_FILE, Store, open_store
from gateway.release.sync import member_name, sync_loops
from gateway.rest.app import RestEndpoints, build_app
from gateway.rest.limits import RestLimits
from gateway.rest.server import HttpOptions, HttpServer
from gateway.server.capture import WireCapture
from gateway.server.ports import bind_listener, check_ports
from gateway.server.statelock import lock_state_dir
from gateway.serving.builder import ModelBuilder
from gateway.serving.metrics import QUEUE_SAMPLE_S, GatewayMetrics
from gateway.serving.registry import Registry
from gateway.serving.remote.link import ExecutorLink
from gateway.tracing import SHUTDOWN_TIMEOUT_S, Tracing, tracing_config

log = logging.getLogger(__name__)

# The server pings a connection idle this long, and drops it when no answer comes in
# KEEPALIVE_TIMEOUT_S: a vanished client's streams do not stay open until the idle limit.
KEEPALIVE_TIME_S = 60
KEEPALIVE_TIMEOUT_S = 20
# Calls still running when a connection reaches max_connection_age_s get this long to end.
CONNECTION_AGE_GRACE_S = 60
# Places on the inference port beyond every cap of ours: for health checks (Kubernetes'
# probes call Health.Check here) and the other short unary calls, while ModelInfer is at
# max_inflight. Calls refused at a cap hold one only for the moment of their refusal.
HEALTH_RESERVE = 32

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def dashboard_url(s: GatewaySettings, port: int) -> str:
    """Where a browser finds the dashboard (the INFO line and `gateway demo` print it)."""
    return f"{'https' if s.tls_cert else 'http'}://{format_address(s.control_host, port)}/"


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


def bind(server: aio.Server, host: str, port: int, *, setting: str, settings: GatewaySettings) -> int:
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


class Gateway:
    """One serving process: the inference port, health, reflection, metrics and the control API."""

    # Set by start.
    metrics: GatewayMetrics
    release_metrics: ReleaseMetrics
    ops: ReleaseOps
    loader: ModelLoader

    def __init__(self, settings: GatewaySettings, span_exporter: SpanExporter | None = None) -> None:
        # `gateway serve` names the replica before any worker starts; a gateway built here
        # directly (tests, tools) names itself.
        self.settings = dataclasses.replace(settings, replica_id=resolved_replica_id(settings))
        # Where spans go instead of OTLP (tests: the SDK's InMemorySpanExporter); given, tracing is on.
        self._span_exporter = span_exporter
        self.tracing: Tracing | None = None  # None: tracing off
        self.port = 0
        self.http_port = -1
        self.metrics_port = -1
        self.control_port = -1
        self.dashboard_port = -1
        # The parts tests and tools look at; None until start builds them.
        self.registry: Registry | None = None
        self.dataplane: DataPlane | None = None
        self.releases: ReleasePlane | None = None
        self.store: Store | None = None
        self.capture: CaptureWriter | None = None
        self.controller: Controller | None = None
        # This process's name among those sharing the store (None: nobody to share with).
        self.member: str | None = None
        self.notifier: Notifier | None = None
        self._streams: StreamGuard | None = None
        self._health = health_aio.HealthServicer()
        self._teardown = AsyncExitStack()
        self._grace_end = 0.0  # when the drain's waits give up (set when it starts)
        self._starting = False
        self._started = asyncio.Event()  # start returned or failed
        self._draining = False
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Build every part and serve; a failure undoes what was built (in drain order) and raises."""
        self._starting = True
        try:
            await self._build(self._teardown)
        except BaseException:
            try:
                await self._teardown.aclose()
            except Exception:
                log.exception("undoing a failed start failed")
            raise
        finally:
            self._started.set()
        # Everything loaded so far (modules, sessions, descriptors) lives as long as
        # the process: keep it out of full collections, which would otherwise walk
        # ~100k startup objects every time and stall the loop for milliseconds.
        gc.freeze()
        return self.port

    async def _build(self, stack: AsyncExitStack) -> None:
        s = self.settings
        # Threads start lazily; every batcher caps its own batches in flight
        # (`instances`), so the pool never queues one version behind another.
        pool = ThreadPoolExecutor(max_workers=256, thread_name_prefix="ort")
        stack.callback(pool.shutdown, wait=False, cancel_futures=True)
        link: ExecutorLink | None = None
        if s.executor_address:
            # Models run in the executor process (`--executors 1`); the link closes after the
            # registry's executors have drained (the stack unwinds last in, first out).
            link = await ExecutorLink.connect(s.executor_address)
            stack.push_async_callback(link.close)
        config = tracing_config(s.otlp_endpoint, os.environ, injected=self._span_exporter is not None)
        if config is not None:
            # This process's own provider (each worker builds one), shut down late in the drain:
            # the spans of shadow copies finished during the drain are exported too.
            tracing = self.tracing = Tracing.build(config, s.worker_index, self._span_exporter)
            # Within what is left of the grace period (half a second at least): a collector that
            # never answers must not hold the process past it (the supervisor kills at grace + 5 s).
            stack.push_async_callback(lambda: tracing.shutdown(min(SHUTDOWN_TIMEOUT_S, max(0.5, self._remaining()))))
        metrics_endpoint = await _reserve(stack)
        metrics_registry = CollectorRegistry()
        self.metrics = GatewayMetrics(metrics_registry)
        self.release_metrics = ReleaseMetrics(metrics_registry)
        if s.capture_dir is not None:
            self.capture = CaptureWriter(
                s.capture_dir, s.capture_fraction, s.capture_file_mb << 20, s.capture_max_mb << 20
            )
            stack.callback(self.capture.close)
        # SQLite in state_dir, or PostgreSQL at state_url (several replicas).
        self.store = store = await asyncio.to_thread(open_store, s.state_dir, s.state_url)
        stack.callback(store.close)
        # Notifications go out until the loops that make release changes are cancelled (below).
        notifier = self.notifier = self._start_notifier(stack, metrics_registry)
        # The loops use the store and the models: cancelled after the models close, before the store does.
        tasks: list[asyncio.Task[None]] = []
        stack.callback(_cancel_all, tasks)
        self.registry = registry = Registry()
        stack.push_async_callback(registry.close)
        self.releases = releases = ReleasePlane(registry)
        releases.tracing = self.tracing
        stack.push_async_callback(releases.external.close)  # in-flight external check reads, their client
        if notifier is not None:
            releases.on_circuit_open = notifier.circuit_opened
        stack.push_async_callback(self._finish_releases, releases)
        self.dataplane = dataplane = DataPlane(registry, releases)
        releases.primary = dataplane
        self.ops = ops = ReleaseOps(
            releases,
            store,
            self.capture,
            on_applied=self.release_metrics.applied,
            on_audit=None if notifier is None else notifier.audit,
        )
        self.loader = loader = ModelLoader(
            ModelBuilder.from_settings(
                s,
                pool,
                self.metrics,
                remote=None if link is None else link.executor,
                remote_load=None if link is None else link.load,
            ),
            registry,
            releases,
            ops,
        )
        await loader.load_at_startup()  # nothing is served before it ends
        loop = asyncio.get_running_loop()
        if s.worker_index >= 0:
            # Run-time loads/unloads reach every worker through the store (gateway.release.model_sync).
            # This host's workers only, so in state_dir whichever store holds the releases.
            await loader.join(IntentStore(s.state_dir / STATE_FILE, run_id()), str(s.worker_index))
            tasks.append(loop.create_task(loader.follow()))
        self.member = member_name(s.replica_id, s.worker_index, bool(s.state_url))
        reachable = self.release_metrics.store_up.set
        tasks += [loop.create_task(sync) for sync in await sync_loops(store, releases, ops, self.member, reachable)]
        if s.controller:
            # Named so `gateway status` says which replica leads; the pid tells a restarted process apart.
            holder = f"{s.replica_id}/{max(s.worker_index, 0)} pid {os.getpid()}"
            self.controller = Controller(ops, on_decision=self.release_metrics.decided, holder=holder)
            tasks.append(loop.create_task(self.controller.run()))
        tasks.append(loop.create_task(self._sample_queues(registry, releases, self.capture)))
        control_api = await _reserve(stack)  # stops after the inference server
        await self._start_inference(stack, dataplane, registry)
        if s.metrics_port >= 0:
            try:
                httpd, _ = start_http_server(s.metrics_port, addr=s.host, registry=metrics_registry)
            except OSError as exc:
                raise ConfigError(f"metrics_port: cannot listen on {s.host}:{s.metrics_port}: {exc.strerror}") from None
            metrics_endpoint.callback(httpd.shutdown)
            self.metrics_port = httpd.server_port
        if s.control_port >= 0:
            control = await self._start_control(releases, ops, loader)
            control_api.push_async_callback(control.stop, 0.5)
        if s.dashboard_port >= 0:
            dashboard, history = await self._start_dashboard(releases, ops)
            # Stops with the control API (its sibling on the control side), before it.
            control_api.push_async_callback(dashboard.stop, 0.5)
            control_api.callback(history.cancel)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        stack.push_async_callback(self._set_health, health_pb2.HealthCheckResponse.NOT_SERVING)

    def _start_notifier(self, stack: AsyncExitStack, registry: CollectorRegistry) -> Notifier | None:
        """The [[notify]] targets' senders, in the one process that makes release changes.

        Events are read off audit rows as this process appends them, so only a process
        that appends them sends: the only one, or worker 0 of `--workers N` (its control API
        and controller make every change; the other workers only follow the store). Each
        row is appended once, so each event goes out once: N senders would not send N
        copies, but a worker sending nothing costs nothing either. A shadow's circuit is
        each process's own: worker 0's is announced, the others' are not (a shadow that
        fails on everyone's copies fails on worker 0's too), so N workers never send N.
        """
        s = self.settings
        if not s.notify or s.worker_index > 0:
            return None
        notifier = Notifier.build(s.notify, NotifyMetrics(registry), os.environ)
        notifier.start()
        stack.push_async_callback(lambda: notifier.close(min(CLOSE_GRACE_S, max(0.1, self._remaining()))))
        log.info("notifications to %s", ", ".join(f"{t.name} ({t.kind})" for t in s.notify))
        return notifier

    async def _start_inference(self, stack: AsyncExitStack, dataplane: DataPlane, registry: Registry) -> None:
        s = self.settings
        self._streams = streams = StreamGuard(s.max_streams, s.stream_idle_s, s.max_watchers)
        server = aio.server(
            migration_thread_pool=None,
            options=inference_options(s),
            # The flood past every cap is refused by gRPC before any Python runs. Within it:
            # ModelInfer keeps max_inflight (the servicer counts), streams and health watchers
            # their own caps (the guard's), and HEALTH_RESERVE places are left for the health
            # checks probes send and the other short calls, however busy inference is.
            maximum_concurrent_rpcs=s.max_inflight + s.max_streams + s.max_watchers + HEALTH_RESERVE,
        )
        # Handlers are wrapped once here rather than by interceptors, which cost every call.
        # The guard sits inside the error mapping: it ends streams with its own status.
        wrappers: list[HandlerWrapper] = [
            SerializedResponses(SERIALIZED_RESPONSES),
            streams,
            ErrorMappingInterceptor(infer_parsers(WireLimits.from_settings(s))),
        ]
        if log.isEnabledFor(logging.DEBUG):
            # Only at DEBUG: otherwise no call pays for the wrapper.
            wrappers.append(RequestLog(REQUEST_LOG_EVERY))
        services = WrappedRegistration(server, wrappers)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            InferenceServicer(
                dataplane, registry, self.capture, WireLimits.from_settings(s), self.tracing, s.max_inflight
            ),
            services,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, services)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        # As reflection.enable_server_reflection does for an aio server (it checks the server type).
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(names, pool=POOL), services
        )
        self.port = bind(server, s.host, s.port, setting="port", settings=s)
        await server.start()
        stack.push_async_callback(self._stop_server, server)
        if s.http_port >= 0:
            http = await self._start_http(dataplane, registry)
            stack.push_async_callback(self._stop_http, http)
        stack.push_async_callback(self._wait_streams, streams)
        stack.push_async_callback(self._drain_dataplane, dataplane)
        # Open streams end at their next wait for a message, so nothing is left
        # running when grpc shuts down (it would answer new calls CANCELLED meanwhile).
        stack.callback(streams.close)

    async def _start_http(self, dataplane: DataPlane, registry: Registry) -> HttpServer:
        """The OIP REST binding on its own port, served on this loop (gateway/rest)."""
        s = self.settings
        capture = None if self.capture is None else WireCapture(self.capture)
        endpoints = RestEndpoints(dataplane, registry, RestLimits.from_settings(s), capture, self.tracing)
        sock = bind_listener(s.host, s.http_port, "http_port", shared=s.worker_index >= 0)
        options = HttpOptions(
            # As gRPC's maximum_concurrent_rpcs; idle keep-alive connections count too.
            max_connections=s.max_inflight + s.max_streams,
            tls_cert=s.tls_cert,
            tls_key=s.tls_key,
            tls_client_ca=s.tls_client_ca,
        )
        http = HttpServer(build_app(endpoints), sock, options)
        try:
            await http.start()
        except BaseException:
            sock.close()
            raise
        self.http_port = http.port
        return http

    async def _start_control(self, releases: ReleasePlane, ops: ReleaseOps, loader: ModelLoader) -> aio.Server:
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
            ReleaseServicer(releases, ops, loader, member=self.member), control
        )
        self.control_port = bind(control, s.control_host, s.control_port, setting="control_port", settings=s)
        await control.start()
        return control

    async def _start_dashboard(self, releases: ReleasePlane, ops: ReleaseOps) -> tuple[HttpServer, asyncio.Task[None]]:
        """The read-only browser dashboard (gateway/dashboard) on the control side, with its history sampler."""
        s = self.settings
        tokens = load_tokens(s.tokens_file, os.environ)
        check_bind(s.control_host, tokens)  # as the control API: loopback only without tokens
        sources = Sources(releases, ops)
        history = History(sources)
        identify = Authenticator(tokens).identify if tokens else None
        app = build_dashboard(sources, history, identify, secure_cookie=s.tls_cert is not None)
        sock = bind_listener(s.control_host, s.dashboard_port, "dashboard_port", shared=False)
        # A few people's browsers, each polling every second or two: a small cap is plenty.
        options = HttpOptions(max_connections=64, tls_cert=s.tls_cert, tls_key=s.tls_key, tls_client_ca=s.tls_client_ca)
        server = HttpServer(app, sock, options)
        try:
            await server.start()
        except BaseException:
            sock.close()
            raise
        self.dashboard_port = server.port
        return server, asyncio.get_running_loop().create_task(history.run())

    async def _sample_queues(self, registry: Registry, releases: ReleasePlane, capture: CaptureWriter | None) -> None:
        """Copy queue depths and release-plane counters into Prometheus, periodically."""
        # Rollout phases are shown by one process of a multi-worker gateway: the one whose
        # control API and controller change them (worker 0), so workers never disagree.
        shows_rollouts = self.settings.worker_index <= 0
        # With an executor each model has one queue, there, for every front end: each reports
        # its share of the capacity, so the workers' sum is the queue's size (as the depth's
        # sum is what waits in it), not that times the number of front ends.
        share = 1 / max(1, self.settings.executor_front_ends)
        while True:
            loaded: dict[str, list[str]] = {}
            for v in registry:
                self.metrics.set_queue_depth(v.name, v.version, v.executor.queue_depth())
                self.metrics.set_queue_capacity(v.name, v.version, v.spec.batching.max_queue_size * share)
                loaded.setdefault(v.name, []).append(v.version)
            for model in releases.table.models():
                self.release_metrics.sync(releases.report(model, local=True))
                if shows_rollouts:
                    self.release_metrics.sync_rollout(self.ops.current(model), loaded.get(model, ()))
            if capture is not None:
                capture.flush()  # so a replay can read what was captured a moment ago
            await asyncio.sleep(QUEUE_SAMPLE_S)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    # -- the drain's waits, in the order they run -----------------------------------------

    def _remaining(self) -> float:
        return max(0.0, self._grace_end - time.monotonic())

    async def _drain_dataplane(self, dataplane: DataPlane) -> None:
        dataplane.draining = True
        # New calls now get UNAVAILABLE while those in flight are answered.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(dataplane.wait_idle(), self._remaining())

    async def _wait_streams(self, streams: StreamGuard) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(streams.wait_closed(), self._remaining())

    async def _stop_http(self, http: HttpServer) -> None:
        await http.stop(self._remaining())

    async def _stop_server(self, server: aio.Server) -> None:
        await server.stop(self._remaining())

    async def _finish_releases(self, releases: ReleasePlane) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(releases.idle(), max(0.1, self._remaining()))

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop taking work, answer what is in flight, then stop (within the grace period).

        While the drain waits, new calls are answered UNAVAILABLE (retryable, "shutting
        down"). A few calls arriving in the last moment still get CANCELLED: grpc core
        cancels the calls it has received but not yet handed to Python when
        `server.stop` runs, and grpc Python has no way to send the clients GOAWAY (which
        would move them to another replica first) before that stop. Clients should
        retry CANCELLED on an idempotent call during a rollout, as they do UNAVAILABLE.
        """
        if self._draining:
            return await self.wait_stopped()
        self._draining = True
        if self._starting:
            await self._started.wait()  # a signal during startup: drain what the start built
        grace = self.settings.grace_s if grace_s is None else grace_s
        self._grace_end = time.monotonic() + grace
        try:
            await self._teardown.aclose()
        finally:
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


# At DEBUG, one inference call in this many gets a log line: a line per call would cost more
# than the call. To log every call, set it to 1 here (there is no setting for it yet).
REQUEST_LOG_EVERY = 100


class RequestLog:
    """One DEBUG line for every `every`-th unary call (method, status, milliseconds), outermost:
    it times what the caller waits for."""

    def __init__(self, every: int) -> None:
        self._every = every
        self._calls = 0

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        inner = handler.unary_unary
        if inner is None:
            return handler

        async def logged(request: object, context: aio.ServicerContext[object, object]) -> object:
            self._calls += 1
            if self._calls % self._every:
                return await inner(request, context)
            start = time.perf_counter()
            status = "OK"
            try:
                return await inner(request, context)
            except BaseException:
                status = "ERROR"
                raise
            finally:
                code = context.code()
                if code is not None and code != grpc.StatusCode.OK:
                    status = code.name if isinstance(code, grpc.StatusCode) else str(code)
                elapsed_ms = round((time.perf_counter() - start) * 1e3, 3)
                extra = {"method": method, "status": status, "ms": elapsed_ms, "sampled_1_in": self._every}
                log.debug("request %s %s %.3f ms", method, status, elapsed_ms, extra=extra)

        wrapped: grpc.RpcMethodHandler = handler._replace(unary_unary=logged)
        return wrapped


async def _reserve(stack: AsyncExitStack) -> AsyncExitStack:
    """A place in the drain order for a part that starts later (a stack unwinds last in, first out)."""
    return await stack.enter_async_context(AsyncExitStack())


def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()


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
    if gateway.http_port >= 0:
        extras += f", http on {format_address(settings.host, gateway.http_port)}"
    if gateway.metrics_port >= 0:
        extras += f", metrics on {format_address(settings.host, gateway.metrics_port)}"
    if gateway.control_port >= 0:
        extras += f", control on {format_address(settings.control_host, gateway.control_port)}"
    if gateway.dashboard_port >= 0:
        extras += f", dashboard on {dashboard_url(settings, gateway.dashboard_port)}"
    log.info("serving %d model versions%s", sum(1 for _ in gateway.registry or ()), extras)
    print(f"listening on {format_address(settings.host, port)}", flush=True)
    await gateway.wait_stopped()
    # The last line: log readers (and --log-format json collectors) see the drain finished.
    log.info("stopped")


__all__ = ["Gateway", "run"]
