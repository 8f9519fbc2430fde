"""Bearer-token authentication and roles for the control API.

Tokens come from a TOML file (`[[tokens]]` with name, role, token) or from
GATEWAY_CONTROL_TOKENS ("name:role:token,..."). Roles: `read` (list, get,
report, audit) and `write` (everything, feedback included). Tokens are
compared in constant time, and every configured token is compared, so
timing reveals neither the token nor which one matched.
"""

from __future__ import annotations

import hmac
import ipaddress
import tomllib
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from gateway.errors import ConfigError, PermissionDenied, Unauthenticated

ROLES = ("read", "write")
# The authenticated caller of the control call being handled: a context
# variable is scoped to the call's own task, so concurrent calls never mix.
ACTOR: ContextVar[str | None] = ContextVar("gateway_actor", default=None)
TOKEN_KEYS = ("name", "role", "token")
READ_METHODS = frozenset({"ListReleases", "GetRelease", "GetReport", "GetAuditLog", "GetDrift", "ListRoutes"})


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    role: str
    secret: bytes


def parse_tokens(text: str, source: str) -> list[Token]:
    """Tokens from "name:role:token,..." text."""
    tokens = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, rest = item.partition(":")
        role, _, secret = rest.partition(":")
        tokens.append(_token(name, role, secret, source))
    return tokens


def _token(name: str, role: str, secret: str, source: str) -> Token:
    if not name or not secret:
        raise ConfigError(f"{source}: every token needs a name and a secret")
    if role not in ROLES:
        raise ConfigError(f"{source}: token {name!r} has role {role!r}; roles are {', '.join(ROLES)}")
    if len(secret) < 16:
        raise ConfigError(f"{source}: token {name!r} is shorter than 16 characters")
    # Refused rather than stripped: a client sends the secret in an HTTP/2 header,
    # whose value is trimmed and printable ASCII, so such a secret could never
    # match; changing it quietly would leave the operator unsure which one is live.
    if secret != secret.strip():
        raise ConfigError(
            f"{source}: token {name!r} has spaces before or after its secret, which no client can send; remove them"
        )
    if not all(" " <= c <= "~" for c in secret):
        raise ConfigError(
            f"{source}: token {name!r} has characters other than printable ASCII, which no client can send"
        )
    return Token(name, role, secret.encode())


def load_tokens(path: Path | None, env: Mapping[str, str]) -> list[Token]:
    tokens: list[Token] = []
    if path is not None:
        tokens += _file_tokens(path)
    if env.get("GATEWAY_CONTROL_TOKENS"):
        tokens += parse_tokens(env["GATEWAY_CONTROL_TOKENS"], "GATEWAY_CONTROL_TOKENS")
    names = [t.name for t in tokens]
    if len(set(names)) != len(names):
        raise ConfigError("control tokens: names must be unique")
    _check_distinct_secrets(tokens)
    return tokens


def _check_distinct_secrets(tokens: list[Token]) -> None:
    """Refuse two tokens with one secret: the caller would get whichever matched last, so a
    read token could act with write's role (or the reverse) depending on the order of the file."""
    first: dict[bytes, str] = {}
    for token in tokens:
        other = first.setdefault(token.secret, token.name)
        if other != token.name:
            # Name both tokens, never the secret.
            raise ConfigError(
                f"control tokens: tokens {other!r} and {token.name!r} have the same secret; give each its own"
            )


def _file_tokens(path: Path) -> list[Token]:
    """Tokens from a TOML file of [[tokens]] tables; anything else in it is refused, naming the place."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"tokens_file: cannot read {path}: {exc}") from None
    # A typo such as [[token]] would otherwise leave the control API without any token.
    unknown = sorted(set(data) - {"tokens"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; the file holds [[tokens]] tables only")
    entries = data.get("tokens")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: tokens: expected [[tokens]] tables with name, role and token, got {entries!r}")
    tokens = []
    for number, entry in enumerate(entries, 1):
        where = f"{path}: tokens #{number}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a table with name, role and token, got {entry!r}")
        extra = sorted(set(entry) - set(TOKEN_KEYS))
        if extra:
            raise ConfigError(f"{where}: unknown key {extra[0]!r} (known: {', '.join(TOKEN_KEYS)})")
        for key in TOKEN_KEYS:
            if not isinstance(entry.get(key), str):
                # The secret's value never appears in a message, only its type.
                raise ConfigError(f"{where}: {key} must be a string, got {type(entry.get(key)).__name__}")
        tokens.append(_token(entry["name"], entry["role"], entry["token"], str(path)))
    return tokens


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, tokens: list[Token]) -> None:
    """The control API never listens beyond this machine without authentication."""
    if not tokens and not is_loopback(host):
        raise ConfigError(
            f"control_host: refusing to serve the control API on {host} without tokens "
            "(set tokens_file or GATEWAY_CONTROL_TOKENS, or bind 127.0.0.1)"
        )


class Authenticator:
    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens

    def identify(self, header: str) -> Token:
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise Unauthenticated("missing bearer token (authorization: Bearer <token>)")
        secret = presented.strip().encode()
        found: Token | None = None
        for token in self.tokens:  # compare with every token: timing reveals nothing
            if hmac.compare_digest(token.secret, secret):
                found = token
        if found is None:
            raise Unauthenticated("unknown token")
        return found

    def authorize(self, method: str, metadata: Mapping[str, str]) -> str | None:
        """The actor name for an allowed call; raises for a refused one. None: auth is off."""
        if not self.tokens:
            return None
        token = self.identify(metadata.get("authorization", ""))
        if method not in READ_METHODS and token.role != "write":
            raise PermissionDenied(f"token {token.name!r} has role {token.role}; {method} needs write")
        return token.name


Behavior = Callable[[Any, Any], Awaitable[Any]]


class AuthInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    """Checks every control call before it runs; the actor it finds rides in the context."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or not self.auth.tokens:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        inner: Behavior = handler.unary_unary
        auth = self.auth

        async def guarded(request: Any, context: Any) -> Any:
            metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
            try:
                actor = auth.authorize(method, metadata)
            except Unauthenticated as exc:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            except PermissionDenied as exc:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            ACTOR.set(actor)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
