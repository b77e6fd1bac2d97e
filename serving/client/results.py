"""What the client's methods return, and how a reply becomes one: checked against the request it answers.

Every result is a small frozen dataclass naming the version that answered (`model_version`). A reply that does
not decode, or does not answer its request (another number of rows, paths, steps or scores than asked for),
is the server's fault: `VaeError` with INTERNAL, as gRPC's own clients report a malformed response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from serving.api import pb
from serving.api.tensors import WireFormatError, tensor_from_proto


class VaeError(Exception):
    """A failed call: `code` is the gRPC status, `details` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


# The results holding arrays compare by identity (eq=False): `==` on arrays is elementwise, not a yes or no.


@dataclass(frozen=True, eq=False)
class Encoding:
    """Encode's answer: the posterior q(z|x) = N(mu, exp(log_var)) of each image."""

    mu: np.ndarray  # [N, D]
    log_var: np.ndarray  # [N, D]
    model_version: int  # the version that answered


@dataclass(frozen=True, eq=False)
class Decoding:
    """Decode's answer: the images the latents decode to."""

    images: np.ndarray  # [N, 1, 28, 28] float32 in [0, 1], or uint8
    model_version: int  # the version that answered


@dataclass(frozen=True, eq=False)
class Samples:
    """Sample's answer, or one chunk of SampleStream's: rows offset .. offset + N - 1 of the seed's prior draws."""

    images: np.ndarray  # [N, 1, 28, 28] float32 in [0, 1], or uint8
    latents: np.ndarray  # [N, D], the draws the images were decoded from
    seed: int  # the request's seed, or the one the server drew when it named none: it redraws these rows
    offset: int  # index of the first row in the seed's sequence
    model_version: int  # the version that answered


@dataclass(frozen=True, eq=False)
class Interpolation:
    """Interpolate's answer: P paths of `steps` points each, both ends included."""

    images: np.ndarray  # [P, steps, 1, 28, 28]
    latents: np.ndarray  # [P, steps, D]
    model_version: int  # the version that answered


@dataclass(frozen=True, eq=False)
class Scores:
    """Per-image scores in nats, each [N] float64; higher means less like the training data (see vae.proto)."""

    negative_elbo: np.ndarray  # the negative ELBO, a Monte Carlo estimate from the posterior draws
    plugin_negative_elbo: np.ndarray  # -log p(x | z = mu) + kl: deterministic; neither a bound nor the ELBO
    reconstruction: np.ndarray
    kl: np.ndarray
    complexity: np.ndarray
    corrected: np.ndarray  # negative_elbo - complexity: the one to flag out-of-distribution inputs with
    latent_norm: np.ndarray
    iwae: np.ndarray | None  # the importance-weighted bound, when importance samples were asked for (else None)
    model_version: int  # the version that answered

    @classmethod
    def from_proto(cls, messages: Any, model_version: int) -> Scores:
        """The columns of a reply's ImageScore messages."""

        def column(name: str) -> np.ndarray:
            return np.array([getattr(m, name) for m in messages], dtype=np.float64)

        has_iwae = len(messages) > 0 and all(m.HasField("iwae") for m in messages)
        return cls(
            negative_elbo=column("negative_elbo"),
            plugin_negative_elbo=column("plugin_negative_elbo"),
            reconstruction=column("reconstruction"),
            kl=column("kl"),
            complexity=column("complexity"),
            corrected=column("corrected"),
            latent_norm=column("latent_norm"),
            iwae=column("iwae") if has_iwae else None,
            model_version=model_version,
        )


@dataclass(frozen=True, eq=False)
class Reconstruction:
    """Reconstruct's answer: the decoded latents and the images' scores (one posterior draw each)."""

    images: np.ndarray  # [N, 1, 28, 28]
    latents: np.ndarray  # [N, D], the posterior means, or the draws with sample_posterior
    scores: Scores
    model_version: int  # the version that answered


@dataclass(frozen=True, eq=False)
class Traversal:
    """Traverse's grid: row r sweeps latent dimension dimensions[r] over `values`."""

    images: np.ndarray  # [R, S, 1, 28, 28]
    latents: np.ndarray  # [R, S, D]
    dimensions: tuple[int, ...]
    values: np.ndarray  # [S]
    active_dimensions: tuple[int, ...]  # the dimensions the model uses (empty: its manifest does not say)
    model_version: int  # the version that answered


@dataclass(frozen=True)
class ModelInfo:
    """The served model, as GetModelInfo describes it."""

    name: str
    model_version: int  # the version that answered, the one this client's requests get
    latent_dim: int
    image_shape: tuple[int, ...]
    provider: str
    manifest: dict[str, Any]
    versions: tuple[VersionStatus, ...] = ()  # every version the server knows of, newest first


@dataclass(frozen=True)
class VersionComparison:
    """A candidate version against stable on the same live inputs (CompareVersions; vae.proto says each field).

    `median_difference` and its interval are candidate − stable negative ELBO in nats: positive, worse."""

    candidate: int
    stable: int
    paired_inputs: int
    median_difference: float
    median_difference_low: float
    median_difference_high: float
    confidence: float
    share_worse: float
    stable_median_negative_elbo: float
    candidate_median_negative_elbo: float
    dropped: int
    abandoned: int
    shadow_fraction: float
    note: str

    @classmethod
    def from_proto(cls, reply: Any) -> VersionComparison:
        return cls(**{name: getattr(reply, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class VersionStatus:
    """A version on the server: AVAILABLE (takes requests), UNLOADING (finishing them) or FAILED (never served)."""

    version: int
    state: str
    labels: tuple[str, ...]
    is_default: bool
    error: str = ""


def malformed(problem: str) -> VaeError:
    """A reply that is not what was asked for: the server's fault, reported as INTERNAL."""
    return VaeError(grpc.StatusCode.INTERNAL, f"malformed reply from the server: {problem}")


def array_of(tensor: pb.Tensor, field: str) -> np.ndarray:
    """A reply's tensor as an array; a malformed one is the server's fault, reported as INTERNAL."""
    try:
        return tensor_from_proto(tensor, field)
    except WireFormatError as exc:
        raise malformed(str(exc)) from None


def answered(field: str, array: np.ndarray, leading: tuple[int, ...], asked: str) -> np.ndarray:
    """`array` when its leading dimensions are the request's counts (`leading`, `asked` in words); else INTERNAL."""
    if array.shape[: len(leading)] != leading:
        raise malformed(f"{field} has shape {list(array.shape)}; the request asked for {asked}")
    return array


def rows_of(array: np.ndarray) -> int:
    """How many images or latents a request array holds (its first dimension)."""
    return int(np.shape(array)[0]) if np.ndim(array) else 1


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def samples_of(reply: pb.SampleResponse, rows: int | None = None) -> Samples:
    """A Sample reply, or one SampleStream message, as its rows and where they sit in the seed's sequence;
    `rows`: how many it must hold (None: as many images as latents)."""
    latents = array_of(reply.latents, "latents")
    expected = rows_of(latents) if rows is None else rows
    asked = plural(expected, "row")
    images = answered("images", array_of(reply.images, "images"), (expected,), asked)
    return Samples(
        images, answered("latents", latents, (expected,), asked), reply.seed, reply.offset, reply.model_version
    )


def scores_of(messages: Any, model_version: int, images: int) -> Scores:
    """A reply's scores, one per image asked about; else INTERNAL."""
    if len(messages) != images:
        raise malformed(f"{len(messages)} scores; the request asked about {plural(images, 'image')}")
    return Scores.from_proto(messages, model_version)
