"""The error -> status table, entry by entry."""

from __future__ import annotations

import grpc
import pytest

from gateway import errors
from gateway.protocol.status import GENERIC_MESSAGE, STATUS_BY_ERROR, status_for

EXPECTED: dict[type[errors.GatewayError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.QueueTimeout: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Draining: grpc.StatusCode.UNAVAILABLE,
    errors.StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
}


@pytest.mark.parametrize("cls", list(EXPECTED))
def test_each_error_maps_to_its_code_with_its_message(cls: type[errors.GatewayError]) -> None:
    assert status_for(cls("what went wrong")) == (EXPECTED[cls], "what went wrong")


def test_every_gateway_error_is_in_the_table_or_is_internal() -> None:
    leaves = set(errors.GatewayError.__subclasses__())
    assert leaves - set(STATUS_BY_ERROR) == {errors.ModelExecutionError}
    assert status_for(errors.ModelExecutionError("secret detail")) == (grpc.StatusCode.INTERNAL, GENERIC_MESSAGE)


def test_unexpected_exceptions_get_a_generic_message() -> None:
    assert status_for(KeyError("/internal/path")) == (grpc.StatusCode.INTERNAL, GENERIC_MESSAGE)
