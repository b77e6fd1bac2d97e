"""Tracing: spans received over OTLP/gRPC by a real receiver from a real server, and the log lines of a traced call.

The server exports to `bench.otlp_receiver.OtlpReceiver` (the OTLP trace service, from opentelemetry-proto's
definitions) on a loopback port, configured only through OTEL_* variables, as a deployment configures it.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.otlp_receiver import OtlpReceiver, ReceivedSpan, draw
from serving.api import oip, oip_grpc, pb, pb_grpc
from serving.api.tensors import fill_tensor
from serving.client import VaeClient
from serving.server.logs import JsonFormatter
from tests.helpers import publish_copy, running_server

DECODE = "vae.v1.VaeService/Decode"


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    """A receiver, and the OTEL_* variables that point the servers the test starts at it (every span sampled)."""
    with OtlpReceiver() as running:
        for name, value in running.env().items():
            monkeypatch.setenv(name, value)
        yield running


def caller_span(sampled: bool = True) -> tuple[str, str, str]:
    """A caller's trace id, span id and the `traceparent` naming them."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def decode_request(rows: int = 1) -> pb.DecodeRequest:
    request = pb.DecodeRequest()
    fill_tensor(request.latents, np.random.default_rng(rows).standard_normal((rows, 20)).astype(np.float32))
    return request


