"""The Open Inference Protocol over REST (`/v2` on --http-port): the same models as over gRPC, JSON and binary
bodies, errors as `{"error": ...}` with their status, the port's bounds, and the curl examples of
docs/serving.md run as written.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from serving.api import oip, oip_grpc, pb, pb_grpc
from serving.client import VaeClient
from tests.helpers import ROOT, ServerThread, patient_config, running_server, scrape, wait_until

MODEL = "vae-mnist"
LATENTS = np.random.default_rng(5).standard_normal((3, 20)).astype(np.float32)
HEADER = "Inference-Header-Content-Length"


def call(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a GET (no body) or POST."""
    request = urllib.request.Request(
        url, data=body, headers=headers or {}, method="POST" if body is not None else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def post_json(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, _, data = call(url, json.dumps(body).encode())
    return status, json.loads(data)


def test_health_metadata_and_config(vae_server: ServerThread) -> None:
    base = vae_server.http_url
    assert call(f"{base}/v2/health/live")[::2] == (200, b'{"live":true}')
    assert call(f"{base}/v2/health/ready")[::2] == (200, b'{"ready":true}')
    server = json.loads(call(f"{base}/v2")[2])
    assert server["name"] == "vae-serving" and "binary_tensor_data" in server["extensions"]
    assert json.loads(call(f"{base}/v2/models/{MODEL}-decoder/versions/1/ready")[2]) == {
        "name": f"{MODEL}-decoder",
        "ready": True,
    }
    assert call(f"{base}/v2/models/{MODEL}-decoder/versions/7/ready")[0] == 503
    metadata = json.loads(call(f"{base}/v2/models/{MODEL}-decoder")[2])
    assert metadata["versions"] == ["1"] and metadata["inputs"] == [
        {"name": "z", "datatype": "FP32", "shape": [-1, 20]}
    ]
    config = json.loads(call(f"{base}/v2/models/{MODEL}-encoder/config")[2])
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [1, 28, 28]}]
    status, _, body = call(f"{base}/v2/models/resnet/config")
    assert status == 404 and f"{MODEL}-encoder" in json.loads(body)["error"]


