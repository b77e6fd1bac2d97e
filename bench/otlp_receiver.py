"""An OTLP/gRPC trace receiver on a loopback port: where the tracing bench and the tests send the server's spans.

It is the OTLP trace service (`opentelemetry.proto.collector.trace.v1.TraceService/Export`) as
`opentelemetry-proto` defines it, what a collector's OTLP receiver answers, keeping each span it receives as
a `ReceivedSpan` (ids in hex, attributes as plain values). Point a server at it with
`OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:<port>` (`endpoint`). While `paused`, exports are not
answered (a collector that cannot keep up) until `resume`.

    with OtlpReceiver() as receiver:
        ...  # a server exporting to receiver.endpoint
        receiver.wait_for(lambda spans: any(s.name == "vae.batch decoder" for s in spans))
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the receiver got it."""

    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root
    name: str
    kind: str  # "SPAN_KIND_SERVER", "SPAN_KIND_INTERNAL", ...
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: list[tuple[str, str]]  # (trace_id, span_id) of each linked span
    status: str  # "STATUS_CODE_UNSET", "STATUS_CODE_ERROR", ...
    resource: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return None if kind is None else getattr(value, kind)


def _attributes(pairs: Sequence[common_pb2.KeyValue]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def draw(spans: Sequence[ReceivedSpan], trace_id: str) -> str:
    """One trace as text: its spans as a tree (start offset and duration in ms, the attributes that say what
    happened), then each span of another trace that links into it (the batches that carried its rows)."""
    mine = sorted((span for span in spans if span.trace_id == trace_id), key=lambda span: span.start_ns)
    if not mine:
        return f"trace {trace_id}: no spans"
    origin = mine[0].start_ns
    children: dict[str, list[ReceivedSpan]] = {}
    for span in mine:
        children.setdefault(span.parent_span_id, []).append(span)
    ids = {span.span_id for span in mine}

    def line(span: ReceivedSpan, depth: int) -> str:
        shown = {key: value for key, value in span.attributes.items() if key.startswith(("vae.", "rpc.grpc", "http.r"))}
        details = " ".join(f"{key}={value}" for key, value in shown.items())
        start = (span.start_ns - origin) / 1e6
        return f"{'  ' * depth}{span.name}  +{start:.3f} ms  {span.duration_ms:.3f} ms  {details}".rstrip()

    lines = [f"trace {trace_id}"]

    def walk(parent: str, depth: int) -> None:
        for span in children.get(parent, []):
            lines.append(line(span, depth))
            walk(span.span_id, depth + 1)

    for root in (span for span in mine if span.parent_span_id not in ids):  # its root, under the caller's span
        lines.append(line(root, 1))
        walk(root.span_id, 2)
    for batch in sorted((span for span in spans if span.trace_id != trace_id), key=lambda span: span.start_ns):
        into = [linked for linked_trace, linked in batch.links if linked_trace == trace_id]
        if into:
            names = ", ".join(span.name for span in mine if span.span_id in into)
            lines.append(f"linked from trace {batch.trace_id} (to {names}; {len(batch.links)} links in all):")
            lines.append(line(batch, 1))
    return "\n".join(lines)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.receiver.answering.wait()
        spans = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        ReceivedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            name=span.name,
                            kind=trace_pb2.Span.SpanKind.Name(span.kind),
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            attributes=_attributes(span.attributes),
                            links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                            status=trace_pb2.Status.StatusCode.Name(span.status.code),
                            resource=resource,
                        )
                    )
        self.receiver.add(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """The receiver, listening on 127.0.0.1 (a free port) from `start` (or `with`) to `stop`."""

    def __init__(self) -> None:
        self.answering = threading.Event()  # cleared: exports wait (`pause`)
        self.answering.set()
        self.exports = 0
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self.resume()
        self._server.stop(grace=None)

    def pause(self) -> None:
        """Hold every export from now until `resume` (the exporter's calls wait, as on a stalled collector)."""
        self.answering.clear()

    def resume(self) -> None:
        self.answering.set()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def add(self, spans: list[ReceivedSpan]) -> None:
        with self._changed:
            self._spans.extend(spans)
            self.exports += 1
            self._changed.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._changed:
            return list(self._spans)

    def clear(self) -> None:
        with self._changed:
            self._spans.clear()

    def wait_for(self, condition: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 20.0) -> list[ReceivedSpan]:
        """The spans received once `condition(spans)` holds; AssertionError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not condition(list(self._spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({span.name for span in self._spans})
                    raise AssertionError(f"spans received ({len(self._spans)}: {names}) never met the condition")
                self._changed.wait(left)
            return list(self._spans)

    def env(self, **overrides: str) -> dict[str, str]:
        """The OTEL_* variables that point a server here, exporting quickly (50 ms batches), every span sampled."""
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            **overrides,
        }
