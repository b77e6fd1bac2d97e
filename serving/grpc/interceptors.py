"""What every RPC goes through before and after its handler, as one `grpc.aio.ServerInterceptor`.

For every method whose request is one message (VaeService's and health's), bytes that are not a valid
protobuf message get INVALID_ARGUMENT: gRPC by itself answers UNKNOWN with a message naming server
internals. For VaeService's methods the interceptor also
- refuses new calls with UNAVAILABLE while the server drains, and tells the drain when the calls it
  accepted have finished (`drain`);
- turns whatever the handler raised into a status code and message (`serving.grpc.status`), so no
  stack trace leaves the server (unexpected errors are logged);
- records the request metrics and, when asked, one JSON log line per request, with the version that took
  the call (which the servicer leaves in the trailing metadata).

Handlers are wrapped once per method, on the first call, and reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc

from serving.api import VERSION_METADATA
from serving.errors import InvalidRequest, NotReady
from serving.grpc.status import cancelled_status, is_unexpected, status_for
from serving.metrics import Metrics

log = logging.getLogger(__name__)

ItemCount = Callable[[Any], int]  # reply → images or latents it carries


class _Malformed:
    """What the wrapped parser returns for bytes that do not parse."""


_MALFORMED = _Malformed()


class RequestInterceptor(grpc.aio.ServerInterceptor):
    """Malformed-request guard for every unary-request method; admission, status, metrics and logs for `service`."""

    def __init__(
        self, service: str, metrics: Metrics, reply_items: Mapping[str, ItemCount], log_requests: bool = False
    ) -> None:
        self.service_prefix = f"/{service}/"
        self.metrics = metrics
        self.reply_items = reply_items
        self.log_requests = log_requests
        self.accepting = True  # False once draining: new calls get UNAVAILABLE
        self._accepted = 0  # accepted calls not finished yet: what a drain waits for
        self._idle = asyncio.Event()
        self._idle.set()
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            handler = await continuation(handler_call_details)
            if handler is None or handler.request_streaming or handler.request_deserializer is None:
                return handler  # unknown methods, and reflection (streaming requests): as gRPC has them
            handler = self._wrap(method, handler)
            self._handlers[method] = handler
        return handler

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new calls; wait until every accepted one has finished (True) or `timeout_s` passed (False)."""
        self.accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        parse = handler.request_deserializer
        message_type = getattr(getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None), "full_name", "request")
        malformed = f"the request is not a valid {message_type} message (malformed protobuf bytes)"

        def safe_parse(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception:  # protobuf's DecodeError, whatever its implementation raises
                return _MALFORMED

        if method.startswith(self.service_prefix):
            name = method[len(self.service_prefix) :]
            return self._observed(name, handler, malformed)._replace(request_deserializer=safe_parse)
        return _guarded(handler, malformed)._replace(request_deserializer=safe_parse)

    def _observed(self, name: str, handler: grpc.RpcMethodHandler, malformed: str) -> grpc.RpcMethodHandler:
        """The handler of one of the service's methods, run as a `_Call`."""
        count = self.reply_items.get(name)
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                call = _Call(self, name, context)
                try:
                    call.admit(request, malformed)
                    reply = await behavior(request, context)
                except BaseException as error:
                    await call.failed(error)
                    raise
                call.succeeded(None if count is None else count(reply))
                return reply

            return handler._replace(unary_unary=unary_unary)

        stream = handler.unary_stream
        if not inspect.isasyncgenfunction(stream):
            raise TypeError(f"{name}: streaming handlers must be async generators")

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(self, name, context)
            items = 0
            try:
                call.admit(request, malformed)
                # aclosing: when gRPC closes this generator (the client left), the handler's closes at once
                async with contextlib.aclosing(stream(request, context)) as replies:
                    async for reply in replies:
                        items += 0 if count is None else count(reply)
                        yield reply
            except BaseException as error:
                await call.failed(error)
                raise
            call.succeeded(items)

        return handler._replace(unary_stream=unary_stream)

    def _call_started(self) -> None:
        self._accepted += 1
        self._idle.clear()

    def _call_finished(self) -> None:
        self._accepted -= 1
        if self._accepted == 0:
            self._idle.set()


class _Call:
    """One call of the service from admission to its metrics and log line."""

    __slots__ = ("accepted", "context", "interceptor", "method", "started")

    def __init__(self, interceptor: RequestInterceptor, method: str, context: grpc.aio.ServicerContext) -> None:
        self.interceptor = interceptor
        self.method = method
        self.context = context
        self.started = time.perf_counter()
        self.accepted = False
        interceptor.metrics.inflight.inc()

    def admit(self, request: Any, malformed: str) -> None:
        """Raise for a request that does not parse, or when the server drains; else count it as accepted."""
        if request is _MALFORMED:
            raise InvalidRequest(malformed)
        if not self.interceptor.accepting:
            raise NotReady("the server is shutting down and accepts no new requests; retry on another replica")
        self.accepted = True
        self.interceptor._call_started()

    def succeeded(self, items: int | None) -> None:
        self._finish("OK", items)

    async def failed(self, error: BaseException) -> None:
        """Record the failure; for anything but a cancellation, abort the call with its status."""
        if isinstance(error, grpc.aio.AbortError):  # the handler aborted by itself: its status stands
            self._finish(self.context.code().name if self.context.code() else "UNKNOWN", None)
            return
        if isinstance(error, (asyncio.CancelledError, GeneratorExit)):  # the deadline passed or the caller left
            self._finish(cancelled_status(self.context.time_remaining()).name, None)
            return
        status, message = status_for(error)
        if is_unexpected(error):
            log.error("request_failed", exc_info=error, extra={"fields": {"method": self.method}})
        self._finish(status.name, None)
        await self.context.abort(status, message)

    def _finish(self, code: str, items: int | None) -> None:
        interceptor = self.interceptor
        interceptor.metrics.inflight.dec()
        if self.accepted:
            interceptor._call_finished()
        duration = time.perf_counter() - self.started
        version = _served_version(self.context)
        interceptor.metrics.request_finished(self.method, code, version, duration, items)
        if interceptor.log_requests:
            fields = {
                "method": self.method, "code": code, "version": int(version) if version else None,
                "duration_ms": round(duration * 1000, 3), "items": items,
            }  # fmt: skip
            log.info("request", extra={"fields": fields})


def _served_version(context: grpc.aio.ServicerContext) -> str:
    """The version that took the call (the servicer's trailing metadata), or "" when none did."""
    for key, value in context.trailing_metadata() or ():
        if key == VERSION_METADATA:
            return str(value)
    return ""


def _guarded(handler: grpc.RpcMethodHandler, malformed: str) -> grpc.RpcMethodHandler:
    """A handler of another service (health) whose malformed requests get INVALID_ARGUMENT."""

    async def refuse(context: grpc.aio.ServicerContext) -> None:
        await context.abort(*status_for(InvalidRequest(malformed)))

    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if request is _MALFORMED:
                await refuse(context)
            return await unary(request, context)

        return handler._replace(unary_unary=unary_unary)

    stream = handler.unary_stream

    async def stream_writes(request: Any, context: grpc.aio.ServicerContext) -> Any:  # health's Watch writes
        if request is _MALFORMED:
            await refuse(context)
        return await stream(request, context)

    return handler._replace(unary_stream=stream_writes)
