"""Property-based fuzzing of every RPC, through the stubs and as raw bytes on the wire.

Whatever a client sends (any shape, dtype, byte string, NaN/Inf, huge or empty counts, unknown enum values,
truncated or garbage protobuf), each call ends within its deadline with OK or a documented status code, and
the server still answers a correct request correctly afterwards. One server for the module; hypothesis runs
a bounded number of examples with no per-example deadline (the machine may be slow).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.api import pb, pb_grpc
from tests.helpers import DirectGraphs, ServerThread, running_server

T = TypeVar("T")
LATENT_DIM = 20
MAX_ITEMS = 64
MAX_STEPS = 16
MAX_STREAM_SAMPLES = 256
MAX_MESSAGE_BYTES = 256 * 1024
MAX_IMPORTANCE_SAMPLES = 8
TIMEOUT_S = 30.0  # a hang is a failure: no fuzzed call may need anything near this
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def fuzz_server(exported_repository: Path) -> Iterator[ServerThread]:
    with running_server(
        exported_repository,
        max_batch_size=32,
        max_queue_rows=256,
        max_items_per_request=MAX_ITEMS,
        max_interpolation_steps=MAX_STEPS,
        max_stream_samples=MAX_STREAM_SAMPLES,
        max_message_bytes=MAX_MESSAGE_BYTES,
        max_importance_samples=MAX_IMPORTANCE_SAMPLES,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def channel(fuzz_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_server.target, options=[("grpc.enable_retries", 0)]) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.VaeServiceStub:
    return pb_grpc.VaeServiceStub(channel)


def make(message: Callable[..., T], **fields: Any) -> T:
    """A protobuf message with any field values, unknown enum values included (the stubs' types refuse those)."""
    return message(**fields)


# ---- strategies -----------------------------------------------------------------------------------------

INT64 = st.integers(-(2**63), 2**63 - 1)
DIMS = st.one_of(st.integers(-2, 70), st.sampled_from([28, LATENT_DIM, 2**31, 2**62, -(2**63)]), INT64)
SHAPES = st.one_of(
    st.lists(DIMS, max_size=6),
    st.lists(st.integers(0, 2), min_size=30, max_size=80),  # ranks numpy cannot hold (> 64)
)
DTYPES = st.one_of(st.sampled_from([0, 1, 2]), st.integers(-(2**31), 2**31 - 1))
ENUMS = st.one_of(st.integers(0, 3), st.integers(-(2**31), 2**31 - 1))
VALUE_KINDS = ("unit", "nan", "inf", "negative", "huge", "uint8", "subnormal")


def _values(count: int, kind: str, rng: np.random.Generator) -> tuple[int, bytes]:
    """`count` values of one kind as (dtype enum, little-endian bytes)."""
    if kind == "uint8":
        return pb.DTYPE_UINT8, rng.integers(0, 256, count, dtype=np.uint8).tobytes()
    values = rng.random(count, dtype=np.float32)
    if count and kind != "unit":
        special = {"nan": np.nan, "inf": -np.inf, "negative": -0.5, "huge": 3e38, "subnormal": 1e-45}[kind]
        values[rng.integers(0, count)] = special
    return pb.DTYPE_FLOAT32, values.astype("<f4").tobytes()


@st.composite
def plausible_tensors(draw: st.DrawFn, kind: str) -> pb.Tensor:
    """Tensors near the valid ones: the right rank, counts around the limit, sometimes a wrong dimension,
    a wrong byte count or special values."""
    count = draw(st.one_of(st.integers(0, MAX_ITEMS + 6), st.just(1)))
    shape = [count, 1, 28, 28] if kind == "images" else [count, LATENT_DIM]
    if draw(st.booleans()) and draw(st.booleans()):
        position = draw(st.integers(1, len(shape) - 1))
        shape[position] = draw(st.sampled_from([0, 1, 19, 21, 27, 29]))
    dtype, data = _values(int(np.prod(shape)), draw(st.sampled_from(VALUE_KINDS)), np.random.default_rng(count))
    if draw(st.integers(0, 9)) == 0:
        data = data[: draw(st.integers(0, len(data)))]  # truncated data
    return make(pb.Tensor, shape=shape, dtype=dtype, data=data)


ARBITRARY_TENSORS = st.builds(
    lambda shape, dtype, data: make(pb.Tensor, shape=shape, dtype=dtype, data=data),
    SHAPES,
    DTYPES,
    st.one_of(st.binary(max_size=512), st.just(b"\0" * (MAX_MESSAGE_BYTES + 1))),  # the last: too large a message
)


def tensors(kind: str) -> st.SearchStrategy[pb.Tensor]:
    return st.one_of(plausible_tensors(kind), ARBITRARY_TENSORS, st.just(pb.Tensor()))


COUNTS = st.one_of(st.integers(0, MAX_ITEMS + 2), st.sampled_from([MAX_STREAM_SAMPLES, 2**31, 2**32 - 1]))
SEEDS = st.one_of(st.none(), st.integers(0, 2**64 - 1))
TEMPERATURES = st.one_of(st.none(), st.floats(width=32), st.sampled_from([0.0, -1.0, 10.0, 10.001, 1e-30]))


OFFSETS = st.one_of(st.just(0), st.integers(0, 2**64 - 1))
U32 = st.one_of(st.integers(0, 20), st.integers(0, 2**32 - 1))


def sample_requests(counts: st.SearchStrategy[int]) -> st.SearchStrategy[pb.SampleRequest]:
    return st.builds(
        lambda n, seed, temperature, dtype, offset: make(
            pb.SampleRequest, num_samples=n, seed=seed, temperature=temperature, output_dtype=dtype, offset=offset
        ),
        counts,
        SEEDS,
        TEMPERATURES,
        ENUMS,
        OFFSETS,
    )


# ---- checks ---------------------------------------------------------------------------------------------


def outcome(call: Callable[[], Any]) -> tuple[grpc.StatusCode, Any]:
    try:
        return grpc.StatusCode.OK, call()
    except grpc.RpcError as error:
        assert error.code() in ALLOWED, f"{error.code()}: {error.details()}"
        assert "Traceback" not in (error.details() or "")
        return error.code(), None


def shape(tensor: pb.Tensor) -> list[int]:
    return list(tensor.shape)


def assert_images_in_unit_range(images: pb.Tensor) -> None:
    """A wrong answer is worse than a refusal: OK images are finite and in [0, 1] (or uint8)."""
    if images.dtype == pb.DTYPE_FLOAT32:
        pixels = np.frombuffer(images.data, "<f4")
        assert np.isfinite(pixels).all() and pixels.min() >= 0.0 and pixels.max() <= 1.0
    else:
        assert images.dtype == pb.DTYPE_UINT8


def assert_server_answers_correctly(server: ServerThread, stub: pb_grpc.VaeServiceStub, model_dir: Path) -> None:
    latents = np.random.default_rng(7).standard_normal((3, LATENT_DIM)).astype(np.float32)
    reply = stub.Decode(
        make(pb.DecodeRequest, latents=make(pb.Tensor, shape=[3, LATENT_DIM], dtype=1, data=latents.tobytes()))
    )
    images = np.frombuffer(reply.images.data, "<f4").reshape(3, 1, 28, 28)
    np.testing.assert_allclose(images, DirectGraphs(model_dir).decode(latents), atol=1e-5)
    assert server.metric("vae_requests_total", method="Decode", code="INTERNAL") == 0
    assert server.metric("vae_inflight_requests") == 0


# ---- the properties -------------------------------------------------------------------------------------


def test_encode_answers_any_tensor_with_ok_or_a_documented_code(
    fuzz_server: ServerThread, stub: pb_grpc.VaeServiceStub, exported_repository: Path
) -> None:
    @given(tensors("images"))
    def encode(images: pb.Tensor) -> None:
        code, reply = outcome(lambda: stub.Encode(make(pb.EncodeRequest, images=images), timeout=TIMEOUT_S))
        if code == grpc.StatusCode.OK:
            assert shape(reply.mu) == shape(reply.log_var) == [images.shape[0], LATENT_DIM]

    encode()
    assert_server_answers_correctly(fuzz_server, stub, exported_repository)


def test_decode_answers_any_tensor_and_output_dtype_with_ok_or_a_documented_code(
    fuzz_server: ServerThread, stub: pb_grpc.VaeServiceStub, exported_repository: Path
) -> None:
    @given(tensors("latents"), ENUMS)
    def decode(latents: pb.Tensor, output_dtype: int) -> None:
        request = make(pb.DecodeRequest, latents=latents, output_dtype=output_dtype)
        code, reply = outcome(lambda: stub.Decode(request, timeout=TIMEOUT_S))
        if code == grpc.StatusCode.OK:
            assert shape(reply.images) == [latents.shape[0], 1, 28, 28]
            assert output_dtype in (0, 1, 2)
            assert_images_in_unit_range(reply.images)

    decode()
    assert_server_answers_correctly(fuzz_server, stub, exported_repository)


def test_sample_answers_any_count_seed_temperature_and_dtype(
    fuzz_server: ServerThread, stub: pb_grpc.VaeServiceStub, exported_repository: Path
) -> None:
    @given(sample_requests(COUNTS))
    def sample(request: pb.SampleRequest) -> None:
        code, reply = outcome(lambda: stub.Sample(request, timeout=TIMEOUT_S))
        if code == grpc.StatusCode.OK:
            assert 1 <= request.num_samples <= MAX_ITEMS
            assert shape(reply.latents) == [request.num_samples, LATENT_DIM]
            assert len(reply.images.data) == request.num_samples * 784 * (1 if reply.images.dtype == 2 else 4)
            assert_images_in_unit_range(reply.images)

    sample()
    assert_server_answers_correctly(fuzz_server, stub, exported_repository)


def test_sample_stream_answers_any_request_and_streams_at_most_the_limit(
    fuzz_server: ServerThread, stub: pb_grpc.VaeServiceStub, exported_repository: Path
) -> None:
    @given(sample_requests(st.one_of(COUNTS, st.integers(MAX_STREAM_SAMPLES - 2, MAX_STREAM_SAMPLES + 2))))
    def sample_stream(request: pb.SampleRequest) -> None:
        code, rows = outcome(
            lambda: sum(reply.latents.shape[0] for reply in stub.SampleStream(request, timeout=TIMEOUT_S))
        )
        if code == grpc.StatusCode.OK:
            assert rows == request.num_samples <= MAX_STREAM_SAMPLES

    sample_stream()
    assert_server_answers_correctly(fuzz_server, stub, exported_repository)


def test_interpolate_answers_any_endpoints_steps_and_method(
    fuzz_server: ServerThread, stub: pb_grpc.VaeServiceStub, exported_repository: Path
) -> None:
    kinds = st.sampled_from(["images", "latents"])
    steps = st.one_of(st.integers(0, MAX_STEPS + 2), st.integers(0, 2**32 - 1))

    @given(kinds.flatmap(tensors), kinds.flatmap(tensors), steps, ENUMS, ENUMS, st.booleans())
    def interpolate(start: pb.Tensor, end: pb.Tensor, steps: int, method: int, dtype: int, same: bool) -> None:
        request = make(
            pb.InterpolateRequest,
            start=start,
            end=start if same else end,
            steps=steps,
            method=method,
            output_dtype=dtype,
        )
        code, reply = outcome(lambda: stub.Interpolate(request, timeout=TIMEOUT_S))
        if code == grpc.StatusCode.OK:
            assert shape(reply.latents) == [start.shape[0], steps, LATENT_DIM]
            assert_images_in_unit_range(reply.images)

    interpolate()
    assert_server_answers_correctly(fuzz_server, stub, exported_repository)


def test_score_answers_any_images_and_importance_samples(
    fuzz_server: ServerThread, stub: pb_grpc.VaeServiceStub, exported_repository: Path
) -> None:
    @given(tensors("images"), U32, SEEDS)
    def score(images: pb.Tensor, samples: int, seed: int | None) -> None:
        request = make(pb.ScoreRequest, images=images, importance_samples=samples, seed=seed)
        code, reply = outcome(lambda: stub.Score(request, timeout=TIMEOUT_S))
        if code == grpc.StatusCode.OK:
            assert len(reply.scores) == images.shape[0] <= MAX_ITEMS
            assert samples <= MAX_IMPORTANCE_SAMPLES and images.shape[0] * samples <= MAX_ITEMS
            for row in reply.scores:
                assert np.isfinite([row.negative_elbo, row.kl, row.complexity, row.corrected]).all()
                assert row.kl >= 0 and row.reconstruction >= 0 and row.HasField("iwae") == (samples > 0)

    score()
    assert_server_answers_correctly(fuzz_server, stub, exported_repository)


def test_reconstruct_answers_any_images_seed_and_dtype(
    fuzz_server: ServerThread, stub: pb_grpc.VaeServiceStub, exported_repository: Path
) -> None:
    @given(tensors("images"), st.booleans(), SEEDS, ENUMS)
    def reconstruct(images: pb.Tensor, sample_posterior: bool, seed: int | None, dtype: int) -> None:
        request = make(
            pb.ReconstructRequest, images=images, sample_posterior=sample_posterior, seed=seed, output_dtype=dtype
        )
        code, reply = outcome(lambda: stub.Reconstruct(request, timeout=TIMEOUT_S))
        if code == grpc.StatusCode.OK:
            assert shape(reply.latents) == [images.shape[0], LATENT_DIM] and len(reply.scores) == images.shape[0]
            assert_images_in_unit_range(reply.images)

    reconstruct()
    assert_server_answers_correctly(fuzz_server, stub, exported_repository)


def test_traverse_answers_any_origin_dimensions_range_and_steps(
    fuzz_server: ServerThread, stub: pb_grpc.VaeServiceStub, exported_repository: Path
) -> None:
    kinds = st.sampled_from(["images", "latents"])
    dimensions = st.lists(st.one_of(st.integers(0, LATENT_DIM), st.integers(0, 2**32 - 1)), max_size=6)
    ends = st.one_of(st.none(), st.floats(width=32), st.sampled_from([-3.0, 3.0, 1e4, 1e5]))
    steps = st.one_of(st.none(), U32)

    @given(kinds.flatmap(tensors), dimensions, ends, ends, steps, st.booleans(), ENUMS)
    def traverse(
        origin: pb.Tensor, dims: list[int], low: float | None, high: float | None, n: int | None, rel: bool, dtype: int
    ) -> None:
        request = make(
            pb.TraverseRequest,
            origin=origin,
            dimensions=dims,
            low=low,
            high=high,
            steps=n,
            relative=rel,
            output_dtype=dtype,
        )
        code, reply = outcome(lambda: stub.Traverse(request, timeout=TIMEOUT_S))
        if code == grpc.StatusCode.OK:
            rows = len(dims) or LATENT_DIM
            assert origin.shape[0] == 1 and shape(reply.latents) == [rows, 9 if n is None else n, LATENT_DIM]
            assert list(reply.dimensions) == (dims or list(range(LATENT_DIM)))
            assert_images_in_unit_range(reply.images)

    traverse()
    assert_server_answers_correctly(fuzz_server, stub, exported_repository)


# ---- raw bytes on the wire ------------------------------------------------------------------------------

VALID_REQUESTS: dict[str, bytes] = {
    "Encode": make(
        pb.EncodeRequest,
        images=make(pb.Tensor, shape=[2, 1, 28, 28], dtype=1, data=np.full(2 * 784, 0.5, "<f4").tobytes()),
    ).SerializeToString(),
    "Decode": make(
        pb.DecodeRequest,
        latents=make(pb.Tensor, shape=[2, LATENT_DIM], dtype=1, data=np.zeros(2 * LATENT_DIM, "<f4").tobytes()),
        output_dtype=2,
    ).SerializeToString(),
    "Sample": make(pb.SampleRequest, num_samples=3, seed=1, temperature=0.5).SerializeToString(),
    "SampleStream": make(pb.SampleRequest, num_samples=100, seed=1).SerializeToString(),
    "Interpolate": make(
        pb.InterpolateRequest,
        start=make(pb.Tensor, shape=[1, LATENT_DIM], dtype=1, data=np.zeros(LATENT_DIM, "<f4").tobytes()),
        end=make(pb.Tensor, shape=[1, LATENT_DIM], dtype=1, data=np.ones(LATENT_DIM, "<f4").tobytes()),
        steps=4,
        method=2,
    ).SerializeToString(),
    "GetModelInfo": b"",
    "Score": make(
        pb.ScoreRequest,
        images=make(pb.Tensor, shape=[2, 1, 28, 28], dtype=2, data=bytes(2 * 784)),
        importance_samples=3,
    ).SerializeToString(),
    "Reconstruct": make(
        pb.ReconstructRequest,
        images=make(pb.Tensor, shape=[1, 1, 28, 28], dtype=2, data=bytes(784)),
        sample_posterior=True,
    ).SerializeToString(),
    "Traverse": make(
        pb.TraverseRequest,
        origin=make(pb.Tensor, shape=[1, LATENT_DIM], dtype=1, data=np.zeros(LATENT_DIM, "<f4").tobytes()),
        dimensions=[0, 5],
        steps=3,
    ).SerializeToString(),
}


@st.composite
def wire_bytes(draw: st.DrawFn) -> tuple[str, bytes]:
    """(method, bytes): garbage, a truncated valid request, a valid one with flipped bytes, or one with junk after."""
    method = draw(st.sampled_from(sorted(VALID_REQUESTS)))
    valid = draw(st.sampled_from(list(VALID_REQUESTS.values())))  # sometimes another method's message
    how = draw(st.sampled_from(["garbage", "truncated", "flipped", "appended"]))
    if how == "garbage":
        return method, draw(st.binary(max_size=256))
    if how == "truncated":
        return method, valid[: draw(st.integers(0, max(0, len(valid) - 1)))]
    if how == "flipped" and valid:
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return method, bytes(data)
    return method, valid + draw(st.binary(min_size=1, max_size=32))


def test_raw_malformed_bytes_get_invalid_argument_or_a_documented_code(
    fuzz_server: ServerThread, channel: grpc.Channel, stub: pb_grpc.VaeServiceStub, exported_repository: Path
) -> None:
    seen: set[grpc.StatusCode] = set()

    @settings(max_examples=settings().max_examples * 5 // 2)  # the loaded profile's, x2.5: bytes are cheap
    @given(wire_bytes())
    def send(method_and_bytes: tuple[str, bytes]) -> None:
        method, data = method_and_bytes
        path = f"/vae.v1.VaeService/{method}"
        if method == "SampleStream":
            call = channel.unary_stream(path)  # no serializers: the bytes go out as they are
            code, _ = outcome(lambda: [len(reply) for reply in call(data, timeout=TIMEOUT_S)])
        else:
            code, _ = outcome(lambda: channel.unary_unary(path)(data, timeout=TIMEOUT_S))
        seen.add(code)

    send()
    assert grpc.StatusCode.INVALID_ARGUMENT in seen
    garbage = channel.unary_unary("/vae.v1.VaeService/Decode")
    with pytest.raises(grpc.RpcError) as refused:
        garbage(b"\xff\xff\xff\xff", timeout=TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        refused.value.details() == "the request is not a valid vae.v1.DecodeRequest message (malformed protobuf bytes)"
    )
    health = channel.unary_unary("/grpc.health.v1.Health/Check")
    with pytest.raises(grpc.RpcError) as refused:
        health(b"\x0a\xff", timeout=TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_server_answers_correctly(fuzz_server, stub, exported_repository)
    assert fuzz_server.metric("vae_requests_total", method="Decode", code="INVALID_ARGUMENT") >= 1


def test_get_model_info_ignores_unknown_fields(stub: pb_grpc.VaeServiceStub, channel: grpc.Channel) -> None:
    unknown_field = b"\x08\x01\x12\x03abc"  # fields 1 and 2, which GetModelInfoRequest does not have
    reply = pb.ModelInfo.FromString(channel.unary_unary("/vae.v1.VaeService/GetModelInfo")(unknown_field))
    assert reply == stub.GetModelInfo(pb.GetModelInfoRequest()) and reply.latent_dim == LATENT_DIM


def test_huge_finite_latents_are_refused_not_decoded_into_nan(stub: pb_grpc.VaeServiceStub) -> None:
    """Found by the decode property: latents of 3e38 overflow the decoder, whose images came back NaN."""
    latents = np.full((1, LATENT_DIM), 3e38, "<f4")
    with pytest.raises(grpc.RpcError) as refused:
        stub.Decode(
            make(pb.DecodeRequest, latents=make(pb.Tensor, shape=[1, LATENT_DIM], dtype=1, data=latents.tobytes()))
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "latents must lie in [-10000, 10000]" in (refused.value.details() or "")


def test_health_watch_still_streams_through_the_malformed_request_guard(channel: grpc.Channel) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # a handler that uses context.write
    watch.cancel()