def test_json_inference_answers_what_the_typed_api_answers(vae_server: ServerThread, vae_client: VaeClient) -> None:
    url = f"{vae_server.http_url}/v2/models/{MODEL}-decoder/infer"
    flat = {
        "id": "a",
        "inputs": [{"name": "z", "shape": [3, 20], "datatype": "FP32", "data": LATENTS.ravel().tolist()}],
    }
    status, reply = post_json(url, flat)
    assert status == 200 and (reply["model_name"], reply["model_version"], reply["id"]) == (
        f"{MODEL}-decoder",
        "1",
        "a",
    )
    (output,) = reply["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("x", "FP32", [3, 1, 28, 28])
    images = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    np.testing.assert_array_equal(images, vae_client.decode(LATENTS).images)
    nested = {"inputs": [{"name": "z", "shape": [3, 20], "datatype": "FP32", "data": LATENTS.tolist()}]}
    assert post_json(url, nested)[1]["outputs"][0]["data"] == output["data"]


def binary_body(inputs: dict[str, tuple[str, np.ndarray]], **request: Any) -> tuple[bytes, dict[str, str]]:
    """The binary tensor extension's body: JSON, then each input's bytes."""
    tensors = [
        {
            "name": name,
            "shape": list(array.shape),
            "datatype": datatype,
            "parameters": {"binary_data_size": array.nbytes},
        }
        for name, (datatype, array) in inputs.items()
    ]
    header = json.dumps({"inputs": tensors, **request}).encode()
    blobs = b"".join(array.tobytes() for _, array in inputs.values())
    return header + blobs, {HEADER: str(len(header)), "Content-Type": "application/octet-stream"}


def binary_outputs(headers: dict[str, str], body: bytes) -> dict[str, np.ndarray]:
    length = int(headers[HEADER])
    reply = json.loads(body[:length])
    offset, arrays = length, {}
    numpy = {"FP32": np.float32, "FP64": np.float64, "UINT8": np.uint8, "INT64": np.int64}
    for output in reply["outputs"]:
        size = output["parameters"]["binary_data_size"]
        arrays[output["name"]] = np.frombuffer(body[offset : offset + size], numpy[output["datatype"]])
        arrays[output["name"]] = arrays[output["name"]].reshape(output["shape"])
        offset += size
    assert offset == len(body)
    return arrays


def test_binary_tensors_both_ways_are_bit_identical_to_the_typed_api(
    vae_server: ServerThread, vae_client: VaeClient
) -> None:
    images = np.random.default_rng(1).integers(0, 256, (2, 1, 28, 28), dtype=np.uint8)
    body, headers = binary_body(
        {"x": ("UINT8", images)},
        parameters={"importance_samples": 3, "seed": 9, "binary_data_output": True},
        outputs=[{"name": "iwae"}, {"name": "kl", "parameters": {"binary_data": True}}],
    )
    status, reply_headers, reply = call(f"{vae_server.http_url}/v2/models/{MODEL}-score/infer", body, headers)
    assert status == 200, reply
    scored = binary_outputs(reply_headers, reply)
    typed = vae_client.score(images, importance_samples=3, seed=9)
    assert typed.iwae is not None
    np.testing.assert_array_equal(scored["iwae"], typed.iwae)
    np.testing.assert_array_equal(scored["kl"], typed.kl)


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b"{not json", {}, 400, "not valid JSON"),
        (
            b'{"inputs": [{"name": "z", "shape": ["3"], "datatype": "FP32", "data": []}]}',
            {},
            400,
            "$.inputs[0].shape[0]",
        ),
        (b'{"inputs": [], "input": []}', {}, 400, "unknown field `input`"),
        (b'{"inputs": [{"name": "z", "shape": [1, 20], "datatype": "FP64", "data": [0]}]}', {}, 400, "takes FP32"),
        (b'{"inputs": [{"name": "z", "shape": [1, 20], "datatype": "FP32", "data": [0, 1]}]}', {}, 400, "needs 20"),
        (b'{"inputs": [{"name": "z", "shape": [1, 20], "datatype": "FP32"}]}', {}, 400, "neither data nor"),
        (b'{"parameters": {"output_datatype": [1]}}', {}, 400, "give a bool, number or string"),
        (b"{}extra", {HEADER: "99"}, 400, "at most the body's 7 bytes"),
        (b"{}extra", {HEADER: "2"}, 400, "5 bytes of binary data that no input claims"),
    ],
)
def test_a_bad_body_gets_400_saying_what_was_wrong(
    vae_server: ServerThread, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    got, _, reply = call(f"{vae_server.http_url}/v2/models/{MODEL}-decoder/infer", body, headers)
    assert got == status
    assert message in json.loads(reply)["error"]


def test_an_unknown_model_or_version_is_404(vae_server: ServerThread) -> None:
    status, reply = post_json(f"{vae_server.http_url}/v2/models/{MODEL}-decoder/versions/stable/infer", {})
    assert status == 404 and "label 'stable' names no version" in reply["error"]
    assert call(f"{vae_server.http_url}/v3/anything")[0] == 404


def test_triton_s_timeout_parameter_is_the_deadline_of_a_rest_request(vae_server: ServerThread) -> None:
    """REST has no deadline of its own: tritonclient.http's `infer(timeout=...)` sends microseconds as the
    parameter `timeout`, and a request still queued when it passes gets 504 without running."""
    url = f"{vae_server.http_url}/v2/models/{MODEL}-decoder/infer"
    z = {"name": "z", "datatype": "FP32", "shape": [2, 20], "data": [0.0] * 40}
    status, reply = post_json(url, {"inputs": [z], "parameters": {"timeout": 1}})
    assert status == 504 and "deadline passed" in reply["error"]
    status, reply = post_json(url, {"inputs": [z], "parameters": {"timeout": 60_000_000}})
    assert status == 200 and reply["outputs"][0]["shape"] == [2, 1, 28, 28]
    status, reply = post_json(url, {"inputs": [z], "parameters": {"timeout": "soon"}})
    assert status == 400 and "parameter 'timeout' is 'soon'" in reply["error"]


def test_more_rows_than_the_limit_get_400_naming_it(vae_server: ServerThread) -> None:
    body, headers = binary_body({"z": ("FP32", np.zeros((1025, 20), np.float32))})
    status, _, reply = call(f"{vae_server.http_url}/v2/models/{MODEL}-decoder/infer", body, headers)
    assert status == 400
    assert "is 1025, more than this server's limit of 1024 per request" in json.loads(reply)["error"]


def test_a_draining_server_refuses_new_requests_over_every_protocol(exported_repository: Path) -> None:
    """Once the drain has begun: typed API and ModelInfer UNAVAILABLE, REST 503, each saying to go elsewhere."""
    with running_server(exported_repository) as server:
        drain = server.running.interceptor.admission.drain
        closing = asyncio.run_coroutine_threadsafe(drain.close(30), server.loop)
        wait_until(lambda: not drain.accepting, what="the drain began")
        request = oip.ModelInferRequest(model_name=f"{MODEL}-decoder")
        request.inputs.add(name="z", datatype="FP32", shape=[1, 20])
        request.raw_input_contents.append(np.zeros((1, 20), np.float32).tobytes())
        with grpc.insecure_channel(server.target) as channel:
            for rpc in (
                lambda: oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30),
                lambda: pb_grpc.VaeServiceStub(channel).Sample(pb.SampleRequest(num_samples=1), timeout=30),
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    rpc()
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in str(refused.value.details())
        body, headers = binary_body({"z": ("FP32", np.zeros((1, 20), np.float32))})
        status, _, reply = call(f"{server.http_url}/v2/models/{MODEL}-decoder/infer", body, headers)
        assert status == 503 and "shutting down" in json.loads(reply)["error"]
        assert closing.result(10) is True  # nothing was running: the drain ends at once


def test_a_full_queue_answers_429_saying_so(exported_repository: Path) -> None:
    """The batcher's queue holds 16 rows; 10 wait there for company (1.5 s, fixed wait): 10 more do not fit."""
    server = ServerThread(patient_config(exported_repository, max_batch_size=16))
    try:
        url = f"{server.http_url}/v2/models/{MODEL}-decoder/infer"
        body, headers = binary_body({"z": ("FP32", np.zeros((10, 20), np.float32))})
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(call, url, body, headers)
            wait_until(lambda: server.metric("vae_queue_depth", version="1") == 10, what="10 rows queued")
            status, _, reply = call(url, body, headers)
            assert (
                status == 429 and "the decoder queue holds 10 rows and takes at most 16" in json.loads(reply)["error"]
            )
            assert queued.result(timeout=30)[0] == 200
    finally:
        server.stop()


def test_rest_requests_are_counted_with_their_protocol(vae_server: ServerThread) -> None:
    post_json(f"{vae_server.http_url}/v2/models/{MODEL}-sample/infer", {"parameters": {"num_samples": 2}})
    requests = scrape(vae_server.metrics_url)["vae_requests_total"]
    rest = [labels for labels, value in requests if labels["protocol"] == "http" and value > 0]
    assert {"method": "ModelInfer", "code": "OK", "version": "1", "protocol": "http"} in rest


def test_the_curl_examples_of_the_docs_run_as_written(vae_server: ServerThread) -> None:
    text = (ROOT / "docs" / "serving.md").read_text()
    section = text[text.index("### REST: `/v2` on `--http-port`") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None and shutil.which("curl")
    port = vae_server.http_url.rsplit(":", 1)[1]
    commands = block.group(1).replace("localhost:8080", f"127.0.0.1:{port}").replace("\\\n", "").splitlines()
    assert len(commands) == 4
    for command in commands:
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, check=True)
        reply = json.loads(result.stdout)
        assert "error" not in reply, (command, reply)
    assert reply["outputs"][0]["name"] == "mu" and reply["model_version"] == "1"


def test_the_port_refuses_a_body_too_large_connections_beyond_the_cap_and_silent_ones(
    exported_repository: Path,
) -> None:
    limits: dict[str, float] = {"max_message_bytes": 64 * 1024, "max_items_per_request": 16, "max_connections": 3}
    limits["handshake_timeout_seconds"] = 0.5
    with running_server(exported_repository, **limits) as server:
        # The connection cap first, on a port no earlier connection may still be counted against (a closed one
        # is forgotten a loop turn later, which a busy machine can stretch past the next connect).
        host, port = server.http_url.removeprefix("http://").split(":")
        silent = [socket.create_connection((host, int(port)), timeout=10) for _ in range(3)]
        try:
            extra = socket.create_connection((host, int(port)), timeout=10)
            assert extra.recv(100).startswith(b"HTTP/1.1 503")  # the fourth: refused, told why
            extra.close()
            for connection in silent:  # closed once the handshake timeout passed without a request head
                assert connection.recv(1) == b""
        finally:
            for connection in silent:
                connection.close()
        deadline = time.monotonic() + 10
        while call(f"{server.http_url}/v2/health/live")[0] != 200:  # the slots are free again
            assert time.monotonic() < deadline
            time.sleep(0.1)
        url = f"{server.http_url}/v2/models/{MODEL}-decoder/infer"
        status, _, reply = call(url, b"{" + b" " * 70_000 + b"}")
        assert status == 413 and "larger than 65536 bytes" in json.loads(reply)["error"]


def test_a_bug_is_500_or_internal_with_a_generic_message_logged_on_the_server_and_serving_goes_on(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in the protocol's path (injected: the catalogue's inference raises what no check raises) reaches
    neither protocol's caller as a stack trace: REST 500 and gRPC INTERNAL, the same generic message, the
    exception in the server's log, counted as INTERNAL; the next request is served."""
    from serving.errors import INTERNAL_MESSAGE
    from serving.oip.models import Catalogue

    infer = Catalogue.infer

    async def broken(self: Catalogue, request: Any) -> Any:
        raise RuntimeError("secret detail of a bug")

    body = {"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 20], "data": [0.0] * 20}]}
    message = oip.ModelInferRequest(model_name=f"{MODEL}-decoder")
    message.inputs.add(name="z", datatype="FP32", shape=[1, 20])
    message.raw_input_contents.append(np.zeros((1, 20), np.float32).tobytes())
    with running_server(model_dir, poll_seconds=0) as server, grpc.insecure_channel(server.target) as channel:
        url, stub = f"{server.http_url}/v2/models/{MODEL}-decoder/infer", oip_grpc.GRPCInferenceServiceStub(channel)
        monkeypatch.setattr(Catalogue, "infer", broken)
        assert post_json(url, body) == (500, {"error": INTERNAL_MESSAGE})
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(message, timeout=30)
        assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
        monkeypatch.setattr(Catalogue, "infer", infer)
        assert post_json(url, body)[0] == 200 and stub.ModelInfer(message, timeout=30).model_version == "1"
        for protocol in ("http", "grpc"):
            assert server.metric("vae_requests_total", method="ModelInfer", code="INTERNAL", protocol=protocol) == 1
    logged = [record for record in caplog.records if record.getMessage() == "request_failed"]
    assert len(logged) == 2 and all("secret detail of a bug" in str(record.exc_text or "") for record in logged)
