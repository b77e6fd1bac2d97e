"""A do-nothing VaeService: Decode answers at once with a cached reply of the requested size, no model.

    python -m bench.echo_server --port 50052 --cpus 0

What the same load costs with no work behind it: gRPC, protobuf and the loopback for a reply of that size,
plus the load generator itself. Against it, `bench/serving.py` measures the transport floor (how close to
the in-process limit any grpc.aio server can get at 1 caller x 64 rows) and the requests/s the load
generator can drive at all (the cap on the many-callers figures).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from bench.loadgen import pin_to_cpus
from serving.api import SERVICE_NAME, pb, pb_grpc
from serving.tensors import fill_tensor

IMAGE_SHAPE = (1, 28, 28)


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


async def serve(host: str, port: int, latent_dim: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_VaeServiceServicer_to_server(EchoServicer(latent_dim), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=50052, help="gRPC port")
    parser.add_argument("--latent-dim", type=int, default=20, help="what GetModelInfo reports")
    parser.add_argument("--cpus", help="pin to these CPUs, e.g. 0")
    args = parser.parse_args(argv)
    if args.cpus:
        pin_to_cpus(args.cpus)
    asyncio.run(serve(args.host, args.port, args.latent_dim))
    return 0


if __name__ == "__main__":
    sys.exit(main())
