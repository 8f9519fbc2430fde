"""Model specs: `models/<name>/model.toml` and its sections, validated once at load.

A missing file gives the defaults. Unknown keys are errors: a typo in a spec
must not silently fall back to a default. Every refusal starts with the spec
file, then the setting (`batching.max_queue_size`), the value and what was
expected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gateway.config._parse import MIB, Schema, check_choices, check_number, read_toml, shown
from gateway.config.urls import http_url_problem
from gateway.errors import ConfigError
from gateway.types import BASIS_POINTS

ExecutionMode = Literal["auto", "inline", "thread"]
CompareKind = Literal["classification", "regression"]
# What a rollout does when max_duration_s passes with checks still inconclusive (none failed).
TimeoutAction = Literal["pause", "rollback", "promote"]
# The load-test gate holds every request it sends in memory (gateway/release/gate.py).
MAX_GATE_REQUESTS = 100_000
# Approval gates (policy.approve_before): a rollout waits for a person before its first
# traffic step ("start"), before a traffic step named by its weight in percent, or before
# promoting. Stored in the release as strings ("start", "25", "promote"): never change one.
START_GATE = "start"
PROMOTE_GATE = "promote"


@dataclass(frozen=True, slots=True)
class BatchingSpec:
    enabled: bool = True
    # The longest a batch is held open for more rows (while another batch runs, or
    # while rows keep arriving under load: gateway.serving.holding). On uvloop it
    # counts in whole milliseconds (libuv timers), so 2 ms is two ticks.
    max_queue_delay_us: int = 2000
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 4096
    instances: int = 1  # batches in flight at once (more only help where runs overlap, e.g. a GPU)
    default_timeout_us: int = 0  # 0: no queue timeout
    # Where a batch runs: on the event loop (cheapest for tiny models), on a
    # thread (onnxruntime releases the GIL), or chosen from warm-up timing.
    execution: ExecutionMode = "auto"

    def __post_init__(self) -> None:
        check_choices(self, "batching.")
        for name in ("max_queue_delay_us", "default_timeout_us"):
            check_number(f"batching.{name}", getattr(self, name), 0)
        check_number("batching.max_queue_size", self.max_queue_size, 1)
        check_number("batching.instances", self.instances, 1)
        for size in self.preferred_batch_sizes:
            check_number("batching.preferred_batch_sizes", size, 1)


@dataclass(frozen=True, slots=True)
class CompareSpec:
    kind: CompareKind = "classification"
    output: str = ""  # the output compared; empty: the model's first output
    atol: float = 1e-5
    rtol: float = 1e-4

    def __post_init__(self) -> None:
        check_choices(self, "compare.")
        check_number("compare.atol", self.atol, 0)
        check_number("compare.rtol", self.rtol, 0)

    def output_index(self, output_names: list[str], where: str) -> int:
        """Which output `compare.output` names; refuses a name the model does not have."""
        if not self.output:
            return 0
        if self.output not in output_names:
            raise ConfigError(
                f"{where}: compare.output: the model has no output {self.output!r} "
                f"(its outputs: {', '.join(output_names) or 'none'})"
            )
        return output_names.index(self.output)


@dataclass(frozen=True, slots=True)
class ReleaseSpec:
    stable: str = ""  # empty: the highest version
    canary: str = ""
    canary_weight_bp: int = 0
    shadows: Mapping[str, float] = field(default_factory=dict)
    # Fraction of canary requests also run on the stable version (for agreement figures).
    canary_compare_fraction: float = 0.0

    def __post_init__(self) -> None:
        check_number("release.canary_compare_fraction", self.canary_compare_fraction, 0, 1)
        check_number("release.canary_weight_bp", self.canary_weight_bp, 0, BASIS_POINTS)
        for version, fraction in self.shadows.items():
            check_number(f"release.shadows.{version}", fraction, 0, 1)


# External checks (`[[policy.checks]]`, gateway/release/external.py): where the number comes from.
EXTERNAL_CHECK_KINDS = ("prometheus", "web")
MAX_EXTERNAL_CHECKS = 16  # each is one HTTP request an interval
MAX_EXTERNAL_TIMEOUT_S = 60.0
# A check's name is a label in the audit, `gateway status` and the metrics: short and plain.
_CHECK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}")
# The built-in checks' names (gateway/release/policy.py, gate.py): an external check must not
# take one, or the audit and the metrics would mix two checks under one name.
_BUILT_IN_CHECK = re.compile(r"(step_|gate_|latency_).*|error_rate|accuracy|accuracy_paired|agreement|prediction_drift")


@dataclass(frozen=True, slots=True)
class ExternalCheckSpec:
    """One `[[policy.checks]]`: a number the gateway does not compute, read over HTTP each
    analysis interval and held to a bound (`max` or `min`). A threshold on a point reading,
    not a statistical test: see docs/promotion.md, "External checks".

    Its messages name fields alone (`url: ...`); the reader of the array adds the
    item's place (`policy.checks[0].url: ...`)."""

    name: str = ""
    kind: str = ""  # one of EXTERNAL_CHECK_KINDS
    # prometheus: the server's base URL (the check asks {url}/api/v1/query); web: the URL to GET.
    url: str = ""
    query: str = ""  # prometheus: the PromQL instant query; it must come to one number
    json_path: str = ""  # web: where the number is in the JSON answer, dotted (`data.p99`, `items.0.v`); "" = value
    max: float | None = None  # fails when the reading is above this
    min: float | None = None  # fails when the reading is below this
    timeout_s: float = 2.0  # for the whole request; no answer by then: inconclusive

    def __post_init__(self) -> None:
        if not _CHECK_NAME.fullmatch(self.name):
            raise ConfigError(
                f"name: must be 1-63 letters, digits, '_', '.', ':' or '-' (starting with a letter or digit), "
                f"got {self.name!r}"
            )
        if _BUILT_IN_CHECK.fullmatch(self.name):
            raise ConfigError(f"name: {self.name!r} is the name of a built-in check (or its family); pick another")
        if self.kind not in EXTERNAL_CHECK_KINDS:
            raise ConfigError(f"kind: must be one of {', '.join(EXTERNAL_CHECK_KINDS)}, got {self.kind!r}")
        problem = http_url_problem(self.url)
        if problem:
            raise ConfigError(
                f"url: must be an http:// or https:// URL with a host, got {shown(self.url)}: it {problem}"
            )
        if self.kind == "prometheus":
            if not self.query.strip():
                raise ConfigError('query: a prometheus check needs a PromQL query, e.g. query = "up"')
            if self.json_path:
                raise ConfigError("json_path: only for kind = web (a prometheus answer's value has a fixed place)")
        elif self.query:
            raise ConfigError("query: only for kind = prometheus (a web check reads json_path from url's answer)")
        if (self.max is None) == (self.min is None):
            given = "both" if self.max is not None else "neither"
            raise ConfigError(
                f"max, min: set exactly one of them, got {given} (max = 0.25: fails above 0.25; "
                "min = 0.9: fails below 0.9)"
            )
        check_number("timeout_s", self.timeout_s, 0, MAX_EXTERNAL_TIMEOUT_S, above=True)

    @property
    def bound(self) -> float:
        """The number the reading is held to (max or min: __post_init__ saw that one is set)."""
        bound = self.max if self.max is not None else self.min
        return 0.0 if bound is None else bound

    @property
    def path(self) -> str:
        """Where a web check's number is in the JSON answer."""
        return self.json_path or "value"


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """How a rollout moves (Flagger's vocabulary; see docs/promotion.md for the statistics)."""

    interval_s: float = 30.0  # analysis period
    step_weights: tuple[float, ...] = (1.0, 5.0, 10.0, 25.0, 50.0)  # percent of traffic per step
    threshold: int = 2  # intervals with a failed check before rollback
    min_samples: int = 200  # per arm, before any check decides
    # Non-inferiority margin on latency: the candidate's latency_quantile of served
    # latency, and its paired extra run time where copies are timed on both versions,
    # at most this times the stable's (0: off). See docs/promotion.md.
    max_latency_ratio: float = 1.2
    latency_quantile: float = 0.9  # the stated quantile of served latency the ratio compares
    max_error_increase: float = 0.01  # canary error rate - stable error rate (negative: off)
    min_agreement: float = 0.0  # top-1 agreement with stable (0: off)
    max_accuracy_drop: float = -1.0  # stable accuracy - canary accuracy (negative: off; needs labels)
    # Prediction drift, candidate vs stable on the same rows (dual-run and shadow copies):
    # the largest change in any class's share of predictions (0: off; classification only).
    max_drift: float = 0.0
    max_duration_s: float = 3600.0  # then on_timeout, unless a check failed or all passed
    on_timeout: TimeoutAction = "pause"  # pause for a person, roll back, or promote
    alpha: float = 0.05  # for all checks together
    # Exposure of each traffic step on its own: a step advances only once it has served
    # this many candidate requests and lasted this long since it began.
    step_min_samples: int = 200
    step_min_duration_s: float = 60.0
    shadow_intervals: int = 0  # >0: mirror the candidate first, traffic only after its checks pass
    # Load-test gate before the first traffic shift (see gateway/release/gate.py).
    gate: bool = False
    gate_requests: int = 300
    gate_max_latency_ratio: float = 1.5  # candidate p99 / stable p99 on the same requests
    gate_min_agreement: float = 0.9
    # External checks, read over HTTP each interval while the candidate serves traffic
    # (gateway/release/external.py); in model.toml, one [[policy.checks]] table each.
    checks: tuple[ExternalCheckSpec, ...] = ()
    # Steps that wait for `gateway rollout approve`: "start", a step weight in percent, "promote".
    approve_before: tuple[str | float, ...] = ()

    def __post_init__(self) -> None:
        check_choices(self, "policy.")
        check_number("policy.interval_s", self.interval_s, 0, above=True)
        if not self.step_weights:
            raise ConfigError("policy.step_weights: must list at least one percentage, got []")
        for weight in self.step_weights:
            check_number("policy.step_weights", weight, 0, 100, above=True)
        if list(self.step_weights) != sorted(self.step_weights):
            raise ConfigError(f"policy.step_weights: must increase, got {list(self.step_weights)}")
        check_number("policy.alpha", self.alpha, 0, 1, above=True)
        if self.alpha == 1:
            raise ConfigError("policy.alpha: must be in (0, 1), got 1.0")
        check_number("policy.threshold", self.threshold, 1)
        check_number("policy.min_samples", self.min_samples, 1)
        # Each check's "off" value is part of its range (see the comments above).
        check_number("policy.max_latency_ratio", self.max_latency_ratio, 0)
        check_number("policy.max_error_increase", self.max_error_increase, None, 1)
        check_number("policy.min_agreement", self.min_agreement, 0, 1)
        check_number("policy.max_accuracy_drop", self.max_accuracy_drop, None, 1)
        check_number("policy.max_drift", self.max_drift, 0, 1)
        check_number("policy.max_duration_s", self.max_duration_s, 0, above=True)
        # 0 and 1 would compare the fastest or the slowest request: a quantile needs both sides.
        if not 0.5 <= self.latency_quantile <= 0.999:
            raise ConfigError(
                f"policy.latency_quantile: must be in 0.5..0.999, got {self.latency_quantile!r} "
                "(0.9 compares p90; tails past p99 need 10^5 requests per arm, see docs/promotion.md)"
            )
        check_number("policy.step_min_samples", self.step_min_samples, 0)
        check_number("policy.step_min_duration_s", self.step_min_duration_s, 0)
        exposure = self.step_min_duration_s * len(self.step_weights)
        if exposure > self.max_duration_s:
            raise ConfigError(
                f"policy.step_min_duration_s: {self.step_min_duration_s:g} s for each of {len(self.step_weights)} "
                f"steps is {exposure:g} s, more than max_duration_s ({self.max_duration_s:g} s): no rollout could "
                "finish in time; lower step_min_duration_s or raise max_duration_s"
            )
        check_number("policy.shadow_intervals", self.shadow_intervals, 0)
        check_number("policy.gate_requests", self.gate_requests, 1, MAX_GATE_REQUESTS)
        check_number("policy.gate_max_latency_ratio", self.gate_max_latency_ratio, 0, above=True)
        check_number("policy.gate_min_agreement", self.gate_min_agreement, 0, 1)
        if len(self.checks) > MAX_EXTERNAL_CHECKS:
            raise ConfigError(f"policy.checks: at most {MAX_EXTERNAL_CHECKS} external checks, got {len(self.checks)}")
        names = [c.name for c in self.checks]
        for name in sorted({n for n in names if names.count(n) > 1}):
            raise ConfigError(f"policy.checks: two checks are named {name!r}; each needs a name of its own")
        for gate in self.approve_before:
            if isinstance(gate, str) and gate not in (START_GATE, PROMOTE_GATE):
                raise ConfigError(
                    f"policy.approve_before: unknown step {gate!r}; name {START_GATE!r} (before the first traffic "
                    f"step), {PROMOTE_GATE!r} (before promoting) or a step weight in percent, one of "
                    f"{', '.join(f'{w:g}' for w in self.step_weights)} (policy.step_weights)"
                )
            if not isinstance(gate, str) and gate not in self.step_weights:
                raise ConfigError(
                    f"policy.approve_before: {gate:g} is not one of policy.step_weights "
                    f"({', '.join(f'{w:g}' for w in self.step_weights)}): name the weight of a step, in percent"
                )

    @property
    def step_weights_bp(self) -> list[int]:
        return [round(w * 100) for w in self.step_weights]

    @property
    def approval_gates(self) -> frozenset[str]:
        """The gates of approve_before as stored: the first step's weight is the start gate."""
        return frozenset(
            gate if isinstance(gate, str) else self.gate_before_step(self.step_weights.index(gate))
            for gate in self.approve_before
        )

    def gate_before_step(self, index: int) -> str:
        """The gate that moving to traffic step `index` (from 0) passes."""
        return START_GATE if index == 0 else f"{self.step_weights[index]:g}"


