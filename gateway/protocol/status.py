"""Our exceptions -> gRPC status codes, in one table and one interceptor.

Anything not in the table is a bug: the caller gets INTERNAL with a generic
message and the details go to the log only.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from gateway import errors

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[errors.GatewayError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.QueueTimeout: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Draining: grpc.StatusCode.UNAVAILABLE,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
}

GENERIC_MESSAGE = "internal error (details are in the gateway log)"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The code and message the caller sees for an exception."""
    for cls in type(exc).__mro__:
        code = STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, GENERIC_MESSAGE


UnaryBehavior = Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[Any]]


async def _abort(exc: Exception, context: aio.ServicerContext[Any, Any], method: str) -> None:
    """End the call with the status for `exc` (the table above, or INTERNAL for a bug)."""
    if isinstance(exc, aio.AbortError):
        raise exc
    if not isinstance(exc, errors.GatewayError):
        log.error("unexpected error in %s", method, exc_info=exc)
    code, message = status_for(exc)
    await context.abort(code, message)


def _wrap_unary(behavior: UnaryBehavior, method: str) -> UnaryBehavior:
    async def guarded(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behavior(request, context)
        except Exception as exc:
            await _abort(exc, context, method)

    return guarded


def _wrap_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def guarded(request_iterator: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        try:
            async for item in behavior(request_iterator, context):
                yield item
        except Exception as exc:
            await _abort(exc, context, method)

    return guarded


class ErrorMappingInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps every handler once (cached per method) with the mapping above."""

    def __init__(self) -> None:
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        elif handler.stream_stream is not None:
            wrapped = grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        else:
            # Server-streaming handlers (grpc.health Watch) manage their own errors.
            return handler
        self._cache[method] = wrapped
        return wrapped