def by_name(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [span for span in spans if span.name == name]


def test_a_burst_of_decodes_traces_each_request_under_its_caller_and_links_the_batches_that_merged_them(
    model_dir: Path, receiver: OtlpReceiver
) -> None:
    callers = [caller_span() for _ in range(24)]
    with running_server(model_dir, poll_seconds=0, batch_wait="fixed", max_delay_ms=20) as server:
        channel = grpc.insecure_channel(server.target)
        stub = pb_grpc.VaeServiceStub(channel)
        barrier = threading.Barrier(len(callers) // 2)  # each half's calls start together

        def call(traceparent: str) -> int:
            barrier.wait()
            return stub.Decode(decode_request(), metadata=(("traceparent", traceparent),), timeout=30).model_version

        with ThreadPoolExecutor(len(callers)) as pool:
            first = list(pool.map(call, [traceparent for _, _, traceparent in callers[:12]]))
            publish_copy(model_dir, 2)
            server.refresh()  # version 2 loads while nothing runs; version 1 retires
            second = list(pool.map(call, [traceparent for _, _, traceparent in callers[12:]]))
        channel.close()
    assert set(first) == {1} and set(second) == {2}

    def complete(spans: list[ReceivedSpan]) -> bool:
        return len(by_name(spans, DECODE)) == len(callers) and bool(by_name(spans, "vae.version.retire"))

    spans = receiver.wait_for(complete)
    requests = {span.trace_id: span for span in by_name(spans, DECODE)}
    for trace_id, span_id, _ in callers:  # each request continues its caller's trace, under the caller's span
        request = requests[trace_id]
        assert request.parent_span_id == span_id and request.kind == "SPAN_KIND_SERVER"
        assert request.attributes["rpc.method"] == "Decode" and request.attributes["rpc.grpc.status_code"] == 0
        assert request.attributes["vae.rows"] == 1
    versions = [requests[trace_id].attributes["vae.model.version"] for trace_id, _, _ in callers]
    assert versions == first + second

    batches = by_name(spans, "vae.batch decoder")
    linked = [link for batch in batches for link in batch.links]
    assert sorted(linked) == sorted((span.trace_id, span.span_id) for span in requests.values())  # each once
    assert sum(batch.attributes["vae.rows"] for batch in batches) == len(callers)  # rows add up
    assert max(len(batch.links) for batch in batches) > 1  # the batcher merged requests into one run
    for batch in batches:
        assert batch.parent_span_id == "" and batch.attributes["vae.requests"] == len(batch.links)
        assert {requests[trace].attributes["vae.model.version"] for trace, _ in batch.links} == {
            batch.attributes["vae.model.version"]
        }
    waits = by_name(spans, "vae.queue_wait")
    assert sorted((wait.trace_id, wait.parent_span_id) for wait in waits) == sorted(linked)  # under each request

    (load,) = [span for span in by_name(spans, "vae.version.load") if span.attributes["vae.model.version"] == 2]
    steps = [span for span in spans if span.parent_span_id == load.span_id]
    assert {step.name for step in steps} == {"vae.version.verify", "vae.version.sessions", "vae.version.warm_up"}
    (retire,) = by_name(spans, "vae.version.retire")
    assert retire.attributes["vae.model.version"] == 1 and retire.start_ns >= load.end_ns


def test_a_score_shows_its_steps_and_the_rows_each_pass_ran(model_dir: Path, receiver: OtlpReceiver) -> None:
    images = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    trace_id, _, traceparent = caller_span()
    with running_server(model_dir, poll_seconds=0) as server, grpc.insecure_channel(server.target) as channel:
        request = pb.ScoreRequest(importance_samples=4, seed=1)
        fill_tensor(request.images, images)
        pb_grpc.VaeServiceStub(channel).Score(request, metadata=(("traceparent", traceparent),), timeout=30)

    def complete(spans: list[ReceivedSpan]) -> bool:  # the call, its 3 steps and 2 waits; the 2 batches
        return len([s for s in spans if s.trace_id == trace_id]) == 6 and len(by_name(spans, "vae.batch encoder")) == 1

    spans = receiver.wait_for(complete)
    (score,) = [span for span in spans if span.name == "vae.v1.VaeService/Score"]
    steps = {span.name: span for span in spans if span.parent_span_id == score.span_id}
    assert set(steps) == {"vae.encode", "vae.decode", "vae.score"}
    assert steps["vae.encode"].attributes["vae.rows"] == 3
    assert steps["vae.decode"].attributes["vae.rows"] == 3 * (1 + 4)  # the means and 4 draws per image
    assert steps["vae.encode"].end_ns <= steps["vae.decode"].start_ns <= steps["vae.score"].start_ns
    drawn = draw(spans, trace_id).splitlines()  # the tree as bench.otlp_receiver.draw writes it
    assert [line.split()[0] for line in drawn[1:6]] == [
        "vae.v1.VaeService/Score", "vae.encode", "vae.queue_wait", "vae.decode", "vae.queue_wait",
    ]  # fmt: skip
    assert drawn[6].split()[0] == "vae.score"
    assert sum(line.startswith("linked from trace") for line in drawn) == 2  # the encoder's and decoder's runs
    for step, graph in (("vae.encode", "encoder"), ("vae.decode", "decoder")):
        (batch,) = [
            span for span in by_name(spans, f"vae.batch {graph}") if span.links == [(trace_id, steps[step].span_id)]
        ]
        assert batch.attributes["vae.rows"] == steps[step].attributes["vae.rows"]


def test_a_caller_s_sampling_decision_stands_and_an_unsampled_batch_is_not_recorded(
    model_dir: Path, receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")  # requests without a sampled parent: never
    sampled, unsampled = caller_span(sampled=True), caller_span(sampled=False)
    with running_server(model_dir, poll_seconds=0) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.VaeServiceStub(channel)
        for _, _, traceparent in (unsampled, sampled):
            stub.Decode(decode_request(), metadata=(("traceparent", traceparent),), timeout=30)
        stub.Decode(decode_request(), timeout=30)  # no parent: the ratio, 0
    spans = receiver.wait_for(lambda spans: bool(by_name(spans, "vae.batch decoder")))
    assert {span.trace_id for span in spans if span.kind == "SPAN_KIND_SERVER"} == {sampled[0]}
    assert [batch.links for batch in by_name(spans, "vae.batch decoder")] == [
        [(sampled[0], by_name(spans, DECODE)[0].span_id)]
    ]
    # version loads are recorded whatever the sampler says: a swap must be on record
    assert [span.attributes["vae.model.version"] for span in by_name(spans, "vae.version.load")] == [1]


def test_rest_requests_continue_the_caller_s_trace_from_its_headers(model_dir: Path, receiver: OtlpReceiver) -> None:
    trace_id, span_id, traceparent = caller_span()
    body = {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 20], "data": [0.0] * 20}]}
    with running_server(model_dir, poll_seconds=0) as server:
        request = urllib.request.Request(
            f"{server.http_url}/v2/models/vae-mnist-decoder/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "traceparent": traceparent, "X-Request-Id": "rest-1"},
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert reply.status == 200
        missing = urllib.request.Request(f"{server.http_url}/v2/models/nothing/infer", data=b"{}", headers={})
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(missing, timeout=30)
    spans = receiver.wait_for(lambda spans: len([s for s in spans if s.kind == "SPAN_KIND_SERVER"]) == 2)
    (infer,) = [span for span in spans if span.trace_id == trace_id and span.kind == "SPAN_KIND_SERVER"]
    assert infer.parent_span_id == span_id and infer.name == "POST /v2/models/{model}/infer"
    assert infer.attributes["http.response.status_code"] == 200 and infer.attributes["vae.model.version"] == 1
    assert infer.attributes["vae.request_id"] == "rest-1"
    assert infer.status == "STATUS_CODE_UNSET"
    (refused,) = [span for span in spans if span.kind == "SPAN_KIND_SERVER" and span.trace_id != trace_id]
    assert refused.attributes["http.response.status_code"] == 404 and refused.status == "STATUS_CODE_UNSET"
    assert [link for batch in by_name(spans, "vae.batch decoder") for link in batch.links] == [
        (trace_id, infer.span_id)
    ]


def test_the_log_lines_of_a_traced_call_carry_its_trace_and_the_caller_s_request_id(
    model_dir: Path, receiver: OtlpReceiver
) -> None:
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("serving.request_record")
    logger.addHandler(handler)
    logger.setLevel("INFO")
    trace_id, _, traceparent = caller_span()
    long_id = "order-19" + "x" * 200
    try:
        with running_server(model_dir, poll_seconds=0, log_requests=True) as server:
            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.VaeServiceStub(channel)
                stub.Decode(decode_request(), metadata=(("traceparent", traceparent), ("x-request-id", "order-17")))
                stub.Decode(decode_request(), metadata=(("x-request-id", long_id),))
            with VaeClient(server.target) as client:
                with pytest.raises(ValueError, match="printable ASCII"):
                    client.with_request_id("order-18\nforged")  # gRPC would refuse it: the client says why
                client.with_request_id("order-18").decode(np.zeros((1, 20), np.float32))
                client.decode(np.zeros((1, 20), np.float32))
    finally:
        logger.removeHandler(handler)
    spans = receiver.wait_for(lambda spans: len(by_name(spans, DECODE)) == 4)
    records = [json.loads(line) for line in lines.getvalue().splitlines()]
    traced, long, named, plain = [record for record in records if record["event"] == "request"]
    assert {record["method"] for record in (traced, long, named, plain)} == {"Decode"}
    (span,) = [span for span in by_name(spans, DECODE) if span.trace_id == trace_id]
    assert (traced["trace_id"], traced["span_id"], traced["request_id"]) == (trace_id, span.span_id, "order-17")
    assert span.attributes["vae.request_id"] == "order-17"  # the span names it too
    assert long["request_id"] == long_id[:128]  # the server keeps 128 characters of it
    assert named["request_id"] == "order-18"  # the client's
    assert "request_id" not in plain  # the last call sent none: nothing left over from the one before
    assert {record["trace_id"] for record in (long, named, plain)} <= {span.trace_id for span in by_name(spans, DECODE)}


def test_a_configuration_the_server_cannot_use_is_one_log_line_and_the_server_serves_untraced(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    caplog.set_level("INFO", logger="serving.tracing")
    with running_server(model_dir, poll_seconds=0) as server, VaeClient(server.target) as client:
        assert client.decode(np.zeros((1, 20), np.float32)).model_version == 1
        assert not server.running.tracing.enabled
    (line,) = [record for record in caplog.records if record.getMessage() == "tracing_disabled"]
    assert line.levelname == "ERROR" and "OTEL_TRACES_EXPORTER='zipkin'" in line.__dict__["fields"]["error"]


def test_spans_the_export_queue_cannot_hold_are_dropped_and_counted_and_requests_go_on(
    model_dir: Path, receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2")
    receiver.pause()  # a collector that answers nothing: the exporter's first call waits, the queue fills
    with running_server(model_dir, poll_seconds=0) as server, VaeClient(server.target) as client:
        for _ in range(20):  # 3 spans each (the request, its wait, its batch), beside the version load's 4
            assert client.decode(np.zeros((1, 20), np.float32)).model_version == 1
        dropped = server.metric("vae_trace_spans_dropped_total")
        assert dropped >= 20 * 3 + 4 - (4 + 2) and dropped == server.running.tracing.dropped_spans
        receiver.resume()


def test_each_stream_message_is_a_span_under_the_stream_s_and_its_batch_links_it(
    model_dir: Path, receiver: OtlpReceiver
) -> None:
    trace_id, span_id, traceparent = caller_span()

    def messages() -> Iterator[oip.ModelInferRequest]:
        for index in range(3):
            message = oip.ModelInferRequest(model_name="vae-mnist-decoder", id=f"m{index}")
            message.inputs.add(name="z", datatype="FP32", shape=[1, 20])
            message.raw_input_contents.append(np.zeros((1, 20), np.float32).tobytes())
            yield message

    with running_server(model_dir, poll_seconds=0) as server, grpc.insecure_channel(server.target) as channel:
        stream = oip_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            messages(), metadata=(("traceparent", traceparent),), timeout=30
        )
        assert [reply.error_message for reply in stream] == ["", "", ""]
    spans = receiver.wait_for(lambda spans: len(by_name(spans, "vae.stream_message")) == 3)
    (call,) = by_name(spans, "inference.GRPCInferenceService/ModelStreamInfer")
    assert (call.trace_id, call.parent_span_id) == (trace_id, span_id)
    stream_messages = by_name(spans, "vae.stream_message")
    assert {message.parent_span_id for message in stream_messages} == {call.span_id}
    assert sorted(message.attributes["vae.message_id"] for message in stream_messages) == ["m0", "m1", "m2"]
    linked = sorted(link for batch in by_name(spans, "vae.batch decoder") for link in batch.links)
    assert linked == sorted((trace_id, message.span_id) for message in stream_messages)
