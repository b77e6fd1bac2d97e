"""OpenTelemetry tracing of requests, the batches they share and version swaps: off unless `OTEL_*` says otherwise.

Configured only through the standard variables, read once at start-up (`Tracing.from_environment`):
- tracing is on when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`: OTLP over gRPC, the SDK's exporter
  reading `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`, `_HEADERS`, `_CERTIFICATE`, `_INSECURE`, `_TIMEOUT`,
  `_COMPRESSION`; `console`: JSON on stdout, for a look by hand), or when it is unset and an OTLP endpoint
  is; never otherwise (no implicit exporter), nor when `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`;
- `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` choose which requests are sampled (default
  `parentbased_always_on`: a caller's decision in `traceparent` stands);
- `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` name the service (default `vae-serving`);
- `OTEL_BSP_*` size the batch span processor: spans are exported from its thread, through a bounded queue;
  when the queue is full a span is dropped and counted (`dropped_spans`, `vae_trace_spans_dropped_total`),
  and no request waits.
A configuration that cannot work (an exporter or sampler this server does not have, a ratio that is not one)
is one `tracing_disabled` log line saying why, and the server serves untraced.

What is traced: which requests, `RequestSampler` decides from the caller's `traceparent` before any span
exists, so an unsampled request costs a header lookup and gets no span. A sampled one gets a SERVER span
(`start_server_span`, the parent from W3C `traceparent` and `tracestate`); under it the time its rows queued for
a batch (`vae.queue_wait`) and the engine's steps of composite calls (`step`). Each onnxruntime run that carried
a sampled request's rows is a span linked to each of them (`BatchSpans`: a batch is shared, so it is the child of
none). Version loads and retirements are spans too (`lifecycle`, always recorded). When tracing is off every
entry point costs an attribute read. A request's `x-request-id` (`REQUEST_ID`), and its span's ids when it has
one, go into the log lines of the request (`log_fields`) whether or not tracing is on.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import random
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision, ParentBased, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

SERVICE_NAME = "vae-serving"  # the resource's service.name unless OTEL_SERVICE_NAME or the attributes say
REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_CHARS = 128  # a longer id is cut: it is the caller's label for log lines, not a payload
# The caller's x-request-id, for the log lines and span of its request (set by the transports per call).
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
Span = trace.Span  # what `lifecycle` and `start_lifecycle` give (the rest of the server names no OpenTelemetry type)
_ALWAYS_RECORDED = "vae.lifecycle"  # the attribute of spans recorded whatever the sampler says
_PROPAGATOR = TraceContextTextMapPropagator()


class TracingConfigError(ValueError):
    """An `OTEL_*` setting this server cannot act on; the message says which and what it takes."""


def request_id_of(value: str | None) -> str | None:
    """A caller's x-request-id as the logs carry it: printable ASCII, at most MAX_REQUEST_ID_CHARS; None if empty."""
    if not value:
        return None
    cleaned = "".join(char for char in value[:MAX_REQUEST_ID_CHARS] if " " <= char <= "~")
    return cleaned or None


def log_fields() -> dict[str, str]:
    """The fields a log line written in a request's context adds: its request id, trace id and span id."""
    fields: dict[str, str] = {}
    request_id = REQUEST_ID.get()
    if request_id is not None:
        fields["request_id"] = request_id
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        fields["trace_id"] = trace.format_trace_id(span_context.trace_id)
        fields["span_id"] = trace.format_span_id(span_context.span_id)
    return fields


def exemplar(span_context: SpanContext | None) -> dict[str, str] | None:
    """A metric observation's exemplar labels for a sampled span (None for anything else)."""
    if span_context is None or not span_context.trace_flags.sampled:
        return None
    return {
        "trace_id": trace.format_trace_id(span_context.trace_id),
        "span_id": trace.format_span_id(span_context.span_id),
    }


def current_exemplar() -> dict[str, str] | None:
    """The exemplar of the current span (the request's), when it is sampled."""
    return exemplar(trace.get_current_span().get_span_context())


_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_LOW_64 = (1 << 64) - 1


