"""The two reference servers `bench/serving.py` measures ours against, each answering Decode only.

    python -m bench.baseline_servers --kind echo --port 50052 --cpus 0
    python -m bench.baseline_servers --kind minimal --model-dir models/vae-mnist --port 50052 --cpus 0

Each logs the `server_started` JSON line our server logs (with the port bound: `--port 0` picks a free one),
so bench/server_process.py starts them all the same way.

- `echo`: a cached reply of the requested size, no model. What gRPC, protobuf and the loopback cost for a
  reply of that size, plus the load generator itself: the transport floor (how close to the in-process limit
  any grpc.aio server can get at 1 caller x 64 rows) and the requests/s the load generator can drive at all.
- `minimal`: the smallest honest grpc.aio model server, the usual yardstick "for scale": parse the
  latents, run the decoder inline on the event loop with the same onnxruntime session the server builds,
  reply. No batching, no validation, no metrics, no executor hop. What our server's own machinery costs is
  the distance between the two on the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from bench.loadgen import pin_to_cpus
from contract.repository import load_version
from serving.api import SERVICE_NAME, pb, pb_grpc
from serving.api.tensors import fill_tensor, tensor_from_proto
from serving.dataplane.runtime import GraphSession, Provider, RuntimeSettings, load_sessions

IMAGE_SHAPE = (1, 28, 28)
KINDS = ("echo", "minimal")


class EchoServicer(pb_grpc.VaeServiceServicer):
    """Decode replies with zero images of the right shape, built once per row count."""

    def __init__(self, latent_dim: int) -> None:
        self.latent_dim = latent_dim
        self.replies: dict[int, pb.DecodeResponse] = {}

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return pb.ModelInfo(name="echo", version=1, latent_dim=self.latent_dim, image_shape=IMAGE_SHAPE)

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext) -> pb.DecodeResponse:
        rows = request.latents.shape[0] if request.latents.shape else 1
        reply = self.replies.get(rows)
        if reply is None:
            reply = self.replies[rows] = pb.DecodeResponse()
            fill_tensor(reply.images, np.zeros((rows, *IMAGE_SHAPE), np.float32))
        return reply


class MinimalServicer(pb_grpc.VaeServiceServicer):
    """Decode: latents → `decoder.run` inline → a fresh reply."""

    def __init__(self, decoder: GraphSession, latent_dim: int) -> None:
        self.decoder = decoder
        self.latent_dim = latent_dim

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return pb.ModelInfo(name="minimal", version=1, latent_dim=self.latent_dim, image_shape=IMAGE_SHAPE)

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext) -> pb.DecodeResponse:
        (images,) = self.decoder.run(tensor_from_proto(request.latents, "latents"))
        reply = pb.DecodeResponse()
        fill_tensor(reply.images, images)
        return reply


def build_servicer(kind: str, model_dir: Path, provider: Provider, latent_dim: int) -> pb_grpc.VaeServiceServicer:
    if kind == "echo":
        return EchoServicer(latent_dim)
    version = load_version(model_dir)
    runtime = load_sessions(version, RuntimeSettings(provider=provider, intra_op_threads=1))
    return MinimalServicer(runtime.decoder, version.latent_dim)


async def serve(servicer: pb_grpc.VaeServiceServicer, host: str, port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_VaeServiceServicer_to_server(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(json.dumps({"event": "server_started", "grpc_address": f"{host}:{bound}"}), file=sys.stderr, flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=KINDS, default="echo", help="echo (no model) or minimal (decoder inline)")
    parser.add_argument("--model-dir", type=Path, default=Path("models/vae-mnist"), help="model for --kind minimal")
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="for --kind minimal")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=50052, help="gRPC port")
    parser.add_argument("--latent-dim", type=int, default=20, help="what the echo server's GetModelInfo reports")
    parser.add_argument("--cpus", help="pin to these CPUs, e.g. 0")
    args = parser.parse_args(argv)
    if args.cpus:
        pin_to_cpus(args.cpus)
    servicer = build_servicer(args.kind, args.model_dir, args.provider, args.latent_dim)
    asyncio.run(serve(servicer, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