def describe_gate(gate: str) -> str:
    """A gate in words: `before the first traffic step`, `before 25%`, `before promoting`."""
    if gate == START_GATE:
        return "before the first traffic step"
    if gate == PROMOTE_GATE:
        return "before promoting"
    return f"before {gate}%"


@dataclass(frozen=True, slots=True)
class LimitsSpec:
    # Caps on what one request may make us allocate, checked before any buffer.
    max_elements: int = 1 << 24  # per input tensor
    max_request_bytes: int = 256 * MIB  # all inputs together

    def __post_init__(self) -> None:
        check_number("limits.max_elements", self.max_elements, 1)
        check_number("limits.max_request_bytes", self.max_request_bytes, 1)


@dataclass(frozen=True, slots=True)
class MonitorSpec:
    """Drift and data-quality monitoring of live inputs and predictions (docs/drift.md)."""

    enabled: bool = True  # on wherever a reference data set is found; off: nothing recorded
    # The reference data set, relative to the model's folder; `<version>/reference.npz`
    # beside a version's model.onnx comes first. Arrays keyed by input name (or `X` for a
    # model of one input), and optionally `y`: labels, the reference class histogram.
    reference: str = "reference.npz"
    # Fraction of answered requests binned, their NaN/Inf and out-of-range values counted
    # (reject_invalid's refusal sees every request). A quarter:
    # binning every request cost digits about 14 % of its throughput at c=64 (50 us of CPU a
    # request), a quarter cost nothing measurable; windows then fill four times slower.
    sample: float = 0.25
    reject_invalid: bool = False  # NaN/Inf in an input: INVALID_ARGUMENT before the model runs
    max_drift: float = 0.2  # population stability index above which a feature counts as drifting
    alpha: float = 0.01  # false alarms per closed window, across all features and the prediction
    window_rows: int = 500  # rows per window; a window's test is made once, when it closes
    bins: int = 10  # bins per feature, cut at the reference's quantiles
    range_margin: float = 0.1  # outside [min - m * span, max + m * span] of the reference: out of range

    def __post_init__(self) -> None:
        check_number("monitor.sample", self.sample, 0, 1, above=True)
        check_number("monitor.max_drift", self.max_drift, 0, above=True)
        check_number("monitor.alpha", self.alpha, 0, 1, above=True)
        if self.alpha == 1:
            raise ConfigError("monitor.alpha: must be in (0, 1), got 1.0")
        check_number("monitor.window_rows", self.window_rows, 10)
        check_number("monitor.bins", self.bins, 2, 100)
        check_number("monitor.range_margin", self.range_margin, 0)
        if not self.reference or Path(self.reference).is_absolute() or ".." in Path(self.reference).parts:
            raise ConfigError(f"monitor.reference: must be a path inside the model's folder, got {self.reference!r}")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    max_batch_size: int = 0  # 0: the model has no batch dimension
    batching: BatchingSpec = field(default_factory=BatchingSpec)
    compare: CompareSpec = field(default_factory=CompareSpec)
    release: ReleaseSpec = field(default_factory=ReleaseSpec)
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    policy: PolicySpec = field(default_factory=PolicySpec)
    monitor: MonitorSpec = field(default_factory=MonitorSpec)

    def __post_init__(self) -> None:
        check_number("max_batch_size", self.max_batch_size, 0)


_SCHEMA = Schema.of(ModelSpec)


def load_model_spec(path: Path) -> ModelSpec:
    """Read `model.toml`; a missing file gives the defaults."""
    if not path.exists():
        return ModelSpec()
    data = read_toml(path, "spec")
    try:
        spec: ModelSpec = _SCHEMA.build(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return spec
