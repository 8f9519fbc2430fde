"""Settings and model specs, validated once at load.

Gateway settings come from (lowest to highest precedence) built-in defaults,
a TOML config file, `GATEWAY_*` environment variables and command-line flags.
Model specs come from `models/<name>/model.toml`. Unknown keys are errors:
a typo in a spec must not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from gateway.errors import ConfigError

ProviderMode = Literal["auto", "cuda", "cpu"]
ExecutionMode = Literal["auto", "inline", "thread"]
CompareKind = Literal["classification", "regression"]
LoopKind = Literal["uvloop", "asyncio"]
BatchingMode = Literal["spec", "off"]
ConvAlgoSearch = Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"]

ENV_PREFIX = "GATEWAY_"
MIB = 1 << 20


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check_choice(name: str, value: object, choices: Any) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}")


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    models: Path = Path("models")
    host: str = "127.0.0.1"
    port: int = 8001
    metrics_port: int = 8002  # -1 turns the metrics endpoint off
    # The release-engineering API listens apart from inference, on loopback by default.
    control_host: str = "127.0.0.1"
    control_port: int = 8003  # -1 turns it off
    provider: ProviderMode = "auto"
    workers: int = 0  # 0: one per core on CPU, one per GPU
    max_message_bytes: int = 64 * MIB
    # Calls in flight per process. Past it gRPC itself refuses new calls with
    # RESOURCE_EXHAUSTED before any Python runs: under heavy overload the event
    # loop cannot even look at requests as fast as they come, so the model
    # queues' bounds alone would let calls pile up unread.
    max_inflight: int = 1024
    # Open streams per process, counted apart from max_inflight (gateway/streams.py):
    # idle streams must never hold the slots unary calls need. A stream with no
    # message from its client for stream_idle_s is ended (0: never). Connections
    # with no call for max_connection_idle_s are closed, and every connection is
    # asked to reconnect after max_connection_age_s (0: either never), which also
    # spreads long-lived clients over --workers again.
    max_streams: int = 256
    stream_idle_s: float = 300.0
    max_connection_idle_s: float = 600.0
    max_connection_age_s: float = 3600.0
    # Caps on one inference request's structure, checked by counting before anything is
    # built per tensor (gateway/protocol/limits.py). Generous for real models: wide tabular
    # models with one input per feature have hundreds of inputs, and 256 tensors decode in
    # well under a millisecond; the protocol's parameters are a handful; real tensors have
    # rank <= 8 (numpy itself stops at 32 or 64); ids are keys (a UUID is 36 bytes, a
    # SHA-256 hex 64), and every id with a label is kept for the prediction log's hour.
    max_inputs: int = 256
    max_outputs: int = 256
    max_parameters: int = 64
    max_rank: int = 16
    max_id_bytes: int = 256
    grace_s: float = 10.0
    log_level: str = "INFO"
    loop: LoopKind = "uvloop"
    # "spec": dynamic batching as each model's spec says; "off": one run per request.
    batching: BatchingMode = "spec"
    # CUDA execution provider options (used when a model runs on the GPU).
    cuda_device: int = 0
    cuda_mem_limit_mb: int = 0  # 0: no limit
    cudnn_conv_algo_search: ConvAlgoSearch = "HEURISTIC"
    # Capture one CUDA graph per preferred batch size; batches are padded up to it.
    cuda_graphs: bool = False
    # onnxruntime intra-op threads per session; 0 lets onnxruntime decide.
    intra_op_threads: int = 0
    # Durable release state and audit log (SQLite) live here.
    state_dir: Path = Path(".gateway-state")
    # Run the promotion controller (one process holds its lease at a time).
    controller: bool = True
    # Control API bearer tokens (TOML [[tokens]] name/role/token); see gateway.control.auth.
    tokens_file: Path | None = None
    # TLS on both ports (mutual TLS when tls_client_ca is set).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Set by `--workers N` for each worker (0..N-1): evidence and labels are then
    # shared through the store. -1: a single serving process.
    worker_index: int = -1
    # Capture live requests served by the stable version, with its answers (replay, gate).
    capture_dir: Path | None = None
    capture_fraction: float = 0.01
    capture_file_mb: int = 16
    capture_max_mb: int = 256
    # Names of models to load; empty loads every model in the repository.
    load: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_choice("provider", self.provider, ProviderMode)
        _check_choice("loop", self.loop, LoopKind)
        _check_choice("batching", self.batching, BatchingMode)
        for name in ("port", "metrics_port", "control_port"):
            value = getattr(self, name)
            if not -1 <= value <= 65535 or (name == "port" and value < 0):
                raise ConfigError(f"{name}: {value} is not a valid port")
        if self.cudnn_conv_algo_search not in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
            raise ConfigError(
                f"cudnn_conv_algo_search: {self.cudnn_conv_algo_search!r} is not EXHAUSTIVE, HEURISTIC or DEFAULT"
            )
        if self.workers < 0:
            raise ConfigError(f"workers: must be >= 0, got {self.workers}")
        if self.max_message_bytes < 1024:
            raise ConfigError(f"max_message_bytes: must be >= 1024, got {self.max_message_bytes}")
        if self.max_inflight < 1:
            raise ConfigError(f"max_inflight: must be >= 1, got {self.max_inflight}")
        if self.max_streams < 1:
            raise ConfigError(f"max_streams: must be >= 1, got {self.max_streams}")
        for name in ("stream_idle_s", "max_connection_idle_s", "max_connection_age_s"):
            if not 0 <= getattr(self, name) <= 2**31 / 1000:  # gRPC keeps milliseconds in C ints
                raise ConfigError(f"{name}: must be in 0..{2**31 // 1000}, got {getattr(self, name)}")
        for cap in ("max_inputs", "max_outputs", "max_parameters", "max_rank", "max_id_bytes"):
            if getattr(self, cap) < 1:
                raise ConfigError(f"{cap}: must be >= 1, got {getattr(self, cap)}")
        if self.grace_s < 0:
            raise ConfigError(f"grace_s: must be >= 0, got {self.grace_s}")


@dataclass(frozen=True, slots=True)
class BatchingSpec:
    enabled: bool = True
    max_queue_delay_us: int = 500
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 4096
    instances: int = 1  # batches in flight at once (more only help where runs overlap, e.g. a GPU)
    default_timeout_us: int = 0  # 0: no queue timeout
    # Where a batch runs: on the event loop (cheapest for tiny models), on a
    # thread (onnxruntime releases the GIL), or chosen from warm-up timing.
    execution: ExecutionMode = "auto"

    def __post_init__(self) -> None:
        _check_choice("batching.execution", self.execution, ExecutionMode)
        for name in ("max_queue_delay_us", "default_timeout_us"):
            if getattr(self, name) < 0:
                raise ConfigError(f"batching.{name}: must be >= 0")
        if self.max_queue_size < 1:
            raise ConfigError("batching.max_queue_size: must be >= 1")
        if self.instances < 1:
            raise ConfigError("batching.instances: must be >= 1")
        if any(s < 1 for s in self.preferred_batch_sizes):
            raise ConfigError("batching.preferred_batch_sizes: sizes must be >= 1")


@dataclass(frozen=True, slots=True)
class CompareSpec:
    kind: CompareKind = "classification"
    output: str = ""  # the output compared; empty: the model's first output
    atol: float = 1e-5
    rtol: float = 1e-4

    def __post_init__(self) -> None:
        _check_choice("compare.kind", self.kind, CompareKind)


@dataclass(frozen=True, slots=True)
class ReleaseSpec:
    stable: str = ""  # empty: the highest version
    canary: str = ""
    canary_weight_bp: int = 0
    shadows: Mapping[str, float] = field(default_factory=dict)
    # Fraction of canary requests also run on the stable version (for agreement figures).
    canary_compare_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.canary_compare_fraction <= 1.0:
            raise ConfigError("release.canary_compare_fraction: must be in 0..1")
        if not 0 <= self.canary_weight_bp <= 10_000:
            raise ConfigError(f"release.canary_weight_bp: must be in 0..10000, got {self.canary_weight_bp}")
        for version, fraction in self.shadows.items():
            if not 0.0 <= fraction <= 1.0:
                raise ConfigError(f"release.shadows.{version}: mirror fraction must be in 0..1, got {fraction}")


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """How a rollout moves (Flagger's vocabulary; see docs/promotion.md for the statistics)."""

    interval_s: float = 30.0  # analysis period
    step_weights: tuple[float, ...] = (1.0, 5.0, 10.0, 25.0, 50.0)  # percent of traffic per step
    threshold: int = 2  # intervals with a failed check before rollback
    min_samples: int = 200  # per arm, before any check decides
    max_latency_ratio: float = 1.2  # canary p99 / stable p99 (0: off)
    max_error_increase: float = 0.01  # canary error rate - stable error rate (negative: off)
    min_agreement: float = 0.0  # top-1 agreement with stable (0: off)
    max_accuracy_drop: float = -1.0  # stable accuracy - canary accuracy (negative: off; needs labels)
    max_duration_s: float = 3600.0
    alpha: float = 0.05  # for all checks together
    shadow_intervals: int = 0  # >0: mirror the candidate first, traffic only after its checks pass
    # Load-test gate before the first traffic shift (see gateway/gate.py).
    gate: bool = False
    gate_requests: int = 300
    gate_max_latency_ratio: float = 1.5  # candidate p99 / stable p99 on the same requests
    gate_min_agreement: float = 0.9

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ConfigError("policy.interval_s: must be > 0")
        if not self.step_weights or any(not 0 < w <= 100 for w in self.step_weights):
            raise ConfigError("policy.step_weights: percentages in (0, 100]")
        if list(self.step_weights) != sorted(self.step_weights):
            raise ConfigError("policy.step_weights: must increase")
        if not 0 < self.alpha < 1:
            raise ConfigError("policy.alpha: must be in (0, 1)")
        if self.threshold < 1 or self.min_samples < 1:
            raise ConfigError("policy.threshold and policy.min_samples: must be >= 1")

    @property
    def step_weights_bp(self) -> list[int]:
        return [round(w * 100) for w in self.step_weights]


@dataclass(frozen=True, slots=True)
class LimitsSpec:
    # Caps on what one request may make us allocate, checked before any buffer.
    max_elements: int = 1 << 24  # per input tensor
    max_request_bytes: int = 256 * MIB  # all inputs together

    def __post_init__(self) -> None:
        if self.max_elements < 1 or self.max_request_bytes < 1:
            raise ConfigError("limits: caps must be >= 1")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    max_batch_size: int = 0  # 0: the model has no batch dimension
    batching: BatchingSpec = field(default_factory=BatchingSpec)
    compare: CompareSpec = field(default_factory=CompareSpec)
    release: ReleaseSpec = field(default_factory=ReleaseSpec)
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    policy: PolicySpec = field(default_factory=PolicySpec)

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise ConfigError(f"max_batch_size: must be >= 0, got {self.max_batch_size}")


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Turn a TOML, environment or CLI value into the field's type."""
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    try:
        if kind.startswith("tuple"):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            item: Any = int if "int" in kind else float if "float" in kind else str
            return tuple(item(v.strip() if isinstance(v, str) else v) for v in value)
        if kind in ("int",):
            if isinstance(value, bool):
                raise ValueError("a boolean is not a number")
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError("expected true or false")
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if kind.startswith("Path"):
            return Path(value)
        if kind.startswith("Mapping"):
            if not isinstance(value, Mapping):
                raise ValueError("expected a table")
            return {str(k): float(v) for k, v in value.items()}
        return str(value) if not isinstance(value, str) else value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {value!r} is not valid ({exc})") from None


def _build(cls: Any, data: Mapping[str, Any], prefix: str = "") -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting {prefix}{unknown[0]!s} (known: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        annotation = fields[key].type
        nested = _SECTIONS.get(str(annotation))
        if nested is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}{key}: expected a table")
            kwargs[key] = _build(nested, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, annotation)
    return cls(**kwargs)


_SECTIONS: dict[str, type] = {
    "BatchingSpec": BatchingSpec,
    "CompareSpec": CompareSpec,
    "ReleaseSpec": ReleaseSpec,
    "LimitsSpec": LimitsSpec,
    "PolicySpec": PolicySpec,
}


def load_model_spec(path: Path) -> ModelSpec:
    """Read `model.toml`; a missing file gives the defaults."""
    if not path.exists():
        return ModelSpec()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read spec: {exc}") from None
    try:
        spec: ModelSpec = _build(ModelSpec, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return spec


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> GatewaySettings:
    """Merge defaults < config file < GATEWAY_* environment < overrides (CLI flags)."""
    merged: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{config_file}: cannot read config: {exc}") from None
        merged.update(data.get("serve", data))
    names = {f.name for f in dataclasses.fields(GatewaySettings)}
    for key, value in (env if env is not None else os.environ).items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in names:
                merged[name] = value
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    settings: GatewaySettings = _build(GatewaySettings, merged)
    return settings
