"""Dynamic batching through a real server: merging, back-pressure, deadlines, and the metrics they leave."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.api import SERVICE_METHODS as METHODS
from serving.api import oip, oip_grpc
from serving.client import VaeClient, VaeError
from tests.helpers import DirectGraphs, ServerThread, patient_config, running_server, scrape, wait_until


@pytest.fixture(scope="module")
def patient_server(exported_repository: Path) -> Iterator[ServerThread]:
    """Batches of 8 rows (tests.helpers.patient_config)."""
    server = ServerThread(patient_config(exported_repository, max_batch_size=8))
    yield server
    server.stop()


def decoder_runs(server: ServerThread) -> tuple[float, float]:
    return (
        server.metric("vae_batch_rows_count", graph="decoder"),
        server.metric("vae_batch_rows_sum", graph="decoder"),
    )


def test_concurrent_requests_share_one_onnxruntime_run(patient_server: ServerThread, exported_repository: Path) -> None:
    runs, rows = decoder_runs(patient_server)
    latents = np.random.default_rng(0).standard_normal((8, 20)).astype(np.float32)
    with VaeClient(patient_server.target) as client, ThreadPoolExecutor(8) as pool:
        images = list(pool.map(lambda i: client.decode(latents[i : i + 1]).images, range(8)))
    assert decoder_runs(patient_server) == (runs + 1, rows + 8)  # eight 1-row requests, one run of 8 rows
    expected = DirectGraphs(exported_repository).decode(latents)
    np.testing.assert_allclose(np.concatenate(images), expected, atol=1e-5)  # each got its own row back


def test_one_run_holds_rows_of_both_protocols_and_both_transports(
    patient_server: ServerThread, exported_repository: Path
) -> None:
    """Typed Decodes, ModelInfer over gRPC and over REST, 1 row each, at once: one onnxruntime run."""
    runs, rows = decoder_runs(patient_server)
    latents = np.random.default_rng(1).standard_normal((8, 20)).astype(np.float32)

    def oip_grpc_row(row: int) -> np.ndarray:
        request = oip.ModelInferRequest(model_name="vae-mnist-decoder")
        request.inputs.add(name="z", datatype="FP32", shape=[1, 20])
        request.raw_input_contents.append(latents[row : row + 1].tobytes())
        with grpc.insecure_channel(patient_server.target) as channel:
            reply = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        return np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(1, 1, 28, 28)

    def rest_row(row: int) -> np.ndarray:
        body = {"inputs": [{"name": "z", "shape": [1, 20], "datatype": "FP32", "data": latents[row].tolist()}]}
        url = f"{patient_server.http_url}/v2/models/vae-mnist-decoder/infer"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            (output,) = json.loads(response.read())["outputs"]
        return np.asarray(output["data"], np.float32).reshape(1, 1, 28, 28)

    with VaeClient(patient_server.target) as client, ThreadPoolExecutor(8) as pool:
        calls = [lambda row: client.decode(latents[row : row + 1]).images, oip_grpc_row, rest_row]
        images = list(pool.map(lambda row: calls[row % 3](row), range(8)))
    assert decoder_runs(patient_server) == (runs + 1, rows + 8)  # eight 1-row requests, one run of 8 rows
    expected = DirectGraphs(exported_repository).decode(latents)
    np.testing.assert_allclose(np.concatenate(images), expected, atol=1e-5)  # each got its own row back


def test_queue_overflow_gets_resource_exhausted_and_health_stays_serving(patient_server: ServerThread) -> None:
    runs, _ = decoder_runs(patient_server)
    with VaeClient(patient_server.target, retries=0) as client, ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client.decode, np.zeros((7, 20), np.float32))  # waits out the delay in the queue
        wait_until(lambda: patient_server.metric("vae_queue_depth", graph="decoder") == 7, what="7 rows queued")
        with pytest.raises(VaeError) as raised:
            client.decode(np.zeros((10, 20), np.float32))  # 7 + 10 > 16
        assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue holds 7 rows and takes at most 16" in raised.value.details
        assert client.health() == "SERVING"
        assert waiting.result(timeout=10).images.shape == (7, 1, 28, 28)  # the queued request still completes
    assert decoder_runs(patient_server)[0] == runs + 1
    assert patient_server.metric("vae_requests_total", method="Decode", code="RESOURCE_EXHAUSTED") >= 1


def test_a_request_whose_deadline_passes_in_the_queue_never_runs(patient_server: ServerThread) -> None:
    runs, _ = decoder_runs(patient_server)
    with VaeClient(patient_server.target, retries=0) as client:
        with pytest.raises(VaeError) as raised:
            client.decode(np.zeros((1, 20), np.float32), timeout_s=0.2)  # the batch would start after 1.5 s
        assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: patient_server.metric("vae_queue_depth", graph="decoder") == 0, what="the queue to empty")
    wait_until(lambda: patient_server.metric("vae_inflight_requests") == 0, what="no request in flight")
    assert decoder_runs(patient_server)[0] == runs  # dropped before running
    assert patient_server.metric("vae_requests_total", method="Decode", code="DEADLINE_EXCEEDED") == 1


def test_metrics_endpoint_exposes_every_metric_with_the_traffic_sent(exported_repository: Path) -> None:
    config = {"max_delay_ms": 0, "encode_score_fraction": 1.0}  # every Encode input scored too (after its reply)
    with running_server(exported_repository, **config) as server, VaeClient(server.target) as client:
        client.encode(np.zeros((3, 1, 28, 28), np.float32))
        client.encode(np.zeros((2, 1, 28, 28), np.float32))
        client.decode(np.zeros((5, 20), np.float32))
        client.sample(4, seed=1)
        list(client.sample_stream(10, seed=1))
        client.interpolate(np.zeros((2, 1, 28, 28), np.float32), np.ones((2, 1, 28, 28), np.float32), steps=3)
        client.model_info()
        assert client.compare_versions(1).note.startswith("no candidate is being compared")
        scored = client.score(np.full((4, 1, 28, 28), 0.5, np.float32), importance_samples=2)
        client.reconstruct(np.zeros((3, 1, 28, 28), np.float32))
        client.traverse(np.zeros((1, 20), np.float32), dimensions=[0, 1], steps=3)
        with pytest.raises(VaeError):
            client.decode(np.zeros((1, 3), np.float32))
        wait_until(lambda: server.metric("vae_input_score_nats_count") == 5 + 4 + 3, what="Encode's inputs scored")
        samples = scrape(server.metrics_url)

    def value(metric: str, **labels: str) -> float:
        matches = [v for sample_labels, v in samples.get(metric, []) if labels.items() <= sample_labels.items()]
        assert len(matches) == 1, f"{metric} {labels}: {matches}"
        return matches[0]

    ok = {"Encode": 2, "Decode": 1, "Sample": 1, "SampleStream": 1, "Interpolate": 1, "GetModelInfo": 1}
    ok |= {"CompareVersions": 1}
    ok |= {"Score": 1, "Reconstruct": 1, "Traverse": 1}
    for method in METHODS:
        assert value("vae_requests_total", method=method, code="OK") == ok[method]
        assert value("vae_request_duration_seconds_count", method=method) == ok[method] + (method == "Decode")
    assert value("vae_requests_total", method="Decode", code="INVALID_ARGUMENT") == 1
    items = {"Encode": 5, "Decode": 5, "Sample": 4, "SampleStream": 10, "Interpolate": 6, "GetModelInfo": 0}
    items |= {"Score": 4, "Reconstruct": 3, "Traverse": 6}
    for method, count in items.items():
        assert value("vae_request_items_sum", method=method) == count
    # Interpolate encodes its 2 + 2 endpoints; Score decodes each image's mean and its 2 importance samples,
    # Reconstruct each image's mean and one posterior draw.
    assert value("vae_batch_rows_sum", graph="encoder") == 3 + 2 + 4 + 4 + 3
    assert value("vae_batch_rows_sum", graph="decoder") == 5 + 4 + 10 + 6 + 4 * 3 + 3 * 2 + 6 + (3 + 2)
    # One queue wait per request a graph ran: the encoder's 5 (2 Encode, Interpolate, Score, Reconstruct), the
    # decoder's 9 (the 2 Encodes' scoring after their replies, and one for every other call but GetModelInfo).
    # A run may serve more than one of them (the scoring after a reply can share the next call's batch).
    for graph, requests in (("encoder", 5), ("decoder", 9)):
        runs = value("vae_batch_rows_count", graph=graph)
        assert value("vae_inference_seconds_count", graph=graph) == runs
        assert value("vae_queue_wait_seconds_count", graph=graph) == requests
        assert 1 <= runs <= requests
        assert value("vae_queue_depth", graph=graph) == 0
    assert value("vae_inflight_requests") == 0
    assert value("vae_model_info", name="vae-mnist", version="1", provider="CPUExecutionProvider") == 1
    # What the server saw of its inputs: scores (Encode's, Score's, Reconstruct's) and posterior-mean norms.
    assert value("vae_input_score_nats_count", version="1") == 5 + 4 + 3
    assert value("vae_latent_norm_count", version="1") == 5 + 4 + 3
    score_sum = value("vae_input_score_nats_sum", version="1")
    # the histogram holds the plug-in score; the gray images' are part of the sum
    assert score_sum > float(scored.plugin_negative_elbo.sum()) > 0
    baseline = json.loads((exported_repository / "1" / "model.json").read_text())["baseline"]["score_quantiles"]
    for quantile, nats in baseline.items():
        assert value("vae_model_score_baseline_nats", version="1", quantile=quantile) == pytest.approx(nats)
    assert "process_cpu_seconds_total" in samples and "python_info" in samples


def test_concurrent_clients_all_get_their_own_answers(vae_server: ServerThread, exported_repository: Path) -> None:
    """A burst from many threads through the shared server: every answer matches its own request."""
    graphs = DirectGraphs(exported_repository)
    latents = np.random.default_rng(9).standard_normal((64, 20)).astype(np.float32)
    errors: list[BaseException] = []

    def call(index: int, client: VaeClient) -> None:
        try:
            image = client.decode(latents[index : index + 1]).images
            np.testing.assert_allclose(image, graphs.decode(latents[index : index + 1]), atol=1e-5)
        except BaseException as error:
            errors.append(error)

    with VaeClient(vae_server.target) as client:
        threads = [threading.Thread(target=call, args=(i, client)) for i in range(64)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert not errors


def test_request_logging_writes_one_json_line_per_request(
    exported_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="serving.request_record")
    with running_server(exported_repository, log_requests=True) as server, VaeClient(server.target) as client:
        started = time.perf_counter()
        client.sample(3, seed=0)
        round_trip_ms = (time.perf_counter() - started) * 1000
        with pytest.raises(VaeError):
            client.sample(0)
        histogram_sum_s = server.metric("vae_request_duration_seconds_sum", method="Sample")
    lines = [record for record in caplog.records if record.getMessage() == "request"]
    fields = [record.__dict__["fields"] for record in lines]  # the `extra` of each log call
    assert [(f["method"], f["code"], f["items"]) for f in fields] == [
        ("Sample", "OK", 3),
        ("Sample", "INVALID_ARGUMENT", None),
    ]
    # the line's duration is the one the latency histogram recorded, and the server's part of the round trip
    assert sum(f["duration_ms"] for f in fields) == pytest.approx(histogram_sum_s * 1000, abs=0.002)
    assert 0 < fields[0]["duration_ms"] < round_trip_ms


def test_the_request_log_names_the_protocol_of_each_request(
    exported_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="serving.request_record")
    z = np.zeros((2, 20), np.float32)
    with running_server(exported_repository, log_requests=True) as server, VaeClient(server.target) as client:
        client.decode(z)
        request = oip.ModelInferRequest(model_name="vae-mnist-decoder")
        request.inputs.add(name="z", datatype="FP32", shape=z.shape)
        request.raw_input_contents.append(z.tobytes())
        with grpc.insecure_channel(server.target) as channel:
            oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        body = {"inputs": [{"name": "z", "datatype": "FP32", "shape": [2, 20], "data": z.ravel().tolist()}]}
        post = urllib.request.Request(
            f"{server.http_url}/v2/models/vae-mnist-decoder/infer", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(post, timeout=30) as response:
            assert response.status == 200
        bad = oip.ModelInferRequest(model_name="vae-mnist-decoder", id="bad")
        bad.inputs.add(name="z", datatype="FP64", shape=z.shape)
        bad.raw_input_contents.append(z.astype(np.float64).tobytes())
        with grpc.insecure_channel(server.target) as channel:
            replies = list(
                oip_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([request, bad]), timeout=30)
            )
        assert sorted(bool(reply.error_message) for reply in replies) == [False, True]  # in the order they finish
    fields = [record.__dict__["fields"] for record in caplog.records if record.getMessage() == "request"]
    lines = [(f["method"], f["protocol"], f["code"], f["version"], f["items"]) for f in fields]
    assert lines[:3] == [
        ("Decode", "grpc", "OK", 1, 2),
        ("ModelInfer", "grpc", "OK", 1, 2),
        ("ModelInfer", "http", "OK", 1, 2),
    ]
    # a stream: a line per message, as its metrics count them, and none for the stream, which ended well
    assert sorted(lines[3:], key=str) == [
        ("ModelStreamInfer", "grpc", "INVALID_ARGUMENT", None, None),
        ("ModelStreamInfer", "grpc", "OK", 1, 2),
    ]
