"""The gRPC servicer: protobuf ↔ numpy around one `VaeModel` call per RPC, errors mapped by `status_for`.

Every RPC runs inside `_Call`, which refuses new work while draining, turns the gRPC deadline into an
event-loop deadline for the batcher, maps exceptions to status codes (no stack trace leaves the server),
and records metrics and the optional request log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from types import TracebackType

import grpc
import numpy as np

from serving.api import pb, pb_grpc
from serving.errors import NotReady, Overloaded, status_for
from serving.metrics import Metrics
from serving.model import VaeModel
from serving.tensors import fill_tensor, method_from_proto, output_dtype_from_proto, tensor_from_proto

log = logging.getLogger(__name__)


class _Call:
    """One RPC in flight: refuses it while draining, maps its errors, records its metrics and log line.

    `deadline` (event-loop time) is what the batcher drops expired work by; `items` is set by the handler.
    `__aexit__` returns None: errors are never swallowed, they become a status via `context.abort`.
    """

    def __init__(self, servicer: VaeServicer, method: str, context: grpc.aio.ServicerContext) -> None:
        self.servicer = servicer
        self.method = method
        self.context = context
        self.items: int | None = None
        self.accepted = False  # counted by the servicer's drain
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining
        self.started = time.perf_counter()

    async def __aenter__(self) -> _Call:
        self.servicer.metrics.inflight.inc()
        if not self.servicer.accepting:
            await self._finish(
                NotReady("the server is shutting down and accepts no new requests; retry on another replica")
            )
        self.accepted = True
        self.servicer.call_started()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._finish(error)

    async def _finish(self, error: BaseException | None) -> None:
        metrics = self.servicer.metrics
        metrics.inflight.dec()
        if self.accepted:
            self.servicer.call_finished()
        failure: tuple[grpc.StatusCode, str] | None = None
        if error is None:
            code = "OK"
        elif isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            # gRPC cancelled the handler: the caller's deadline passed, or the caller went away. Asked of gRPC's
            # own clock: `self.deadline` (loop time) can lag it by a preemption of the thread that computed it,
            # and a busy machine then counted expired calls as CANCELLED (seen in tests/test_overload.py).
            remaining = self.context.time_remaining()
            expired = remaining is not None and remaining < 0.005
            code = "DEADLINE_EXCEEDED" if expired else "CANCELLED"
        else:
            failure = status_for(error)
            code = failure[0].name
        duration = time.perf_counter() - self.started
        metrics.request_finished(self.method, code, duration, self.items if code == "OK" else None)
        if self.servicer.log_requests:
            fields = {
                "method": self.method,
                "code": code,
                "duration_ms": round(duration * 1000, 3),
                "items": self.items,
            }
            log.info("request", extra={"fields": fields})
        if failure is not None:
            status, message = failure
            if status == grpc.StatusCode.INTERNAL:
                log.error("request_failed", exc_info=error, extra={"fields": {"method": self.method}})
            await self.context.abort(status, message)


class VaeServicer(pb_grpc.VaeServiceServicer):
    def __init__(
        self, model: VaeModel, metrics: Metrics, log_requests: bool = False, max_sample_streams: int = 64
    ) -> None:
        self.model = model
        self.metrics = metrics
        self.log_requests = log_requests
        self.accepting = True  # False once draining: new RPCs get UNAVAILABLE
        self.max_sample_streams = max_sample_streams  # SampleStream calls at once; more get RESOURCE_EXHAUSTED
        self.sample_streams = 0  # running now
        self._accepted_calls = 0  # accepted and not finished: what a drain waits for
        self._idle = asyncio.Event()
        self._idle.set()

    def call_started(self) -> None:
        self._accepted_calls += 1
        self._idle.clear()

    def call_finished(self) -> None:
        self._accepted_calls -= 1
        if self._accepted_calls == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every accepted call has finished (True), or `timeout_s` passed (False)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def _call(self, method: str, context: grpc.aio.ServicerContext) -> _Call:
        return _Call(self, method, context)

    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        async with self._call("Encode", context) as call:
            mu, log_var = await self.model.encode(tensor_from_proto(request.images, "images"), call.deadline)
            call.items = len(mu)
            response = pb.EncodeResponse()
            fill_tensor(response.mu, mu)
            fill_tensor(response.log_var, log_var)
            return response

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext) -> pb.DecodeResponse:
        async with self._call("Decode", context) as call:
            latents = tensor_from_proto(request.latents, "latents")
            images = await self.model.decode(latents, output_dtype_from_proto(request.output_dtype), call.deadline)
            call.items = len(images)
            response = pb.DecodeResponse()
            fill_tensor(response.images, images)
            return response

    async def Sample(self, request: pb.SampleRequest, context: grpc.aio.ServicerContext) -> pb.SampleResponse:
        async with self._call("Sample", context) as call:
            images, latents = await self.model.sample(
                request.num_samples,
                request.seed if request.HasField("seed") else None,
                request.temperature if request.HasField("temperature") else None,
                output_dtype_from_proto(request.output_dtype),
                call.deadline,
            )
            call.items = len(latents)
            return _sample_response(images, latents)

    async def SampleStream(
        self, request: pb.SampleRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SampleResponse]:
        async with self._call("SampleStream", context) as call:
            if self.sample_streams >= self.max_sample_streams:
                raise Overloaded(
                    f"server busy: {self.sample_streams} SampleStream calls are running and this server runs at "
                    f"most {self.max_sample_streams} at once; retry with backoff"
                )
            self.sample_streams += 1
            try:
                chunks = self.model.sample_stream(
                    request.num_samples,
                    request.seed if request.HasField("seed") else None,
                    request.temperature if request.HasField("temperature") else None,
                    output_dtype_from_proto(request.output_dtype),
                    call.deadline,
                )
                call.items = 0
                async for images, latents in chunks:
                    call.items += len(latents)
                    yield _sample_response(images, latents)
            finally:
                self.sample_streams -= 1

    async def Interpolate(
        self, request: pb.InterpolateRequest, context: grpc.aio.ServicerContext
    ) -> pb.InterpolateResponse:
        async with self._call("Interpolate", context) as call:
            images, latents = await self.model.interpolate(
                tensor_from_proto(request.start, "start"),
                tensor_from_proto(request.end, "end"),
                request.steps,
                method_from_proto(request.method),
                output_dtype_from_proto(request.output_dtype),
                call.deadline,
            )
            call.items = latents.shape[0] * latents.shape[1]
            response = pb.InterpolateResponse()
            fill_tensor(response.images, images)
            fill_tensor(response.latents, latents)
            return response

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        async with self._call("GetModelInfo", context):
            info = self.model.info
            return pb.ModelInfo(
                name=info.name,
                version=info.version,
                latent_dim=info.latent_dim,
                image_shape=info.image_shape,
                provider=info.provider,
                manifest_json=info.manifest_json,
            )


def _sample_response(images: np.ndarray, latents: np.ndarray) -> pb.SampleResponse:
    response = pb.SampleResponse()
    fill_tensor(response.images, images)
    fill_tensor(response.latents, latents)
    return response
