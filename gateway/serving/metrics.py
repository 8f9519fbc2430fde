"""Serving-plane Prometheus collectors, created on an injected registry (no module globals).

Per-version children are bound once at load time, so the request path pays a
method call per observation and no label lookups.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway import errors

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
QUEUE_SAMPLE_S = 0.5
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

OUTCOME_BY_ERROR: dict[type[Exception], str] = {
    errors.InvalidInput: "invalid",
    errors.ModelNotFound: "not_found",
    errors.Overloaded: "rejected",
    errors.QueueTimeout: "timeout",
    errors.DeadlineExceeded: "deadline",
    errors.Draining: "unavailable",
}


# Which outcomes count against the version that answered: its error rate, which
# the rollout's error_rate check compares, holds only failures the version caused.
#   "error"     the model run failed, or answered with the wrong shape (or a bug);
#   "timeout"   the request outwaited the spec's own queue timeout (default_timeout_us):
#               the version did not keep up within the time the operator gave it;
#   "rejected"  the version's queue was full: the server refused at its own choice,
#               under the load this version's share of traffic brought.
# Everything else is counted apart, by outcome, and never against the version,
# because any client could produce it at will: "invalid" (bad parameters, such as
# a malformed timeout_us), "deadline" (the client's gRPC deadline passed first),
# "client_timeout" (the client's own timeout_us passed first), "cancelled" (the
# client went away); and "unavailable" (draining or unloading) is no one's fault.
VERSION_FAULTS = frozenset({"error", "timeout", "rejected"})


def outcome_of(exc: BaseException | None, client_timeout: bool = False) -> str:
    """The outcome label for a request; `client_timeout`: the request carried its own timeout_us."""
    if exc is None:
        return "ok"
    for cls in type(exc).__mro__:
        outcome = OUTCOME_BY_ERROR.get(cls)
        if outcome is not None:
            return "client_timeout" if outcome == "timeout" and client_timeout else outcome
    return "cancelled" if exc.__class__.__name__ == "CancelledError" else "error"


@dataclass(slots=True)
class VersionMetrics:
    """Children bound to one (model, version)."""

    request_seconds: Histogram
    queue_seconds: Histogram
    compute_seconds: Histogram
    batch_size: Histogram
    batch_reruns: Counter
    _requests: Counter
    _labels: tuple[str, str]
    _cache: dict[str, Counter]

    def count(self, outcome: str) -> None:
        child = self._cache.get(outcome)
        if child is None:
            child = self._cache[outcome] = self._requests.labels(*self._labels, outcome)
        child.inc()


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        labels = ("model", "version")
        self.requests = Counter(
            "gateway_requests", "Inference requests by outcome", (*labels, "outcome"), registry=registry
        )
        self.request_seconds = Histogram(
            "gateway_request_seconds",
            "Time from decode to answer",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "gateway_queue_seconds",
            "Time a request waited before its batch ran",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.compute_seconds = Histogram(
            "gateway_compute_seconds",
            "Model run time per batch",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # Sampled by the server every QUEUE_SAMPLE_S; "livesum" adds the live
        # workers' values when several processes serve one port.
        self.queue_depth = Gauge(
            "gateway_queue_depth", "Requests waiting to run", labels, registry=registry, multiprocess_mode="livesum"
        )
        # How many requests the queue holds before refusing (batching.max_queue_size), so that
        # an alert can compare the depth with it; summed over workers like the depth.
        self.queue_capacity = Gauge(
            "gateway_queue_capacity",
            "Requests the queue holds before refusing more",
            labels,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.batch_size = Histogram(
            "gateway_batch_size", "Requests' rows per model run", labels, buckets=BATCH_BUCKETS, registry=registry
        )
        self.batch_reruns = Counter(
            "gateway_batch_reruns",
            "Requests run again on their own after their batch's run failed",
            labels,
            registry=registry,
        )

    def for_version(self, model: str, version: str) -> VersionMetrics:
        return VersionMetrics(
            request_seconds=self.request_seconds.labels(model, version),
            queue_seconds=self.queue_seconds.labels(model, version),
            compute_seconds=self.compute_seconds.labels(model, version),
            batch_size=self.batch_size.labels(model, version),
            batch_reruns=self.batch_reruns.labels(model, version),
            _requests=self.requests,
            _labels=(model, version),
            _cache={},
        )

    def set_queue_depth(self, model: str, version: str, depth: int) -> None:
        self.queue_depth.labels(model, version).set(depth)

    def set_queue_capacity(self, model: str, version: str, capacity: float) -> None:
        self.queue_capacity.labels(model, version).set(capacity)
