"""Property-based fuzzing of the Open Inference Protocol: ModelInfer and ModelStreamInfer messages through the
stub, garbage bytes on the wire, and REST bodies (JSON and the binary extension's header).

Whatever a client sends, each call ends within its deadline with OK or a documented status (gRPC:
INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED; REST: 200, 400, 404, 413, 429, each error a JSON
`{"error": ...}`), no reply carries a stack trace, nothing is counted as INTERNAL, and the server still
answers a correct request correctly afterwards. The typed API's fuzzing: test_fuzz.py.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.api import oip, oip_grpc
from serving.grpc.oip_servicer import parameter_message
from tests.helpers import DirectGraphs, ServerThread, running_server

LATENT_DIM = 20
MAX_ITEMS = 64
MAX_MESSAGE_BYTES = 256 * 1024
TIMEOUT_S = 30.0
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # a `timeout` parameter of a few microseconds
}
REST_ALLOWED = {200, 400, 404, 413, 429, 504}
KINDS = ("encoder", "decoder", "sample", "score", "reconstruct", "interpolate", "traverse")


@pytest.fixture(scope="module")
def fuzz_server(exported_repository: Path) -> Iterator[ServerThread]:
    with running_server(
        exported_repository,
        max_batch_size=32,
        max_queue_rows=256,
        max_items_per_request=MAX_ITEMS,
        max_interpolation_steps=16,
        max_message_bytes=MAX_MESSAGE_BYTES,
        max_importance_samples=8,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def channel(fuzz_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_server.target, options=[("grpc.enable_retries", 0)]) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> oip_grpc.GRPCInferenceServiceStub:
    return oip_grpc.GRPCInferenceServiceStub(channel)


# ---- strategies -----------------------------------------------------------------------------------------

MODELS = st.one_of(st.sampled_from([f"vae-mnist-{kind}" for kind in KINDS]), st.text(max_size=20))
VERSIONS = st.one_of(st.sampled_from(["", "1", "2", "0", "stable", "18446744073709551616"]), st.text(max_size=8))
NAMES = st.one_of(st.sampled_from(["x", "z", "start", "end", "origin", "mu"]), st.text(max_size=6))
DATATYPES = st.one_of(st.sampled_from(["FP32", "UINT8", "FP64", "INT64", "BYTES", "BOOL", "FP16"]), st.text(max_size=5))
DIMS = st.one_of(st.integers(-2, 70), st.sampled_from([28, LATENT_DIM, 2**31, 2**62, -(2**63)]))
SHAPES = st.one_of(
    st.lists(DIMS, max_size=5),
    st.sampled_from([[1, 1, 28, 28], [3, 1, 28, 28], [2, LATENT_DIM], [1, LATENT_DIM], [MAX_ITEMS + 1, LATENT_DIM]]),
)
PARAMETER_NAMES = st.one_of(
    st.sampled_from(["num_samples", "seed", "offset", "temperature", "steps", "method", "dimensions", "low", "high",
                     "importance_samples", "sample_posterior", "relative", "output_datatype", "binary_data_output",
                     "timeout"]),
    st.text(max_size=6),
)  # fmt: skip
PARAMETER_VALUES = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(0, 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["FP32", "UINT8", "linear", "slerp", "0,3", "x", "-1", ""]),
    st.text(max_size=8),
)


def data_for(shape: list[int], datatype: str, kind: str) -> bytes:
    """Bytes for a tensor: the right count of plausible values, a wrong count, or nothing."""
    count = int(np.prod(shape)) if shape and all(0 <= d <= 4096 for d in shape) and np.prod(shape) <= 100_000 else 3
    rng = np.random.default_rng(count)
    if datatype == "UINT8":
        data = rng.integers(0, 256, count, dtype=np.uint8).tobytes()
    else:
        data = rng.random(count, dtype=np.float32).tobytes()
    return {"right": data, "short": data[: len(data) // 2], "none": b"", "extra": data + b"\0" * 4}[kind]


@st.composite
def infer_requests(draw: st.DrawFn) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=draw(MODELS), model_version=draw(VERSIONS), id=draw(st.text(max_size=4)))
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        shape, datatype = draw(SHAPES), draw(DATATYPES)
        tensor = request.inputs.add(name=draw(NAMES), datatype=datatype, shape=shape)
        data = data_for(shape, datatype, draw(st.sampled_from(["right", "short", "none", "extra"])))
        if raw:
            request.raw_input_contents.append(data)
        elif datatype == "UINT8":
            tensor.contents.uint_contents.extend(list(data))
        else:
            tensor.contents.fp32_contents.extend(np.frombuffer(data[: len(data) // 4 * 4], np.float32).tolist())
    if raw and draw(st.integers(0, 5)) == 0:
        request.raw_input_contents.append(b"\0")  # one more than the inputs
    for name, value in draw(st.dictionaries(PARAMETER_NAMES, PARAMETER_VALUES, max_size=4)).items():
        request.parameters[name].CopyFrom(parameter_message(value))
    for name in draw(st.lists(NAMES, max_size=2)):
        request.outputs.add(name=name)
    return request


# ---- checks ---------------------------------------------------------------------------------------------


def outcome(call: Any) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        assert error.code() in ALLOWED, f"{error.code()}: {error.details()}"
        assert "Traceback" not in (error.details() or "")
        return error.code()


def assert_server_answers_correctly(
    server: ServerThread, stub: oip_grpc.GRPCInferenceServiceStub, model_dir: Path
) -> None:
    latents = np.random.default_rng(7).standard_normal((3, LATENT_DIM)).astype(np.float32)
    request = oip.ModelInferRequest(model_name="vae-mnist-decoder")
    request.inputs.add(name="z", datatype="FP32", shape=[3, LATENT_DIM])
    request.raw_input_contents.append(latents.tobytes())
    reply = stub.ModelInfer(request, timeout=TIMEOUT_S)
    images = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(3, 1, 28, 28)
    np.testing.assert_allclose(images, DirectGraphs(model_dir).decode(latents), atol=1e-5)
    for method in ("ModelInfer", "ModelStreamInfer"):
        for protocol in ("grpc", "http"):
            assert server.metric("vae_requests_total", method=method, code="INTERNAL", protocol=protocol) == 0
    assert server.metric("vae_inflight_requests") == 0


# ---- the properties -------------------------------------------------------------------------------------


def test_model_infer_answers_any_request_with_ok_or_a_documented_code(
    fuzz_server: ServerThread, stub: oip_grpc.GRPCInferenceServiceStub, exported_repository: Path
) -> None:
    seen: set[grpc.StatusCode] = set()

    @given(infer_requests())
    def infer(request: oip.ModelInferRequest) -> None:
        seen.add(outcome(lambda: stub.ModelInfer(request, timeout=TIMEOUT_S)))

    infer()
    assert grpc.StatusCode.INVALID_ARGUMENT in seen
    assert_server_answers_correctly(fuzz_server, stub, exported_repository)


def test_a_stream_answers_every_message_of_any_kind_and_ends_ok(
    fuzz_server: ServerThread, stub: oip_grpc.GRPCInferenceServiceStub, exported_repository: Path
) -> None:
    @settings(max_examples=max(4, settings().max_examples // 4))
    @given(st.lists(infer_requests(), min_size=1, max_size=6))
    def stream(requests: list[oip.ModelInferRequest]) -> None:
        replies = list(stub.ModelStreamInfer(iter(requests), timeout=TIMEOUT_S))
        assert len(replies) == len(requests)
        for reply in replies:
            if reply.error_message:
                code = reply.error_message.split(":", 1)[0]
                assert code in {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}, reply.error_message
                assert "Traceback" not in reply.error_message
            else:
                assert reply.infer_response.model_version == "1"

    stream()
    assert_server_answers_correctly(fuzz_server, stub, exported_repository)


def test_garbage_bytes_on_the_wire_get_invalid_argument(channel: grpc.Channel) -> None:
    @given(st.sampled_from(["ModelInfer", "ModelMetadata", "ModelConfig", "ModelReady"]), st.binary(max_size=64))
    def send(method: str, data: bytes) -> None:
        outcome(lambda: channel.unary_unary(f"/inference.GRPCInferenceService/{method}")(data, timeout=TIMEOUT_S))

    send()
    with pytest.raises(grpc.RpcError) as refused:
        channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(b"\xff\xff\xff", timeout=TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inference.ModelInferRequest" in str(refused.value.details())


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=6))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=6), inner, max_size=4), max_leaves=12)  # fmt: skip


@st.composite
def rest_bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A JSON request near the valid ones or any JSON value, or bytes; sometimes with a binary part."""
    shape = draw(SHAPES)
    datatype = draw(DATATYPES)
    tensor: dict[str, Any] = {"name": draw(NAMES), "shape": shape, "datatype": datatype}
    binary = b""
    if draw(st.booleans()):
        binary = data_for(shape, datatype, draw(st.sampled_from(["right", "short", "none", "extra"])))
        tensor["parameters"] = {"binary_data_size": draw(st.sampled_from([len(binary), len(binary) + 1, -1, "x"]))}
    else:
        tensor["data"] = draw(st.one_of(JSON_VALUES, st.lists(st.floats(0, 1), max_size=40)))
    body = {"inputs": [tensor], "parameters": draw(st.dictionaries(PARAMETER_NAMES, JSON_SCALARS, max_size=3))}
    if draw(st.booleans()):
        body["outputs"] = [{"name": draw(NAMES), "parameters": {"binary_data": draw(st.booleans())}}]
    header = draw(st.one_of(st.just(json.dumps(body).encode()), JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                            st.binary(max_size=64)))  # fmt: skip
    headers: dict[str, str] = {}
    if binary or draw(st.booleans()):
        headers["Inference-Header-Content-Length"] = draw(
            st.one_of(
                st.just(str(len(header))), st.sampled_from(["-1", "x", "", "99999999"]), st.integers(0, 64).map(str)
            )
        )
    return header + binary, headers


def test_rest_answers_any_body_with_a_documented_status_and_a_json_error(
    fuzz_server: ServerThread, stub: oip_grpc.GRPCInferenceServiceStub, exported_repository: Path
) -> None:
    statuses: set[int] = set()

    @given(st.sampled_from(KINDS), rest_bodies())
    def post(kind: str, body_and_headers: tuple[bytes, dict[str, str]]) -> None:
        body, headers = body_and_headers
        url = f"{fuzz_server.http_url}/v2/models/vae-mnist-{kind}/infer"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                status, reply = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, reply = error.code, error.read()
        assert status in REST_ALLOWED, reply
        statuses.add(status)
        if status != 200:
            refusal = json.loads(reply)
            assert set(refusal) == {"error"} and "Traceback" not in refusal["error"]

    post()
    assert 400 in statuses
    assert_server_answers_correctly(fuzz_server, stub, exported_repository)
