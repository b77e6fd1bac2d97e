"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`) on the typed API's port: every model
answers what the typed RPC of the same name answers, bit for bit, and bad requests get a status that says
what was wrong.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving.admin import set_label
from serving.api import oip, oip_grpc
from serving.client import VaeClient
from serving.grpc.oip_servicer import parameter_message
from serving.oip.models import Param
from tests.helpers import ServerThread, publish_copy, running_server

MODEL = "vae-mnist"
RNG = np.random.default_rng(7)
IMAGES = RNG.integers(0, 256, size=(3, 1, 28, 28), dtype=np.uint8)
LATENTS = RNG.standard_normal((4, 20)).astype(np.float32)


@pytest.fixture(scope="module")
def stub(vae_server: ServerThread) -> Iterator[oip_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(vae_server.target) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


def raw_input(request: oip.ModelInferRequest, name: str, array: np.ndarray, datatype: str) -> None:
    request.inputs.add(name=name, datatype=datatype, shape=array.shape)
    request.raw_input_contents.append(array.tobytes())


def infer(
    stub: oip_grpc.GRPCInferenceServiceStub, kind: str, inputs: dict[str, np.ndarray], **parameters: Param
) -> oip.ModelInferResponse:
    request = oip.ModelInferRequest(model_name=f"{MODEL}-{kind}", id=f"{kind}-1")
    for name, array in inputs.items():
        raw_input(request, name, array, "UINT8" if array.dtype == np.uint8 else "FP32")
    for name, value in parameters.items():
        request.parameters[name].CopyFrom(parameter_message(value))
    reply: oip.ModelInferResponse = stub.ModelInfer(request, timeout=30)
    return reply


_NUMPY = {"FP32": np.float32, "FP64": np.float64, "UINT8": np.uint8, "INT64": np.int64}


def outputs(reply: oip.ModelInferResponse) -> dict[str, np.ndarray]:
    """The reply's raw outputs as arrays, by name."""
    assert len(reply.raw_output_contents) == len(reply.outputs)
    return {
        tensor.name: np.frombuffer(data, dtype=_NUMPY[tensor.datatype]).reshape(tensor.shape)
        for tensor, data in zip(reply.outputs, reply.raw_output_contents, strict=True)
    }


def test_server_and_model_readiness_and_metadata(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ServerReady(oip.ServerReadyRequest()).ready
    assert stub.ModelReady(oip.ModelReadyRequest(name=f"{MODEL}-decoder")).ready
    assert stub.ModelReady(oip.ModelReadyRequest(name=f"{MODEL}-decoder", version="1")).ready
    assert not stub.ModelReady(oip.ModelReadyRequest(name=f"{MODEL}-decoder", version="2")).ready
    assert not stub.ModelReady(oip.ModelReadyRequest(name="other-decoder")).ready
    server = stub.ServerMetadata(oip.ServerMetadataRequest())
    assert server.name == "vae-serving" and "binary_tensor_data" in server.extensions
    metadata = stub.ModelMetadata(oip.ModelMetadataRequest(name=f"{MODEL}-encoder"))
    assert (metadata.name, list(metadata.versions)) == (f"{MODEL}-encoder", ["1"])
    assert metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("x", "FP32", [-1, 1, 28, 28])]
    assert [(t.name, list(t.shape)) for t in metadata.outputs] == [("mu", [-1, 20]), ("log_var", [-1, 20])]


def test_model_config_leaves_out_the_batch_dimension_of_batched_models(
    stub: oip_grpc.GRPCInferenceServiceStub, vae_server: ServerThread
) -> None:
    config = stub.ModelConfig(oip.ModelConfigRequest(name=f"{MODEL}-decoder")).config
    assert config.max_batch_size == vae_server.config.limits.max_items_per_request
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("z", oip.TYPE_FP32, [20])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("x", [1, 28, 28])]
    interpolate = stub.ModelConfig(oip.ModelConfigRequest(name=f"{MODEL}-interpolate")).config
    assert interpolate.max_batch_size == 0 and list(interpolate.input[0].dims) == [-1, 20]


