"""The REST port: an aiohttp application on a listener bounded as the gRPC port is.

- At most `max_connections` connections at once: one beyond it is answered 503 and closed at once.
- A connection has `handshake_timeout_s` to finish its TLS handshake and send a whole request head; then it
  is closed (so connections that send nothing, or a header a byte at a time, cannot hold descriptors).
- An idle keep-alive connection is closed after `idle_timeout_s`.
- A body larger than the API's `max_body_bytes` gets 413 (the Content-Length is checked before a byte is
  read); the body itself must arrive within the receive bound (`serving.http.rest`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from serving.http.rest import RestApi


@dataclass(frozen=True)
class HttpLimits:
    max_connections: int
    handshake_timeout_s: float
    idle_timeout_s: float


_BODY = b'{"error": "too many connections to the REST port: retry later or on another replica"}'
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    + f"Content-Length: {len(_BODY)}\r\n\r\n".encode()
    + _BODY
)


class _Refused(asyncio.Protocol):
    """A connection beyond the limit: told so, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_REFUSAL)
        transport.close()


async def _name_the_server(request: web.Request, response: web.StreamResponse) -> None:
    """`Server: vae-serving`, not the framework and its version."""
    response.headers["Server"] = "vae-serving"


@dataclass
class HttpListener:
    runner: web.AppRunner
    server: asyncio.base_events.Server
    port: int

    async def close(self) -> None:
        """Stop accepting, close the connections (the calls accepted were drained before), free the runner."""
        self.server.close()
        await self.runner.cleanup()


async def start_http(
    api: RestApi, host: str, port: int, limits: HttpLimits, tls: ssl.SSLContext | None
) -> HttpListener:
    """Serve `api`'s routes on host:port (0: any free port) within `limits`; OSError when the port is taken."""
    waiting: set[RequestHandler] = set()  # connections that have not sent a whole request head yet

    @web.middleware
    async def head_received(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        waiting.discard(request.protocol)
        return await handler(request)

    app = web.Application(client_max_size=api.max_body_bytes, middlewares=[head_received])
    app.on_response_prepare.append(_name_the_server)
    app.add_routes(api.routes())
    runner = web.AppRunner(app, handle_signals=False, access_log=None, keepalive_timeout=limits.idle_timeout_s)
    await runner.setup()
    server = runner.server
    assert server is not None
    loop = asyncio.get_running_loop()

    # Counted from the accept (the factory), not from aiohttp's connection_made, which comes a loop turn later:
    # a burst of connections accepted at once would all see room.
    opened: set[RequestHandler] = set()
    forget = server.connection_lost

    def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
        opened.discard(handler)
        forget(handler, exc)

    server.connection_lost = connection_lost  # type: ignore[method-assign]

    def close_if_silent(handler: RequestHandler) -> None:
        if handler in waiting:
            waiting.discard(handler)
            if handler.transport is None:  # its TLS handshake never finished: it will not be lost, forget it
                opened.discard(handler)
            else:
                handler.transport.close()

    def connection() -> asyncio.Protocol:
        if len(opened) >= limits.max_connections:
            return _Refused()
        handler = server()
        opened.add(handler)
        waiting.add(handler)
        loop.call_later(limits.handshake_timeout_s, close_if_silent, handler)
        return handler

    listening = await loop.create_server(
        connection, host, port, ssl=tls, ssl_handshake_timeout=limits.handshake_timeout_s if tls else None
    )
    bound = listening.sockets[0].getsockname()[1]
    return HttpListener(runner, listening, bound)