def parse_traceparent(value: str | None) -> tuple[int, bool] | None:
    """A W3C traceparent's trace id and sampled flag; None when absent or invalid (then the request starts a
    trace of its own, as the W3C spec says)."""
    match = _TRACEPARENT.match(value.strip().lower()) if value else None
    if match is None or match[1] == "ff" or int(match[2], 16) == 0 or int(match[3], 16) == 0:
        return None
    return int(match[2], 16), bool(int(match[4], 16) & 1)


@dataclass(frozen=True)
class RequestSampler:
    """Which requests are traced (OTEL_TRACES_SAMPLER's rule), decided from the caller's traceparent before any
    span exists: an unsampled request gets no span at all, so it costs a header lookup, not the SDK's span."""

    name: str
    parent_based: bool  # a caller's decision stands
    ratio: float  # the share of the others traced: 1 (always_on), 0 (always_off), or traceidratio's argument

    def sampled(self, traceparent: str | None) -> bool:
        parent = parse_traceparent(traceparent)
        if parent is not None and self.parent_based:
            return parent[1]
        if self.ratio >= 1.0 or self.ratio <= 0.0:
            return self.ratio >= 1.0
        trace_id = parent[0] if parent is not None else random.getrandbits(64)  # a new trace: any id will do
        return (trace_id & _LOW_64) < round(self.ratio * (1 << 64))  # the SDK's TraceIdRatioBased rule

    @property
    def description(self) -> str:
        return f"{self.name}({self.ratio:g})" if "ratio" in self.name else self.name


class _Sampler(Sampler):
    """What the SDK records: a request's SERVER span (made only for a request `RequestSampler` chose), the
    children of recorded spans, a batch linked to a recorded request, and version swaps (roots of their own)."""

    _children = ParentBased(ALWAYS_OFF)

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        if kind is SpanKind.SERVER or (attributes and attributes.get(_ALWAYS_RECORDED)):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        if links and any(link.context.trace_flags.sampled for link in links):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self._children.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return "VaeSampler"


def sampler_from(environ: Mapping[str, str]) -> RequestSampler:
    """OTEL_TRACES_SAMPLER (and its _ARG) as the request sampler; TracingConfigError for one this server lacks."""
    name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    fixed = {"always_on": 1.0, "always_off": 0.0, "parentbased_always_on": 1.0, "parentbased_always_off": 0.0}
    if name in fixed:
        return RequestSampler(name, name.startswith("parentbased_"), fixed[name])
    if name in ("traceidratio", "parentbased_traceidratio"):
        argument = environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
        try:
            ratio = float(argument)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise TracingConfigError(f"OTEL_TRACES_SAMPLER_ARG={argument!r}: {name} takes a ratio from 0 to 1")
        return RequestSampler(name, name.startswith("parentbased_"), ratio)
    accepted = ", ".join([*fixed, "traceidratio", "parentbased_traceidratio"])
    raise TracingConfigError(f"OTEL_TRACES_SAMPLER={name!r} is not a sampler this server has: use one of {accepted}")


def exporters_from(environ: Mapping[str, str]) -> list[SpanExporter]:
    """The span exporters OTEL_TRACES_EXPORTER names (empty: tracing off); TracingConfigError for a bad one."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = environ.get("OTEL_TRACES_EXPORTER")
    if names is None:  # unset: on only where an OTLP endpoint is configured
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        names = "otlp" if endpoint else "none"
    exporters: list[SpanExporter] = []
    for name in (part.strip().lower() for part in names.split(",")):
        if name in ("none", ""):
            continue
        if name == "console":
            exporters.append(ConsoleSpanExporter(service_name=SERVICE_NAME))
        elif name == "otlp":
            protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            if protocol not in (None, "", "grpc"):
                raise TracingConfigError(f"OTLP protocol {protocol!r}: this server exports OTLP over grpc only")
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())  # endpoint, headers, TLS, timeout: from OTEL_EXPORTER_OTLP_*
        else:
            raise TracingConfigError(f"OTEL_TRACES_EXPORTER={name!r} is not an exporter this server has: use otlp, "
                                     "console or none")  # fmt: skip
    return exporters


def resource_from(version: str) -> Resource:
    """The resource OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME describe, named `vae-serving` where they do not
    name the service, with this server's version where they do not give one."""
    detected = Resource.create()
    defaults: dict[str, str] = {}
    if str(detected.attributes.get("service.name", "unknown_service")).startswith("unknown_service"):  # :python
        defaults["service.name"] = SERVICE_NAME
    if "service.version" not in detected.attributes:
        defaults["service.version"] = version
    return detected.merge(Resource(defaults))


