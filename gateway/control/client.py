"""A thin client of the control API, shared by the CLI commands.

It turns gRPC failures into one-line messages that say what to do, and into
exit codes scripts can rely on:

    0 done · 1 refused (not allowed now, unknown name, bad value)
    2 usage error · 3 authentication or permission · 4 cannot reach the gateway
    (`rollout wait` and `rollout start --wait` add: 1 rolled back, 5 timed out;
    gateway/cli/wait.py)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from gateway.errors import ANSWERED_KEY
from gateway.protocol.pb import release_pb2_grpc as rgrpc

T = TypeVar("T")

EXIT_REFUSED = 1
EXIT_AUTH = 3
EXIT_UNREACHABLE = 4
DEFAULT_CONTROL = "127.0.0.1:8003"


class CommandFailed(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class ControlClient:
    address: str
    token: str = ""
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.tls_ca.read_bytes(),
                private_key=self.tls_key.read_bytes() if self.tls_key else None,
                certificate_chain=self.tls_cert.read_bytes() if self.tls_cert else None,
            )
            self.channel = grpc.secure_channel(self.address, credentials)
        else:
            self.channel = grpc.insecure_channel(self.address)
        self.stub = rgrpc.ReleaseServiceStub(self.channel)  # type: ignore[no-untyped-call]

    @classmethod
    def from_env(cls, address: str | None, token: str | None, **tls: Any) -> ControlClient:
        return cls(
            address or os.environ.get("GATEWAY_CONTROL", DEFAULT_CONTROL),
            token if token is not None else os.environ.get("GATEWAY_TOKEN", ""),
            **tls,
        )

    def call(self, method: Callable[..., T], request: Any) -> T:
        metadata = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        try:
            return method(request, metadata=metadata, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise self._failure(exc) from None

    def call_with_trailers(self, method: Any, request: Any) -> tuple[Any, dict[str, str | bytes]]:
        """`call`, and the answer's trailing metadata by key (the rollout view rides there)."""
        metadata = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        try:
            response, call = method.with_call(request, metadata=metadata, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise self._failure(exc) from None
        return response, dict(call.trailing_metadata() or ())

    def _failure(self, exc: grpc.RpcError) -> CommandFailed:
        code = exc.code()
        details = exc.details() or code.name
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not _answered(exc):
            return CommandFailed(
                f"cannot reach the control API at {self.address} ({details}): is `gateway serve` running? "
                "Set --control or GATEWAY_CONTROL to its address.",
                EXIT_UNREACHABLE,
            )
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return CommandFailed(f"{details}: pass --token or set GATEWAY_TOKEN", EXIT_AUTH)
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return CommandFailed(f"{details}: use a token with the write role", EXIT_AUTH)
        return CommandFailed(details, EXIT_REFUSED)

    def close(self) -> None:
        self.channel.close()


def _answered(exc: grpc.RpcError) -> bool:
    """Whether the gateway itself sent this status (its refusal, e.g. a store it cannot
    write: the message says what to fix) rather than grpc finding no gateway to ask."""
    trailing = exc.trailing_metadata() if isinstance(exc, grpc.Call) else None
    return any(key == ANSWERED_KEY for key, _ in trailing or ())
