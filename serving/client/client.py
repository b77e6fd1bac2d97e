"""A typed client for VaeService: numpy in, numpy out. It imports the contract (`serving.api`), nothing of the server.

    with VaeClient("localhost:50051") as vae:
        drawn = vae.sample(16, seed=1)                 # .images [16,1,28,28] float32, .latents [16,D], .seed, .offset
        posterior = vae.encode(drawn.images)           # .mu, .log_var, each [16,D]
        scores = vae.score(drawn.images)               # per image: .negative_elbo, .corrected, ... (nats)
        print(scores.model_version)                    # every result names the version that answered it
        canary = vae.using(label="canary")             # the same channel, requests naming a label
        canary_drawn = canary.sample(16, seed=1)

Every method that calls VaeService returns a small frozen result carrying `model_version`, the version that
answered that very call, so one client can be shared by threads without their answers being mixed up. A client
names a version (`model_version=3`) or a label (`label="stable"`) in every request, or neither (the server's
default route).

For a server with TLS, pass the CA that signed its certificate (`tls_ca`; without it the system's roots),
and for mutual TLS a client certificate and key (`tls_cert`, `tls_key`); the CLI's `--tls-ca`, `--tls-cert`,
`--tls-key` (`python -m serving.client --help`) do the same.

Every call has a deadline (`timeout_s`). Only UNAVAILABLE and a CANCELLED sent by the server are retried (by
gRPC's own retry policy, with backoff): every VaeService method is free of side effects, UNAVAILABLE means
the request did not run, and a server cancels calls only when it shuts down (gRPC refuses calls that race
its listener closing with CANCELLED, before they reach the service). A cancel by the caller is never retried.
Failures raise `VaeError` carrying the gRPC status code and the server's message; a reply that does not
decode raises `VaeError` with INTERNAL, as gRPC's own clients report a malformed response.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.api import SERVICE_NAME, pb, pb_grpc
from serving.api.tensors import WireFormatError, tensor_from_proto, tensor_to_proto

DEFAULT_TARGET = "localhost:50051"
_DTYPES = {"float32": pb.DTYPE_FLOAT32, "uint8": pb.DTYPE_UINT8}
INTERPOLATION_METHODS = {"linear": pb.LINEAR, "slerp": pb.SLERP}


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
class VersionStatus:
    """A version on the server: AVAILABLE (takes requests), UNLOADING (finishing them) or FAILED (never served)."""

    version: int
    state: str
    labels: tuple[str, ...]
    is_default: bool
    error: str = ""


def _array(tensor: pb.Tensor, field: str) -> np.ndarray:
    """A reply's tensor as an array; a malformed one is the server's fault, reported as INTERNAL."""
    try:
        return tensor_from_proto(tensor, field)
    except WireFormatError as exc:
        raise VaeError(grpc.StatusCode.INTERNAL, f"malformed reply from the server: {exc}") from None


def _service_config(retries: int) -> str:
    policy = {
        "maxAttempts": retries + 1,
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
    }
    return json.dumps({"methodConfig": [{"name": [{"service": SERVICE_NAME}], "retryPolicy": policy}]})


def channel_credentials(
    tls_ca: Path | None = None, tls_cert: Path | None = None, tls_key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials: trust `tls_ca` (None: the system's roots), present `tls_cert`/`tls_key` (mutual TLS)."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together: give both or neither")

    def read(path: Path | None) -> bytes | None:
        return None if path is None else Path(path).read_bytes()

    return grpc.ssl_channel_credentials(
        root_certificates=read(tls_ca), private_key=read(tls_key), certificate_chain=read(tls_cert)
    )


def _samples(reply: pb.SampleResponse) -> Samples:
    """A Sample reply, or one SampleStream message, as its rows and where they sit in the seed's sequence."""
    return Samples(
        _array(reply.images, "images"), _array(reply.latents, "latents"), reply.seed, reply.offset, reply.model_version
    )


def _version_spec(model_version: int | None, label: str | None) -> pb.ModelVersionSpec | None:
    if model_version is not None and label is not None:
        raise ValueError("name a model_version or a label, not both")
    if model_version is not None:
        return pb.ModelVersionSpec(number=model_version)
    return None if label is None else pb.ModelVersionSpec(label=label)


