"""Gateway settings: defaults < a TOML config file < `GATEWAY_*` environment < command-line flags.

Each setting is read by its type (gateway/config/_parse.py) and checked where
it is read: a refused value names the file or environment variable it came
from, the setting, the value and what was expected. Unknown keys in the file
are errors; `GATEWAY_*` variables that name no setting are left alone (other
parts read some, e.g. GATEWAY_CONTROL_TOKENS).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from gateway.config._parse import INT32_MAX, MIB, Schema, check_choice, check_choices, check_number, read_toml
from gateway.config.notify import NotifyTarget, check_targets
from gateway.errors import ConfigError

ProviderMode = Literal["auto", "cuda", "cpu"]
LoopKind = Literal["uvloop", "asyncio"]
BatchingMode = Literal["spec", "off"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["text", "json"]
ConvAlgoSearch = Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"]

ENV_PREFIX = "GATEWAY_"
# GATEWAY_* variables that are not serve settings: the CLI's client side and the
# control API's tokens. Any other unknown one is most likely a misspelt setting.
OTHER_VARIABLES = frozenset({"GATEWAY_CONTROL", "GATEWAY_TOKEN", "GATEWAY_CONTROL_TOKENS"})

log = logging.getLogger(__name__)
# More serving processes than this is a typo, not a machine: each one loads every model.
MAX_WORKERS = 1024
# A replica's name: what a Kubernetes pod name or a host name looks like, short enough for a label.
REPLICA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def resolved_replica_id(settings: GatewaySettings) -> str:
    """The replica's name: as set, else HOST-PID of this (the serving or supervising)
    process, resolved once before any worker starts so all of one replica's workers share it."""
    if settings.replica_id:
        return settings.replica_id
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).lstrip("._-")[:48] or "gateway"
    return f"{host}-{os.getpid()}"


def check_otlp_endpoint(origin: str, value: str) -> None:
    """Refuse what is not the URL of an OTLP/gRPC collector (its scheme says plain or TLS)."""
    parts = urlsplit(value)
    try:
        port = parts.port  # raises for a port that is not a number in 0..65535
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or not port:
        raise ConfigError(
            f"{origin}: expected http://HOST:PORT (plain) or https://HOST:PORT (TLS) of an OTLP/gRPC collector, "
            f"got {value!r} (the OTLP/gRPC port is usually 4317)"
        )


def check_state_url(origin: str, value: str) -> None:
    """Refuse what is not a PostgreSQL URL with a host and a database (the value is not
    repeated: it may hold a password)."""
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 -- raises for a port that is not a number in 0..65535
        port_ok = True
    except ValueError:
        port_ok = False
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname or not parts.path.strip("/") or not port_ok:
        raise ConfigError(
            f"{origin}: expected postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE (a PostgreSQL database "
            "shared by the replicas); leave it empty for SQLite in state_dir"
        )


