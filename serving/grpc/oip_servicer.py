"""The Open Inference Protocol's gRPC service (`inference.GRPCInferenceService`), beside VaeService on one port.

Each RPC translates protobuf to the protocol's neutral request (`serving.oip.models`), makes one call of the
catalogue, and translates back; the interceptor gives it the typed API's admission, status codes, metrics and
request log. Tensors come as `raw_input_contents` (one entry per input, little-endian bytes) or typed
`contents`, and the reply answers in the same encoding (raw when the request has no inputs: what tritonclient
reads). ModelStreamInfer answers each request message with one message, in the order they finish (each
carries the request's `id`); a failed request is an `error_message`, and the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import numpy as np

from serving.api import VERSION_METADATA, oip, oip_grpc
from serving.dataplane.admission import Admission, Slots
from serving.errors import InvalidRequest
from serving.grpc.converters import deadline_of
from serving.grpc.status import is_unexpected, status_for
from serving.oip import tensors
from serving.oip.models import (
    EXTENSIONS,
    SERVER_NAME,
    Catalogue,
    InferRequest,
    InferResult,
    ModelConfig,
    Param,
    TensorMetadata,
    add_input,
)
from serving.oip.tensors import DTYPES
from serving.request_record import RequestRecord

log = logging.getLogger(__name__)

# Typed `contents` field of each datatype.
_CONTENTS = {
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "UINT8": "uint_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "BOOL": "bool_contents",
}
_DATA_TYPES = {name: oip.DataType.Value(f"TYPE_{name}") for name in DTYPES}


def reply_items(reply: oip.ModelInferResponse) -> int:
    """Rows in a ModelInfer reply (the first dimension of its first output), for vae_request_items."""
    return int(reply.outputs[0].shape[0]) if reply.outputs and reply.outputs[0].shape else 0


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        catalogue: Catalogue,
        admission: Admission,
        streams: Slots,
        ready: Callable[[], Awaitable[bool]],
        version: str,
        stream_requests_in_flight: int,
        record: RequestRecord,
    ) -> None:
        self.catalogue = catalogue
        self.admission = admission
        self.streams = streams  # shared with SampleStream: long-lived calls, bounded over the server
        self.ready = ready
        self.version = version
        self.stream_requests_in_flight = stream_requests_in_flight
        self.record = record  # where each stream message is counted and logged as a request

    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=await self.ready())

    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelReadyResponse:
        return oip.ModelReadyResponse(ready=self.catalogue.ready(request.name, request.version))

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        metadata = self.catalogue.metadata(request.name, request.version)
        return oip.ModelMetadataResponse(
            name=metadata.name,
            versions=metadata.versions,
            platform=metadata.platform,
            inputs=[_tensor_metadata(tensor) for tensor in metadata.inputs],
            outputs=[_tensor_metadata(tensor) for tensor in metadata.outputs],
        )

    async def ModelConfig(
        self, request: oip.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelConfigResponse:
        return oip.ModelConfigResponse(config=_model_config(self.catalogue.config(request.name, request.version)))

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelInferResponse:
        result = await self.catalogue.infer(infer_request(self.catalogue, request, deadline_of(context)))
        context.set_trailing_metadata(((VERSION_METADATA, str(result.version)),))
        return infer_response(result, request, raw=_raw(request))

    async def ModelStreamInfer(
        self, requests: AsyncIterator[oip.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        """Each request message runs as soon as it arrives, at most `stream_requests_in_flight` at once (the
        stream stops reading beyond that); replies go out as they finish."""
        replies: asyncio.Queue[oip.ModelStreamInferResponse | None] = asyncio.Queue()
        room = asyncio.Semaphore(self.stream_requests_in_flight)
        running: set[asyncio.Task[None]] = set()

        async def answer(request: oip.ModelInferRequest) -> None:
            try:
                replies.put_nowait(await self._stream_reply(request, context))
            finally:
                room.release()

        async def read() -> None:
            try:
                async for request in requests:
                    await room.acquire()
                    task = asyncio.ensure_future(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*running)
            finally:
                replies.put_nowait(None)

        with self.streams.hold():
            reader = asyncio.ensure_future(read())
            try:
                while (reply := await replies.get()) is not None:
                    yield reply
                await reader  # its failure (a malformed message) ends the stream with its status
            finally:
                reader.cancel()
                for task in list(running):
                    task.cancel()

    async def _stream_reply(
        self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelStreamInferResponse:
        """One stream message's reply: admitted as a call of its own (a call slot and its bytes), counted as
        one request in the metrics, and traced as a child of the stream's span (when that is recorded)."""
        started = time.perf_counter()
        attributes = {"vae.model": request.model_name, "vae.message_id": request.id}
        with self.record.tracing.step("vae.stream_message", **attributes):
            try:
                with self.admission.calls.hold(), self.admission.request_bytes.hold(request.ByteSize()):
                    result = await self.catalogue.infer(infer_request(self.catalogue, request, deadline_of(context)))
                reply = infer_response(result, request, raw=_raw(request))
            except Exception as error:  # this message's failure, as its reply: the stream goes on
                if is_unexpected(error):  # a bug: logged here, never sent as a trace
                    log.error("request_failed", exc_info=error, extra={"fields": {"method": "ModelStreamInfer"}})
                self._message_done(status_for(error)[0].name, "", started, None)
                return oip.ModelStreamInferResponse(error_message=_error_message(error, request))
            self._message_done("OK", str(result.version), started, reply_items(reply))
        return oip.ModelStreamInferResponse(infer_response=reply)

    def _message_done(self, code: str, version: str, started: float, items: int | None) -> None:
        self.record.finished("ModelStreamInfer", "grpc", code, version, time.perf_counter() - started, items)


