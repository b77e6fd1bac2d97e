"""The VAE data plane of one served model version, on numpy arrays: encode, decode, sample, interpolate, and
what only a latent-variable model answers (score, reconstruct, traverse).

Each method validates its inputs (`serving.dataplane.validation`), runs the graphs through the per-graph
batchers and returns numpy arrays; the gRPC servicer only translates protobuf to and from these calls.
Nothing here imports gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import numpy as np

from contract import scores
from contract.interpolation import Method, interpolate
from contract.settings import check_settings, setting
from serving.dataplane.admission import Slots
from serving.dataplane.batcher import Batcher, BatchObserver, BatchSettings
from serving.dataplane.draws import normal_rows
from serving.dataplane.runtime import GraphSessions
from serving.dataplane.validation import (
    check_count,
    check_dimensions,
    check_endpoints,
    check_images,
    check_importance_samples,
    check_latents,
    check_origin,
    check_range,
    check_steps,
    check_temperature,
)
from serving.errors import ServingError
from serving.tracing import OFF, Tracing

OutputDType = Literal["float32", "uint8"]
T = TypeVar("T")


@dataclass(frozen=True)
class LimitSettings:
    """How much one request may ask for."""

    max_items_per_request: int = setting(
        1024, "images or latents per request (Interpolate: pairs x steps), at most", minimum=1, metavar="N"
    )
    max_interpolation_steps: int = setting(1024, "Interpolate steps, at most", minimum=2, metavar="N")
    max_stream_samples: int = setting(1_000_000, "SampleStream num_samples, at most", minimum=1, metavar="N")
    max_sample_streams: int = setting(
        64,
        "streaming calls (SampleStream and the Open Inference Protocol's ModelStreamInfer) running at once over "
        "the whole server (all versions), at most; beyond it RESOURCE_EXHAUSTED",
        minimum=1,
        metavar="N",
    )
    max_importance_samples: int = setting(
        1024, "Score importance samples per image (K), at most; images x K also within the items", minimum=1
    )

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class TelemetrySettings:
    """What the server measures of its inputs, for the drift alert (vae_input_score_nats, vae_latent_norm)."""

    encode_score_fraction: float = setting(
        0.1,
        "fraction of Encode requests whose images are also scored (one decoder pass, after the reply) for the "
        "input score histogram; Score and Reconstruct always are; 0 turns it off",
        minimum=0.0,
        maximum=1.0,
    )

    def __post_init__(self) -> None:
        check_settings(self)


class InputsAnswered(Protocol):
    """Told of the images of each Encode, Score and Reconstruct an engine answered (shadow scoring, in the
    version lifecycle): their checked array, the importance samples and seed their scores were drawn with, and
    those scores where the request computed them (None for Encode). Called on the event loop; must not block."""

    def __call__(
        self,
        version: int,
        images: np.ndarray,
        importance_samples: int,
        seed: int | None,
        result: scores.ImageScores | None,
    ) -> None: ...


class EngineObserver(BatchObserver, Protocol):
    """The batchers' observer, and what the engine measures of the inputs it encodes."""

    def inputs_encoded(self, latent_norms: np.ndarray) -> None: ...

    def inputs_scored(self, plugin_negative_elbo: np.ndarray) -> None: ...


