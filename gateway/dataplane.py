"""The request path: resolve the version, validate, execute, answer, record."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from gateway.errors import Draining, InvalidInput, ModelExecutionError
from gateway.logthrottle import ThrottledLog, one_line
from gateway.release.plane import ReleasePlane, Served, routing_key
from gateway.release.routing import Role
from gateway.release.rules import Rule
from gateway.release.state import ReleaseState
from gateway.serving.metrics import VERSION_FAULTS, outcome_of
from gateway.serving.registry import LoadedVersion, Registry
from gateway.serving.validation import build_inputs, check_outputs
from gateway.tracing import RequestTrace
from gateway.types import InferResponse, RequestRun, Tensors, WireRequest

log = logging.getLogger(__name__)


def _timeout_s(req: WireRequest, default_us: int) -> float | None:
    value = req.parameters.get("timeout_us")
    if value is None:
        return default_us / 1e6 if default_us else None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput("parameter 'timeout_us' must be an integer (int64_param or uint64_param)")
    if value <= 0:
        raise InvalidInput(f"parameter 'timeout_us' must be > 0, got {value}")
    return value / 1e6


@dataclass(slots=True)
class _Call:
    """One request on its way through `DataPlane.infer`: what its accounting needs at the end."""

    req: WireRequest
    loaded: LoadedVersion
    role: Role
    state: ReleaseState | None
    rule: Rule | None  # the routing rule that chose the version, if one did
    trace: RequestTrace | None  # None unless tracing is on and the request was sampled
    start: int = field(default_factory=time.perf_counter_ns)
    batch: int = 1
    feeds: Tensors | None = None
    results: list[np.ndarray] | None = None


class DataPlane:
    def __init__(self, registry: Registry, releases: ReleasePlane) -> None:
        self.registry = registry
        self.releases = releases
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Model-run failures, at most a line per version per few seconds.
        self._failures = ThrottledLog(log)

    def is_idle(self) -> bool:
        return self._idle.is_set()

    async def wait_idle(self) -> None:
        """Return once no request is in flight (used by the drain)."""
        await self._idle.wait()

    async def infer(self, req: WireRequest, trace: RequestTrace | None = None) -> InferResponse:
        """Serve one request; `trace` (a traced request's, from the edge) gets the routing and the times."""
        if self.draining:
            raise Draining("the server is shutting down; retry on another replica")
        key = routing_key(req.parameters, req.id)
        loaded, role, state, rule = self.releases.route(req, key)
        call = _Call(req, loaded, role, state, rule, trace)
        if trace is not None:
            _trace_route(trace, req, loaded.version, role, state, rule)
        self.inflight += 1
        self._idle.clear()
        try:
            outputs = await self._run(call)
        except BaseException as exc:
            # Accounted here, never from a `finally` reading a saved copy of the
            # exception: a local holding it closes the cycle exception ->
            # traceback -> this frame -> exception, and the frame holds the
            # request (up to the message size), which then stayed in memory until
            # a full collection (on an idle server: never).
            self._finish(call, exc)
            raise
        self._finish(call, None)
        if rule is not None:
            return InferResponse(req.model, loaded.version, outputs, req.id, {"role": role, "rule": rule.name})
        return InferResponse(req.model, loaded.version, outputs, req.id, {"role": role})

    async def _run(self, call: _Call) -> dict[str, np.ndarray]:
        req, loaded, trace = call.req, call.loaded, call.trace
        model = loaded.model
        if trace is not None:
            trace.validating_ns = time.perf_counter_ns()
        if req.outputs:
            check_outputs(req.outputs, model.outputs, req.model)
        call.feeds, call.batch = build_inputs(req.inputs, model.inputs, loaded.spec, req.model)
        self.releases.screen(loaded, call.feeds)
        timeout_s = _timeout_s(req, loaded.spec.batching.default_timeout_us)
        if trace is None:
            call.results = await loaded.executor.submit(call.feeds, call.batch, req.deadline, timeout_s)
        else:
            trace.validated_ns, trace.rows = time.perf_counter_ns(), call.batch
            call.results = await loaded.executor.submit(call.feeds, call.batch, req.deadline, timeout_s, trace.timing)
        if req.outputs:
            wanted = set(req.outputs)
            return {n: a for n, a in zip(model.output_names, call.results, strict=True) if n in wanted}
        return dict(zip(model.output_names, call.results, strict=True))

    def _finish(self, call: _Call, error: BaseException | None) -> None:
        """Count the request's outcome and record it as evidence where it is the version's."""
        self.inflight -= 1
        if not self.inflight:
            self._idle.set()
        req, loaded = call.req, call.loaded
        elapsed = time.perf_counter_ns() - call.start
        loaded.stats.record_request(error is None, elapsed, call.batch)
        outcome = outcome_of(error, client_timeout="timeout_us" in req.parameters)
        if loaded.metrics is not None:
            loaded.metrics.count(outcome)
            loaded.metrics.request_seconds.observe(elapsed / 1e9)
        if isinstance(error, ModelExecutionError):
            self._log_failure(loaded.name, loaded.version, req.id, error)
        # Only what the version caused is its evidence (see VERSION_FAULTS): a
        # client's bad parameters, deadlines and cancellations are counted apart,
        # in the outcome above, so no client can roll back a healthy candidate.
        if call.feeds is not None and (error is None or outcome in VERSION_FAULTS):
            run = RequestRun(
                request_id=req.id,
                feeds=call.feeds,
                rows=call.batch,
                outputs=call.results or (),
                seconds=elapsed / 1e9,
                deadline=req.deadline,
                trace=None if call.trace is None else call.trace.context,
            )
            self.releases.record(
                Served(loaded=loaded, role=call.role, state=call.state, ok=error is None, run=run, rule=call.rule)
            )

    def _log_failure(self, model: str, version: str, request_id: str, error: BaseException) -> None:
        """The caller got INTERNAL "details are in the gateway log": these are the details."""
        self._failures.log(
            logging.ERROR,
            (model, version),
            "model %s version %s failed on request id %s: %s",
            model,
            version,
            one_line(repr(request_id)),
            one_line(error),
        )


def _trace_route(
    trace: RequestTrace, req: WireRequest, version: str, role: Role, state: ReleaseState | None, rule: Rule | None
) -> None:
    """A traced request's routing, on its span: which version served it, in which role, and why."""
    if state is None:
        decision = "pinned"  # the client named the version
    elif rule is not None:
        decision = f"rule:{rule.name}"  # a routing rule matched (gateway.release.rules)
    elif not state.canary or state.canary_weight_bp <= 0:
        decision = "stable_only"  # no canary takes traffic: every request goes to the stable version
    else:
        decision = "weighted_split"  # the routing key's point fell on this side of the canary's weight
    key = "routing_key" if "routing_key" in req.parameters else "request_id" if req.id else "none"
    trace.set(
        {
            "gateway.model": req.model,
            "gateway.version": version,
            "gateway.role": role,
            "gateway.routing": decision,
            "gateway.routing.key": key,
            "gateway.release.revision": 0 if state is None else state.revision,
            "gateway.canary.weight_bp": 0 if state is None else state.canary_weight_bp,
            "gateway.request.id": req.id,
        }
    )
