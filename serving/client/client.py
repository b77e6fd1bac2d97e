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
decode, or does not answer its request (another number of rows, paths, steps or scores than asked for, a
stream whose chunks skip or repeat rows, a manifest that is not a JSON object), raises `VaeError` with
INTERNAL, as gRPC's own clients report a malformed response.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Generator
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.api import REQUEST_ID_METADATA, SERVICE_NAME, pb, pb_grpc
from serving.api.tensors import tensor_to_proto
from serving.client.results import (
    Decoding,
    Encoding,
    Interpolation,
    ModelInfo,
    Reconstruction,
    Samples,
    Scores,
    Traversal,
    VaeError,
    VersionComparison,
    VersionStatus,
    answered,
    array_of,
    malformed,
    plural,
    rows_of,
    samples_of,
    scores_of,
)

DEFAULT_TARGET = "localhost:50051"
_DTYPES = {"float32": pb.DTYPE_FLOAT32, "uint8": pb.DTYPE_UINT8}
INTERPOLATION_METHODS = {"linear": pb.LINEAR, "slerp": pb.SLERP}


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
        self._metadata: tuple[tuple[str, str], ...] = ()  # sent with every call (`with_request_id`)
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

    def with_request_id(self, request_id: str) -> VaeClient:
        """This client on the same channel, its calls sending `x-request-id: request_id`: the server's log lines
        and trace of each call carry it. ValueError unless it is 1 to 128 printable ASCII characters (what gRPC
        metadata may carry, and what the server keeps)."""
        if not 0 < len(request_id) <= 128 or not all(" " <= char <= "~" for char in request_id):
            raise ValueError(f"request id {request_id!r}: give 1 to 128 printable ASCII characters")
        view = copy.copy(self)
        view._metadata = (
            *(item for item in self._metadata if item[0] != REQUEST_ID_METADATA),
            (REQUEST_ID_METADATA, request_id),
        )
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
            timeout = self.timeout_s if timeout_s is None else timeout_s
            return method(request, timeout=timeout, metadata=self._metadata or None)
        except grpc.RpcError as exc:
            raise VaeError(exc.code(), exc.details() or "") from None

    def encode(self, images: np.ndarray, timeout_s: float | None = None) -> Encoding:
        """Images [N,1,28,28] (float32 in [0,1] or uint8) → their posteriors: mu and log_var, each [N, D]."""
        reply = self._call(self._stub.Encode, pb.EncodeRequest(images=_wire(images)), timeout_s)
        rows = rows_of(images)
        asked = plural(rows, "image")
        return Encoding(
            answered("mu", array_of(reply.mu, "mu"), (rows,), asked),
            answered("log_var", array_of(reply.log_var, "log_var"), (rows,), asked),
            reply.model_version,
        )

    def decode(self, latents: np.ndarray, output_dtype: str = "float32", timeout_s: float | None = None) -> Decoding:
        """Latents [N, D] → images [N,1,28,28] (float32 in [0,1], or uint8 with output_dtype="uint8")."""
        request = pb.DecodeRequest(latents=_wire(latents), output_dtype=_DTYPES[output_dtype])
        reply = self._call(self._stub.Decode, request, timeout_s)
        rows = rows_of(latents)
        return Decoding(
            answered("images", array_of(reply.images, "images"), (rows,), plural(rows, "latent")), reply.model_version
        )

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
        drawn = samples_of(self._call(self._stub.Sample, request, timeout_s), rows=count)
        if drawn.offset != offset:
            raise malformed(f"the rows start at offset {drawn.offset}; the request asked for offset {offset}")
        return drawn

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
        cancels the stream. A stream broken after k rows resumes with offset=offset + k. Chunks that skip or
        repeat rows, or a stream that ends before `count` rows, raise VaeError (INTERNAL)."""
        request = self._versioned(self._sample_request(count, seed, temperature, output_dtype, offset))
        timeout = self.timeout_s if timeout_s is None else timeout_s
        stream = self._stub.SampleStream(request, timeout=timeout, metadata=self._metadata or None)
        received = 0  # rows so far; the next chunk must start at offset + received
        try:
            for reply in stream:
                chunk = samples_of(reply)
                rows = len(chunk.latents)
                if chunk.offset != offset + received or received + rows > count:
                    raise malformed(
                        f"a chunk of rows {chunk.offset} .. {chunk.offset + rows - 1} after {received} of {count} "
                        f"rows from offset {offset}: chunks must follow each other"
                    )
                received += rows
                yield chunk
            if received != count:
                raise malformed(f"the stream ended after {received} of {count} rows")
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
        paths = (rows_of(start), steps)
        asked = f"{plural(paths[0], 'path')} of {steps} steps"
        return Interpolation(
            answered("images", array_of(reply.images, "images"), paths, asked),
            answered("latents", array_of(reply.latents, "latents"), paths, asked),
            reply.model_version,
        )

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
        return scores_of(reply.scores, reply.model_version, rows_of(images))

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
        rows = rows_of(images)
        asked = plural(rows, "image")
        return Reconstruction(
            answered("images", array_of(reply.images, "images"), (rows,), asked),
            answered("latents", array_of(reply.latents, "latents"), (rows,), asked),
            scores_of(reply.scores, reply.model_version, rows),
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
        swept = tuple(reply.dimensions)
        if (dimensions and swept != tuple(dimensions)) or (steps is not None and len(reply.values) != steps):
            raise malformed(
                f"it swept dimensions {list(swept)} over {len(reply.values)} values; the request asked for "
                f"{list(dimensions) or 'all'} over {steps if steps is not None else 'the default'} steps"
            )
        grid = (len(swept), len(reply.values))
        asked = f"{plural(grid[0], 'dimension')} × {grid[1]} steps"
        return Traversal(
            answered("images", array_of(reply.images, "images"), grid, asked),
            answered("latents", array_of(reply.latents, "latents"), grid, asked),
            swept,
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
        try:
            manifest = json.loads(reply.manifest_json)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            raise malformed(f"manifest_json is not JSON: {str(exc)[:200]}") from None
        if not isinstance(manifest, dict):
            raise malformed(f"manifest_json is not a JSON object: {reply.manifest_json[:40]!r}")
        return ModelInfo(
            reply.name, reply.version, reply.latent_dim, tuple(reply.image_shape), reply.provider, manifest, versions
        )

    def compare_versions(
        self, candidate: int | None = None, label: str | None = None, timeout_s: float | None = None
    ) -> VersionComparison:
        """The server's evidence on a candidate (a version number or label; neither: the canary's version)
        against the stable version, from shadow scoring on the same live inputs."""
        request = pb.CompareVersionsRequest(candidate=_version_spec(candidate, label))
        reply = self._call(self._stub.CompareVersions, request, timeout_s)
        if candidate is not None and reply.candidate != candidate:
            raise malformed(f"it compares version {reply.candidate}; the request asked about {candidate}")
        if reply.paired_inputs and not 0.0 <= reply.share_worse <= 1.0:
            raise malformed(f"share_worse is {reply.share_worse:g}, not a share (0 .. 1)")
        return VersionComparison.from_proto(reply)

    def health(self, service: str = "", timeout_s: float | None = None) -> str:
        """The server's health status for `service` ("" is the whole server): "SERVING", "NOT_SERVING", ..."""
        reply = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout_s)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