def test_encoder_and_decoder_answer_what_the_typed_api_answers(
    stub: oip_grpc.GRPCInferenceServiceStub, vae_client: VaeClient
) -> None:
    encoded = outputs(infer(stub, "encoder", {"x": IMAGES}))
    typed = vae_client.encode(IMAGES)
    np.testing.assert_array_equal(encoded["mu"], typed.mu)
    np.testing.assert_array_equal(encoded["log_var"], typed.log_var)
    reply = infer(stub, "decoder", {"z": LATENTS}, output_datatype="UINT8")
    assert (reply.model_name, reply.model_version, reply.id) == (f"{MODEL}-decoder", "1", "decoder-1")
    np.testing.assert_array_equal(outputs(reply)["x"], vae_client.decode(LATENTS, output_dtype="uint8").images)


def test_fp32_images_answer_as_the_typed_api_answers_them(
    stub: oip_grpc.GRPCInferenceServiceStub, vae_client: VaeClient
) -> None:
    images = IMAGES.astype(np.float32) / 255.0
    encoded = outputs(infer(stub, "encoder", {"x": images}))
    np.testing.assert_array_equal(encoded["mu"], vae_client.encode(images).mu)
    scored = outputs(infer(stub, "score", {"x": images}, seed=3))
    np.testing.assert_array_equal(scored["negative_elbo"], vae_client.score(images, seed=3).negative_elbo)


