"""The VaeService servicer: each RPC is protobuf → one `VaeEngine` call → protobuf, and nothing else.

Admission, draining, errors → status codes, metrics and the request log are the interceptor's
(`serving.grpc.interceptors`); `REPLY_ITEMS` tells it how many images or latents a reply carries.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np

from serving.api import pb, pb_grpc
from serving.api.tensors import fill_tensor, tensor_from_proto
from serving.dataplane.engine import OutputDType, VaeEngine
from serving.grpc.converters import deadline_of, method_from_proto, output_dtype_from_proto

# Images or latents in a successful reply (SampleStream: in each chunk), by method: vae_request_items.
REPLY_ITEMS: dict[str, Callable[[Any], int]] = {
    "Encode": lambda reply: reply.mu.shape[0],
    "Decode": lambda reply: reply.images.shape[0],
    "Sample": lambda reply: reply.latents.shape[0],
    "SampleStream": lambda reply: reply.latents.shape[0],
    "Interpolate": lambda reply: reply.latents.shape[0] * reply.latents.shape[1],
}


class VaeServicer(pb_grpc.VaeServiceServicer):
    def __init__(self, engine: VaeEngine) -> None:
        self.engine = engine

    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        mu, log_var = await self.engine.encode(tensor_from_proto(request.images, "images"), deadline_of(context))
        response = pb.EncodeResponse()
        fill_tensor(response.mu, mu)
        fill_tensor(response.log_var, log_var)
        return response

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext) -> pb.DecodeResponse:
        images = await self.engine.decode(
            tensor_from_proto(request.latents, "latents"),
            output_dtype_from_proto(request.output_dtype),
            deadline_of(context),
        )
        response = pb.DecodeResponse()
        fill_tensor(response.images, images)
        return response

    async def Sample(self, request: pb.SampleRequest, context: grpc.aio.ServicerContext) -> pb.SampleResponse:
        images, latents = await self.engine.sample(*_sample_arguments(request), deadline=deadline_of(context))
        return _sample_response(images, latents)

    async def SampleStream(
        self, request: pb.SampleRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SampleResponse]:
        chunks = self.engine.sample_stream(*_sample_arguments(request), deadline=deadline_of(context))
        async for images, latents in chunks:
            yield _sample_response(images, latents)

    async def Interpolate(
        self, request: pb.InterpolateRequest, context: grpc.aio.ServicerContext
    ) -> pb.InterpolateResponse:
        images, latents = await self.engine.interpolate(
            tensor_from_proto(request.start, "start"),
            tensor_from_proto(request.end, "end"),
            request.steps,
            method_from_proto(request.method),
            output_dtype_from_proto(request.output_dtype),
            deadline_of(context),
        )
        response = pb.InterpolateResponse()
        fill_tensor(response.images, images)
        fill_tensor(response.latents, latents)
        return response

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        version = self.engine.version
        return pb.ModelInfo(
            name=version.name,
            version=version.version,
            latent_dim=version.latent_dim,
            image_shape=version.image_shape,
            provider=self.engine.provider,
            manifest_json=version.manifest_json,
        )


def _sample_arguments(request: pb.SampleRequest) -> tuple[int, int | None, float | None, OutputDType]:
    """Sample's and SampleStream's fields: (num_samples, seed, temperature, output dtype)."""
    return (
        request.num_samples,
        request.seed if request.HasField("seed") else None,
        request.temperature if request.HasField("temperature") else None,
        output_dtype_from_proto(request.output_dtype),
    )


def _sample_response(images: np.ndarray, latents: np.ndarray) -> pb.SampleResponse:
    response = pb.SampleResponse()
    fill_tensor(response.images, images)
    fill_tensor(response.latents, latents)
    return response