DEFAULT_TRAVERSE_RANGE = (-3.0, 3.0)
DEFAULT_TRAVERSE_STEPS = 9
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _PosteriorPass:
    """What Score and Reconstruct share: the scores, and the decoder's outputs they were computed from."""

    result: scores.ImageScores
    mu: np.ndarray  # [N, D]
    draws: np.ndarray  # [S, N, D], the posterior draws
    at_mean: np.ndarray  # [N, 1, 28, 28], decoded at mu
    at_draws: np.ndarray  # [S, N, 1, 28, 28], decoded at the draws


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
        policy: BatchSettings,
        limits: LimitSettings,
        executor: Executor | None = None,
        observer: EngineObserver | None = None,
        telemetry: TelemetrySettings | None = None,
        stream_slots: Slots | None = None,
        tracing: Tracing = OFF,
        inputs_answered: InputsAnswered | None = None,
    ) -> None:
        """`stream_slots` counts SampleStream calls over the whole server (the manager shares one among its
        engines); without it the engine counts its own. `tracing`: where its batches and the steps of its
        composite calls are traced. `inputs_answered`: told of the inputs of the requests it answered."""
        self.version = sessions.version
        self.provider = sessions.provider
        self.latent_dim = sessions.version.latent_dim
        self.image_shape = sessions.version.image_shape
        self.limits = limits
        self.policy = policy
        self.stream_slots = stream_slots or Slots(limits.max_sample_streams, "SampleStream calls")
        self.observer = observer
        self.telemetry = telemetry or TelemetrySettings()
        self.tracing = tracing
        self.inputs_answered = inputs_answered
        number = sessions.version.number
        self.encoder = Batcher(
            "encoder", sessions.encoder.run, policy, executor, observer, tracing.batches("encoder", number)
        )
        self.decoder = Batcher(
            "decoder", sessions.decoder.run, policy, executor, observer, tracing.batches("decoder", number)
        )
        self._telemetry_rng = np.random.default_rng()
        self._background: set[asyncio.Task[None]] = set()  # Encode inputs being scored after their reply

    def start(self) -> None:
        """Start the batchers (on the running event loop)."""
        self.encoder.start()
        self.decoder.start()

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.encoder.close()
        await self.decoder.close()

    async def encode(self, images: np.ndarray, deadline: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """[N,1,28,28] float32 in [0,1] or uint8 → (mu, log_var), each [N, D]."""
        images = check_images(images, self.image_shape, self.limits.max_items_per_request)
        mu, log_var = await self.encoder.run(images, deadline)
        if self.inputs_answered is not None:
            self.inputs_answered(self.version.number, images, 0, None, None)
        if self.observer is not None:
            self.observer.inputs_encoded(np.linalg.norm(mu, axis=1))
            fraction = self.telemetry.encode_score_fraction
            if fraction > 0 and self._telemetry_rng.random() < fraction:
                task = asyncio.get_running_loop().create_task(self._score_in_background(images, mu, log_var))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        return mu, log_var

    async def _score_in_background(self, images: np.ndarray, mu: np.ndarray, log_var: np.ndarray) -> None:
        """Score Encode's inputs for the histogram once its reply is on its way; a busy server skips it."""
        try:
            (decoded,) = await self.decoder.run(mu)
        except ServingError as exc:  # queue full or closing: telemetry gives way to requests
            log.debug("encode inputs not scored: %s", exc)
            return
        if self.observer is not None:
            plugin = await _off_loop(scores.plugin_negative_elbo_nats, images, mu, log_var, decoded)
            self.observer.inputs_scored(plugin)

    async def score(
        self, images: np.ndarray, importance_samples: int = 0, seed: int | None = None, deadline: float | None = None
    ) -> scores.ImageScores:
        """Images [N,1,28,28] → their scores (`contract.scores`), estimated from S = max(K, 1) seeded posterior
        draws per image (the same request gives the same numbers); with K importance samples also the K-sample
        bound. One encoder pass, and one decoder pass of N·(1 + S) rows: the posterior means and the draws."""
        limit = self.limits.max_items_per_request
        images = check_images(images, self.image_shape, limit)
        k = check_importance_samples(importance_samples, images.shape[0], self.limits.max_importance_samples, limit)
        scored = await self._posterior_pass(images, max(k, 1), seed, deadline, with_iwae=k > 0)
        if self.inputs_answered is not None:
            self.inputs_answered(self.version.number, images, k, seed, scored.result)
        return scored.result

    async def score_again(
        self, images: np.ndarray, importance_samples: int, seed: int | None, deadline: float | None = None
    ) -> scores.ImageScores:
        """`score`'s numbers for images a request has already brought (shadow scoring): checked images, and
        neither counted in the input histograms nor told to `inputs_answered` again."""
        scored = await self._posterior_pass(
            images, max(importance_samples, 1), seed, deadline, with_iwae=importance_samples > 0, observed=False
        )
        return scored.result

    async def reconstruct(
        self,
        images: np.ndarray,
        sample_posterior: bool = False,
        seed: int | None = None,
        output_dtype: OutputDType = "float32",
        deadline: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray, scores.ImageScores]:
        """Images → (reconstructions, the latents decoded [N, D], the images' scores).

        The latents are the posterior means, or with `sample_posterior` one draw z ~ q(z|x) per image (image i
        uses row i of the seed's sequence). The scores are Score's with K = 0 and the same seed, from the same
        decoder pass: one encoder pass and one decoder pass of 2·N rows.
        """
        images = check_images(images, self.image_shape, self.limits.max_items_per_request)
        scored = await self._posterior_pass(images, 1, seed, deadline, with_iwae=False)
        if self.inputs_answered is not None:
            self.inputs_answered(self.version.number, images, 0, seed, scored.result)
        if sample_posterior:
            return to_output_dtype(scored.at_draws[0], output_dtype), scored.draws[0], scored.result
        return to_output_dtype(scored.at_mean, output_dtype), scored.mu, scored.result

    async def _posterior_pass(
        self,
        images: np.ndarray,
        draws: int,
        seed: int | None,
        deadline: float | None,
        with_iwae: bool,
        observed: bool = True,
    ) -> _PosteriorPass:
        """Encode checked images, decode their means and `draws` seeded posterior draws each, and score them.

        Image i's draws are rows i·S .. i·S + S − 1 of the seed's sequence (S = `draws`).
        """
        count, step = images.shape[0], self.tracing.step
        with step("vae.encode", **{"vae.rows": count}):
            mu, log_var = await self.encoder.run(images, deadline)
        eps = normal_rows(seed or 0, 0, count * draws, self.latent_dim).reshape(count, draws, -1).transpose(1, 0, 2)
        z = mu + np.exp(np.float32(0.5) * log_var) * eps  # [S, N, D]
        with step("vae.decode", **{"vae.rows": count * (1 + draws), "vae.draws": draws}):
            latents = np.concatenate([mu, z.reshape(draws * count, self.latent_dim)])
            (decoded,) = await self.decoder.run(latents, deadline)
        at_mean, at_draws = decoded[:count], decoded[count:].reshape(draws, count, *self.image_shape)
        with step("vae.score", **{"vae.rows": count, "vae.iwae": with_iwae}):
            result = await _off_loop(scores.score, images, mu, log_var, eps, at_draws, at_mean, with_iwae)
        if observed and self.observer is not None:
            self.observer.inputs_encoded(result.latent_norm)
            self.observer.inputs_scored(result.plugin_negative_elbo)
        return _PosteriorPass(result, mu, z, at_mean, at_draws)

    async def traverse(
        self,
        origin: np.ndarray,
        dimensions: Sequence[int] = (),
        low: float | None = None,
        high: float | None = None,
        steps: int | None = None,
        relative: bool = False,
        output_dtype: OutputDType = "float32",
        deadline: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[int], np.ndarray]:
        """One image or latent → (images [R, S, 1,28,28], latents [R, S, D], the R dimensions, the S values).

        Row r sweeps dimension dimensions[r] over linspace(low, high, S), every other dimension staying at the
        origin's (an image's posterior mean); `relative` adds each value to the origin's own coordinate.
        """
        kind = check_origin(origin, self.image_shape, self.latent_dim)
        dims = check_dimensions(dimensions, self.latent_dim)
        values = check_range(
            DEFAULT_TRAVERSE_RANGE[0] if low is None else low, DEFAULT_TRAVERSE_RANGE[1] if high is None else high
        )
        count = check_steps(
            DEFAULT_TRAVERSE_STEPS if steps is None else steps,
            len(dims),
            self.limits.max_interpolation_steps,
            self.limits.max_items_per_request,
            rows="dimensions",
        )
        if kind == "images":
            (z,), _ = await self.encoder.run(check_images(origin, self.image_shape, 1, "origin"), deadline)
        else:
            z = check_latents(origin, self.latent_dim, 1, "origin")[0]
        sweep = np.linspace(values[0], values[1], count, dtype=np.float32)
        grid = np.repeat(np.repeat(z[None, None, :], len(dims), axis=0), count, axis=1)  # [R, S, D]
        for row, dim in enumerate(dims):
            grid[row, :, dim] = sweep + z[dim] if relative else sweep
        (images,) = await self.decoder.run(grid.reshape(-1, self.latent_dim), deadline)
        images = images.reshape(len(dims), count, *self.image_shape)
        return to_output_dtype(images, output_dtype), grid, dims, sweep

    async def decode(
        self, latents: np.ndarray, output_dtype: OutputDType = "float32", deadline: float | None = None
    ) -> np.ndarray:
        """[N, D] → images [N,1,28,28] in `output_dtype`."""
        latents = check_latents(latents, self.latent_dim, self.limits.max_items_per_request)
        (images,) = await self.decoder.run(latents, deadline)
        return to_output_dtype(images, output_dtype)

    def prior_latents(self, seed: int, offset: int, count: int, temperature: float) -> np.ndarray:
        """Rows offset .. offset + count - 1 of the seed's draws from N(0, temperature²·I), [count, D] float32."""
        latents = normal_rows(seed, offset, count, self.latent_dim)
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
        offset: int = 0,
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """(images, latents, seed) for rows offset .. offset + num_samples - 1 of the seed's prior draws.

        The same seed and row give the same draw, whatever the count or offset of the request that asks for it
        (`serving.dataplane.draws`); with no seed the server draws one and returns it.
        """
        check_count(num_samples, self.limits.max_items_per_request, "num_samples")
        scale = check_temperature(temperature)
        seed = secrets.randbits(64) if seed is None else seed
        latents = self.prior_latents(seed, offset, num_samples, scale)
        (images,) = await self.decoder.run(latents, deadline)
        return to_output_dtype(images, output_dtype), latents, seed

    async def sample_stream(
        self,
        num_samples: int,
        seed: int | None = None,
        temperature: float | None = None,
        output_dtype: OutputDType = "float32",
        deadline: float | None = None,
        offset: int = 0,
    ) -> AsyncIterator[tuple[np.ndarray, np.ndarray, int, int]]:
        """`sample` in chunks of at most max_batch_size rows: the same draws, for any count up to the stream limit.

        Yields (images, latents, seed, the chunk's first row). Chunks are produced one at a time, when the
        consumer asks for the next: a consumer that stops stops the work.
        """
        check_count(num_samples, self.limits.max_stream_samples, "num_samples")
        scale = check_temperature(temperature)
        with self.stream_slots.hold():
            seed = secrets.randbits(64) if seed is None else seed
            chunk = min(self.policy.max_batch_size, self.limits.max_items_per_request)
            for start in range(offset, offset + num_samples, chunk):
                latents = self.prior_latents(seed, start, min(chunk, offset + num_samples - start), scale)
                (images,) = await self.decoder.run(latents, deadline)
                yield to_output_dtype(images, output_dtype), latents, seed, start

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


async def _off_loop(function: Callable[..., T], *args: Any) -> T:
    """Run numpy and zlib work (they release the GIL) on the default thread pool, off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)