def read_executors(value: int | str) -> int | str:
    """ "auto", or a count of executor processes ("off" and "0": none); refused with the fix."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("auto", "off"):
            return text
        if not text.isdigit():
            raise ConfigError(f"executors: {value[:40]!r} is not auto, off or a number of executor processes (0, 1)")
        value = int(text)
    if value == 0:
        return "off"
    if value < 0:
        raise ConfigError(f"executors: {value} is not auto, off or a number of executor processes (0, 1)")
    if value > 1:
        raise ConfigError(
            f"executors: {value}: one executor process is supported so far (it owns one device); use 1, auto or off"
        )
    return value


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    models: Path = Path("models")
    host: str = "127.0.0.1"
    port: int = 8001
    # The OIP REST binding (KServe v2 HTTP/JSON, gateway/rest), as Triton and KServe number it.
    # -1 turns it off, 0 picks a free port (as for the metrics and control ports).
    http_port: int = 8000
    metrics_port: int = 8002  # -1 turns the metrics endpoint off
    # The release-engineering API listens apart from inference, on loopback by default.
    control_host: str = "127.0.0.1"
    control_port: int = 8003  # -1 turns it off
    # The read-only browser dashboard (gateway/dashboard), on control_host with the control API's
    # tokens, beside it. -1 turns it off, 0 picks a free port.
    dashboard_port: int = 8004
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
    # Health Watch calls, counted apart from max_streams so that watchers never take
    # ModelStreamInfer's places; never idled out (a watcher only waits for news).
    max_watchers: int = 256
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
    # Typed contents values (fp32_contents, int64_contents, ...) of all inputs together,
    # counted before parsing: packed numbers cost up to 8 bytes parsed per byte sent
    # (an int64 0 is one byte), so 64 MiB of them took ~1 GB and 1 s. 1 Mi values is a few
    # images; large tensors belong in raw_input_contents, as Triton's clients send them.
    max_contents_values: int = 1 << 20
    grace_s: float = 10.0
    log_level: str = "INFO"
    # "text": lines for people; "json": one JSON object a line, for log collectors.
    log_format: LogFormat = "text"
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
    # Release state, audit log and controller lease on PostgreSQL instead, shared by several
    # replicas (postgresql://user@host:port/db); empty: SQLite in state_dir (one host).
    state_url: str = ""
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
    # This replica's name in a shared store (evidence rows, label answers, the controller
    # lease): unique per replica. Empty: HOST-PID of the serving process (a Kubernetes pod's
    # host name is its pod name); see resolved_replica_id.
    replica_id: str = ""
    # Capture live requests served by the stable version, with its answers (replay, gate).
    capture_dir: Path | None = None
    capture_fraction: float = 0.01
    capture_file_mb: int = 16
    capture_max_mb: int = 256
    # Names of models to load; empty loads every model in the repository.
    load: tuple[str, ...] = ()
    # OpenTelemetry traces go to this OTLP/gRPC collector (http://HOST:4317); empty: tracing is
    # off unless the standard OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT is set (gateway/tracing.py).
    otlp_endpoint: str = ""
    # Where rollout events are sent ([[notify]] tables in the config file; gateway/config/notify.py).
    notify: tuple[NotifyTarget, ...] = ()
    # Executor processes (gateway/serving/remote, docs/executors.md): "auto" (one on a GPU host,
    # none on a CPU host, where in-process batching answers sooner), "off" (0), or a count (1 so
    # far: one executor for the one device). With one, the front-end workers hand every model
    # run to it through shared memory, so requests from all of them batch together.
    executors: int | str = "auto"
    # Set by the supervisor for each front-end worker: where its executor listens (@NAME: an
    # abstract Unix socket). Empty: models run in this process.
    executor_address: str = ""
    # Set with it: how many front ends share that executor (and so each model's one queue).
    executor_front_ends: int = 0

    def __post_init__(self) -> None:
        check_choices(self)
        object.__setattr__(self, "executors", read_executors(self.executors))
        for name in ("port", "http_port", "metrics_port", "control_port", "dashboard_port"):
            value = getattr(self, name)
            if not -1 <= value <= 65535 or (name == "port" and value < 0):
                raise ConfigError(f"{name}: {value} is not a valid port")
        check_choice("log_level", self.log_level.upper(), LogLevel)
        check_number("workers", self.workers, 0, MAX_WORKERS)
        check_number("executor_front_ends", self.executor_front_ends, 0, MAX_WORKERS)
        # gRPC keeps message sizes and the concurrent-call cap in C ints.
        check_number("max_message_bytes", self.max_message_bytes, 1024, INT32_MAX)
        check_number("max_inflight", self.max_inflight, 1, INT32_MAX)
        check_number("max_streams", self.max_streams, 1, INT32_MAX - self.max_inflight)
        check_number("max_watchers", self.max_watchers, 1, INT32_MAX - self.max_inflight - self.max_streams)
        for name in ("stream_idle_s", "max_connection_idle_s", "max_connection_age_s"):
            check_number(name, getattr(self, name), 0, INT32_MAX / 1000)  # gRPC keeps milliseconds in C ints
        for cap in ("max_inputs", "max_outputs", "max_parameters", "max_rank", "max_id_bytes", "max_contents_values"):
            check_number(cap, getattr(self, cap), 1)
        check_number("grace_s", self.grace_s, 0)
        check_number("cuda_device", self.cuda_device, 0)
        check_number("cuda_mem_limit_mb", self.cuda_mem_limit_mb, 0)
        check_number("intra_op_threads", self.intra_op_threads, 0)
        check_number("worker_index", self.worker_index, -1, MAX_WORKERS - 1)
        check_number("capture_fraction", self.capture_fraction, 0, 1, above=True)
        check_number("capture_file_mb", self.capture_file_mb, 1)
        check_number("capture_max_mb", self.capture_max_mb, 1)
        if self.otlp_endpoint:
            check_otlp_endpoint("otlp_endpoint", self.otlp_endpoint)
        if self.state_url:
            check_state_url("state_url", self.state_url)
        if self.replica_id and not REPLICA_ID.fullmatch(self.replica_id):
            raise ConfigError(
                f"replica_id: {self.replica_id[:80]!r} is not a replica name: use 1-63 letters, digits, '.', '_' "
                "or '-', starting with a letter or digit (e.g. the pod name), or leave it empty for HOST-PID"
            )
        check_targets(self.notify)


_SCHEMA = Schema.of(GatewaySettings)


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> GatewaySettings:
    """Merge defaults < config file < GATEWAY_* environment < overrides (CLI flags).

    Every refusal names where the value came from: the config file or the
    environment variable, then the setting, the value and what was expected.
    """
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if config_file is not None:
        for key, value in _config_file_values(config_file).items():
            if not _SCHEMA.knows(key):
                raise ConfigError(f"{config_file}: {_SCHEMA.unknown(key)}")
            values[key] = _SCHEMA.read(f"{config_file}: {key}", key, value)
            origins[key] = str(config_file)
    for variable, text in (env if env is not None else os.environ).items():
        key = variable[len(ENV_PREFIX) :].lower()
        if variable.startswith(ENV_PREFIX) and _SCHEMA.knows(key):
            values[key] = _SCHEMA.read(variable, key, text, text=True)
            origins[key] = variable
        elif variable.startswith(ENV_PREFIX) and variable not in OTHER_VARIABLES:
            _warn_unknown_variable(variable)
    for key, value in (overrides or {}).items():
        if value is not None:
            if not _SCHEMA.knows(key):
                raise _SCHEMA.unknown(key)
            values[key] = _SCHEMA.read(key, key, value)
            origins.pop(key, None)
    try:
        return GatewaySettings(**values)
    except ConfigError as exc:
        # Range checks start their message with the setting's name: say who set it.
        origin = origins.get(str(exc).split(":", 1)[0])
        if origin is None:
            raise
        raise ConfigError(f"{origin}: {exc}") from None


def _warn_unknown_variable(variable: str) -> None:
    """Not refused (another program may share the prefix), but never silently ignored:
    GATEWAY_GRACE for GATEWAY_GRACE_S would otherwise leave the default in force."""
    settings = [ENV_PREFIX + key.upper() for key in _SCHEMA.readers]  # not arrays of tables: file only
    close = difflib.get_close_matches(variable, settings, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    log.warning("%s is not a gateway setting and is ignored%s", variable, hint)


def _config_file_values(config_file: Path) -> Mapping[str, Any]:
    data = read_toml(config_file, "config")
    section = data.get("serve", data)
    if not isinstance(section, Mapping):
        raise ConfigError(f"{config_file}: serve: expected a table, got {section!r}")
    if section is not data and "notify" in data:
        # [[notify]] reads naturally at the top level beside a [serve] table too.
        if "notify" in section:
            raise ConfigError(f"{config_file}: notify: give the targets as [[notify]] or [[serve.notify]], not both")
        return {**section, "notify": data["notify"]}
    return section
