"""Request bytes that are not a valid protobuf message get INVALID_ARGUMENT, like any other bad request.

By itself gRPC Python answers such bytes with UNKNOWN and "Unexpected <class DecodeError>: ...", a code
outside the documented set and a message naming server internals. `add_servicer` registers a generated
servicer with every unary-request handler wrapped: its parser returns a marker instead of raising, and the
handler refuses the marker with INVALID_ARGUMENT. Handlers are wrapped once, at start-up.

    add_servicer(pb_grpc.add_VaeServiceServicer_to_server, servicer, server, on_malformed)
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import grpc

OnMalformed = Callable[[str], None]  # called with the method's name, e.g. "Encode"


class _Malformed:
    """What the wrapped parser returns for bytes that do not parse."""


_MALFORMED = _Malformed()


def add_servicer(
    add_to_server: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server, on_malformed: OnMalformed
) -> None:
    """`add_to_server(servicer, server)` (a generated `add_*Servicer_to_server`), with malformed requests refused."""
    registration = _Registration(server, on_malformed)
    add_to_server(servicer, registration)
    if not registration.registered:  # generated code from another grpcio-tools would register nothing here
        raise RuntimeError(f"{add_to_server.__name__} did not call add_registered_method_handlers")


class _Registration:
    """Stands in for the server while generated code registers its handlers, and wraps them."""

    def __init__(self, server: grpc.aio.Server, on_malformed: OnMalformed) -> None:
        self.server = server
        self.on_malformed = on_malformed
        self.registered = False

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # built from the unwrapped handlers; add_registered_method_handlers registers both kinds

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        wrapped = {name: self._wrap(name, handler) for name, handler in handlers.items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        self.server.add_registered_method_handlers(service, wrapped)
        self.registered = True

    def _wrap(self, name: str, handler: Any) -> Any:
        if handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
        message_type = getattr(descriptor, "full_name", name + " request")
        on_malformed = self.on_malformed

        def safe_parse(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception:  # protobuf's DecodeError, whatever its implementation raises
                return _MALFORMED

        async def refuse(context: grpc.aio.ServicerContext) -> None:
            on_malformed(name)
            detail = f"the request is not a valid {message_type} message (malformed protobuf bytes)"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, detail)

        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if request is _MALFORMED:
                    await refuse(context)
                return await unary(request, context)

            return handler._replace(request_deserializer=safe_parse, unary_unary=unary_unary)

        stream = handler.unary_stream
        if inspect.isasyncgenfunction(stream):

            async def stream_replies(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if request is _MALFORMED:
                    await refuse(context)
                # aclosing: when gRPC closes this generator (the client left), the servicer's closes at once
                async with contextlib.aclosing(stream(request, context)) as replies:
                    async for reply in replies:
                        yield reply

            return handler._replace(request_deserializer=safe_parse, unary_stream=stream_replies)

        async def stream_writes(request: Any, context: grpc.aio.ServicerContext) -> Any:  # uses context.write
            if request is _MALFORMED:
                await refuse(context)
            return await stream(request, context)

        return handler._replace(request_deserializer=safe_parse, unary_stream=stream_writes)
