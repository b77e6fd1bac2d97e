"""Prometheus metrics (DESIGN.md's names) on their own registry, served over HTTP on their own port.

Labels take bounded values only: method (the six RPCs), code (gRPC status names), graph (encoder, decoder),
and the served model's name, version and provider. The process and platform collectors of the client
library are registered too (CPU, memory, file descriptors, GC).
"""

from __future__ import annotations

from collections.abc import Sequence
from wsgiref.simple_server import WSGIServer

import prometheus_client as prom

METHODS = ("Encode", "Decode", "Sample", "Interpolate", "GetModelInfo", "SampleStream")
GRAPHS = ("encoder", "decoder")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)


class Metrics:
    """The server's metrics; also the batchers' observer (`queue_depth`, `batch_ran`)."""

    def __init__(self) -> None:
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
            "onnxruntime run time per batch, by graph",
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
        for method in METHODS:
            self.requests.labels(method, "OK")
            self.request_duration.labels(method)
            self.request_items.labels(method)
        for graph in GRAPHS:
            for family in (self.batch_rows, self.queue_wait, self.inference, self.queue_depth_rows):
                family.labels(graph)

    def set_model(self, name: str, version: int, provider: str) -> None:
        self.model_info.labels(name, str(version), provider).set(1)

    def request_finished(self, method: str, code: str, duration_seconds: float, items: int | None) -> None:
        self.requests.labels(method, code).inc()
        self.request_duration.labels(method).observe(duration_seconds)
        if items is not None:
            self.request_items.labels(method).observe(items)

    # BatchObserver
    def queue_depth(self, graph: str, rows: int) -> None:
        self.queue_depth_rows.labels(graph).set(rows)

    def batch_ran(self, graph: str, rows: int, queue_wait_seconds: Sequence[float], inference_seconds: float) -> None:
        self.batch_rows.labels(graph).observe(rows)
        self.inference.labels(graph).observe(inference_seconds)
        wait = self.queue_wait.labels(graph)
        for seconds in queue_wait_seconds:
            wait.observe(seconds)

    def serve(self, host: str, port: int) -> tuple[WSGIServer, int]:
        """Start the /metrics HTTP server in a thread; returns it and the port it listens on."""
        server, _thread = prom.start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_address[1]
