"""The request path: resolve the version, validate, execute, answer, record."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from gateway.errors import Draining, InvalidInput, ModelExecutionError
from gateway.logthrottle import ThrottledLog, one_line
from gateway.release.plane import ReleasePlane, routing_key
from gateway.serving.metrics import VERSION_FAULTS, outcome_of
from gateway.serving.registry import Registry
from gateway.serving.validation import build_inputs, check_outputs
from gateway.types import InferResponse, Tensors, WireRequest

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

    async def infer(self, req: WireRequest) -> InferResponse:
        if self.draining:
            raise Draining("the server is shutting down; retry on another replica")
        key = routing_key(req.parameters, req.id)
        loaded, role, state = self.releases.route(req.model, req.version, key)
        start = time.perf_counter_ns()
        error: BaseException | None = None
        batch = 1
        feeds: Tensors | None = None
        results: list[np.ndarray] | None = None
        self.inflight += 1
        self._idle.clear()
        try:
            model = loaded.model
            if req.outputs:
                check_outputs(req.outputs, model.outputs, req.model)
            feeds, batch = build_inputs(req.inputs, model.inputs, loaded.spec, req.model)
            timeout_s = _timeout_s(req, loaded.spec.batching.default_timeout_us)
            results = await loaded.executor.submit(feeds, batch, req.deadline, timeout_s)
            if req.outputs:
                wanted = set(req.outputs)
                outputs = {n: a for n, a in zip(model.output_names, results, strict=True) if n in wanted}
            else:
                outputs = dict(zip(model.output_names, results, strict=True))
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.inflight -= 1
            if not self.inflight:
                self._idle.set()
            elapsed = time.perf_counter_ns() - start
            loaded.stats.record_request(error is None, elapsed, batch)
            outcome = outcome_of(error, client_timeout="timeout_us" in req.parameters)
            if loaded.metrics is not None:
                loaded.metrics.count(outcome)
                loaded.metrics.request_seconds.observe(elapsed / 1e9)
            if isinstance(error, ModelExecutionError):
                self._log_failure(loaded.name, loaded.version, req.id, error)
            # Only what the version caused is its evidence (see VERSION_FAULTS): a
            # client's bad parameters, deadlines and cancellations are counted apart,
            # in the outcome above, so no client can roll back a healthy candidate.
            if feeds is not None and (error is None or outcome in VERSION_FAULTS):
                self.releases.record(
                    loaded, role, state, req.id, error is None, elapsed / 1e9, batch, feeds, results, req.deadline
                )
        return InferResponse(req.model, loaded.version, outputs, req.id, {"role": role})

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
