"""The VAE data plane: encode, decode, sample and interpolate one served model version, on numpy arrays.

Each method validates its inputs (`serving.dataplane.validation`), runs the graphs through the per-graph
batchers and returns numpy arrays; the gRPC servicer only translates protobuf to and from these calls.
Nothing here imports gRPC.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Literal

import numpy as np

from serving.dataplane.batcher import Batcher, BatchObserver, BatchPolicy
from serving.dataplane.interpolation import Method, interpolate
from serving.dataplane.runtime import GraphSessions
from serving.dataplane.validation import (
    check_count,
    check_endpoints,
    check_images,
    check_latents,
    check_steps,
    check_temperature,
)
from serving.errors import Overloaded
from serving.settings import check_settings, setting

OutputDType = Literal["float32", "uint8"]


@dataclass(frozen=True)
class RequestLimits:
    """How much one request may ask for."""

    max_items_per_request: int = setting(
        1024, "images or latents per request (Interpolate: pairs x steps), at most", minimum=1, metavar="N"
    )
    max_interpolation_steps: int = setting(1024, "Interpolate steps, at most", minimum=2, metavar="N")
    max_stream_samples: int = setting(1_000_000, "SampleStream num_samples, at most", minimum=1, metavar="N")
    max_sample_streams: int = setting(
        64, "SampleStream calls running at once, at most; beyond it RESOURCE_EXHAUSTED", minimum=1, metavar="N"
    )

    def __post_init__(self) -> None:
        check_settings(self)


def to_output_dtype(images: np.ndarray, output_dtype: OutputDType) -> np.ndarray:
    """float32 images in [0, 1] as they are, or as uint8 round(x * 255)."""
    if output_dtype == "uint8":
        return np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    return images


class VaeEngine:
    """One served model version: its graphs behind dynamic batchers, and the operations clients call."""

    def __init__(
        self,
        sessions: GraphSessions,
        policy: BatchPolicy,
        limits: RequestLimits,
        executor: Executor | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        self.version = sessions.version
        self.provider = sessions.provider
        self.latent_dim = sessions.version.latent_dim
        self.image_shape = sessions.version.image_shape
        self.limits = limits
        self.policy = policy
        self.sample_streams = 0  # SampleStream calls running now
        self.encoder = Batcher("encoder", sessions.encoder.run, policy, executor, observer)
        self.decoder = Batcher("decoder", sessions.decoder.run, policy, executor, observer)

    def start(self) -> None:
        """Start the batchers (on the running event loop)."""
        self.encoder.start()
        self.decoder.start()

    async def close(self) -> None:
        await self.encoder.close()
        await self.decoder.close()

    async def encode(self, images: np.ndarray, deadline: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """[N,1,28,28] float32 in [0,1] or uint8 → (mu, log_var), each [N, D]."""
        images = check_images(images, self.image_shape, self.limits.max_items_per_request)
        mu, log_var = await self.encoder.run(images, deadline)
        return mu, log_var

    async def decode(
        self, latents: np.ndarray, output_dtype: OutputDType = "float32", deadline: float | None = None
    ) -> np.ndarray:
        """[N, D] → images [N,1,28,28] in `output_dtype`."""
        latents = check_latents(latents, self.latent_dim, self.limits.max_items_per_request)
        (images,) = await self.decoder.run(latents, deadline)
        return to_output_dtype(images, output_dtype)

    def prior_latents(self, count: int, rng: np.random.Generator, temperature: float) -> np.ndarray:
        """`count` draws from N(0, temperature²·I), [count, D] float32."""
        latents = rng.standard_normal((count, self.latent_dim), dtype=np.float32)
        if temperature != 1.0:
            latents *= np.float32(temperature)
        return latents

    async def sample(
        self,
        num_samples: int,
        seed: int | None = None,
        temperature: float | None = None,
        output_dtype: OutputDType = "float32",
        deadline: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(images, latents) for `num_samples` prior draws; the same seed gives the same draws."""
        check_count(num_samples, self.limits.max_items_per_request, "num_samples")
        scale = check_temperature(temperature)
        latents = self.prior_latents(num_samples, np.random.default_rng(seed), scale)
        (images,) = await self.decoder.run(latents, deadline)
        return to_output_dtype(images, output_dtype), latents

    async def sample_stream(
        self,
        num_samples: int,
        seed: int | None = None,
        temperature: float | None = None,
        output_dtype: OutputDType = "float32",
        deadline: float | None = None,
    ) -> AsyncIterator[tuple[np.ndarray, np.ndarray]]:
        """`sample` in chunks of at most max_batch_size rows: the same draws, for any count up to the stream limit.

        Chunks are produced one at a time, when the consumer asks for the next: a consumer that stops
        stops the work.
        """
        check_count(num_samples, self.limits.max_stream_samples, "num_samples")
        scale = check_temperature(temperature)
        if self.sample_streams >= self.limits.max_sample_streams:
            raise Overloaded(
                f"server busy: {self.sample_streams} SampleStream calls are running and this server runs at "
                f"most {self.limits.max_sample_streams} at once; retry with backoff"
            )
        self.sample_streams += 1
        try:
            rng = np.random.default_rng(seed)
            chunk = min(self.policy.max_batch_size, self.limits.max_items_per_request)
            for start in range(0, num_samples, chunk):
                latents = self.prior_latents(min(chunk, num_samples - start), rng, scale)
                (images,) = await self.decoder.run(latents, deadline)
                yield to_output_dtype(images, output_dtype), latents
        finally:
            self.sample_streams -= 1

    async def interpolate(
        self,
        start: np.ndarray,
        end: np.ndarray,
        steps: int,
        method: Method = "linear",
        output_dtype: OutputDType = "float32",
        deadline: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Paths between P pairs of endpoints → (images [P, steps, 1,28,28], latents [P, steps, D]).

        Image endpoints are replaced by their encoder means first.
        """
        limit = self.limits.max_items_per_request
        kind = check_endpoints(start, end, self.image_shape, self.latent_dim, limit)
        pairs = start.shape[0]
        check_steps(steps, pairs, self.limits.max_interpolation_steps, limit)
        if kind == "images":
            both = np.concatenate(
                [
                    check_images(start, self.image_shape, limit, "start"),
                    check_images(end, self.image_shape, limit, "end"),
                ]
            )
            mu, _ = await self.encoder.run(both, deadline)
            z0, z1 = mu[:pairs], mu[pairs:]
        else:
            z0 = check_latents(start, self.latent_dim, limit, "start")
            z1 = check_latents(end, self.latent_dim, limit, "end")
        path = interpolate(z0, z1, steps, method)  # [P, steps, D]
        (images,) = await self.decoder.run(path.reshape(pairs * steps, self.latent_dim), deadline)
        images = images.reshape(pairs, steps, *self.image_shape)
        return to_output_dtype(images, output_dtype), path
