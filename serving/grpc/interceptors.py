"""What every RPC goes through before and after its handler, as one `grpc.aio.ServerInterceptor`.

Every method whose request is one message (VaeService's, GRPCInferenceService's and health's) is served as a request
stream of one message, so that the server, not gRPC, reads that message: gRPC would hold a call that never sends it
until the connection goes. Here the call waits for its message at most `--request-receive-timeout-seconds`, among at
most `--max-pending-requests` such calls (`serving.dataplane.admission.PendingRequests`), and takes none of the
slots that calls with their request need. Bytes that are not a valid protobuf message get INVALID_ARGUMENT (gRPC by
itself answers UNKNOWN with a message naming server internals). For the methods of the served APIs (VaeService and
the Open Inference Protocol's GRPCInferenceService) the interceptor also
- admits a call only once its message is there: within `--max-concurrent-rpcs` calls and
  `--max-request-bytes-in-flight` request bytes at once, checked before the message is parsed;
- refuses new calls with UNAVAILABLE while the server drains, and counts the calls it accepted for the
  drain (`serving.dataplane.admission.Drain`);
- names the call's caller (`serving.dataplane.admission.CALLER`, its connection) for the batchers' fair share;
- turns whatever the handler raised into a status code and message (`serving.grpc.status`), so no
  stack trace leaves the server (unexpected errors are logged);
- records the request metrics and, when asked, one JSON log line per request, with the version that took
  the call (which the servicer leaves in the trailing metadata) (`serving.request_record`);
- makes the call's SERVER span when tracing is on, continuing the caller's trace from its `traceparent`
  metadata, and names the caller's `x-request-id` for the call's log lines (`serving.tracing`).

Handlers are wrapped once per method, on the first call, and reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any

import grpc

from serving.api import VERSION_METADATA
from serving.dataplane.admission import CALLER, Admission
from serving.errors import InvalidRequest, ServingError
from serving.grpc.status import cancelled_status, is_unexpected, status_for
from serving.request_record import RequestRecord
from serving.tracing import REQUEST_ID, REQUEST_ID_HEADER, ServerSpan, request_id_of

log = logging.getLogger(__name__)

ItemCount = Callable[[Any], int]  # reply → images or latents it carries
# The codes that make a server span an error (OpenTelemetry's gRPC conventions): the others are the caller's.
_SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})
Parse = Callable[[bytes], Any]


class RequestInterceptor(grpc.aio.ServerInterceptor):
    """Request receipt and malformed-request guard for every unary-request method; admission, status, metrics
    and logs for the methods of `services`."""

    def __init__(
        self,
        services: Sequence[str],
        record: RequestRecord,
        reply_items: Mapping[str, ItemCount],
        admission: Admission,
        counted_by_message: Collection[str] = (),
        routes_by_request_id: Callable[[], bool] = lambda: False,
    ) -> None:
        """`routes_by_request_id()`: whether the version a call gets depends on its x-request-id now (a canary
        weight is in force), so that its metadata must be read even with tracing and request logs off."""
        self.service_prefixes = tuple(f"/{service}/" for service in services)
        self.record = record
        self.metrics = record.metrics
        self.tracing = record.tracing
        # Whether a call's metadata is read when it starts: for its span and its x-request-id in the log lines.
        self.reads_metadata = record.tracing.enabled or record.log_requests
        self.routes_by_request_id = routes_by_request_id
        self.reply_items = reply_items
        self.admission = admission
        # Streams whose handler counts and logs each request message (ModelStreamInfer): the stream itself is
        # counted and logged only when it fails as a whole (refused, or broken), never as one more request.
        self.counted_by_message = frozenset(counted_by_message)
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
            if handler is None or handler.request_deserializer is None:
                return handler  # unknown methods: as gRPC has them
            if handler.request_streaming:
                if not method.startswith(self.service_prefixes):
                    return handler  # reflection: as gRPC has it
                handler = self._observed_bidi(method, handler)
            else:
                handler = self._wrap(method, handler)
            self._handlers[method] = handler
        return handler

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler as a request stream of one message, which it reads itself (the module docstring)."""
        parse = _safe(handler.request_deserializer)
        serialize = handler.response_serializer
        if method.startswith(self.service_prefixes):
            if handler.unary_unary is not None:
                unary = self._observed_unary(method, handler, parse)
                return grpc.stream_unary_rpc_method_handler(unary, None, serialize)
            stream = self._observed_stream(method, handler, parse)
            return grpc.stream_stream_rpc_method_handler(stream, None, serialize)
        if handler.unary_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._guarded(handler.unary_unary, parse), None, serialize)
        return grpc.stream_stream_rpc_method_handler(self._guarded(handler.unary_stream, parse), None, serialize)

    async def _receive(self, context: grpc.aio.ServicerContext) -> bytes:
        """The call's request message, as bytes, within the receive bound (`PendingRequests`)."""
        data = await self.admission.pending.receive(context.read, context.peer())
        if data is grpc.aio.EOF:
            raise InvalidRequest("the call ended without a request message")
        return bytes(data)

    @contextlib.asynccontextmanager
    async def _admitted(self, call: _Call, parse: Parse) -> AsyncIterator[Any]:
        """A service call from its message to its end: received, admitted (a call slot and its bytes), parsed,
        its caller named for the batchers; the slots are given back on leaving."""
        self.admission.drain.check_accepting()
        data = await self._receive(call.context)
        admission = self.admission
        with admission.calls.hold(), admission.request_bytes.hold(len(data)):
            call.accept()
            request = parse(data)
            CALLER.set(call.context.peer())
            yield request

    def _observed_unary(self, method: str, handler: grpc.RpcMethodHandler, parse: Parse) -> Any:
        count = self.reply_items.get(_name(method))
        behavior = handler.unary_unary

        async def unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(self, method, context)
            try:
                async with self._admitted(call, parse) as request:
                    reply = await behavior(request, context)
            except BaseException as error:
                await call.failed(error)
                raise
            call.succeeded(None if count is None else count(reply))
            return reply

        return unary

    def _observed_stream(self, method: str, handler: grpc.RpcMethodHandler, parse: Parse) -> Any:
        """A server-streaming method (SampleStream): admitted with its message, as a unary call is."""
        stream = _async_generator(method, handler.unary_stream)

        @contextlib.asynccontextmanager
        async def opened(requests: Any, call: _Call) -> AsyncIterator[AsyncIterator[Any]]:
            async with self._admitted(call, parse) as request:
                yield stream(request, call.context)

        return self._relayed(method, opened)

    def _observed_bidi(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """A stream of requests (ModelStreamInfer): refused while draining, its caller named, its end counted
        and logged as one call; gRPC reads its messages, and the handler admits each (a call slot and its bytes)
        and answers each failure in the stream."""
        stream = _async_generator(method, handler.stream_stream)

        @contextlib.asynccontextmanager
        async def opened(requests: Any, call: _Call) -> AsyncIterator[AsyncIterator[Any]]:
            self.admission.drain.check_accepting()
            call.accept()
            CALLER.set(call.context.peer())
            yield stream(requests, call.context)

        relayed = self._relayed(method, opened)
        return grpc.stream_stream_rpc_method_handler(relayed, handler.request_deserializer, handler.response_serializer)

    def _relayed(self, method: str, opened: Callable[[Any, _Call], Any]) -> Any:
        """The replies of the stream `opened(requests, call)` yields, counted, its failure turned into a status."""
        count = self.reply_items.get(_name(method))

        async def streaming(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(self, method, context)
            items = 0
            try:
                # aclosing: when gRPC closes this generator (the client left), the handler's closes at once
                async with opened(requests, call) as stream, contextlib.aclosing(stream) as replies:
                    async for reply in replies:
                        items += 0 if count is None else count(reply)
                        yield reply
            except BaseException as error:
                await call.failed(error)
                raise
            call.succeeded(items)

        return streaming

    def _guarded(self, behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], parse: Parse) -> Any:
        """A handler of another service (health's Check, and Watch, which writes with context.write): the
        receipt bound and the malformed-message guard only."""

        async def guarded(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                request = parse(await self._receive(context))
            except ServingError as error:  # malformed, never sent, or pushed out by newer calls
                await context.abort(*status_for(error))
            return await behavior(request, context)

        return guarded


def _async_generator(name: str, handler: Any) -> Any:
    """A streaming handler, which must be an async generator (so that closing the call closes it at once)."""
    if not inspect.isasyncgenfunction(handler):
        raise TypeError(f"{name}: streaming handlers must be async generators")
    return handler


def _safe(deserialize: Callable[[bytes], Any]) -> Parse:
    """The request parser, raising InvalidRequest naming the message type for bytes that do not parse."""
    message_type = getattr(getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None), "full_name", "request")
    malformed = f"the request is not a valid {message_type} message (malformed protobuf bytes)"

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # protobuf's DecodeError, whatever its implementation raises
            raise InvalidRequest(malformed) from None

    return parse


def _name(method: str) -> str:
    """A method's name without its service: "/vae.v1.VaeService/Decode" → "Decode"."""
    return method.rsplit("/", 1)[1]


class _Call:
    """One call of the service from admission to its metrics, log line and span."""

    __slots__ = ("accepted", "context", "interceptor", "method", "span", "started")

    def __init__(self, interceptor: RequestInterceptor, method: str, context: grpc.aio.ServicerContext) -> None:
        self.interceptor = interceptor
        self.method = _name(method)
        self.context = context
        self.started = time.perf_counter()
        self.accepted = False
        self.span: ServerSpan | None = None
        interceptor.metrics.inflight.inc()
        if interceptor.reads_metadata or interceptor.routes_by_request_id():
            traceparent, tracestate = self._read_metadata()
            if interceptor.tracing.enabled:
                service, name = method[1:].rsplit("/", 1)
                attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
                if (request_id := REQUEST_ID.get()) is not None:
                    attributes["vae.request_id"] = request_id
                self.span = interceptor.tracing.start_server_span(method[1:], traceparent, tracestate, attributes)

    def _read_metadata(self) -> tuple[str | None, str | None]:
        """Name the caller's x-request-id for this call's log lines (this call's task, and the tasks it starts);
        its traceparent and tracestate."""
        traceparent = tracestate = None
        for key, value in self.context.invocation_metadata() or ():
            if not isinstance(value, str):  # binary metadata
                continue
            if key == REQUEST_ID_HEADER:
                REQUEST_ID.set(request_id_of(value))
            elif key == "traceparent":
                traceparent = value
            elif key == "tracestate":
                tracestate = value
        return traceparent, tracestate

    def accept(self) -> None:
        """Count the call as accepted: a drain waits for it."""
        self.accepted = True
        self.interceptor.admission.drain.started()

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
            if not self.interceptor.reads_metadata:  # the error line names the caller's request id all the same
                self._read_metadata()
            log.error("request_failed", exc_info=error, extra={"fields": {"method": self.method}})
        self._finish(status.name, None, message)
        await self.context.abort(status, message)

    def _finish(self, code: str, items: int | None, error: str | None = None) -> None:
        interceptor = self.interceptor
        interceptor.metrics.inflight.dec()
        if self.accepted:
            interceptor.admission.drain.finished()
        version = _served_version(self.context)
        if self.method not in interceptor.counted_by_message or code not in ("OK", "CANCELLED"):
            # (a stream whose messages were counted and logged one by one is not one more request)
            duration = time.perf_counter() - self.started
            interceptor.record.finished(self.method, "grpc", code, version, duration, items)
        if self.span is not None:
            attributes: dict[str, Any] = {"rpc.grpc.status_code": getattr(grpc.StatusCode, code).value[0]}
            if items is not None:
                attributes["vae.rows"] = items
            if version:
                attributes["vae.model.version"] = int(version)
            self.span.end(code not in _SERVER_ERRORS, attributes, error or code)


def _served_version(context: grpc.aio.ServicerContext) -> str:
    """The version that took the call (the servicer's trailing metadata), or "" when none did."""
    for key, value in context.trailing_metadata() or ():
        if key == VERSION_METADATA:
            return str(value)
    return ""
