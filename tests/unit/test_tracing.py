"""Tracing's configuration from OTEL_* variables, its sampler, its drop count and the request ids it logs."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags

from serving import tracing
from serving.tracing import TracingConfigError


@pytest.mark.parametrize(
    ("environ", "kinds"),
    [
        ({}, []),  # nothing configured: off, no implicit exporter
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, [OTLPSpanExporter]),  # an endpoint is a choice
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, [OTLPSpanExporter]),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, [OTLPSpanExporter]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, [OTLPSpanExporter, ConsoleSpanExporter]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, [OTLPSpanExporter]),
    ],
)
def test_exporters_are_what_the_variables_name_and_none_unless_they_do(
    environ: dict[str, str], kinds: list[type]
) -> None:
    assert [type(exporter) for exporter in tracing.exporters_from(environ)] == kinds


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin' is not an exporter this server has"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "grpc only"),
    ],
)
def test_an_exporter_the_server_lacks_is_refused_saying_what_it_has(environ: dict[str, str], message: str) -> None:
    with pytest.raises(TracingConfigError, match=message):
        tracing.exporters_from(environ)


@pytest.mark.parametrize(
    ("environ", "description"),
    [
        ({}, "parentbased_always_on"),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, "always_off"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}, "traceidratio(0.25)"),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
         "parentbased_traceidratio(0.1)"),
    ],
)  # fmt: skip
def test_the_sampler_is_the_one_the_variables_name(environ: dict[str, str], description: str) -> None:
    assert tracing.sampler_from(environ).description == description


SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


def test_requests_are_sampled_before_any_span_by_the_caller_s_decision_or_the_ratio() -> None:
    parent_based = tracing.sampler_from({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                         "OTEL_TRACES_SAMPLER_ARG": "0.25"})  # fmt: skip
    assert parent_based.sampled(SAMPLED) and not parent_based.sampled(UNSAMPLED)  # the caller's decision stands
    roots = [parent_based.sampled(None) for _ in range(4000)]
    assert 0.2 < sum(roots) / len(roots) < 0.3  # no caller's decision: the ratio
    for invalid in ("ff-" + SAMPLED[3:], "00-" + "0" * 32 + SAMPLED[35:], SAMPLED[:36] + "0" * 16 + "-01", "x", ""):
        assert tracing.parse_traceparent(invalid) is None  # a request with one of these starts its own trace
    assert tracing.parse_traceparent(SAMPLED.upper()) == (0x0AF7651916CD43DD8448EB211C80319C, True)
    ratio = tracing.sampler_from({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"})
    low, high = "00-" + "0" * 16 + "00000000000000ff-b7ad6b7169203331-00", "00-" + "f" * 32 + "-b7ad6b7169203331-01"
    assert ratio.sampled(low) and not ratio.sampled(high)  # not parent-based: the trace id's low 64 bits decide
    assert tracing.sampler_from({"OTEL_TRACES_SAMPLER": "always_off"}).sampled(SAMPLED) is False
    assert tracing.sampler_from({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}).sampled(SAMPLED) is True


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "not a sampler this server has: use one of always_on"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"}, "a ratio from 0 to 1"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "ten percent"}, "a ratio from 0 to 1"),
    ],
)
def test_a_sampler_that_cannot_work_is_refused_saying_why(environ: dict[str, str], message: str) -> None:
    with pytest.raises(TracingConfigError, match=message):
        tracing.sampler_from(environ)


def test_a_bad_configuration_turns_tracing_off_with_one_error_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "2")
    assert tracing.Tracing.from_environment("0.2.0") is tracing.OFF
    assert [(record.levelname, record.getMessage()) for record in caplog.records] == [("ERROR", "tracing_disabled")]


def context(sampled: bool) -> SpanContext:
    return SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else 0))


def test_the_sdk_records_chosen_requests_their_children_their_batches_and_version_swaps() -> None:
    decide = tracing._Sampler().should_sample
    recorded = Decision.RECORD_AND_SAMPLE
    assert decide(None, 1, "vae.v1.VaeService/Decode", SpanKind.SERVER).decision == recorded  # chosen before
    assert decide(None, 1, "vae.batch decoder", links=[Link(context(False)), Link(context(True))]).decision == recorded
    assert decide(None, 1, "vae.batch decoder", links=[Link(context(False))]).decision == Decision.DROP
    assert decide(None, 1, "vae.version.load", attributes={"vae.lifecycle": True}).decision == recorded
    assert decide(None, 1, "vae.encode").decision == Decision.DROP  # a step with no recorded parent


def test_the_service_is_vae_serving_unless_the_variables_name_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=vae-0")
    resource = tracing.resource_from("0.2.0").attributes
    assert (resource["service.name"], resource["service.version"], resource["k8s.pod.name"]) == (
        "vae-serving",
        "0.2.0",
        "vae-0",
    )
    monkeypatch.setenv("OTEL_SERVICE_NAME", "vae-canary")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.version=build-7")
    resource = tracing.resource_from("0.2.0").attributes
    assert (resource["service.name"], resource["service.version"]) == ("vae-canary", "build-7")


class Stalled(SpanExporter):
    """An exporter whose first export waits until released: the processor's queue fills behind it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(30)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


def test_spans_beyond_the_export_queue_are_dropped_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "8")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4")
    exporter = Stalled()
    processor = tracing._CountingProcessor(exporter)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("test")
    for _ in range(100):
        tracer.start_span("request").end()
    assert 100 - 8 - 4 <= processor.dropped <= 100 - 8  # the queue's 8, and at most one batch being exported
    assert processor.batch._batch_processor._queue.maxlen == 8  # (the queue this reads is the SDK's own)
    exporter.release.set()
    provider.shutdown()
    assert exporter.exported == 100 - processor.dropped  # what was not dropped was exported


def test_request_ids_are_kept_as_printable_ascii_of_bounded_length() -> None:
    assert tracing.request_id_of("order-17") == "order-17"
    assert tracing.request_id_of("a\x00b\tc\u00e9d") == "abcd"
    assert tracing.request_id_of("x" * 500) == "x" * tracing.MAX_REQUEST_ID_CHARS
    assert (
        tracing.request_id_of("") is None
        and tracing.request_id_of("\x01") is None
        and tracing.request_id_of(None) is None
    )


def test_tracing_off_records_nothing() -> None:
    off = tracing.OFF
    assert not off.enabled and off.batches("decoder", 1) is None and off.dropped_spans == 0
    with off.step("vae.encode"):
        pass
    with off.lifecycle("vae.version.load", 1) as span:
        assert not span.is_recording()
