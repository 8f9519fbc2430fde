"""The REST endpoints of KServe v2 (health, metadata, infer) as a Starlette application.

Thin, like the gRPC servicer: read the body under its cap, decode, one data-plane
call, encode. Errors become JSON `{"error": "..."}` with the status of the one
table (rest/status.py); nothing raised here reaches Starlette's own 500 page.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import SERVER_NAME, __version__
from gateway.dataplane import DataPlane
from gateway.errors import ModelNotFound
from gateway.rest import codec
from gateway.rest.limits import DEFAULT_LIMITS, RestLimits, check_length_header, decompress, too_large
from gateway.rest.status import JSON_TYPE, error_answer, error_body, http_status
from gateway.serving.registry import PLATFORM, Registry
from gateway.tracing import RequestTrace, Tracing
from gateway.types import InferResponse, TensorSpec, WireRequest

# Triton's binary tensor data extension is the one this binding adds to the core protocol.
EXTENSIONS = ["binary_tensor_data"]
BINARY_TYPE = "application/octet-stream"
_V = "/v2/models/{name}"
_VV = "/v2/models/{name}/versions/{version}"
# A traced infer's span name and route (by whether the path names a version), as
# OpenTelemetry's HTTP conventions name a server span: method and route template.
INFER_ROUTES = {False: f"{_V}/infer", True: f"{_VV}/infer"}
INFER_SPANS = {versioned: f"POST {route}" for versioned, route in INFER_ROUTES.items()}


class Recorder(Protocol):
    """Where sampled stable answers go (the composition root adapts the capture writer)."""

    def wanted(self) -> bool: ...

    def record(self, request: WireRequest, response: InferResponse, seconds: float) -> None: ...


def _json(document: object, status: int = 200) -> Response:
    return Response(orjson.dumps(document), status, media_type=JSON_TYPE)


def _tensors(specs: list[TensorSpec]) -> list[dict[str, object]]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]


Endpoint = Callable[[Request], Awaitable[Response]]


def _guarded(endpoint: Endpoint) -> Endpoint:
    """Every exception answered from the one table, as the gRPC edge's ErrorMappingInterceptor does."""

    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ClientDisconnect:
            # The client left before its body arrived: nobody reads the answer, and it is no bug to log.
            return Response(status_code=400)
        except Exception as exc:
            status, body, headers = error_answer(exc, request.url.path)
            return Response(body, status, headers=headers, media_type=JSON_TYPE)

    return guarded


