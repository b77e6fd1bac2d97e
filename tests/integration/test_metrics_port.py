"""The metrics port (`serving.server.metrics_port`): connections are bounded in number and time, a connection
takes a thread only once its request is in, and a scrape gets through clients that send nothing, or their
request a byte at a time. Against `serve_metrics_port` itself, on 127.0.0.1, without a model."""

from __future__ import annotations

import contextlib
import socket
import threading
import urllib.request
from collections.abc import Iterator

import pytest

from serving.api import SERVICE_METHODS
from serving.metrics import Metrics
from serving.server.metrics_port import MAX_REQUEST_HEAD_BYTES, MetricsHTTPServer, serve_metrics_port

TIMEOUT_SECONDS = 2.0


@pytest.fixture
def metrics_port() -> Iterator[tuple[MetricsHTTPServer, int]]:
    registry = Metrics(SERVICE_METHODS).registry
    server, port = serve_metrics_port(registry, "127.0.0.1", 0, max_connections=2, timeout_seconds=TIMEOUT_SECONDS)
    assert isinstance(server, MetricsHTTPServer)
    yield server, port
    server.shutdown()
    server.server_close()


def scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return bytes(response.read())


def closed_by_the_server(connection: socket.socket) -> bool:
    """Whether the server closes `connection` (end of file or a reset) within the timeout and a margin."""
    connection.settimeout(TIMEOUT_SECONDS + 10)
    with contextlib.suppress(ConnectionResetError):
        while data := connection.recv(65536):
            if data.startswith(b"HTTP/"):  # an answer: not what a partial or oversized request gets
                return False
    return True


def test_clients_that_never_finish_their_request_hold_no_thread(metrics_port: tuple[MetricsHTTPServer, int]) -> None:
    _, port = metrics_port
    assert b"vae_requests_total" in scrape(port)
    threads = threading.active_count()
    slow = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
    try:
        for connection in slow:  # a slowloris request: the head never ends
            connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\n")
        assert b"vae_requests_total" in scrape(port)  # the longest waiting gives way to the scrape
        # No thread per client: 20 clients would add 20. A thread or two of this process's other servers (the
        # default executor's, started on demand) may come and go meanwhile.
        assert threading.active_count() - threads < 5
        assert all(closed_by_the_server(connection) for connection in slow)
    finally:
        for connection in slow:
            connection.close()
    assert b"vae_requests_total" in scrape(port)


def test_a_request_head_beyond_its_limit_is_closed_unanswered(metrics_port: tuple[MetricsHTTPServer, int]) -> None:
    _, port = metrics_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        with contextlib.suppress(ConnectionError):  # the server may close while this is still sending
            connection.sendall(b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"x" * MAX_REQUEST_HEAD_BYTES)
        assert closed_by_the_server(connection)
    assert b"vae_requests_total" in scrape(port)
