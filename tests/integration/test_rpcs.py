"""Every RPC end to end through the public client against a real server and real exported graphs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from contract.interpolation import interpolate
from contract.manifest import decode, public_json
from serving.api import pb
from serving.client import VaeClient, VaeError
from serving.dataplane.draws import normal_rows
from tests.helpers import DirectGraphs, ServerThread

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def graphs(exported_repository: Path) -> DirectGraphs:
    return DirectGraphs(exported_repository)


def digits(count: int, seed: int = 0) -> np.ndarray:
    """Images in [0, 1] the graphs can take (their content does not matter for equality)."""
    return np.random.default_rng(seed).random((count, 1, 28, 28), dtype=np.float32)


def test_encode_equals_the_encoder_graph(vae_client: VaeClient, graphs: DirectGraphs) -> None:
    images = digits(5)
    posterior = vae_client.encode(images)
    expected_mu, expected_log_var = graphs.encode(images)
    assert posterior.mu.shape == (5, 20) and posterior.mu.dtype == np.float32
    np.testing.assert_allclose(posterior.mu, expected_mu, atol=TOLERANCE)
    np.testing.assert_allclose(posterior.log_var, expected_log_var, atol=TOLERANCE)


def test_encode_takes_uint8_images_as_x_over_255(vae_client: VaeClient, graphs: DirectGraphs) -> None:
    pixels = (digits(3) * 255).astype(np.uint8)
    mu = vae_client.encode(pixels).mu
    np.testing.assert_allclose(mu, graphs.encode(pixels.astype(np.float32) / 255.0)[0], atol=TOLERANCE)


def test_decode_equals_the_decoder_graph_and_uint8_is_rounded(vae_client: VaeClient, graphs: DirectGraphs) -> None:
    latents = np.random.default_rng(1).standard_normal((7, 20)).astype(np.float32)
    images = vae_client.decode(latents).images
    expected = graphs.decode(latents)
    assert images.shape == (7, 1, 28, 28) and images.dtype == np.float32
    np.testing.assert_allclose(images, expected, atol=TOLERANCE)
    pixels = vae_client.decode(latents, output_dtype="uint8").images
    assert pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - np.rint(expected * 255)).max() <= 1  # rounding at exact .5 may differ


def test_large_requests_run_in_chunks_with_the_same_results(
    vae_server: ServerThread, vae_client: VaeClient, graphs: DirectGraphs
) -> None:
    runs, rows = (vae_server.metric(f"vae_batch_rows_{kind}", graph="decoder") for kind in ("count", "sum"))
    latents = np.random.default_rng(2).standard_normal((150, 20)).astype(np.float32)
    np.testing.assert_allclose(vae_client.decode(latents).images, graphs.decode(latents), atol=TOLERANCE)
    assert vae_server.metric("vae_batch_rows_count", graph="decoder") - runs == 3  # 64 + 64 + 22
    assert vae_server.metric("vae_batch_rows_sum", graph="decoder") - rows == 150


def test_sample_same_seed_same_images(vae_client: VaeClient, graphs: DirectGraphs) -> None:
    drawn, again = vae_client.sample(6, seed=42), vae_client.sample(6, seed=42)
    np.testing.assert_array_equal(drawn.images, again.images)
    np.testing.assert_array_equal(drawn.latents, again.latents)
    np.testing.assert_array_equal(drawn.latents, normal_rows(42, 0, 6, 20))  # serving.dataplane.draws' generator
    np.testing.assert_allclose(drawn.images, graphs.decode(drawn.latents), atol=TOLERANCE)
    assert not np.array_equal(drawn.images, vae_client.sample(6, seed=43).images)


def test_sample_without_seed_differs_and_temperature_scales_the_prior(vae_client: VaeClient) -> None:
    first, second = vae_client.sample(4).latents, vae_client.sample(4).latents
    assert not np.array_equal(first, second)
    unit = vae_client.sample(4, seed=7).latents
    hot = vae_client.sample(4, seed=7, temperature=2.0).latents
    np.testing.assert_allclose(hot, unit * 2.0, rtol=1e-6)


def test_sample_stream_yields_the_same_samples_in_chunks(vae_client: VaeClient) -> None:
    chunks = list(vae_client.sample_stream(150, seed=3))
    assert [len(chunk.images) for chunk in chunks] == [64, 64, 22]
    whole = vae_client.sample(150, seed=3)
    np.testing.assert_array_equal(np.concatenate([chunk.latents for chunk in chunks]), whole.latents)
    np.testing.assert_allclose(np.concatenate([chunk.images for chunk in chunks]), whole.images, atol=TOLERANCE)


def test_sample_stream_stops_when_the_client_goes_away(vae_server: ServerThread, vae_client: VaeClient) -> None:
    before = vae_server.metric("vae_batch_rows_sum", graph="decoder")
    stream = vae_client.sample_stream(100_000, seed=1)
    next(stream)
    stream.close()  # cancels the RPC
    from tests.helpers import wait_until

    wait_until(lambda: vae_server.metric("vae_inflight_requests") == 0, what="the stream to end on the server")
    assert vae_server.metric("vae_batch_rows_sum", graph="decoder") - before < 1_000  # not 100,000


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_interpolate_latents_decodes_the_path(vae_client: VaeClient, graphs: DirectGraphs, method: str) -> None:
    rng = np.random.default_rng(4)
    start, end = rng.standard_normal((2, 3, 20)).astype(np.float32)
    result = vae_client.interpolate(start, end, steps=5, method=method)
    images, path = result.images, result.latents
    assert images.shape == (3, 5, 1, 28, 28) and path.shape == (3, 5, 20)
    np.testing.assert_allclose(path, interpolate(start, end, 5, method), atol=TOLERANCE)
    np.testing.assert_allclose(images.reshape(15, 1, 28, 28), graphs.decode(path.reshape(15, 20)), atol=TOLERANCE)


def test_slerp_between_opposite_or_parallel_latents_stays_on_the_line(vae_client: VaeClient) -> None:
    """sin(omega) ~ 0 at both ends of the angle range: no great circle is defined, the path is the chord."""
    start = np.array([[1.0, 2.0, 3.0] + [0.0] * 17, [1.0, 2.0, 3.0] + [0.0] * 17], np.float32)
    end = np.stack([-start[0], 2 * start[1]])  # opposite, and parallel
    path = vae_client.interpolate(start, end, steps=5, method="slerp").latents
    a = np.linspace(0, 1, 5)[None, :, None]
    np.testing.assert_allclose(path, (1 - a) * start[:, None] + a * end[:, None], atol=1e-6)
    assert np.isfinite(path).all()


def test_interpolate_images_walks_between_their_encoder_means(vae_client: VaeClient, graphs: DirectGraphs) -> None:
    start, end = digits(2, seed=5), digits(2, seed=6)
    result = vae_client.interpolate(start, end, steps=4, output_dtype="uint8")
    images, path = result.images, result.latents
    np.testing.assert_allclose(path[:, 0], graphs.encode(start)[0], atol=TOLERANCE)
    np.testing.assert_allclose(path[:, -1], graphs.encode(end)[0], atol=TOLERANCE)
    assert images.dtype == np.uint8 and images.shape == (2, 4, 1, 28, 28)


def test_model_info_reports_the_manifest_and_provider(vae_client: VaeClient, exported_repository: Path) -> None:
    info = vae_client.model_info()
    manifest = (exported_repository / "1" / "model.json").read_bytes()
    assert (info.name, info.model_version, info.latent_dim, info.image_shape) == ("vae-mnist", 1, 20, (1, 28, 28))
    assert info.provider == "CPUExecutionProvider"
    assert info.manifest == json.loads(public_json(decode(manifest)))  # model.json without the exporter's paths
    assert info.manifest["training"]["checkpoint"] == "best.pt"


def test_health_is_serving_for_the_server_and_the_service(vae_server: ServerThread) -> None:
    with grpc.insecure_channel(vae_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "vae.v1.VaeService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_service(vae_server: ServerThread) -> None:
    with grpc.insecure_channel(vae_server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="vae.v1.VaeService"),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    names = {service.name for service in listed.list_services_response.service}
    assert {"vae.v1.VaeService", "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto  # the proto, so tools need no .proto file


def raw_call(target: str, method: str, request: Any) -> grpc.RpcError:
    """Send a hand-built request (bypassing the client's conversions) and return the error it gets."""
    with grpc.insecure_channel(target) as channel:
        stub = __import__("serving.api", fromlist=["pb_grpc"]).pb_grpc.VaeServiceStub(channel)
        try:
            getattr(stub, method)(request, timeout=10)
        except grpc.RpcError as error:
            return error
    raise AssertionError(f"{method} succeeded but should have failed")


def tensor(shape: list[int], dtype: int = pb.DTYPE_FLOAT32, data: bytes | None = None, fill: float = 0.0) -> pb.Tensor:
    count = int(np.prod(shape))
    if data is None:
        data = np.full(count, fill, np.float32 if dtype == pb.DTYPE_FLOAT32 else np.uint8).tobytes()
    return pb.Tensor(shape=shape, dtype=dtype, data=data)  # type: ignore[arg-type]  # any int, on purpose


UNKNOWN_ENUM: Any = 7  # proto3 enums are open: a client can send numbers the server does not know

INVALID: list[tuple[str, Callable[[], Any], str]] = [
    (
        "Encode",
        lambda: pb.EncodeRequest(images=tensor([2, 28, 28])),
        "images has shape [2, 28, 28]; expected [N, 1, 28, 28]",
    ),
    ("Encode", lambda: pb.EncodeRequest(images=tensor([1, 1, 28, 28], fill=2.0)), "FLOAT32 images must lie in [0, 1]"),
    ("Encode", lambda: pb.EncodeRequest(images=tensor([1, 1, 28, 28], fill=np.nan)), "784 NaN or infinite values"),
    ("Encode", lambda: pb.EncodeRequest(images=tensor([1, 1, 28, 28], data=b"\0" * 10)), "images.data has 10 bytes"),
    ("Encode", lambda: pb.EncodeRequest(), "images is missing: set its shape, dtype and data"),
    ("Encode", lambda: pb.EncodeRequest(images=tensor([0, 1, 28, 28])), "number of images must be at least 1, got 0"),
    ("Decode", lambda: pb.DecodeRequest(latents=tensor([2, 3])), "latents has shape [2, 3]; expected [N, 20]"),
    ("Decode", lambda: pb.DecodeRequest(latents=tensor([1, 20], pb.DTYPE_UINT8)), "latents must be FLOAT32"),
    ("Decode", lambda: pb.DecodeRequest(latents=tensor([1, 20], fill=np.inf)), "20 NaN or infinite values"),
    (
        "Decode",
        lambda: pb.DecodeRequest(latents=tensor([1, 20]), output_dtype=UNKNOWN_ENUM),
        "output_dtype 7 is not a known DType",
    ),
    ("Decode", lambda: pb.DecodeRequest(latents=tensor([1025, 20])), "limit of 1024 per request"),
    ("Sample", lambda: pb.SampleRequest(num_samples=0), "num_samples must be at least 1, got 0"),
    (
        "Sample",
        lambda: pb.SampleRequest(num_samples=2000),
        "num_samples is 2000, more than this server's limit of 1024",
    ),
    ("Sample", lambda: pb.SampleRequest(num_samples=1, temperature=-1.0), "temperature is -1.0; it must be in (0, 10]"),
    ("Interpolate", lambda: pb.InterpolateRequest(start=tensor([1, 20]), end=tensor([1, 20]), steps=1), "steps is 1"),
    (
        "Interpolate",
        lambda: pb.InterpolateRequest(start=tensor([1, 20]), end=tensor([1, 20]), steps=3, method=UNKNOWN_ENUM),
        "method 7 is not a known InterpolationMethod",
    ),
    (
        "Interpolate",
        lambda: pb.InterpolateRequest(start=tensor([1, 20]), end=tensor([2, 20]), steps=3),
        "start has shape [1, 20] but end has [2, 20]",
    ),
    (
        "Interpolate",
        lambda: pb.InterpolateRequest(start=tensor([300, 20]), end=tensor([300, 20]), steps=4),
        "300 pairs x 4 steps = 1200 images",
    ),
]


@pytest.mark.parametrize(
    ("method", "build", "message"), INVALID, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(INVALID)]
)
def test_invalid_requests_get_invalid_argument_with_a_precise_message(
    vae_server: ServerThread, method: str, build: Callable[[], Any], message: str
) -> None:
    error = raw_call(vae_server.target, method, build())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()
    assert "Traceback" not in error.details()


def test_client_raises_vae_error_with_code_and_message(vae_client: VaeClient) -> None:
    with pytest.raises(VaeError) as raised:
        vae_client.decode(np.zeros((1, 3), np.float32))
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(raised.value).startswith("INVALID_ARGUMENT: latents has shape [1, 3]")


def test_messages_over_the_size_limit_get_resource_exhausted(vae_server: ServerThread) -> None:
    too_big = pb.EncodeRequest(images=pb.Tensor(shape=[1], dtype=pb.DTYPE_UINT8, data=b"\0" * (17 * 1024 * 1024)))
    error = raw_call(vae_server.target, "Encode", too_big)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_sample_stream_validates_before_streaming(vae_client: VaeClient) -> None:
    for count, message in ((0, "num_samples must be at least 1, got 0"), (2_000_000, "limit of 1000000 per request")):
        with pytest.raises(VaeError) as raised:
            list(vae_client.sample_stream(count))
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert message in raised.value.details
