"""The VaeService servicer: each RPC leases a served version, makes one call to its engine, and translates.

Admission, draining, errors → status codes, metrics and the request log are the interceptor's
(`serving.grpc.interceptors`); `REPLY_ITEMS` tells it how many images or latents a reply carries. Every
reply says which version answered (`model_version`); the same number goes out as trailing metadata
(`vae-model-version`, also on errors), which is where the interceptor reads it for the metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import grpc
import numpy as np

from serving.api import VERSION_METADATA, pb, pb_grpc
from serving.api.tensors import fill_tensor, tensor_from_proto
from serving.dataplane.engine import OutputDType, VaeEngine
from serving.grpc.converters import (
    deadline_of,
    image_scores_to_proto,
    method_from_proto,
    output_dtype_from_proto,
    version_choice,
)
from serving.lifecycle.manager import ModelManager

# Images or latents in a successful reply (SampleStream: in each chunk), by method: vae_request_items.
REPLY_ITEMS: dict[str, Callable[[Any], int]] = {
    "Encode": lambda reply: reply.mu.shape[0],
    "Decode": lambda reply: reply.images.shape[0],
    "Sample": lambda reply: reply.latents.shape[0],
    "SampleStream": lambda reply: reply.latents.shape[0],
    "Interpolate": lambda reply: reply.latents.shape[0] * reply.latents.shape[1],
    "Score": lambda reply: len(reply.scores),
    "Reconstruct": lambda reply: reply.latents.shape[0],
    "Traverse": lambda reply: reply.latents.shape[0] * reply.latents.shape[1],
}


class _VersionedRequest(Protocol):
    model_version: pb.ModelVersionSpec

    def HasField(self, field_name: str) -> bool: ...


class VaeServicer(pb_grpc.VaeServiceServicer):
    def __init__(self, models: ModelManager) -> None:
        self.models = models

    @contextlib.asynccontextmanager
    async def _lease(self, request: _VersionedRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[VaeEngine]:
        """The engine of the version the request names (or the default route's, the canary's share by the caller's
        x-request-id or else the request's seed), for the whole call."""
        seed = _seed_of(request) if self.models.routes_by_request_id else None  # a key only the canary reads
        async with self.models.lease(*version_choice(request.model_version), seed=seed) as engine:
            context.set_trailing_metadata(((VERSION_METADATA, str(engine.version.number)),))
            yield engine

    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        async with self._lease(request, context) as engine:
            mu, log_var = await engine.encode(tensor_from_proto(request.images, "images"), deadline_of(context))
        response = pb.EncodeResponse(model_version=engine.version.number)
        fill_tensor(response.mu, mu)
        fill_tensor(response.log_var, log_var)
        return response

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext) -> pb.DecodeResponse:
        async with self._lease(request, context) as engine:
            images = await engine.decode(
                tensor_from_proto(request.latents, "latents"),
                output_dtype_from_proto(request.output_dtype),
                deadline_of(context),
            )
        response = pb.DecodeResponse(model_version=engine.version.number)
        fill_tensor(response.images, images)
        return response

    async def Sample(self, request: pb.SampleRequest, context: grpc.aio.ServicerContext) -> pb.SampleResponse:
        async with self._lease(request, context) as engine:
            images, latents, seed = await engine.sample(
                *_sample_arguments(request), deadline=deadline_of(context), offset=request.offset
            )
        return _sample_response(images, latents, engine, seed, request.offset)

    async def SampleStream(
        self, request: pb.SampleRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SampleResponse]:
        async with self._lease(request, context) as engine:
            chunks = engine.sample_stream(
                *_sample_arguments(request), deadline=deadline_of(context), offset=request.offset
            )
            async for images, latents, seed, offset in chunks:
                yield _sample_response(images, latents, engine, seed, offset)

    async def Interpolate(
        self, request: pb.InterpolateRequest, context: grpc.aio.ServicerContext
    ) -> pb.InterpolateResponse:
        async with self._lease(request, context) as engine:
            images, latents = await engine.interpolate(
                tensor_from_proto(request.start, "start"),
                tensor_from_proto(request.end, "end"),
                request.steps,
                method_from_proto(request.method),
                output_dtype_from_proto(request.output_dtype),
                deadline_of(context),
            )
        response = pb.InterpolateResponse(model_version=engine.version.number)
        fill_tensor(response.images, images)
        fill_tensor(response.latents, latents)
        return response

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        async with self._lease(request, context) as engine:
            result = await engine.score(
                tensor_from_proto(request.images, "images"),
                request.importance_samples,
                request.seed if request.HasField("seed") else None,
                deadline_of(context),
            )
        return pb.ScoreResponse(scores=image_scores_to_proto(result), model_version=engine.version.number)

    async def Reconstruct(
        self, request: pb.ReconstructRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReconstructResponse:
        async with self._lease(request, context) as engine:
            images, latents, result = await engine.reconstruct(
                tensor_from_proto(request.images, "images"),
                request.sample_posterior,
                request.seed if request.HasField("seed") else None,
                output_dtype_from_proto(request.output_dtype),
                deadline_of(context),
            )
        response = pb.ReconstructResponse(scores=image_scores_to_proto(result), model_version=engine.version.number)
        fill_tensor(response.images, images)
        fill_tensor(response.latents, latents)
        return response

    async def Traverse(self, request: pb.TraverseRequest, context: grpc.aio.ServicerContext) -> pb.TraverseResponse:
        async with self._lease(request, context) as engine:
            images, latents, dimensions, values = await engine.traverse(
                tensor_from_proto(request.origin, "origin"),
                list(request.dimensions),
                request.low if request.HasField("low") else None,
                request.high if request.HasField("high") else None,
                request.steps if request.HasField("steps") else None,
                request.relative,
                output_dtype_from_proto(request.output_dtype),
                deadline_of(context),
            )
        response = pb.TraverseResponse(
            dimensions=dimensions,
            values=values.tolist(),
            active_dimensions=engine.version.active_dimensions or (),
            model_version=engine.version.number,
        )
        fill_tensor(response.images, images)
        fill_tensor(response.latents, latents)
        return response

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        engine = self.models.engine(*version_choice(request.model_version))  # the default route's, never the canary
        context.set_trailing_metadata(((VERSION_METADATA, str(engine.version.number)),))
        version = engine.version
        versions = [
            pb.VersionStatus(
                version=row.version,
                state=pb.VersionState.Value(row.state.name),
                labels=row.labels,
                is_default=row.is_default,
                error=row.error,
            )
            for row in self.models.status()
        ]
        return pb.ModelInfo(
            name=version.name,
            version=version.number,
            latent_dim=version.latent_dim,
            image_shape=version.image_shape,
            provider=engine.provider,
            manifest_json=version.manifest_json,
            versions=versions,
        )

    async def CompareVersions(
        self, request: pb.CompareVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.VersionComparison:
        compared = self.models.comparison(*version_choice(request.candidate))
        context.set_trailing_metadata(((VERSION_METADATA, str(compared.candidate)),))
        return pb.VersionComparison(**dataclasses.asdict(compared))  # the same fields, by name


def _seed_of(request: _VersionedRequest) -> int | None:
    """The request's seed where it has one set (Sample, SampleStream, Score, Reconstruct)."""
    try:
        has_seed = request.HasField("seed")
    except ValueError:  # a message without the field
        return None
    return getattr(request, "seed", None) if has_seed else None


def _sample_arguments(request: pb.SampleRequest) -> tuple[int, int | None, float | None, OutputDType]:
    """Sample's and SampleStream's fields: (num_samples, seed, temperature, output dtype)."""
    return (
        request.num_samples,
        request.seed if request.HasField("seed") else None,
        request.temperature if request.HasField("temperature") else None,
        output_dtype_from_proto(request.output_dtype),
    )


def _sample_response(
    images: np.ndarray, latents: np.ndarray, engine: VaeEngine, seed: int, offset: int
) -> pb.SampleResponse:
    response = pb.SampleResponse(model_version=engine.version.number, seed=seed, offset=offset)
    fill_tensor(response.images, images)
    fill_tensor(response.latents, latents)
    return response
