"""Locust load test for the gateway's ModelInfer (Open Inference Protocol over gRPC).

Run from the repository root, against a running gateway:

    .venv/bin/locust -f loadtests/locustfile.py --host 127.0.0.1:8001
    .venv/bin/locust -f loadtests/locustfile.py --headless -u 50 -r 10 -t 1m \\
        --host 127.0.0.1:8001 --model digits --rows 4 --routing-keys 100 --csv out/run

`--host` is `HOST:PORT` (`grpc://HOST:PORT` works too). The gateway-specific
options also read environment variables and Locust's config files:

    --model NAME          LOCUST_MODEL          default digits
    --model-version V     LOCUST_MODEL_VERSION  default: none (the gateway routes)
    --rows N              LOCUST_ROWS           rows per request, default 1
    --routing-keys K      LOCUST_ROUTING_KEYS   distinct `routing_key` values, default 0 (none sent)
    --request-timeout S   LOCUST_REQUEST_TIMEOUT  per-call deadline in seconds, default 10

Each user first asks the gateway for the model's metadata (ModelMetadata), then
sends ModelInfer in a closed loop (no think time). For `digits` the rows are
sampled from the held-out split (models/digits/heldout.npz); for any other
model they are generated from the metadata by gateway.types.random_inputs
(floats uniform in [0, 1), other types zero, every -1 dimension but the batch
one set to 1). With `--routing-keys K`
every request carries one of K keys, picked at random per request by every
user, so the same key arrives from many users and connections and the
gateway's sticky split is exercised; at the end each process logs which
versions and roles answered, and how many keys moved between versions (none,
unless the release changed during the run).

Every call is reported to Locust's statistics by a client interceptor
(request_type "grpc", named "<Method> <model>"), the pattern Locust documents
for gRPC. A call fails on a gRPC error status, or when a ModelInfer response
lacks an output or has the wrong number of rows. Locust runs users as gevent
greenlets, so gRPC's sync API is put in gevent mode at import, after Locust has
monkey-patched the standard library and before any channel exists.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import User, events, task
from locust.env import Environment
from locust.exception import LocustError

from gateway.dtypes import NUMPY_BY_DATATYPE
from gateway.protocol.pb import inference_pb2 as pb
from gateway.protocol.pb import inference_pb2_grpc as pb_grpc
from gateway.types import TensorSpec, random_inputs

# Locust imports this file by its path, with only its folder and the working directory on
# sys.path; the load tests are not installed, so from any other directory the checkout's root
# must go on the path too for their shared helpers to import.
_CHECKOUT = str(Path(__file__).resolve().parent.parent)
if _CHECKOUT not in sys.path:
    sys.path.append(_CHECKOUT)
from loadtests.signature import check_response, infer_request  # noqa: E402  (needs the path above)

# gRPC's sync API blocks in C unless its completion queue is polled through
# gevent: without this, one user's call would stall every greenlet in the process.
# `import locust` (above, and long before this file under the locust command)
# has monkey-patched the standard library; no gRPC object exists yet.
grpc_gevent.init_gevent()

log = logging.getLogger("loadtests.locustfile")

HELDOUT = Path(__file__).resolve().parent.parent / "models" / "digits" / "heldout.npz"
DIGITS = "digits"
DEFAULT_HOST = "127.0.0.1:8001"  # `gateway serve`'s default
METADATA_RETRY_S = 1.0  # between ModelMetadata attempts while a user has no metadata yet
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


# --------------------------------------------------------------------------- options


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{text} is not a positive integer")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"{text} is negative")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"{text} is not a positive number of seconds")
    return value


def _add_arguments(parser: Any, **_kwargs: Any) -> None:
    group = parser.add_argument_group("gateway", "What the GatewayUser sends (see loadtests/locustfile.py)")
    group.add_argument("--model", default=DIGITS, env_var="LOCUST_MODEL", help="model name (default: digits)")
    group.add_argument(
        "--model-version",
        default="",
        env_var="LOCUST_MODEL_VERSION",
        help="pin a version; default none, so the gateway routes (stable, canary)",
    )
    group.add_argument(
        "--rows", type=_positive_int, default=1, env_var="LOCUST_ROWS", help="rows per request (default: 1)"
    )
    group.add_argument(
        "--routing-keys",
        type=_count,
        default=0,
        env_var="LOCUST_ROUTING_KEYS",
        help="number of distinct routing_key values to spread requests over (default: 0, none sent)",
    )
    group.add_argument(
        "--request-timeout",
        type=_seconds,
        default=10.0,
        env_var="LOCUST_REQUEST_TIMEOUT",
        help="per-call deadline in seconds (default: 10)",
    )


# add_listener is untyped: registering by a call keeps the listeners type-checked.
events.init_command_line_parser.add_listener(_add_arguments)


@dataclass(frozen=True, slots=True)
class LoadOptions:
    model: str = DIGITS
    version: str = ""
    rows: int = 1
    routing_keys: int = 0
    timeout_s: float = 10.0

    @classmethod
    def of(cls, environment: Environment) -> LoadOptions:
        """Locust's parsed options; the environment variables when Locust runs as a library (no parser)."""
        parsed = environment.parsed_options
        if parsed is not None:
            return cls(parsed.model, parsed.model_version, parsed.rows, parsed.routing_keys, parsed.request_timeout)
        env = os.environ
        return cls(
            env.get("LOCUST_MODEL", DIGITS),
            env.get("LOCUST_MODEL_VERSION", ""),
            _positive_int(env.get("LOCUST_ROWS", "1")),
            _count(env.get("LOCUST_ROUTING_KEYS", "0")),
            _seconds(env.get("LOCUST_REQUEST_TIMEOUT", "10")),
        )

    @property
    def label(self) -> str:
        """The model as request names show it: `digits`, or `digits@2` when pinned."""
        return f"{self.model}@{self.version}" if self.version else self.model


