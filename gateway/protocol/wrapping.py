"""A server interceptor that wraps each method's handler once and caches the result.

grpc.aio asks every interceptor for a handler on every call; building the
wrapped handler again each time would cost a few microseconds a request, so
the wrapped handler is kept per method (methods are fixed at startup).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from grpc import aio


class WrappingInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    """Subclasses say how one method's handler is wrapped (`wrap`); this caches it."""

    def __init__(self) -> None:
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        raise NotImplementedError

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
        if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED
            return handler
        wrapped = self.wrap(method, handler)
        self._cache[method] = wrapped
        return wrapped