class RestEndpoints:
    def __init__(
        self,
        dataplane: DataPlane,
        registry: Registry,
        limits: RestLimits = DEFAULT_LIMITS,
        capture: Recorder | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.dataplane = dataplane
        self.registry = registry
        self.limits = limits
        self.capture = capture
        self.tracing = tracing  # None: tracing off, and the infer routes are the untraced endpoint itself

    async def live(self, request: Request) -> Response:
        return _json({"live": True})

    async def ready(self, request: Request) -> Response:
        # KServe v2: the status is the answer (200 true, 4xx false); the body says it too.
        ready = self.registry.ready() and not self.dataplane.draining
        return _json({"ready": ready}, 200 if ready else 400)

    async def server_metadata(self, request: Request) -> Response:
        return _json({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})

    async def model_metadata(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version", "")
        entry = self.registry.entry(name)
        loaded = self.registry.get(name, version)
        return _json(
            {
                "name": entry.name,
                "versions": entry.sorted_versions(),
                "platform": PLATFORM,
                "inputs": _tensors(loaded.model.inputs),
                "outputs": _tensors(loaded.model.outputs),
            }
        )

    async def model_ready(self, request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params.get("version", "")
        try:
            loaded = self.registry.get(name, version)
        except ModelNotFound:
            ready = False
        else:
            ready = loaded.ready and not self.dataplane.draining
        return _json({"name": name, "ready": ready}, 200 if ready else 400)

    async def infer(self, request: Request, trace: RequestTrace | None = None) -> Response:
        body = await self._body(request)
        decoded = codec.decode_infer(
            body,
            request.headers.get(codec.HEADER_LENGTH),
            request.path_params["name"],
            request.path_params.get("version", ""),
            self.limits,
        )
        del body  # the JSON and binary parts are all decoded into the request now
        decoded.wire.headers = request.headers.items  # read only if a routing rule asks (gateway.release.rules)
        start = time.perf_counter()
        answer = await self.dataplane.infer(decoded.wire, trace)
        content, json_length = codec.encode_infer(answer, decoded)
        # The stable version's answers are the reference a replay compares with (as on gRPC).
        if self.capture is not None and answer.parameters.get("role") == "stable" and self.capture.wanted():
            self.capture.record(decoded.wire, answer, time.perf_counter() - start)
        if json_length is None:
            return Response(content, media_type=JSON_TYPE)
        headers = {"Inference-Header-Content-Length": str(json_length)}
        return Response(content, headers=headers, media_type=BINARY_TYPE)

    async def traced_infer(self, request: Request) -> Response:
        """`infer` with its span, its parent the request's `traceparent` header (the sampler may drop it)."""
        assert self.tracing is not None  # routed here only when tracing is on
        headers = request.headers
        versioned = "version" in request.path_params
        trace = self.tracing.start(
            self.tracing.extract(headers.get("traceparent"), headers.get("tracestate")),
            INFER_SPANS[versioned],
            {"http.request.method": "POST", "http.route": INFER_ROUTES[versioned]},
        )
        if trace is None:
            return await self.infer(request)
        try:
            response = await self.infer(request, trace)
        except BaseException as exc:
            # The answer is made further out (`_guarded`) from the same table: the span says it too.
            # A client that went away gets no answer, and a cancelled task is not an HTTP error.
            if isinstance(exc, Exception) and not isinstance(exc, ClientDisconnect):
                trace.set({"http.response.status_code": http_status(exc)})
            trace.end(exc)
            raise
        trace.set({"http.response.status_code": response.status_code})
        trace.end()
        return response

    async def _body(self, request: Request) -> bytes:
        """The body, read no further than the cap (a declared length over it is refused unread)."""
        cap = self.limits.max_body_bytes
        check_length_header(request.headers.get("content-length"), cap)
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise too_large(f"over {cap}", cap)
            chunks.append(chunk)
        body = b"".join(chunks)
        encoding = request.headers.get("content-encoding")
        if encoding is not None and encoding.strip().lower() not in ("", "identity"):
            body = decompress(body, encoding, cap)
        return body

    def routes(self) -> list[Route]:
        get, post = ["GET"], ["POST"]
        # Picked once here: with tracing off the infer routes cost not even a test for it.
        infer = self.infer if self.tracing is None else self.traced_infer
        endpoints: list[tuple[str, Endpoint, list[str]]] = [
            ("/v2", self.server_metadata, get),
            ("/v2/health/live", self.live, get),
            ("/v2/health/ready", self.ready, get),
            (_V, self.model_metadata, get),
            (_VV, self.model_metadata, get),
            (f"{_V}/ready", self.model_ready, get),
            (f"{_VV}/ready", self.model_ready, get),
            (f"{_V}/infer", infer, post),
            (f"{_VV}/infer", infer, post),
        ]
        return [Route(path, _guarded(endpoint), methods=methods) for path, endpoint, methods in endpoints]


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such path: 404, wrong method: 405) in the same JSON form."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    message = f"{request.method} {request.url.path[:200]}: {detail}"
    headers: dict[str, Any] = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
    return Response(error_body(message), status, headers=headers, media_type=JSON_TYPE)


def build_app(endpoints: RestEndpoints) -> Starlette:
    return Starlette(routes=endpoints.routes(), exception_handlers={HTTPException: _http_error})
