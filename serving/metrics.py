"""Prometheus metrics (DESIGN.md's names) on their own registry, served over HTTP on their own port.

Labels take bounded values only: method (the service's RPCs), code (gRPC status names), graph (encoder, decoder),
and the served model's name, version and provider. The process and platform collectors of the client
library are registered too (CPU, memory, file descriptors, GC).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client as prom
from prometheus_client.exposition import ThreadingWSGIServer

GRAPHS = ("encoder", "decoder")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)


class Metrics:
    """The server's metrics; also the batchers' observer (`queue_depth`, `batch_ran`)."""

    def __init__(self, methods: Sequence[str]) -> None:
        """`methods`: the RPCs whose series exist from the start (zeros, not gaps, before the first request)."""
        self.registry = prom.CollectorRegistry()
        r = self.registry
        prom.ProcessCollector(registry=r)
        prom.PlatformCollector(registry=r)
        prom.GCCollector(registry=r)
        self.requests = prom.Counter(
            "vae_requests", "RPCs finished, by method and gRPC status code", ["method", "code"], registry=r
        )
        self.request_duration = prom.Histogram(
            "vae_request_duration_seconds",
            "RPC latency on the server, by method",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_items = prom.Histogram(
            "vae_request_items",
            "images or latents per successful request, by method",
            ["method"],
            buckets=_ROW_BUCKETS,
            registry=r,
        )
        self.batch_rows = prom.Histogram(
            "vae_batch_rows", "rows per onnxruntime run, by graph", ["graph"], buckets=_ROW_BUCKETS, registry=r
        )
        self.queue_wait = prom.Histogram(
            "vae_queue_wait_seconds",
            "time a request waited for its batch to start, by graph",
            ["graph"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = prom.Histogram(
            "vae_inference_seconds",
            "onnxruntime run time per batch (the run alone, not the hand-off to its thread), by graph",
            ["graph"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth_rows = prom.Gauge("vae_queue_depth", "rows waiting to run, by graph", ["graph"], registry=r)
        self.inflight = prom.Gauge("vae_inflight_requests", "RPCs being handled", registry=r)
        self.model_info = prom.Gauge(
            "vae_model_info", "the served model (value 1)", ["name", "version", "provider"], registry=r
        )
        # Create every labelled series up front so dashboards see zeros, not gaps, before the first request.
        for method in methods:
            self.requests.labels(method, "OK")
            self.request_duration.labels(method)
            self.request_items.labels(method)
        for graph in GRAPHS:
            for family in (self.batch_rows, self.queue_wait, self.inference, self.queue_depth_rows):
                family.labels(graph)
        # The labelled children, looked up once: `labels()` costs microseconds, on every request and batch.
        self._requests_by_code: dict[tuple[str, str], Any] = {}
        self._durations = {method: self.request_duration.labels(method) for method in methods}
        self._items = {method: self.request_items.labels(method) for method in methods}
        self._depths = {graph: self.queue_depth_rows.labels(graph) for graph in GRAPHS}
        self._batches = {
            graph: (self.batch_rows.labels(graph), self.inference.labels(graph), self.queue_wait.labels(graph))
            for graph in GRAPHS
        }

    def set_model(self, name: str, version: int, provider: str) -> None:
        self.model_info.labels(name, str(version), provider).set(1)

    def request_finished(self, method: str, code: str, duration_seconds: float, items: int | None) -> None:
        counter = self._requests_by_code.get((method, code))
        if counter is None:
            counter = self._requests_by_code[(method, code)] = self.requests.labels(method, code)
        counter.inc()
        self._durations[method].observe(duration_seconds)
        if items is not None:
            self._items[method].observe(items)

    # BatchObserver
    def queue_depth(self, graph: str, rows: int) -> None:
        self._depths[graph].set(rows)

    def batch_ran(self, graph: str, rows: int, queue_wait_seconds: Sequence[float], inference_seconds: float) -> None:
        batch_rows, inference, queue_wait = self._batches[graph]
        batch_rows.observe(rows)
        inference.observe(inference_seconds)
        for seconds in queue_wait_seconds:
            queue_wait.observe(seconds)

    def serve(self, host: str, port: int) -> tuple[WSGIServer, int]:
        """Start the /metrics HTTP server in a thread; returns it and the port it listens on.

        Only GET /metrics is served; every other path is 404 (prometheus_client's own server answers any
        path with the metrics, which would make the port look larger than it is).
        """
        server = make_server(host, port, metrics_only_app(self.registry), ThreadingWSGIServer, _QuietHandler)
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        return server, server.server_address[1]


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


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape on stderr (the server's log is JSON lines)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass
