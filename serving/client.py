"""A typed client for VaeService (numpy in, numpy out) and its command line.

    python -m serving.client --target localhost:50051 sample -n 64 --seed 1 -o samples.png
    python -m serving.client --target localhost:50051 interpolate a.png b.png --steps 10 -o strip.png
    python -m serving.client --target localhost:50051 info

In Python:

    with VaeClient("localhost:50051") as vae:
        images, latents = vae.sample(16, seed=1)       # [16,1,28,28] float32, [16,D]
        mu, log_var = vae.encode(images)

For a server with TLS, pass the CA that signed its certificate (`tls_ca`; without it the system's roots),
and for mutual TLS a client certificate and key (`tls_cert`, `tls_key`); the CLI's `--tls-ca`, `--tls-cert`,
`--tls-key` (or `VAE_TLS_CA`, `VAE_TLS_CLIENT_CERT`, `VAE_TLS_CLIENT_KEY`) do the same.

Every call has a deadline (`timeout_s`). Only UNAVAILABLE and a CANCELLED sent by the server are retried (by
gRPC's own retry policy, with backoff): every VaeService method is free of side effects, UNAVAILABLE means
the request did not run, and a server cancels calls only when it shuts down (gRPC refuses calls that race
its listener closing with CANCELLED, before they reach the service). A cancel by the caller is never retried.
Failures raise `VaeError` carrying the gRPC status code and the server's message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Generator
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.api import SERVICE_NAME, pb, pb_grpc
from serving.model import ModelInfo
from serving.tensors import tensor_from_proto, tensor_to_proto

DEFAULT_TARGET = "localhost:50051"
_DTYPES = {"float32": pb.DTYPE_FLOAT32, "uint8": pb.DTYPE_UINT8}
_METHODS = {"linear": pb.LINEAR, "slerp": pb.SLERP}


class VaeError(Exception):
    """A failed call: `code` is the gRPC status, `details` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


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
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
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

    def __enter__(self) -> VaeClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        try:
            return method(request, timeout=self.timeout_s if timeout_s is None else timeout_s)
        except grpc.RpcError as exc:
            raise VaeError(exc.code(), exc.details() or "") from None

    def encode(self, images: np.ndarray, timeout_s: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Images [N,1,28,28] (float32 in [0,1] or uint8) → (mu, log_var), each [N, D]."""
        reply = self._call(self._stub.Encode, pb.EncodeRequest(images=_wire(images)), timeout_s)
        return tensor_from_proto(reply.mu, "mu"), tensor_from_proto(reply.log_var, "log_var")

    def decode(self, latents: np.ndarray, output_dtype: str = "float32", timeout_s: float | None = None) -> np.ndarray:
        """Latents [N, D] → images [N,1,28,28] (float32 in [0,1], or uint8 with output_dtype="uint8")."""
        request = pb.DecodeRequest(latents=_wire(latents), output_dtype=_DTYPES[output_dtype])
        return tensor_from_proto(self._call(self._stub.Decode, request, timeout_s).images, "images")

    def _sample_request(self, count: int, seed: int | None, temperature: float | None, dtype: str) -> pb.SampleRequest:
        return pb.SampleRequest(num_samples=count, seed=seed, temperature=temperature, output_dtype=_DTYPES[dtype])

    def sample(
        self,
        count: int,
        seed: int | None = None,
        temperature: float | None = None,
        output_dtype: str = "float32",
        timeout_s: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(images [count,1,28,28], latents [count, D]) from the prior; the same seed gives the same images."""
        reply = self._call(self._stub.Sample, self._sample_request(count, seed, temperature, output_dtype), timeout_s)
        return tensor_from_proto(reply.images, "images"), tensor_from_proto(reply.latents, "latents")

    def sample_stream(
        self,
        count: int,
        seed: int | None = None,
        temperature: float | None = None,
        output_dtype: str = "float32",
        timeout_s: float | None = None,
    ) -> Generator[tuple[np.ndarray, np.ndarray], None, None]:
        """`sample` for large counts: (images, latents) chunks; closing the iterator early cancels the stream."""
        request = self._sample_request(count, seed, temperature, output_dtype)
        stream = self._stub.SampleStream(request, timeout=self.timeout_s if timeout_s is None else timeout_s)
        try:
            for reply in stream:
                yield tensor_from_proto(reply.images, "images"), tensor_from_proto(reply.latents, "latents")
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
    ) -> tuple[np.ndarray, np.ndarray]:
        """P pairs of images [P,1,28,28] or latents [P,D] → (images [P,steps,1,28,28], latents [P,steps,D])."""
        request = pb.InterpolateRequest(
            start=_wire(start), end=_wire(end), steps=steps, method=_METHODS[method], output_dtype=_DTYPES[output_dtype]
        )
        reply = self._call(self._stub.Interpolate, request, timeout_s)
        return tensor_from_proto(reply.images, "images"), tensor_from_proto(reply.latents, "latents")

    def model_info(self, timeout_s: float | None = None) -> ModelInfo:
        """The served model: name, version, latent_dim, image shape, provider and manifest."""
        reply = self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout_s)
        return ModelInfo(
            reply.name,
            reply.version,
            reply.latent_dim,
            tuple(reply.image_shape),
            reply.provider,
            json.loads(reply.manifest_json),
        )

    def health(self, service: str = "", timeout_s: float | None = None) -> str:
        """The server's health status for `service` ("" is the whole server): "SERVING", "NOT_SERVING", ..."""
        reply = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout_s)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _sample_command(client: VaeClient, args: argparse.Namespace) -> str:
    from serving.images import image_grid

    images, _ = client.sample(args.num_samples, seed=args.seed, temperature=args.temperature, output_dtype="uint8")
    image_grid(images, args.columns).save(args.output)
    seed = "random" if args.seed is None else args.seed
    return f"wrote {args.output}: {len(images)} samples (seed {seed})"


