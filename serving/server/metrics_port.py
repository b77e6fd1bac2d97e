"""The metrics port: an HTTP server that answers `GET /metrics` from the registry, and nothing else.

At most `--max-metrics-connections` connections at once, each with METRICS_TIMEOUT_SECONDS to send its
request and take its reply, and no thread for a connection that has not sent its whole request: idle or slow
clients hold no thread, and a scraper still gets through (`MetricsHTTPServer`).
"""

from __future__ import annotations

import io
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import prometheus_client as prom

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD_BYTES = 16 * 1024  # a scrape's request line and headers are a few hundred bytes
METRICS_TIMEOUT_SECONDS = 5.0  # to send the whole request after connecting, and again to take the reply
DEFAULT_MAX_METRICS_CONNECTIONS = 16  # --max-metrics-connections: a scraper or two need one each
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def metrics_only_app(registry: prom.CollectorRegistry) -> WsgiApp:
    """A WSGI app: prometheus_client's exposition at /metrics, 404 everywhere else."""
    metrics_app = prom.make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/metrics":
            return metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: this port serves /metrics only\n"]

    return app


@dataclass
class _Waiting:
    """A connection whose request has not all arrived yet."""

    deadline: float  # time.monotonic() by which its request must be in
    address: Any
    received: bytearray = field(default_factory=bytearray)


class MetricsHTTPServer(WSGIServer):
    """The metrics port's HTTP server: at most `max_connections` connections at once, none held for long.

    One thread (`serve_forever`) accepts connections and gathers their request bytes with a selector: a
    connection takes no thread until its request head has all arrived, and one that has not sent it within
    `timeout_seconds` is closed (a silent or slow client holds nothing for long). A complete request is
    answered by one of `max_connections` threads, whose socket times out after `timeout_seconds` too (a
    client that does not read its reply). When `max_connections` connections are open, a new one closes the
    one that has waited longest for its request, so idle connections give way to a scraper, which sends its
    request at once; when all of them are being answered, the new one is closed at once.
    """

    request_queue_size = 64  # the listen backlog: connections the kernel holds until they are accepted

    def __init__(self, address: tuple[str, int], max_connections: int, timeout_seconds: float) -> None:
        super().__init__(address, _MetricsRequestHandler)
        self.max_connections = max_connections
        self.timeout_seconds = timeout_seconds
        self._waiting: dict[socket.socket, _Waiting] = {}  # oldest first; only the serving thread touches it
        self._answering = 0  # connections handed to the pool, not yet closed
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_connections, thread_name_prefix="metrics-http-answer")
        self._stop = threading.Event()
        self._stopped = threading.Event()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept, gather requests and hand them to the pool until `shutdown`; `poll_interval`: how often the
        loop looks for `shutdown` when nothing happens."""
        self.socket.setblocking(False)
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            try:
                while not self._stop.is_set():
                    wait = poll_interval
                    if self._waiting:
                        wait = min(wait, next(iter(self._waiting.values())).deadline - time.monotonic())
                    for key, _ in selector.select(max(0.0, wait)):
                        if key.fileobj is self.socket:
                            for _ in range(self.request_queue_size):  # the whole backlog, as far as it goes
                                if not self._accept(selector):
                                    break
                        else:
                            self._receive(selector, cast(socket.socket, key.fileobj))
                    self._close_expired(selector)
            finally:
                for connection in list(self._waiting):
                    self._drop(selector, connection)
                self._stopped.set()

    def shutdown(self) -> None:
        """Stop `serve_forever` and wait until it has (as socketserver's own `shutdown`)."""
        self._stop.set()
        self._stopped.wait()

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A failure while answering, as one JSON log line (socketserver would print a traceback on stderr)."""
        log.exception("metrics_request_failed")

    def _accept(self, selector: selectors.BaseSelector) -> bool:
        """Accept one connection (False when none is queued)."""
        try:
            connection, address = self.socket.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:  # out of descriptors: the kernel keeps the connection queued; look again shortly
            time.sleep(0.05)
            return False
        with self._lock:
            answering = self._answering
        if len(self._waiting) + answering >= self.max_connections:
            if not self._waiting:  # every connection is being answered: no room
                self.shutdown_request(connection)
                return True
            self._drop(selector, next(iter(self._waiting)))  # the longest waiting gives way
        connection.setblocking(False)
        self._waiting[connection] = _Waiting(time.monotonic() + self.timeout_seconds, address)
        selector.register(connection, selectors.EVENT_READ)
        return True

    def _receive(self, selector: selectors.BaseSelector, connection: socket.socket) -> None:
        waiting = self._waiting.get(connection)
        if waiting is None:  # closed by an earlier event of the same look (it gave way to a new connection)
            return
        try:
            data = connection.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data or len(waiting.received) + len(data) > MAX_REQUEST_HEAD_BYTES:  # gone, or not a scrape
            self._drop(selector, connection)
            return
        waiting.received += data
        if b"\r\n\r\n" in waiting.received or b"\n\n" in waiting.received:  # the request head is complete
            selector.unregister(connection)
            del self._waiting[connection]
            with self._lock:
                self._answering += 1
            self._pool.submit(self._answer, connection, waiting)

    def _answer(self, connection: socket.socket, waiting: _Waiting) -> None:
        """Answer one received request (in a pool thread)."""
        try:
            connection.settimeout(self.timeout_seconds)
            self.RequestHandlerClass((connection, bytes(waiting.received)), waiting.address, self)  # type: ignore[arg-type]
        except OSError:  # the client left, or did not read its reply in time: nothing more to do
            pass
        except Exception:
            self.handle_error(connection, waiting.address)
        finally:
            self.shutdown_request(connection)
            with self._lock:
                self._answering -= 1

    def _close_expired(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        expired = [connection for connection, waiting in self._waiting.items() if waiting.deadline <= now]
        for connection in expired:
            self._drop(selector, connection)

    def _drop(self, selector: selectors.BaseSelector, connection: socket.socket) -> None:
        selector.unregister(connection)
        del self._waiting[connection]
        self.shutdown_request(connection)


class _MetricsRequestHandler(WSGIRequestHandler):
    """One request whose head `MetricsHTTPServer` has received: read from those bytes, answered on the socket.
    No access log line per scrape on stderr (the server's log is JSON lines)."""

    def setup(self) -> None:
        connection, head = cast(tuple[socket.socket, bytes], self.request)
        self.connection = connection
        self.rfile = io.BytesIO(head)
        self.wfile = connection.makefile("wb")  # flushed by `finish`

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_metrics_port(
    registry: prom.CollectorRegistry,
    host: str,
    port: int,
    max_connections: int = DEFAULT_MAX_METRICS_CONNECTIONS,
    timeout_seconds: float = METRICS_TIMEOUT_SECONDS,
) -> tuple[WSGIServer, int]:
    """Start the /metrics HTTP server in a thread; returns it and the port it listens on.

    Only GET /metrics is served; every other path is 404 (prometheus_client's own server answers any
    path with the metrics, which would make the port look larger than it is).
    """
    server = MetricsHTTPServer((host, port), max_connections, timeout_seconds)
    server.set_app(metrics_only_app(registry))
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server, server.server_address[1]