class _CountingProcessor(SpanProcessor):
    """The SDK's BatchSpanProcessor, but a span that finds its queue full is dropped here, and counted."""

    def __init__(self, exporter: SpanExporter) -> None:
        self.batch = BatchSpanProcessor(exporter)
        processor = self.batch._batch_processor  # the SDK counts drops only in its own metrics: read its queue
        self._queue, self._capacity = processor._queue, processor._max_queue_size
        self.dropped = 0

    def on_start(self, span: SdkSpan, parent_context: otel_context.Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if len(self._queue) >= self._capacity:  # full: this span goes, counted (the SDK would drop its oldest,
            self.dropped += 1  # uncounted); its worker only takes from the queue, so it cannot fill meanwhile
            return
        self.batch.on_end(span)

    def shutdown(self) -> None:
        self.batch.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.batch.force_flush(timeout_millis)


@dataclass(frozen=True)
class Traced:
    """A request's rows in a batcher's queue: the request's span context, and when they were queued."""

    context: SpanContext
    queued_ns: int


class BatchSpans:
    """The spans of one graph's batcher for one version: each run, linked to the requests it carried."""

    def __init__(self, tracer: trace.Tracer, graph: str, version: int) -> None:
        self._tracer = tracer
        self._name = f"vae.batch {graph}"
        self._attributes: dict[str, Any] = {"vae.graph": graph, "vae.model.version": version}

    @staticmethod
    def capture() -> Traced | None:
        """The current request's span and the time, when it is sampled (at enqueue)."""
        span_context = trace.get_current_span().get_span_context()
        return Traced(span_context, time.time_ns()) if span_context.trace_flags.sampled else None

    def ran(self, traced: Sequence[Traced | None], rows: int, started_ns: int, ended_ns: int) -> None:
        """One run of `rows` rows from `started_ns` to `ended_ns`: when it carried sampled requests' rows, its span,
        linked to each of them, and under each the time its rows queued."""
        requests = [item for item in traced if item is not None]
        if not requests:
            return
        for item in requests:
            parent = trace.set_span_in_context(trace.NonRecordingSpan(item.context))
            wait = self._tracer.start_span("vae.queue_wait", parent, start_time=item.queued_ns,
                                           attributes=self._attributes)  # fmt: skip
            wait.end(end_time=max(started_ns, item.queued_ns))
        attributes: dict[str, Any] = {**self._attributes, "vae.rows": rows, "vae.requests": len(traced)}
        links = [Link(item.context) for item in requests]
        span = self._tracer.start_span(
            self._name, otel_context.Context(), attributes=attributes, links=links, start_time=started_ns
        )
        span.end(end_time=ended_ns)


class ServerSpan:
    """A request's SERVER span, current from its start to `end` (in the same task)."""

    __slots__ = ("_token", "span")

    def __init__(self, span: trace.Span, token: object) -> None:
        self.span = span
        self._token = token

    def end(self, ok: bool, attributes: Mapping[str, Any], error: str | None = None) -> None:
        """End it with the request's outcome (`ok`, or an error status with `error`) and its attributes."""
        span = self.span
        if span.is_recording():
            span.set_attributes(attributes)
            if not ok:
                span.set_status(Status(StatusCode.ERROR, error))
        otel_context.detach(self._token)  # type: ignore[arg-type]
        span.end()


class Tracing:
    """The server's tracer (`OFF`, or built by `from_environment`), and the spans the server makes with it."""

    def __init__(
        self,
        provider: TracerProvider | None = None,
        processors: Sequence[_CountingProcessor] = (),
        requests: RequestSampler | None = None,
    ) -> None:
        self.requests = requests or RequestSampler("always_off", False, 0.0)
        self._provider = provider
        self._processors = list(processors)
        self.enabled = provider is not None
        self._tracer = provider.get_tracer("vae-serving") if provider is not None else trace.NoOpTracer()

    @classmethod
    def from_environment(cls, version: str) -> Tracing:
        """Tracing as the `OTEL_*` variables (the module docstring) configure it; OFF (and one log line) when they
        cannot. `version`: the server's, for the resource."""
        environ = os.environ
        try:
            exporters = exporters_from(environ)
            if not exporters:
                return OFF
            requests = sampler_from(environ)
            resource = resource_from(version)
        except Exception as error:  # the SDK's own checks too: a bad header or certificate path
            log.error("tracing_disabled", extra={"fields": {"error": str(error)}})
            return OFF
        processors = [_CountingProcessor(exporter) for exporter in exporters]
        provider = TracerProvider(sampler=_Sampler(), resource=resource)
        for processor in processors:
            provider.add_span_processor(processor)
        fields = {
            "exporters": ",".join(type(exporter).__name__ for exporter in exporters),
            "sampler": requests.description,
            "service": resource.attributes.get("service.name"),
        }
        log.info("tracing_enabled", extra={"fields": fields})
        return cls(provider, processors, requests)

    @property
    def dropped_spans(self) -> int:
        """Spans dropped because an export queue was full, since start-up."""
        return sum(processor.dropped for processor in self._processors)

    def shutdown(self) -> None:
        """Export what is queued (within the exporters' timeouts) and stop."""
        if self._provider is not None:
            self._provider.shutdown()

    def start_server_span(
        self, name: str, traceparent: str | None, tracestate: str | None, attributes: Mapping[str, Any]
    ) -> ServerSpan | None:
        """A SERVER span for one request, current until `ServerSpan.end`, continuing the caller's trace from its
        `traceparent` and `tracestate`; None (and nothing made) when the request is not sampled."""
        if not self.requests.sampled(traceparent):
            return None
        if traceparent:
            headers = {"traceparent": traceparent} if tracestate is None else {"traceparent": traceparent,
                                                                               "tracestate": tracestate}  # fmt: skip
            parent = _PROPAGATOR.extract(headers)
        else:
            parent = otel_context.Context()
        span = self._tracer.start_span(name, parent, SpanKind.SERVER, attributes)
        return ServerSpan(span, otel_context.attach(trace.set_span_in_context(span, parent)))

    @contextlib.contextmanager
    def step(self, name: str, **attributes: Any) -> Iterator[None]:
        """A child of the current span while the block runs, when that span is recorded (else nothing)."""
        if not self.enabled or not trace.get_current_span().is_recording():
            yield
            return
        with self._tracer.start_as_current_span(name, attributes=attributes):
            yield

    @contextlib.contextmanager
    def lifecycle(self, name: str, version: int, **attributes: Any) -> Iterator[trace.Span]:
        """A root span of a version's lifecycle (load, retire), always recorded, current while the block runs."""
        every = {_ALWAYS_RECORDED: True, "vae.model.version": version, **attributes}
        with self._tracer.start_as_current_span(name, otel_context.Context(), attributes=every) as span:
            yield span

    def start_lifecycle(self, name: str, version: int, **attributes: Any) -> trace.Span:
        """`lifecycle`'s span, not current, for an event that ends elsewhere (`span.end()`)."""
        every = {_ALWAYS_RECORDED: True, "vae.model.version": version, **attributes}
        return self._tracer.start_span(name, otel_context.Context(), attributes=every)

    def batches(self, graph: str, version: int) -> BatchSpans | None:
        """The batch spans of one graph's batcher (None when tracing is off: the batcher then records nothing)."""
        return BatchSpans(self._tracer, graph, version) if self.enabled else None


OFF = Tracing()