def grpc_target(host: str | None) -> str:
    """Locust's --host as a gRPC target: `HOST:PORT` or `grpc://HOST:PORT`."""
    if not host:
        raise LocustError("set the gateway's address with --host HOST:PORT")
    target = host.removeprefix("grpc://").rstrip("/")
    if "://" in target or "/" in target or ":" not in target:
        raise LocustError(f"--host {host!r}: expected HOST:PORT or grpc://HOST:PORT (the gateway speaks gRPC)")
    return target


# --------------------------------------------------------------------------- reporting to Locust


class CallFailed(Exception):
    """A gRPC error status or a bad response, worded so that Locust groups equal failures together."""


Check = Callable[[str, Any, Any], str | None]  # (method, request, response) -> problem or None


def _short_method(method: str | bytes) -> str:
    text = method.decode() if isinstance(method, bytes) else method
    return text.rsplit("/", 1)[-1]


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Fires Locust's `request` event for every unary call on its channel.

    The name is "<Method> <label>", the response time covers the call alone
    (not the check), and a `check` may turn a response that arrived into a
    failure. The caller still gets the call's own outcome: a gRPC error raises
    from the stub as usual.
    """

    def __init__(self, environment: Environment, label: str, check: Check | None = None) -> None:
        self.environment = environment
        self.label = label
        self.check = check

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        method = _short_method(client_call_details.method)
        start = time.perf_counter()
        outcome = continuation(client_call_details, request)  # the sync API completes the call here
        response: Any = None
        exception: Exception | None = None
        length = 0
        try:
            response = outcome.result()
        except grpc.RpcError as exc:
            exception = CallFailed(f"{exc.code().name}: {exc.details()}")
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        if response is not None:
            length = response.ByteSize()
            problem = self.check(method, request, response) if self.check else None
            if problem:
                exception = CallFailed(problem)
        self.environment.events.request.fire(
            request_type="grpc",
            name=f"{method} {self.label}",
            response_time=elapsed_ms,
            response_length=length,
            response=response,
            context={},
            exception=exception,
        )
        return outcome


# --------------------------------------------------------------------------- requests


def _tensors(metadata: Sequence[Any]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in metadata)


def _heldout_rows() -> np.ndarray | None:
    if not HELDOUT.exists():
        return None
    with np.load(HELDOUT) as data:
        return np.ascontiguousarray(data["X"], dtype=np.float32)


@dataclass(slots=True)
class RequestFactory:
    """ModelInferRequests for one model, from its metadata (and the digits held-out rows)."""

    model: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    pool: np.ndarray | None = None  # rows to sample from, for a single [-1, F] input

    @classmethod
    def from_metadata(cls, options: LoadOptions, metadata: Any) -> RequestFactory:
        inputs, outputs = _tensors(metadata.inputs), _tensors(metadata.outputs)
        for tensor in inputs:
            if tensor.datatype not in NUMPY_BY_DATATYPE:
                raise LocustError(
                    f"{options.model}: input {tensor.name!r} is {tensor.datatype}, which cannot be generated"
                )
        factory = cls(options.model, options.version, inputs, outputs)
        if options.model == DIGITS:
            rows = _heldout_rows()
            if (
                rows is not None
                and len(inputs) == 1
                and inputs[0].datatype == "FP32"
                and inputs[0].shape[1:] == rows.shape[1:]
            ):
                factory.pool = rows
            else:
                log.warning("digits: the held-out rows do not fit the served inputs; generating inputs instead")
        return factory

    def request(self, rows: int, rng: np.random.Generator, routing_key: str | None) -> pb.ModelInferRequest:
        if self.pool is not None:
            values = {self.inputs[0].name: self.pool[rng.integers(0, len(self.pool), rows)]}
        else:
            values = random_inputs(self.inputs, rows, rng)
        request = infer_request(self.model, self.version, self.inputs, values)
        if routing_key is not None:
            request.parameters["routing_key"].string_param = routing_key
        return request

    def problem(self, request: pb.ModelInferRequest, response: pb.ModelInferResponse) -> str | None:
        """What is wrong with a response to `request` (None when every output is there with its rows)."""
        rows = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1
        return check_response(response, self.outputs, rows)


# Per process: the first user to get a model's metadata shares it with the rest.
_FACTORIES: dict[tuple[str, str], RequestFactory] = {}


# --------------------------------------------------------------------------- who answered


@dataclass(slots=True)
class RoutingTally:
    """Which versions and roles answered, and whether any routing key moved between versions."""

    served: Counter[tuple[str, str]] = field(default_factory=Counter)
    version_of_key: dict[str, str] = field(default_factory=dict)
    moves: int = 0

    def record(self, key: str | None, response: pb.ModelInferResponse) -> None:
        role = response.parameters["role"].string_param if "role" in response.parameters else ""
        self.served[(response.model_version, role)] += 1
        if key is None:
            return
        before = self.version_of_key.setdefault(key, response.model_version)
        if before != response.model_version:
            self.moves += 1
            self.version_of_key[key] = response.model_version

    def summary(self, label: str, keys: int) -> list[str]:
        total = sum(self.served.values())
        if not total:
            return []
        shares = ", ".join(
            f"v{version} {role or '?'} {count / total:.1%}" for (version, role), count in sorted(self.served.items())
        )
        lines = [f"{label}: {total} answers: {shares}"]
        if keys:
            lines.append(
                f"{label}: {len(self.version_of_key)} of {keys} routing keys seen, "
                f"{self.moves} moves between versions (a weight change or promotion moves keys; nothing else should)"
            )
        return lines


TALLY = RoutingTally()


def _reset_tally(environment: Environment, **_kwargs: Any) -> None:
    TALLY.served.clear()
    TALLY.version_of_key.clear()
    TALLY.moves = 0


def _log_tally(environment: Environment, **_kwargs: Any) -> None:
    options = LoadOptions.of(environment)
    for line in TALLY.summary(options.label, options.routing_keys):
        log.info(line)


events.test_start.add_listener(_reset_tally)  # the web UI may run several tests in one process
events.test_stop.add_listener(_log_tally)

# --------------------------------------------------------------------------- the user


class GatewayUser(User):
    """One client of the gateway: its own gRPC connection, ModelInfer in a closed loop."""

    host = DEFAULT_HOST

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.options = LoadOptions.of(environment)
        target = grpc_target(self.host)
        self.rng = np.random.default_rng()
        self.pick = random.Random()
        self.keys = [f"key-{i}" for i in range(self.options.routing_keys)]
        self.factory: RequestFactory | None = None
        # A local subchannel pool gives every user its own TCP connection, so the load spreads
        # over `gateway serve --workers N` processes (they share the port with SO_REUSEPORT).
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.use_local_subchannel_pool", 1),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        interceptor = LocustInterceptor(environment, self.options.label, self._check)
        self.stub = pb_grpc.GRPCInferenceServiceStub(grpc.intercept_channel(self.channel, interceptor))

    def wait_time(self) -> float:
        # Closed loop once the user can send; a pause between metadata attempts until then.
        return 0.0 if self.factory is not None else METADATA_RETRY_S

    def on_start(self) -> None:
        self._prepare()

    def on_stop(self) -> None:
        self.channel.close()

    def _check(self, method: str, request: Any, response: Any) -> str | None:
        if method == "ModelInfer" and self.factory is not None:
            return self.factory.problem(request, response)
        return None

    def _prepare(self) -> bool:
        options = self.options
        key = (options.model, options.version)
        factory = _FACTORIES.get(key)
        if factory is None:
            try:
                metadata = self.stub.ModelMetadata(
                    pb.ModelMetadataRequest(name=options.model, version=options.version), timeout=options.timeout_s
                )
            except grpc.RpcError:
                return False  # reported as a failure already; retried after METADATA_RETRY_S
            factory = _FACTORIES.setdefault(key, RequestFactory.from_metadata(options, metadata))
        self.factory = factory
        return True

    @task
    def infer(self) -> None:
        if self.factory is None and not self._prepare():
            return
        assert self.factory is not None
        key = self.pick.choice(self.keys) if self.keys else None
        request = self.factory.request(self.options.rows, self.rng, key)
        try:
            response = self.stub.ModelInfer(request, timeout=self.options.timeout_s)
        except grpc.RpcError:
            return  # reported as a failure already
        TALLY.record(key, response)
