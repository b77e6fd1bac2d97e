"""The client checks every reply against its request: a reply with other counts than asked for (rows, paths,
steps, scores), a stream whose chunks skip rows or stop short, or a manifest that is not JSON is the server's
fault, raised as VaeError(INTERNAL) with what was wrong, never handed on or let out as another exception.

The server here is a fake VaeService (a real grpc.aio server on 127.0.0.1) that answers each method with
the reply a test sets, however wrong.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from serving.api import SERVICE_METHODS, pb, pb_grpc
from serving.api.tensors import tensor_to_proto
from serving.client import VaeClient, VaeError

LATENT_DIM = 4
IMAGE = (1, 28, 28)


class FakeVae(pb_grpc.VaeServiceServicer):
    """Answers every call with `replies[method]` (SampleStream: the list of its messages)."""

    def __init__(self) -> None:
        self.replies: dict[str, Any] = {}

    async def Encode(self, request: Any, context: Any) -> Any:
        return self.replies["Encode"]

    async def Decode(self, request: Any, context: Any) -> Any:
        return self.replies["Decode"]

    async def Sample(self, request: Any, context: Any) -> Any:
        return self.replies["Sample"]

    async def SampleStream(self, request: Any, context: Any) -> Any:
        for reply in self.replies["SampleStream"]:
            yield reply

    async def Interpolate(self, request: Any, context: Any) -> Any:
        return self.replies["Interpolate"]

    async def Score(self, request: Any, context: Any) -> Any:
        return self.replies["Score"]

    async def Reconstruct(self, request: Any, context: Any) -> Any:
        return self.replies["Reconstruct"]

    async def Traverse(self, request: Any, context: Any) -> Any:
        return self.replies["Traverse"]

    async def GetModelInfo(self, request: Any, context: Any) -> Any:
        return self.replies["GetModelInfo"]

    async def CompareVersions(self, request: Any, context: Any) -> Any:
        return self.replies["CompareVersions"]


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[FakeVae, str]]:
    """The fake on a free 127.0.0.1 port, served by an event loop in a thread of its own."""
    servicer = FakeVae()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-vae", daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        pb_grpc.add_VaeServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    yield servicer, f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


@pytest.fixture
def fake(fake_server: tuple[FakeVae, str]) -> Iterator[tuple[FakeVae, VaeClient]]:
    servicer, target = fake_server
    servicer.replies = well_formed_replies()
    with VaeClient(target, timeout_s=10, retries=0) as client:
        yield servicer, client


def tensor(*shape: int) -> pb.Tensor:
    return tensor_to_proto(np.zeros(shape, np.float32))


def scores(count: int) -> list[pb.ImageScore]:
    return [pb.ImageScore(negative_elbo=100.0) for _ in range(count)]


def samples(rows: int, offset: int) -> pb.SampleResponse:
    return pb.SampleResponse(images=tensor(rows, *IMAGE), latents=tensor(rows, LATENT_DIM), offset=offset, seed=1)


def well_formed_replies() -> dict[str, Any]:
    """Replies that answer the calls of `CALLS` (one image or latent, 3 steps, 2 traversed dimensions)."""
    return {
        "Encode": pb.EncodeResponse(mu=tensor(1, LATENT_DIM), log_var=tensor(1, LATENT_DIM), model_version=1),
        "Decode": pb.DecodeResponse(images=tensor(1, *IMAGE), model_version=1),
        "Sample": samples(1, offset=0),
        "SampleStream": [samples(2, offset=0), samples(1, offset=2)],
        "Interpolate": pb.InterpolateResponse(images=tensor(1, 3, *IMAGE), latents=tensor(1, 3, LATENT_DIM)),
        "Score": pb.ScoreResponse(scores=scores(1), model_version=1),
        "Reconstruct": pb.ReconstructResponse(
            images=tensor(1, *IMAGE), latents=tensor(1, LATENT_DIM), scores=scores(1), model_version=1
        ),
        "Traverse": pb.TraverseResponse(
            images=tensor(2, 3, *IMAGE), latents=tensor(2, 3, LATENT_DIM), dimensions=[0, 1], values=[-1, 0, 1]
        ),
        "GetModelInfo": pb.ModelInfo(name="vae-mnist", version=1, manifest_json='{"name": "vae-mnist"}'),
        "CompareVersions": pb.VersionComparison(candidate=2, stable=1, paired_inputs=300, share_worse=0.4),
    }


ONE_LATENT = np.zeros((1, LATENT_DIM), np.float32)
ONE_IMAGE = np.zeros((1, *IMAGE), np.float32)

# Each method called as the well-formed replies answer it.
CALLS: dict[str, Callable[[VaeClient], Any]] = {
    "Encode": lambda client: client.encode(ONE_IMAGE),
    "Decode": lambda client: client.decode(ONE_LATENT),
    "Sample": lambda client: client.sample(1, seed=1),
    "SampleStream": lambda client: list(client.sample_stream(3, seed=1)),
    "Interpolate": lambda client: client.interpolate(ONE_LATENT, ONE_LATENT, steps=3),
    "Score": lambda client: client.score(ONE_IMAGE),
    "Reconstruct": lambda client: client.reconstruct(ONE_IMAGE),
    "Traverse": lambda client: client.traverse(ONE_LATENT, dimensions=[0, 1], steps=3),
    "GetModelInfo": lambda client: client.model_info(),
    "CompareVersions": lambda client: client.compare_versions(2),
}


def test_replies_that_answer_their_requests_are_accepted(fake: tuple[FakeVae, VaeClient]) -> None:
    _, client = fake
    assert set(CALLS) == set(SERVICE_METHODS)  # a new RPC gets its call, and its malformed replies below
    for method, call in CALLS.items():
        assert call(client) is not None, method


MALFORMED: list[tuple[str, Any, str]] = [
    ("Encode", pb.EncodeResponse(mu=tensor(3, LATENT_DIM), log_var=tensor(1, LATENT_DIM)), "mu has shape \\[3, 4\\]"),
    (
        "Encode",
        pb.EncodeResponse(mu=tensor(1, LATENT_DIM), log_var=tensor(0, LATENT_DIM)),
        "log_var has shape \\[0, 4\\]",
    ),
    ("Decode", pb.DecodeResponse(images=tensor(3, *IMAGE)), "images has shape \\[3, 1, 28, 28\\]; .* 1 latent$"),
    ("Sample", samples(2, offset=0), "images has shape \\[2, 1, 28, 28\\]; the request asked for 1 row$"),
    ("Sample", samples(1, offset=5), "the rows start at offset 5; the request asked for offset 0"),
    ("SampleStream", [samples(2, offset=0), samples(1, offset=3)], "a chunk of rows 3 .. 3 after 2 of 3 rows"),
    ("SampleStream", [samples(2, offset=0), samples(2, offset=2)], "a chunk of rows 2 .. 3 after 2 of 3 rows"),
    ("SampleStream", [samples(2, offset=0)], "the stream ended after 2 of 3 rows"),
    ("SampleStream", [], "the stream ended after 0 of 3 rows"),
    (
        "Interpolate",
        pb.InterpolateResponse(images=tensor(1, 2, *IMAGE), latents=tensor(1, 3, LATENT_DIM)),
        "images has shape \\[1, 2, 1, 28, 28\\]; the request asked for 1 path of 3 steps",
    ),
    ("Score", pb.ScoreResponse(scores=[]), "0 scores; the request asked about 1 image"),
    ("Score", pb.ScoreResponse(scores=scores(3)), "3 scores; the request asked about 1 image"),
    (
        "Reconstruct",
        pb.ReconstructResponse(images=tensor(1, *IMAGE), latents=tensor(1, LATENT_DIM), scores=[]),
        "0 scores; the request asked about 1 image",
    ),
    (
        "Reconstruct",
        pb.ReconstructResponse(images=tensor(2, *IMAGE), latents=tensor(1, LATENT_DIM), scores=scores(1)),
        "images has shape \\[2, 1, 28, 28\\]",
    ),
    (
        "Traverse",
        pb.TraverseResponse(
            images=tensor(2, 2, *IMAGE), latents=tensor(2, 3, LATENT_DIM), dimensions=[0, 1], values=[0, 1, 2]
        ),
        "images has shape \\[2, 2, 1, 28, 28\\]; the request asked for 2 dimensions × 3 steps",
    ),
    (
        "Traverse",
        pb.TraverseResponse(
            images=tensor(1, 3, *IMAGE), latents=tensor(1, 3, LATENT_DIM), dimensions=[0], values=[0, 1, 2]
        ),
        "it swept dimensions \\[0\\] over 3 values; the request asked for \\[0, 1\\] over 3 steps",
    ),
    ("GetModelInfo", pb.ModelInfo(manifest_json="{not json"), "manifest_json is not JSON: Expecting property name"),
    ("GetModelInfo", pb.ModelInfo(manifest_json=""), "manifest_json is not JSON"),
    ("GetModelInfo", pb.ModelInfo(manifest_json="[" * 100_000), "manifest_json is not JSON"),
    ("GetModelInfo", pb.ModelInfo(manifest_json="[1, 2]"), "manifest_json is not a JSON object: '\\[1, 2\\]'"),
    ("CompareVersions", pb.VersionComparison(candidate=3), "it compares version 3; the request asked about 2"),
    (
        "CompareVersions",
        pb.VersionComparison(candidate=2, stable=1, paired_inputs=3, share_worse=1.5),
        "share_worse is 1.5, not a share",
    ),
]


@pytest.mark.parametrize(("method", "reply", "message"), MALFORMED)
def test_a_reply_that_does_not_answer_its_request_is_internal(
    fake: tuple[FakeVae, VaeClient], method: str, reply: Any, message: str
) -> None:
    servicer, client = fake
    servicer.replies[method] = reply
    with pytest.raises(VaeError) as refused:
        CALLS[method](client)
    assert refused.value.code == grpc.StatusCode.INTERNAL
    assert refused.value.details.startswith("malformed reply from the server: ")
    assert refused.value.details == refused.value.details.strip() and "\n" not in refused.value.details
    assert re.search(message, refused.value.details), refused.value.details
