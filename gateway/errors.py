"""One exception hierarchy for the whole gateway.

Each class names a situation, not a transport status: the protocol edge maps
classes to gRPC codes in one table (gateway.protocol.status). Messages are
written for the caller and must name the offending field.
"""

from __future__ import annotations

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


class QueueTimeout(GatewayError):
    """The request waited in the queue longer than its timeout_us."""


class DeadlineExceeded(GatewayError):
    """The client's deadline passed before the request could run."""


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