def _interpolate_command(client: VaeClient, args: argparse.Namespace) -> str:
    from serving.images import image_grid, load_image

    shape = client.model_info().image_shape
    start, end = (load_image(path, shape)[None] for path in (args.start, args.end))
    images, _ = client.interpolate(start, end, args.steps, args.method, output_dtype="uint8")
    image_grid(images.reshape(-1, *images.shape[2:]), columns=args.steps).save(args.output)
    return f"wrote {args.output}: {args.steps} images from {args.start} to {args.end} ({args.method})"


def _info_command(client: VaeClient, args: argparse.Namespace) -> str:
    info = client.model_info()
    summary = {
        "name": info.name,
        "version": info.version,
        "latent_dim": info.latent_dim,
        "image_shape": list(info.image_shape),
        "provider": info.provider,
        "health": client.health(),
        "manifest": info.manifest,
    }
    return json.dumps(summary, indent=2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.client", description="Call a running VAE server.")
    parser.add_argument(
        "--target", default=os.environ.get("VAE_TARGET", DEFAULT_TARGET), help="server address [env VAE_TARGET]"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    env = os.environ.get
    tls = parser.add_argument_group("TLS (plaintext unless one of these is given)")
    tls.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CA certificates")
    tls.add_argument("--tls-ca", type=Path, default=env("VAE_TLS_CA"), help="PEM CA of the server [env VAE_TLS_CA]")
    tls.add_argument(
        "--tls-cert", type=Path, default=env("VAE_TLS_CLIENT_CERT"), help="client certificate [env VAE_TLS_CLIENT_CERT]"
    )
    tls.add_argument("--tls-key", type=Path, default=env("VAE_TLS_CLIENT_KEY"), help="its key [env VAE_TLS_CLIENT_KEY]")
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser("sample", help="draw images from the prior and save them as a PNG grid")
    sample.add_argument("-n", "--num-samples", type=int, default=64, help="how many (default 64)")
    sample.add_argument("--seed", type=int, default=None, help="same seed, same images (default: random)")
    sample.add_argument("--temperature", type=float, default=None, help="prior std multiplier (default 1.0)")
    sample.add_argument("--columns", type=int, default=None, help="grid width (default: square)")
    sample.add_argument("-o", "--output", type=Path, default=Path("samples.png"), help="PNG to write")
    sample.set_defaults(run=_sample_command)

    interp = commands.add_parser("interpolate", help="decode the path between two images; save it as a PNG strip")
    interp.add_argument("start", type=Path, help="first image (PNG; grayscale, resized to the model's size)")
    interp.add_argument("end", type=Path, help="last image")
    interp.add_argument("--steps", type=int, default=10, help="images in the strip, both ends included (default 10)")
    interp.add_argument("--method", choices=sorted(_METHODS), default="linear", help="path in latent space")
    interp.add_argument("-o", "--output", type=Path, default=Path("strip.png"), help="PNG to write")
    interp.set_defaults(run=_interpolate_command)

    info = commands.add_parser("info", help="print the served model, its provider, health and manifest (JSON)")
    info.set_defaults(run=_info_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tls_files = {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}
        with VaeClient(args.target, timeout_s=args.timeout, tls=args.tls, **tls_files) as client:
            print(args.run(client, args))
    except VaeError as exc:
        print(f"error: {args.target}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # --tls-cert without --tls-key
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `... info | head`: the reader has what it wanted, as with any Unix tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 0
    except OSError as exc:  # reading or writing a PNG, reading a TLS file
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