def _wire(array: np.ndarray) -> pb.Tensor:
    """uint8 stays uint8 (images); anything else is sent as float32."""
    array = np.asarray(array)
    return tensor_to_proto(array if array.dtype == np.uint8 else array.astype(np.float32, copy=False))


class VaeClient:
    """Blocking client for one server (`target` as gRPC spells it: "host:port", "dns:///name:port", ...).

    Plaintext unless `tls` is set or a TLS file is given: `tls_ca` (PEM CA of the server's certificate),
    `tls_cert` and `tls_key` (the client's certificate and key, for servers that require mutual TLS).
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        timeout_s: float = 30.0,
        retries: int = 2,
        max_message_bytes: int = 64 * 1024 * 1024,
        tls: bool = False,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        model_version: int | None = None,
        label: str | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._spec = _version_spec(model_version, label)
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.enable_retries", int(retries > 0)),
        ]
        if retries > 0:  # gRPC wants maxAttempts >= 2 in a retry policy
            options.append(("grpc.service_config", _service_config(retries)))
        if tls or tls_ca is not None or tls_cert is not None:
            credentials = channel_credentials(tls_ca, tls_cert, tls_key)
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.VaeServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def using(self, model_version: int | None = None, label: str | None = None) -> VaeClient:
        """This client on the same channel, its requests naming `model_version` or `label` (neither: default)."""
        view = copy.copy(self)
        view._spec = _version_spec(model_version, label)
        return view

    def __enter__(self) -> VaeClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _versioned(self, request: Any) -> Any:
        """`request` naming this client's version or label (when it has one, and the message has the field)."""
        if self._spec is not None and "model_version" in request.DESCRIPTOR.fields_by_name:  # not health's
            request.model_version.CopyFrom(self._spec)
        return request

    def _call(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        request = self._versioned(request)
        try:
            return method(request, timeout=self.timeout_s if timeout_s is None else timeout_s)
        except grpc.RpcError as exc:
            raise VaeError(exc.code(), exc.details() or "") from None

    def encode(self, images: np.ndarray, timeout_s: float | None = None) -> Encoding:
        """Images [N,1,28,28] (float32 in [0,1] or uint8) → their posteriors: mu and log_var, each [N, D]."""
        reply = self._call(self._stub.Encode, pb.EncodeRequest(images=_wire(images)), timeout_s)
        return Encoding(_array(reply.mu, "mu"), _array(reply.log_var, "log_var"), reply.model_version)

    def decode(self, latents: np.ndarray, output_dtype: str = "float32", timeout_s: float | None = None) -> Decoding:
        """Latents [N, D] → images [N,1,28,28] (float32 in [0,1], or uint8 with output_dtype="uint8")."""
        request = pb.DecodeRequest(latents=_wire(latents), output_dtype=_DTYPES[output_dtype])
        reply = self._call(self._stub.Decode, request, timeout_s)
        return Decoding(_array(reply.images, "images"), reply.model_version)

    def _sample_request(
        self, count: int, seed: int | None, temperature: float | None, dtype: str, offset: int
    ) -> pb.SampleRequest:
        return pb.SampleRequest(
            num_samples=count, seed=seed, temperature=temperature, output_dtype=_DTYPES[dtype], offset=offset
        )

    def sample(
        self,
        count: int,
        seed: int | None = None,
        temperature: float | None = None,
        output_dtype: str = "float32",
        timeout_s: float | None = None,
        offset: int = 0,
    ) -> Samples:
        """Images [count,1,28,28] and latents [count, D]: rows offset .. offset + count - 1 of the seed's prior
        draws. The same seed and row always give the same image; without a seed the server draws one (the
        result's `seed`)."""
        request = self._sample_request(count, seed, temperature, output_dtype, offset)
        return _samples(self._call(self._stub.Sample, request, timeout_s))

    def sample_stream(
        self,
        count: int,
        seed: int | None = None,
        temperature: float | None = None,
        output_dtype: str = "float32",
        timeout_s: float | None = None,
        offset: int = 0,
    ) -> Generator[Samples, None, None]:
        """`sample` for large counts: one `Samples` per chunk, each with its own offset; closing the iterator early
        cancels the stream. A stream broken after k rows resumes with offset=offset + k."""
        request = self._versioned(self._sample_request(count, seed, temperature, output_dtype, offset))
        stream = self._stub.SampleStream(request, timeout=self.timeout_s if timeout_s is None else timeout_s)
        try:
            for reply in stream:
                yield _samples(reply)
        except grpc.RpcError as exc:
            raise VaeError(exc.code(), exc.details() or "") from None
        finally:
            stream.cancel()

    def interpolate(
        self,
        start: np.ndarray,
        end: np.ndarray,
        steps: int = 10,
        method: str = "linear",
        output_dtype: str = "float32",
        timeout_s: float | None = None,
    ) -> Interpolation:
        """P pairs of images [P,1,28,28] or latents [P,D] → the paths: images [P,steps,1,28,28], latents [P,steps,D]."""
        request = pb.InterpolateRequest(
            start=_wire(start),
            end=_wire(end),
            steps=steps,
            method=INTERPOLATION_METHODS[method],
            output_dtype=_DTYPES[output_dtype],
        )
        reply = self._call(self._stub.Interpolate, request, timeout_s)
        return Interpolation(_array(reply.images, "images"), _array(reply.latents, "latents"), reply.model_version)

    def score(
        self,
        images: np.ndarray,
        importance_samples: int = 0,
        seed: int | None = None,
        timeout_s: float | None = None,
    ) -> Scores:
        """Images [N,1,28,28] → their scores (nats); importance_samples=K adds the K-sample bound `iwae`."""
        request = pb.ScoreRequest(images=_wire(images), importance_samples=importance_samples, seed=seed)
        reply = self._call(self._stub.Score, request, timeout_s)
        return Scores.from_proto(reply.scores, reply.model_version)

    def reconstruct(
        self,
        images: np.ndarray,
        sample_posterior: bool = False,
        seed: int | None = None,
        output_dtype: str = "float32",
        timeout_s: float | None = None,
    ) -> Reconstruction:
        """Images → their reconstructions [N,1,28,28], the latents decoded [N, D] and the images' scores: the
        posterior means decoded, or with sample_posterior one seeded draw z ~ q(z|x) per image."""
        request = pb.ReconstructRequest(
            images=_wire(images), sample_posterior=sample_posterior, seed=seed, output_dtype=_DTYPES[output_dtype]
        )
        reply = self._call(self._stub.Reconstruct, request, timeout_s)
        return Reconstruction(
            _array(reply.images, "images"),
            _array(reply.latents, "latents"),
            Scores.from_proto(reply.scores, reply.model_version),
            reply.model_version,
        )

    def traverse(
        self,
        origin: np.ndarray,
        dimensions: tuple[int, ...] | list[int] = (),
        low: float | None = None,
        high: float | None = None,
        steps: int | None = None,
        relative: bool = False,
        output_dtype: str = "float32",
        timeout_s: float | None = None,
    ) -> Traversal:
        """One image [1,1,28,28] or latent [1, D] → the grid decoded while each dimension (default: all) sweeps
        linspace(low, high, steps) (default -3, 3, 9), the others staying at the origin's."""
        request = pb.TraverseRequest(
            origin=_wire(origin),
            dimensions=dimensions,
            low=low,
            high=high,
            steps=steps,
            relative=relative,
            output_dtype=_DTYPES[output_dtype],
        )
        reply = self._call(self._stub.Traverse, request, timeout_s)
        return Traversal(
            _array(reply.images, "images"),
            _array(reply.latents, "latents"),
            tuple(reply.dimensions),
            np.array(reply.values, dtype=np.float32),
            tuple(reply.active_dimensions),
            reply.model_version,
        )

    def model_info(self, timeout_s: float | None = None) -> ModelInfo:
        """The version this client's requests get (name, model_version, latent_dim, image shape, provider,
        manifest), and every version the server knows of."""
        reply = self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout_s)
        versions = tuple(
            VersionStatus(row.version, pb.VersionState.Name(row.state), tuple(row.labels), row.is_default, row.error)
            for row in reply.versions
        )
        return ModelInfo(
            reply.name,
            reply.version,
            reply.latent_dim,
            tuple(reply.image_shape),
            reply.provider,
            json.loads(reply.manifest_json),
            versions,
        )

    def health(self, service: str = "", timeout_s: float | None = None) -> str:
        """The server's health status for `service` ("" is the whole server): "SERVING", "NOT_SERVING", ..."""
        reply = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout_s)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
