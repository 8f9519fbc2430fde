"""Release-plane Prometheus collectors, created on an injected registry (no module globals).

They live here rather than beside the serving collectors because they read the
release plane's reports, and the serving plane must not know the release plane.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.types import BASIS_POINTS

if TYPE_CHECKING:
    from gateway.release.plane import ModelReport


class ReleaseMetrics:
    """Release-plane figures, synced from the release plane's reports every sample period.

    The plane keeps plain counters (cheap on the request path); this turns
    them into Prometheus counters (by delta) and gauges.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        mv = ("model", "version")
        self.weight = Gauge(
            "gateway_traffic_weight",
            "Share of live traffic (shadows: mirror fraction)",
            (*mv, "role"),
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.shadow = Counter(
            "gateway_shadow_requests", "Mirrored copies by outcome", (*mv, "outcome"), registry=registry
        )
        self.circuit = Gauge(
            "gateway_shadow_circuit_open",
            "1 while a shadow's circuit is open",
            mv,
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.feedback = Counter("gateway_feedback", "Labels received", ("model", "outcome"), registry=registry)
        self.compare: dict[str, Gauge] = {
            field: Gauge(
                f"gateway_compare_{field}",
                f"Candidate vs stable: {field.replace('_', ' ')}",
                mv,
                registry=registry,
                multiprocess_mode="liveall",
            )
            for field in (
                "agreement",
                "compared_rows",
                "within_tolerance",
                "max_abs_diff",
                "mean_abs_diff",
                "relative_l2",
                "latency_diff_ms",
                "accuracy",
                "labelled",
            )
        }
        self._seen: dict[tuple[str, ...], float] = {}

    def _inc(self, counter: Counter, labels: tuple[str, ...], total: float) -> None:
        key = (counter._name, *labels)
        delta = total - self._seen.get(key, 0.0)
        if delta > 0:
            counter.labels(*labels).inc(delta)
            self._seen[key] = total

    def sync(self, report: ModelReport) -> None:
        state = report.release
        model = state.model
        weight = state.canary_weight_bp / BASIS_POINTS if state.canary else 0.0
        self.weight.labels(model, state.stable, "stable").set(1.0 - weight)
        if state.canary:
            self.weight.labels(model, state.canary, "canary").set(weight)
        for version, fraction in state.shadows.items():
            self.weight.labels(model, version, "shadow").set(fraction)
        for version, shadow in report.shadows.items():
            for outcome, count in asdict(shadow.counters).items():
                self._inc(self.shadow, (model, version, outcome), count)
            self.circuit.labels(model, version).set(shadow.circuit_open)
        self._inc(self.feedback, (model, "joined"), report.feedback_joined)
        self._inc(self.feedback, (model, "unknown"), report.feedback_unknown)
        for v in report.versions:
            for field, gauge in self.compare.items():
                value = getattr(v, field)
                if value == value:  # NaN: nothing measured yet
                    gauge.labels(model, v.version).set(value)
