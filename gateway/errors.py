"""One exception hierarchy for the whole gateway.

Each class names a situation, not a transport status. `CODE_BY_ERROR` is the one
table from a class to its canonical code (the names gRPC and Google APIs share);
each edge maps a code to its transport's status: gRPC in gateway.protocol.status,
HTTP in gateway.rest.status. Messages are written for the caller and must name
the offending field.
"""

from __future__ import annotations

import enum

# Trailing metadata on every status the gateway answers from this hierarchy. A
# client cannot otherwise tell an UNAVAILABLE the gateway chose to send (its state
# store cannot be written) from one grpc makes up when no gateway answered at all.
ANSWERED_KEY = "gateway-answered"


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class InvalidInput(GatewayError):
    """The request is malformed: shape, dtype, size, names, parameters."""


class ModelNotFound(GatewayError):
    """No such model, or no such version of it."""


class Overloaded(GatewayError):
    """The queue is full: the request was refused before it was queued."""


class ShadowShed(Overloaded):
    """A shadow copy refused by a busy executor process: its primaries come first.

    The shadow lane counts it dropped, with no mark against the shadow version."""


class QueueTimeout(GatewayError):
    """The request waited in the queue longer than its timeout_us."""


class DeadlineExceeded(GatewayError):
    """The client's deadline passed before the request could run."""


class ShadowLate(DeadlineExceeded):
    """A shadow copy whose deadline passed while the executor process served primaries.

    The shadow lane counts it timed out, with no mark against the shadow version."""


class Draining(GatewayError):
    """The server is shutting down and takes no new work."""


class FailedPrecondition(GatewayError):
    """A control-plane change that the current state does not allow."""


class Unauthenticated(GatewayError):
    """No bearer token, or an unknown one."""


class PermissionDenied(GatewayError):
    """The token is valid but its role may not do this."""


class ModelLoadError(GatewayError):
    """A model file or spec is missing or corrupt; names the file and the problem."""


class ConfigError(GatewayError):
    """A setting or spec value is invalid; names the setting."""


class ModelExecutionError(GatewayError):
    """The runtime failed while executing a valid request."""


class StoreUnavailable(GatewayError):
    """The state store cannot be read or written now (disk full, read-only, I/O error).

    The caller gets UNAVAILABLE: the release cannot change until the store is fixed,
    and the data plane serves the current release meanwhile."""


class Code(enum.StrEnum):
    """Canonical status codes, transport-neutral: what each edge maps to its own statuses."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    INTERNAL = "INTERNAL"


# The one table. A class not in it (ModelExecutionError, or any bug) is INTERNAL,
# and its message stays in the log: the caller gets a generic one.
CODE_BY_ERROR: dict[type[GatewayError], Code] = {
    InvalidInput: Code.INVALID_ARGUMENT,
    ModelNotFound: Code.NOT_FOUND,
    Overloaded: Code.RESOURCE_EXHAUSTED,
    QueueTimeout: Code.RESOURCE_EXHAUSTED,
    DeadlineExceeded: Code.DEADLINE_EXCEEDED,
    Draining: Code.UNAVAILABLE,
    StoreUnavailable: Code.UNAVAILABLE,
    FailedPrecondition: Code.FAILED_PRECONDITION,
    Unauthenticated: Code.UNAUTHENTICATED,
    PermissionDenied: Code.PERMISSION_DENIED,
    ConfigError: Code.INVALID_ARGUMENT,
    ModelLoadError: Code.FAILED_PRECONDITION,
}

GENERIC_MESSAGE = "internal error (details are in the gateway log)"


def code_for(exc: BaseException) -> tuple[Code, str]:
    """The canonical code and the message the caller sees for an exception."""
    for cls in type(exc).__mro__:
        code = CODE_BY_ERROR.get(cls)
        if code is not None:
            return code, str(exc)
    return Code.INTERNAL, GENERIC_MESSAGE