def test_more_rows_than_the_limit_get_invalid_argument_naming_it(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        infer(stub, "decoder", {"z": np.zeros((1025, 20), np.float32)})
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is 1025, more than this server's limit of 1024 per request" in str(refused.value.details())


def test_seeded_operations_are_bit_identical_across_the_two_protocols(
    stub: oip_grpc.GRPCInferenceServiceStub, vae_client: VaeClient
) -> None:
    reply = infer(stub, "sample", {}, num_samples=5, seed=2**63 + 5, offset=3, temperature=0.5)
    sampled = outputs(reply)
    typed = vae_client.sample(5, seed=2**63 + 5, offset=3, temperature=0.5)
    np.testing.assert_array_equal(sampled["x"], typed.images)
    np.testing.assert_array_equal(sampled["z"], typed.latents)
    assert reply.parameters["seed"].uint64_param == 2**63 + 5 and reply.parameters["offset"].int64_param == 3

    scored = outputs(infer(stub, "score", {"x": IMAGES}, importance_samples=4, seed=11))
    typed_scores = vae_client.score(IMAGES, importance_samples=4, seed=11)
    for name in ("negative_elbo", "reconstruction", "kl", "complexity", "corrected", "iwae", "plugin_negative_elbo"):
        np.testing.assert_array_equal(scored[name], getattr(typed_scores, name), err_msg=name)

    rebuilt = outputs(infer(stub, "reconstruct", {"x": IMAGES}, sample_posterior=True, seed=3))
    typed_rebuilt = vae_client.reconstruct(IMAGES, sample_posterior=True, seed=3)
    np.testing.assert_array_equal(rebuilt["x"], typed_rebuilt.images)
    np.testing.assert_array_equal(rebuilt["kl"], typed_rebuilt.scores.kl)

    path = outputs(infer(stub, "interpolate", {"start": LATENTS[:2], "end": LATENTS[2:]}, steps=5, method="slerp"))
    typed_path = vae_client.interpolate(LATENTS[:2], LATENTS[2:], steps=5, method="slerp")
    np.testing.assert_array_equal(path["x"], typed_path.images)
    assert path["z"].shape == (2, 5, 20)

    swept = outputs(infer(stub, "traverse", {"origin": LATENTS[:1]}, dimensions="0,5", steps=4, low=-2.0, high=2.0))
    typed_sweep = vae_client.traverse(LATENTS[:1], dimensions=(0, 5), steps=4, low=-2.0, high=2.0)
    np.testing.assert_array_equal(swept["x"], typed_sweep.images)
    assert swept["dimensions"].tolist() == [0, 5] and swept["values"].tolist() == typed_sweep.values.tolist()


def test_typed_contents_are_answered_in_typed_contents(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    request = oip.ModelInferRequest(model_name=f"{MODEL}-decoder")
    tensor = request.inputs.add(name="z", datatype="FP32", shape=[2, 20])
    tensor.contents.fp32_contents.extend(LATENTS[:2].ravel().tolist())
    request.outputs.add(name="x")
    reply = stub.ModelInfer(request, timeout=30)
    assert not reply.raw_output_contents
    (output,) = reply.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("x", "FP32", [2, 1, 28, 28])
    raw = outputs(infer(stub, "decoder", {"z": LATENTS[:2]}))["x"]
    typed = np.asarray(output.contents.fp32_contents, dtype=np.float32).reshape(2, 1, 28, 28)
    np.testing.assert_array_equal(typed, raw)


def test_only_the_outputs_asked_for_come_back_in_their_order(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    request = oip.ModelInferRequest(model_name=f"{MODEL}-score")
    raw_input(request, "x", IMAGES, "UINT8")
    request.outputs.add(name="kl")
    request.outputs.add(name="negative_elbo")
    reply = stub.ModelInfer(request, timeout=30)
    assert [output.name for output in reply.outputs] == ["kl", "negative_elbo"]


def test_a_label_is_accepted_where_a_version_is_and_the_reply_names_the_number(
    stub: oip_grpc.GRPCInferenceServiceStub,
) -> None:
    request = oip.ModelInferRequest(model_name=f"{MODEL}-decoder", model_version="no-such-label")
    raw_input(request, "z", LATENTS, "FP32")
    with pytest.raises(grpc.RpcError) as missing:
        stub.ModelInfer(request, timeout=30)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "label 'no-such-label'" in str(missing.value.details())
    request.model_version = "1"
    assert stub.ModelInfer(request, timeout=30).model_version == "1"


def test_a_served_label_answers_over_both_protocols_and_the_reply_names_its_number(model_dir: Path) -> None:
    publish_copy(model_dir, 2)
    set_label(model_dir, "stable", 1)
    request = oip.ModelInferRequest(model_name=f"{MODEL}-decoder", model_version="stable")
    raw_input(request, "z", LATENTS, "FP32")
    with running_server(model_dir, poll_seconds=0) as server, grpc.insecure_channel(server.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelReady(oip.ModelReadyRequest(name=f"{MODEL}-decoder", version="stable"), timeout=30).ready
        assert stub.ModelInfer(request, timeout=30).model_version == "1"
        request.model_version = ""  # the default route: the newest version, no label set as the default
        assert stub.ModelInfer(request, timeout=30).model_version == "2"
        body = {"inputs": [{"name": "z", "datatype": "FP32", "shape": [4, 20], "data": LATENTS.ravel().tolist()}]}
        url = f"{server.http_url}/v2/models/{MODEL}-decoder/versions/stable/infer"
        post = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(post, timeout=30) as response:
            assert json.loads(response.read())["model_version"] == "1"


@pytest.mark.parametrize("method", ["ModelStatistics", "RepositoryIndex", "SystemSharedMemoryStatus", "TraceSetting"])
def test_the_rest_of_triton_s_rpcs_answer_unimplemented(vae_server: ServerThread, method: str) -> None:
    """Triton's superset beyond the eight RPCs served: tritonclient gets UNIMPLEMENTED, a clear 'not here'."""
    with grpc.insecure_channel(vae_server.target) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        with pytest.raises(grpc.RpcError) as refused:
            call(b"", timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_triton_s_timeout_parameter_is_the_request_s_deadline(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    """tritonclient's `infer(timeout=...)` sends microseconds as the parameter `timeout`: 1 µs has passed by the
    time the batcher looks, so the request is dropped unrun; a minute is plenty; a negative one is refused."""
    with pytest.raises(grpc.RpcError) as late:
        infer(stub, "decoder", {"z": LATENTS}, timeout=1)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline passed" in str(late.value.details())
    assert len(outputs(infer(stub, "decoder", {"z": LATENTS}, timeout=60_000_000))["x"]) == 4
    with pytest.raises(grpc.RpcError) as negative:
        infer(stub, "decoder", {"z": LATENTS}, timeout=-1)
    assert negative.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameter 'timeout' is -1; it is microseconds" in str(negative.value.details())


def bad_request(change: str) -> oip.ModelInferRequest:
    """A decoder request with one thing wrong."""
    request = oip.ModelInferRequest(model_name=f"{MODEL}-decoder")
    if change == "datatype":
        raw_input(request, "z", LATENTS.astype(np.float64), "FP64")
    elif change == "bytes":
        request.inputs.add(name="z", datatype="FP32", shape=[4, 20])
        request.raw_input_contents.append(LATENTS.tobytes()[:-4])
    elif change == "shape":
        raw_input(request, "z", LATENTS.reshape(8, 10), "FP32")
    elif change == "raw count":
        raw_input(request, "z", LATENTS, "FP32")
        request.raw_input_contents.append(b"")
    elif change == "input name":
        raw_input(request, "latents", LATENTS, "FP32")
    elif change == "parameter":
        raw_input(request, "z", LATENTS, "FP32")
        request.parameters["sede"].int64_param = 1
    elif change == "output":
        raw_input(request, "z", LATENTS, "FP32")
        request.outputs.add(name="mu")
    elif change == "negative dimension":
        request.inputs.add(name="z", datatype="FP32", shape=[-1, 20])
        request.raw_input_contents.append(b"")
    return request


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("datatype", "input 'z' has datatype 'FP64'; this model takes FP32"),
        ("bytes", "input 'z' has 316 bytes of data; shape [4, 20] of FP32 needs 320"),
        ("shape", "expected [N, 20]"),
        ("raw count", "2 raw_input_contents for 1 inputs"),
        ("input name", "decoder has no input 'latents'; its inputs: 'z'"),
        ("parameter", "decoder has no parameter 'sede'; its parameters: output_datatype"),
        ("output", "decoder has no output 'mu'"),
        ("negative dimension", "dimensions must be >= 0"),
    ],
)
def test_a_bad_request_gets_invalid_argument_saying_what_was_wrong(
    stub: oip_grpc.GRPCInferenceServiceStub, change: str, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(bad_request(change), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in str(refused.value.details())


def test_an_unknown_model_is_not_found_and_lists_the_models(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as missing:
        stub.ModelMetadata(oip.ModelMetadataRequest(name="resnet50"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"{MODEL}-encoder, {MODEL}-decoder, {MODEL}-sample" in str(missing.value.details())


def test_a_stream_answers_each_request_and_goes_on_after_a_bad_one(
    stub: oip_grpc.GRPCInferenceServiceStub, vae_server: ServerThread
) -> None:
    def counted(code: str) -> float:
        return vae_server.metric("vae_requests_total", method="ModelStreamInfer", code=code)

    def rows() -> float:
        return vae_server.metric("vae_request_items_sum", method="ModelStreamInfer")

    before = counted("OK"), counted("INVALID_ARGUMENT"), rows()

    def requests() -> Iterator[oip.ModelInferRequest]:
        for index in range(4):
            request = oip.ModelInferRequest(model_name=f"{MODEL}-decoder", id=str(index))
            raw_input(request, "z", LATENTS[index : index + 1], "FP32")
            yield request
        bad = bad_request("datatype")
        bad.id = "bad"
        yield bad
        last = oip.ModelInferRequest(model_name=f"{MODEL}-decoder", id="last")
        raw_input(last, "z", LATENTS[:2], "FP32")
        yield last

    replies = list(stub.ModelStreamInfer(requests(), timeout=30))
    answered = {reply.infer_response.id: reply for reply in replies if not reply.error_message}
    assert sorted(answered) == ["0", "1", "2", "3", "last"]
    (failed,) = [reply.error_message for reply in replies if reply.error_message]
    assert failed.startswith("INVALID_ARGUMENT: input 'z' has datatype 'FP64'") and "request id 'bad'" in failed
    for index in range(4):
        single = outputs(answered[str(index)].infer_response)["x"]
        assert single.shape == (1, 1, 28, 28)
    assert outputs(answered["last"].infer_response)["x"].shape == (2, 1, 28, 28)
    # each message is one request in the metrics (the stream itself is not one more): 5 answered, 6 rows, 1 refused
    assert (counted("OK"), counted("INVALID_ARGUMENT"), rows()) == (before[0] + 5, before[1] + 1, before[2] + 6)


def test_reflection_lists_the_inference_service(vae_server: ServerThread) -> None:
    with grpc.insecure_channel(vae_server.target) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {service.name for service in reply.list_services_response.service}
    assert {"inference.GRPCInferenceService", "vae.v1.VaeService"} <= names