def _error_message(error: BaseException, request: oip.ModelInferRequest) -> str:
    code, message = status_for(error)
    return f"{code.name}: {message}" + (f" (request id {request.id!r})" if request.id else "")


def _raw(request: oip.ModelInferRequest) -> bool:
    """Whether the reply carries raw bytes: the request sent raw bytes, or no inputs at all."""
    return bool(request.raw_input_contents) or not request.inputs


def infer_request(catalogue: Catalogue, request: oip.ModelInferRequest, deadline: float | None) -> InferRequest:
    """A ModelInferRequest as the protocol's neutral request, its tensors checked against the model's inputs."""
    operation = catalogue.operation(request.model_name)
    raw = request.raw_input_contents
    tensors_in = request.inputs
    if raw and len(raw) != len(tensors_in):
        raise InvalidRequest(
            f"the request has {len(raw)} raw_input_contents for {len(tensors_in)} inputs: give one per input"
        )
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(tensors_in):
        if raw:
            if tensor.HasField("contents"):
                raise InvalidRequest(
                    f"input {tensor.name!r} has contents although the request sends raw_input_contents"
                )
            add_input(operation, inputs, tensor.name, tensor.datatype, list(tensor.shape), raw=raw[index])
        else:  # an unknown datatype has no contents field: add_input names it
            field = _CONTENTS.get(tensor.datatype)
            values = [] if field is None else getattr(tensor.contents, field)
            add_input(operation, inputs, tensor.name, tensor.datatype, list(tensor.shape), values=values)
    parameters = request.parameters
    return InferRequest(
        model=request.model_name,
        version=request.model_version,
        inputs=inputs,
        parameters={name: parameter_value(name, value) for name, value in parameters.items()} if parameters else {},
        outputs=[output.name for output in request.outputs] if request.outputs else (),
        deadline=deadline,
    )


def parameter_value(name: str, parameter: oip.InferParameter) -> Param:
    kind = parameter.WhichOneof("parameter_choice")
    if kind is None:
        raise InvalidRequest(f"parameter {name!r} has no value")
    value: Param = getattr(parameter, kind)
    return value


def parameter_message(value: Param) -> oip.InferParameter:
    """A parameter value as the protocol's message: ints from 2^63 up as uint64_param."""
    if isinstance(value, bool):
        return oip.InferParameter(bool_param=value)
    if isinstance(value, int):
        return oip.InferParameter(int64_param=value) if value < 2**63 else oip.InferParameter(uint64_param=value)
    if isinstance(value, float):
        return oip.InferParameter(double_param=value)
    return oip.InferParameter(string_param=value)


def infer_response(result: InferResult, request: oip.ModelInferRequest, raw: bool) -> oip.ModelInferResponse:
    response = oip.ModelInferResponse(model_name=result.model, model_version=str(result.version), id=request.id)
    for name, value in result.parameters.items():  # most replies have none
        response.parameters[name].CopyFrom(parameter_message(value))
    for name, array in result.outputs.items():
        output = response.outputs.add(name=name, datatype=tensors.datatype_of(array), shape=array.shape)
        if raw:
            response.raw_output_contents.append(tensors.to_raw(array))
        else:
            getattr(output.contents, _CONTENTS[output.datatype]).extend(array.ravel().tolist())
    return response


def _tensor_metadata(tensor: TensorMetadata) -> oip.ModelMetadataResponse.TensorMetadata:
    return oip.ModelMetadataResponse.TensorMetadata(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)


def _model_config(config: ModelConfig) -> oip.ModelConfig:
    return oip.ModelConfig(
        name=config.name,
        platform=config.platform,
        max_batch_size=config.max_batch_size,
        input=[oip.ModelInput(name=t.name, data_type=_DATA_TYPES[t.datatype], dims=t.shape) for t in config.inputs],
        output=[oip.ModelOutput(name=t.name, data_type=_DATA_TYPES[t.datatype], dims=t.shape) for t in config.outputs],
    )
