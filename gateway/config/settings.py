"""Settings and model specs, validated once at load.

Gateway settings come from (lowest to highest precedence) built-in defaults,
a TOML config file, `GATEWAY_*` environment variables and command-line flags.
Model specs come from `models/<name>/model.toml`. Unknown keys are errors:
a typo in a spec must not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import math
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
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
ConvAlgoSearch = Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"]

ENV_PREFIX = "GATEWAY_"
MIB = 1 << 20
INT32_MAX = (1 << 31) - 1
# More serving processes than this is a typo, not a machine: each one loads every model.
MAX_WORKERS = 1024
# The load-test gate holds every request it sends in memory (gateway/release/gate.py).
MAX_GATE_REQUESTS = 100_000


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check_choice(name: str, value: object, choices: Any) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _check_number(
    name: str, value: float, low: float | None = None, high: float | None = None, *, above: bool = False
) -> None:
    """Refuse NaN, infinity and values outside [low, high] ((low, high] with above), naming setting and value.

    Messages start with the setting's name: load_settings relies on that to say
    which file or environment variable set the refused value.
    """
    fits = math.isfinite(value)
    fits = fits and (low is None or (value > low if above else value >= low))
    fits = fits and (high is None or value <= high)
    if not fits:
        raise ConfigError(f"{name}: must be {_expected_range(low, high, above)}, got {value!r}")


def _expected_range(low: float | None, high: float | None, above: bool) -> str:
    if low is None and high is None:
        return "a finite number"
    if high is None:
        return f"{'>' if above else '>='} {low:g}"
    if low is None:
        return f"<= {high:g}"
    return f"in ({low:g}, {high:g}]" if above else f"in {low:g}..{high:g}"


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
    # Open streams per process, counted apart from max_inflight (gateway/protocol/streams.py):
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
        _check_choice("log_level", self.log_level.upper(), LogLevel)
        _check_number("workers", self.workers, 0, MAX_WORKERS)
        # gRPC keeps message sizes and the concurrent-call cap in C ints.
        _check_number("max_message_bytes", self.max_message_bytes, 1024, INT32_MAX)
        _check_number("max_inflight", self.max_inflight, 1, INT32_MAX)
        _check_number("max_streams", self.max_streams, 1, INT32_MAX - self.max_inflight)
        for name in ("stream_idle_s", "max_connection_idle_s", "max_connection_age_s"):
            _check_number(name, getattr(self, name), 0, INT32_MAX / 1000)  # gRPC keeps milliseconds in C ints
        for cap in ("max_inputs", "max_outputs", "max_parameters", "max_rank", "max_id_bytes"):
            _check_number(cap, getattr(self, cap), 1)
        _check_number("grace_s", self.grace_s, 0)
        _check_number("cuda_device", self.cuda_device, 0)
        _check_number("cuda_mem_limit_mb", self.cuda_mem_limit_mb, 0)
        _check_number("intra_op_threads", self.intra_op_threads, 0)
        _check_number("worker_index", self.worker_index, -1, MAX_WORKERS - 1)
        _check_number("capture_fraction", self.capture_fraction, 0, 1, above=True)
        _check_number("capture_file_mb", self.capture_file_mb, 1)
        _check_number("capture_max_mb", self.capture_max_mb, 1)


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
            _check_number(f"batching.{name}", getattr(self, name), 0)
        _check_number("batching.max_queue_size", self.max_queue_size, 1)
        _check_number("batching.instances", self.instances, 1)
        for size in self.preferred_batch_sizes:
            _check_number("batching.preferred_batch_sizes", size, 1)


@dataclass(frozen=True, slots=True)
class CompareSpec:
    kind: CompareKind = "classification"
    output: str = ""  # the output compared; empty: the model's first output
    atol: float = 1e-5
    rtol: float = 1e-4

    def __post_init__(self) -> None:
        _check_choice("compare.kind", self.kind, CompareKind)
        _check_number("compare.atol", self.atol, 0)
        _check_number("compare.rtol", self.rtol, 0)

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
        _check_number("release.canary_compare_fraction", self.canary_compare_fraction, 0, 1)
        _check_number("release.canary_weight_bp", self.canary_weight_bp, 0, 10_000)
        for version, fraction in self.shadows.items():
            _check_number(f"release.shadows.{version}", fraction, 0, 1)


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
    # Load-test gate before the first traffic shift (see gateway/release/gate.py).
    gate: bool = False
    gate_requests: int = 300
    gate_max_latency_ratio: float = 1.5  # candidate p99 / stable p99 on the same requests
    gate_min_agreement: float = 0.9

    def __post_init__(self) -> None:
        _check_number("policy.interval_s", self.interval_s, 0, above=True)
        if not self.step_weights:
            raise ConfigError("policy.step_weights: must list at least one percentage, got []")
        for weight in self.step_weights:
            _check_number("policy.step_weights", weight, 0, 100, above=True)
        if list(self.step_weights) != sorted(self.step_weights):
            raise ConfigError(f"policy.step_weights: must increase, got {list(self.step_weights)}")
        _check_number("policy.alpha", self.alpha, 0, 1, above=True)
        if self.alpha == 1:
            raise ConfigError("policy.alpha: must be in (0, 1), got 1.0")
        _check_number("policy.threshold", self.threshold, 1)
        _check_number("policy.min_samples", self.min_samples, 1)
        # Each check's "off" value is part of its range (see the comments above).
        _check_number("policy.max_latency_ratio", self.max_latency_ratio, 0)
        _check_number("policy.max_error_increase", self.max_error_increase, None, 1)
        _check_number("policy.min_agreement", self.min_agreement, 0, 1)
        _check_number("policy.max_accuracy_drop", self.max_accuracy_drop, None, 1)
        _check_number("policy.max_duration_s", self.max_duration_s, 0, above=True)
        _check_number("policy.shadow_intervals", self.shadow_intervals, 0)
        _check_number("policy.gate_requests", self.gate_requests, 1, MAX_GATE_REQUESTS)
        _check_number("policy.gate_max_latency_ratio", self.gate_max_latency_ratio, 0, above=True)
        _check_number("policy.gate_min_agreement", self.gate_min_agreement, 0, 1)

    @property
    def step_weights_bp(self) -> list[int]:
        return [round(w * 100) for w in self.step_weights]


@dataclass(frozen=True, slots=True)
class LimitsSpec:
    # Caps on what one request may make us allocate, checked before any buffer.
    max_elements: int = 1 << 24  # per input tensor
    max_request_bytes: int = 256 * MIB  # all inputs together

    def __post_init__(self) -> None:
        _check_number("limits.max_elements", self.max_elements, 1)
        _check_number("limits.max_request_bytes", self.max_request_bytes, 1)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    max_batch_size: int = 0  # 0: the model has no batch dimension
    batching: BatchingSpec = field(default_factory=BatchingSpec)
    compare: CompareSpec = field(default_factory=CompareSpec)
    release: ReleaseSpec = field(default_factory=ReleaseSpec)
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    policy: PolicySpec = field(default_factory=PolicySpec)

    def __post_init__(self) -> None:
        _check_number("max_batch_size", self.max_batch_size, 0)


def _coerce(name: str, value: Any, annotation: Any, text: bool = False) -> Any:
    """Turn a TOML value or CLI flag (typed) or an environment value (text) into the field's type.

    A typed value must already have the field's type: a quoted "256" for an
    integer, 2.9 for an integer or 5 for a boolean is refused with the setting's
    name rather than guessed at (int(2.9) would quietly serve 2). Text is parsed.
    """
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    try:
        if kind.startswith("tuple"):
            item = "int" if "int" in kind else "float" if "float" in kind else "str"
            if text:
                return tuple(_scalar(item, v.strip(), True) for v in value.split(",") if v.strip())
            if not isinstance(value, list | tuple):
                raise ValueError("an array")
            return tuple(_scalar(item, v, False) for v in value)
        if kind.startswith("Mapping"):
            if not isinstance(value, Mapping):
                raise ValueError("a table")
            return {str(k): _scalar("float", v, False) for k, v in value.items()}
        if kind.startswith("Path"):
            if not text and not isinstance(value, str | Path):
                raise ValueError("a path (a string)")
            return Path(value)
        return _scalar(kind if kind in ("int", "float", "bool") else "str", value, text)
    except ValueError as exc:
        raise ConfigError(f"{name}: expected {exc}, got {_shown(value)}") from None


def _shown(value: Any, limit: int = 120) -> str:
    """A value for an error message, cut short: a refused setting may be huge."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _scalar(kind: str, value: Any, text: bool) -> Any:
    """One int, float, bool or string; raises ValueError naming what was expected."""
    if kind == "int":
        if text:
            try:
                return int(value)
            except ValueError:
                raise ValueError("an integer") from None
        if type(value) is not int:  # bool is an int subclass, and 2.9 is no integer
            raise ValueError("an integer")
        return value
    if kind == "float":
        if isinstance(value, bool) or not (text or isinstance(value, int | float)):
            raise ValueError("a number")
        try:
            number = float(value)
        except ValueError:
            raise ValueError("a number") from None
        if not math.isfinite(number):
            raise ValueError("a finite number")
        return number
    if kind == "bool":
        if text:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError("true or false")
            return value.lower() in ("1", "true", "yes")
        if not isinstance(value, bool):
            raise ValueError("true or false")
        return value
    if not isinstance(value, str):
        raise ValueError("a string (in quotes)")
    return value


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
                raise ConfigError(f"{prefix}{key}: expected a table, got {value!r}")
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
    """Merge defaults < config file < GATEWAY_* environment < overrides (CLI flags).

    Every refusal names where the value came from: the config file or the
    environment variable, then the setting, the value and what was expected.
    """
    fields = {f.name: f.type for f in dataclasses.fields(GatewaySettings)}
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if config_file is not None:
        for key, value in _config_file_values(config_file).items():
            if key not in fields:
                raise ConfigError(f"{config_file}: unknown setting {key} (known: {', '.join(sorted(fields))})")
            values[key] = _coerce(f"{config_file}: {key}", value, fields[key])
            origins[key] = str(config_file)
    for variable, text in (env if env is not None else os.environ).items():
        key = variable[len(ENV_PREFIX) :].lower()
        if variable.startswith(ENV_PREFIX) and key in fields:
            values[key] = _coerce(variable, text, fields[key], text=True)
            origins[key] = variable
    for key, value in (overrides or {}).items():
        if value is not None:
            if key not in fields:
                raise ConfigError(f"unknown setting {key} (known: {', '.join(sorted(fields))})")
            values[key] = _coerce(key, value, fields[key])
            origins.pop(key, None)
    try:
        return GatewaySettings(**values)
    except ConfigError as exc:
        # Range checks start their message with the setting's name: say who set it.
        origin = origins.get(str(exc).split(":", 1)[0])
        if origin is None:
            raise
        raise ConfigError(f"{origin}: {exc}") from None


def _config_file_values(config_file: Path) -> Mapping[str, Any]:
    try:
        data = tomllib.loads(config_file.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config_file}: cannot read config: {exc}") from None
    section = data.get("serve", data)
    if not isinstance(section, Mapping):
        raise ConfigError(f"{config_file}: serve: expected a table, got {section!r}")
    return section
