"""Our exceptions -> gRPC status codes (the table in gateway.errors), in one interceptor.

Anything not in the table is a bug: the caller gets INTERNAL with a generic
message and the details go to the log only.

The interceptor also parses requests itself: grpc's own deserializer raises
outside every handler, so a message that is not protobuf would answer UNKNOWN
and log a traceback per request. Ours never raises; it hands the handler an
`Unparseable` marker, which becomes INVALID_ARGUMENT (in a ModelStreamInfer
stream: that one message's error, and the stream goes on).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from gateway import errors
from gateway.logthrottle import ThrottledLog, one_line
from gateway.protocol.wrapping import WrappingInterceptor

log = logging.getLogger(__name__)

# gRPC's codes carry the canonical names: the table in gateway.errors, in gRPC's terms.
STATUS_BY_ERROR: dict[type[errors.GatewayError], grpc.StatusCode] = {
    cls: grpc.StatusCode[code.value] for cls, code in errors.CODE_BY_ERROR.items()
}

GENERIC_MESSAGE = errors.GENERIC_MESSAGE

# Unparseable messages are the client's fault and can arrive by the thousand:
# one line per method per interval, the next one saying how many were held back.
_REASON_CHARS = 200

# Streams whose handler answers an unparseable message in the stream itself (it
# receives the Unparseable marker as a message); any other stream ends with
# INVALID_ARGUMENT at that message.
IN_STREAM_ERRORS = frozenset({"/inference.GRPCInferenceService/ModelStreamInfer"})


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The code and message the caller sees for an exception."""
    code, message = errors.code_for(exc)
    return grpc.StatusCode[code.value], message


@dataclass(frozen=True, slots=True)
class Unparseable:
    """Stands in for a request message that did not parse."""

    method: str
    message_type: str
    size: int
    reason: str
    refusal: str = ""  # set when a structure check refused the bytes before parsing (its message)

    def error(self) -> errors.InvalidInput:
        if self.refusal:
            return errors.InvalidInput(self.refusal)
        return errors.InvalidInput(
            f"the request does not parse as {self.message_type} ({self.size} bytes: {self.reason}); "
            f"send a serialized {self.message_type} (check that client and server use the same .proto)"
        )


def _message_type(deserializer: Callable[[bytes], Any]) -> str:
    # Generated stubs pass `Message.FromString`, bound to the message class.
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "the method's request message"))


def _tolerant(
    deserializer: Callable[[bytes], Any] | None, method: str, warnings: ThrottledLog
) -> Callable[[bytes], Any] | None:
    """`deserializer`, returning an Unparseable marker where it would raise."""
    if deserializer is None:
        return None
    message_type = _message_type(deserializer)

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except errors.InvalidInput as exc:  # over a cap (gateway.protocol.limits): named, not logged
            return Unparseable(method, message_type, len(data), "", str(exc))
        except Exception as exc:  # DecodeError from protobuf; anything from another deserializer
            reason = one_line(str(exc) or type(exc).__name__, _REASON_CHARS)
            warnings.log(
                logging.WARNING,
                method,
                "refused an unparseable request to %s (%d bytes): %s",
                method,
                len(data),
                reason,
            )
            return Unparseable(method, message_type, len(data), reason)

    return parse


class _Held:
    """A stream's message on its way from grpc to the handler, in a box emptied when taken.

    grpc's request iterator keeps the last message it produced while it waits for
    the next one: on an idle stream, for up to stream_idle_s, a message of up to
    the message size per stream. Handed over in this box, what grpc keeps is an
    empty box."""

    __slots__ = ("message",)

    def __init__(self, message: Any) -> None:
        self.message = message

    def take(self) -> Any:
        message, self.message = self.message, None
        return message


def _boxed(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    return lambda data: _Held(deserializer(data))


async def _unboxed(requests: AsyncIterator[_Held]) -> AsyncIterator[Any]:
    iterator = requests.__aiter__()
    while True:
        try:
            message = (await iterator.__anext__()).take()
        except StopAsyncIteration:
            return
        yield message
        del message  # not kept through the wait for the next one


async def _refusing(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The request stream of a handler that does not know the marker: its first
    unparseable message raises InvalidInput, ending the stream with INVALID_ARGUMENT."""
    iterator = requests.__aiter__()
    while True:
        try:
            item = await iterator.__anext__()
        except StopAsyncIteration:
            return
        if isinstance(item, Unparseable):
            raise item.error()
        yield item
        del item  # not kept through the wait for the next one


UnaryBehavior = Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[Any]]


async def _abort(exc: Exception, context: aio.ServicerContext[Any, Any], method: str) -> None:
    """End the call with the status for `exc` (the table above, or INTERNAL for a bug)."""
    if isinstance(exc, aio.AbortError):
        raise exc
    if not isinstance(exc, errors.GatewayError):
        log.error("unexpected error in %s", method, exc_info=exc)
    code, message = status_for(exc)
    # Not context.abort(): grpc keeps the AbortError on the call's state, and its
    # traceback holds the frames that hold the request, a cycle that kept every
    # refused request (up to the message size each) until a full collection. A
    # status set on the context is sent as is when the handler returns.
    context.set_code(code)
    context.set_details(message)
    context.set_trailing_metadata(((errors.ANSWERED_KEY, "1"),))


def _wrap_unary(behavior: UnaryBehavior, method: str) -> UnaryBehavior:
    async def guarded(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        try:
            if isinstance(request, Unparseable):
                raise request.error()
            return await behavior(request, context)
        except Exception as exc:
            await _abort(exc, context, method)

    return guarded


def _wrap_stream(behavior: Callable[..., Any], method: str, in_stream_errors: bool) -> Callable[..., Any]:
    # Markers travel as messages (through any wrapper between here and the handler)
    # only to a handler that answers them in the stream.
    async def guarded(request_iterator: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        messages = _unboxed(request_iterator)
        requests = messages if in_stream_errors else _refusing(messages)
        try:
            async for item in behavior(requests, context):
                yield item
        except Exception as exc:
            await _abort(exc, context, method)

    return guarded


def _refuse_unparseable(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """A server-streaming handler (grpc.health Watch) that refuses a marker and is otherwise untouched:
    those handlers map their own errors, and grpc tells their two forms apart, so keep the form."""
    if inspect.isasyncgenfunction(behavior):

        async def streaming(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, Unparseable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error()))
            async for item in behavior(request, context):
                yield item

        return streaming

    async def writing(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Unparseable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error()))
        return await behavior(request, context)

    return writing


class ErrorMappingInterceptor(WrappingInterceptor):
    """Wraps every handler once (cached per method) with the mapping above."""

    def __init__(self, parsers: Mapping[str, Callable[[bytes], Any]] | None = None) -> None:
        # Per method, a deserializer to use instead of the handler's (one that checks first).
        super().__init__()
        self._parsers = dict(parsers or {})
        self._unparseable = ThrottledLog(log)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        parser = self._parsers.get(method, handler.request_deserializer)
        deserializer = _tolerant(parser, method, self._unparseable)
        if handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        elif handler.stream_stream is not None:
            wrapped = grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method, method in IN_STREAM_ERRORS),
                request_deserializer=_boxed(deserializer),
                response_serializer=handler.response_serializer,
            )
        elif handler.unary_stream is not None:
            wrapped = grpc.unary_stream_rpc_method_handler(
                _refuse_unparseable(handler.unary_stream),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        else:
            return handler  # no client-streaming method is served
        return wrapped
