"""The load-test gate: before a candidate gets its first share of traffic, replay
requests against it and the stable version, side by side, and require

    candidate p99 <= max_latency_ratio x stable p99   (same requests, interleaved)
    top-1 agreement with the stable version >= min_agreement

The requests are the newest captured live requests for the model, read through a
`CapturedRequests` the composition root injects (gateway.protocol.capture's writer
is one); without a capture, inputs are generated from the model's signature
(latency is still measured; agreement on random inputs is weak evidence and the
audit record says which kind was used).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from gateway.config.spec import PolicySpec
from gateway.percentiles import p99
from gateway.release.compare import top1
from gateway.release.confidence import Verdict
from gateway.release.policy import CheckResult
from gateway.serving.registry import LoadedVersion
from gateway.serving.validation import build_inputs
from gateway.types import Tensors, WireRequest, random_inputs


class CapturedRequests(Protocol):
    """Recorded live requests, already decoded: the release plane reads captures
    without knowing their wire format, which belongs to the protocol edge."""

    def newest(self, model: str) -> Iterator[WireRequest]:
        """The model's captured requests, most recent capture file first.

        Called on the event loop, so a writer can flush its buffered records there
        first; the iterator it returns is then read in a worker thread."""
        ...


@dataclass(frozen=True, slots=True)
class GateResult:
    passed: bool
    checks: list[CheckResult]
    source: str  # "capture" or "generated"
    requests: int

    def summary(self) -> str:
        parts = [f"{c.name} {c.value:.3g} (bound {c.bound:g}): {c.verdict.value}" for c in self.checks]
        return f"load-test gate on {self.requests} {self.source} requests: " + "; ".join(parts)


def captured_inputs(requests: Iterator[WireRequest], stable: LoadedVersion, limit: int) -> list[tuple[Tensors, int]]:
    """Up to `limit` of `requests` that the stable version accepts, as model feeds."""
    found: list[tuple[Tensors, int]] = []
    for wire in requests:
        try:
            found.append(build_inputs(wire.inputs, stable.model.inputs, stable.spec, stable.name))
        except Exception:
            continue
        if len(found) >= limit:
            return found
    return found


def generated_inputs(stable: LoadedVersion, count: int, seed: int = 0) -> list[tuple[Tensors, int]]:
    rng = np.random.default_rng(seed)
    return [(random_inputs(stable.model.inputs, 1, rng), 1) for _ in range(count)]


async def run_gate(
    stable: LoadedVersion,
    candidate: LoadedVersion,
    requests: Sequence[tuple[Tensors, int]],
    *,
    policy: PolicySpec,
    source: str,
    output_index: int,
) -> GateResult:
    latencies: dict[str, list[float]] = {"stable": [], "candidate": []}
    agree = rows = 0
    for i, (feeds, batch) in enumerate(requests):
        # Alternate which goes first, so neither always meets a warmer cache.
        order = [("stable", stable), ("candidate", candidate)]
        if i % 2:
            order.reverse()
        outputs: dict[str, list[np.ndarray]] = {}
        for role, loaded in order:
            start = time.perf_counter()
            outputs[role] = await loaded.executor.submit(feeds, batch, None, None)
            latencies[role].append(time.perf_counter() - start)
        base, cand = outputs["stable"][output_index], outputs["candidate"][output_index]
        if base.shape == cand.shape:
            agree += int(np.count_nonzero(top1(base) == top1(cand)))
        rows += batch
    s99, c99 = p99(latencies["stable"]), p99(latencies["candidate"])
    ratio = c99 / s99 if s99 > 0 else float("inf")
    agreement = agree / rows if rows else 0.0
    n = len(requests)
    checks = [
        CheckResult(
            "gate_latency_p99_ratio",
            Verdict.PASS if ratio <= policy.gate_max_latency_ratio else Verdict.FAIL,
            ratio,
            s99 * 1e3,
            c99 * 1e3,
            policy.gate_max_latency_ratio,
            n,
        ),
        CheckResult(
            "gate_agreement",
            Verdict.PASS if agreement >= policy.gate_min_agreement else Verdict.FAIL,
            agreement,
            agreement,
            agreement,
            policy.gate_min_agreement,
            rows,
        ),
    ]
    return GateResult(all(c.verdict is Verdict.PASS for c in checks), checks, source, n)
