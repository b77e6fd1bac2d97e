"""The Open Inference Protocol over HTTP (`/v2`): health, metadata, config and inference, JSON or binary.

    GET  /v2/health/live | /v2/health/ready                      200 {"live": true} / {"ready": true}, or 503
    GET  /v2                                                    the server's name, version, extensions
    GET  /v2/models/{model}[/versions/{version}]                 the model's metadata
    GET  /v2/models/{model}[/versions/{version}]/ready           200 {"name", "ready": true}, or 503
    GET  /v2/models/{model}[/versions/{version}]/config          Triton's model configuration (perf_analyzer)
    POST /v2/models/{model}[/versions/{version}]/infer           one inference

An inference body is JSON, or, with Triton's binary tensor extension, JSON of `Inference-Header-Content-Length`
bytes followed by the inputs' raw bytes (each input's `parameters.binary_data_size`, in order). Outputs come
back as JSON `data`, or as raw bytes after the JSON when the request asks (`binary_data` on an output, or
`binary_data_output` for all). Each handler translates to the protocol's neutral request (`serving.oip`),
makes one catalogue call and translates back. Every call is admitted as a gRPC call is: the drain, the body
within the receive bound among the pending calls, a call slot and its bytes (`serving.dataplane.admission`);
its caller (the peer's address and port) shares the batchers fairly. Failures are `{"error": "..."}` with the
status of `serving.http.status`; metrics and the request log carry `protocol="http"`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import numpy as np
from aiohttp import web

from serving.dataplane.admission import CALLER, Admission
from serving.errors import InvalidRequest, ServingError
from serving.http.status import http_status
from serving.oip import tensors
from serving.oip.models import Catalogue, InferRequest, InferResult, Param, TensorMetadata, add_input
from serving.request_record import RequestRecord
from serving.tracing import REQUEST_ID, REQUEST_ID_HEADER, request_id_of

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"


class _Input(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = {}
    data: Any = None


class _Output(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    parameters: dict[str, Any] = {}


class _Request(msgspec.Struct, forbid_unknown_fields=True):
    inputs: list[_Input] = []
    outputs: list[_Output] = []
    parameters: dict[str, Any] = {}
    id: str = ""
    model_name: str = ""  # the KServe SDK repeats the path's model here; the path decides
    model_version: str = ""


_DECODER = msgspec.json.Decoder(_Request)
_ENCODER = msgspec.json.Encoder()


class RestApi:
    """The `/v2` routes over a catalogue, admitted and observed like the gRPC services' calls."""

    def __init__(
        self,
        catalogue: Catalogue,
        admission: Admission,
        record: RequestRecord,
        ready: Callable[[], Awaitable[bool]],
        server_metadata: dict[str, Any],
        max_body_bytes: int,
    ) -> None:
        self.catalogue = catalogue
        self.admission = admission
        self.record = record
        self.tracing = record.tracing
        self.ready = ready
        self.server_metadata = server_metadata
        self.max_body_bytes = max_body_bytes  # larger: 413 (the listener's client_max_size too)

    def routes(self) -> list[web.RouteDef]:
        models = "/v2/models/{model}"
        versioned = "/v2/models/{model}/versions/{version}"
        return [
            web.get("/v2/health/live", self.live),
            web.get("/v2/health/ready", self.server_ready),
            web.get("/v2", self.server_info),
            *[web.get(prefix, self.model_metadata) for prefix in (models, versioned)],
            *[web.get(f"{prefix}/ready", self.model_ready) for prefix in (models, versioned)],
            *[web.get(f"{prefix}/config", self.model_config) for prefix in (models, versioned)],
            *[web.post(f"{prefix}/infer", self.infer) for prefix in (models, versioned)],
        ]

    async def live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def server_ready(self, request: web.Request) -> web.Response:
        ready = await self.ready()
        return _json({"ready": ready}, status=200 if ready else 503)

    async def server_info(self, request: web.Request) -> web.Response:
        return _json(self.server_metadata)

    async def model_ready(self, request: web.Request) -> web.Response:
        model, version = _model_and_version(request)
        ready = self.catalogue.ready(model, version)
        return _json({"name": model, "ready": ready}, status=200 if ready else 503)

    async def model_metadata(self, request: web.Request) -> web.Response:
        return await self._answer(request, "ModelMetadata", self._metadata)

    async def model_config(self, request: web.Request) -> web.Response:
        return await self._answer(request, "ModelConfig", self._config)

    async def infer(self, request: web.Request) -> web.Response:
        return await self._answer(request, "ModelInfer", self._infer, admitted=True)

    async def _metadata(self, request: web.Request) -> tuple[web.Response, str, int | None]:
        metadata = self.catalogue.metadata(*_model_and_version(request))
        body = {
            "name": metadata.name,
            "versions": metadata.versions,
            "platform": metadata.platform,
            "inputs": [_tensor(tensor) for tensor in metadata.inputs],
            "outputs": [_tensor(tensor) for tensor in metadata.outputs],
        }
        return _json(body), "", None

    async def _config(self, request: web.Request) -> tuple[web.Response, str, int | None]:
        config = self.catalogue.config(*_model_and_version(request))
        body = {
            "name": config.name,
            "platform": config.platform,
            "max_batch_size": config.max_batch_size,
            "input": [_config_tensor(tensor) for tensor in config.inputs],
            "output": [_config_tensor(tensor) for tensor in config.outputs],
        }
        return _json(body), "", None

    async def _infer(self, request: web.Request) -> tuple[web.Response, str, int | None]:
        body = await self._receive(request)
        with self.admission.calls.hold(), self.admission.request_bytes.hold(len(body)):
            model, version = _model_and_version(request)
            parsed, blobs = _split(body, request.headers.get(HEADER_LENGTH))
            result = await self.catalogue.infer(_infer_request(self.catalogue, model, version, parsed, blobs))
        response = _infer_response(result, parsed)
        first = next(iter(result.outputs.values()), None)
        return response, str(result.version), None if first is None or first.ndim == 0 else int(first.shape[0])

    async def _receive(self, request: web.Request) -> bytes:
        """The request body, within the receive bound among the pending calls, at most --max-message-bytes."""
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=self.max_body_bytes, actual_size=request.content_length)
        body: bytes = await self.admission.pending.receive(request.read, _peer(request))
        return body

    async def _answer(
        self,
        request: web.Request,
        method: str,
        handle: Callable[[web.Request], Awaitable[tuple[web.Response, str, int | None]]],
        admitted: bool = False,
    ) -> web.Response:
        """One observed call: its error as `{"error": ...}`, its metrics and log line (`protocol="http"`), its
        span when tracing is on (the caller's trace continued from `traceparent`)."""
        started = time.perf_counter()
        drain = self.admission.drain
        version, items, accepted = "", None, False
        # Requests on one keep-alive connection may share a task: the request id is this request's alone.
        request_id = request_id_of(request.headers.get(REQUEST_ID_HEADER))
        named = REQUEST_ID.set(request_id)
        span = None
        if self.tracing.enabled:
            route = request.match_info.route.resource
            attributes: dict[str, Any] = {
                "http.request.method": request.method,
                "http.route": route.canonical if route is not None else request.path,
                "url.path": request.path,
            }
            if request_id is not None:
                attributes["vae.request_id"] = request_id
            name = f"{request.method} {attributes['http.route']}"
            headers = request.headers
            span = self.tracing.start_server_span(
                name, headers.get("traceparent"), headers.get("tracestate"), attributes
            )
        try:
            drain.check_accepting()
            if admitted:
                drain.started()
                accepted = True
            CALLER.set(_peer(request))
            response, version, items = await handle(request)
            code = "OK"
        except web.HTTPRequestEntityTooLarge:
            message = f"the request body is larger than {self.max_body_bytes} bytes (--max-message-bytes)"
            code, response = "RESOURCE_EXHAUSTED", _error(413, message)
        except Exception as error:  # every failure becomes a reply; bugs are logged
            status, code, message = http_status(error)
            if not isinstance(error, ServingError):
                log.error("request_failed", exc_info=error, extra={"fields": {"method": method, "protocol": "http"}})
            response = _error(status, message)
        finally:
            if accepted:
                drain.finished()
        items = items if code == "OK" else None
        self.record.finished(method, "http", code, version, time.perf_counter() - started, items)
        if span is not None:
            outcome: dict[str, Any] = {"http.response.status_code": response.status, "vae.method": method}
            if version:
                outcome["vae.model.version"] = int(version)
            if items is not None:
                outcome["vae.rows"] = items
            span.end(response.status < 500, outcome, code)  # 4xx: the caller's error, not the server's
        REQUEST_ID.reset(named)
        return response


def _peer(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return f"http:{peer[0]}:{peer[1]}" if peer else "http:unknown"


def _model_and_version(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=_ENCODER.encode(body), status=status, content_type=JSON_TYPE)


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status=status)


def _tensor(tensor: TensorMetadata) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}


def _config_tensor(tensor: TensorMetadata) -> dict[str, Any]:
    return {"name": tensor.name, "data_type": f"TYPE_{tensor.datatype}", "dims": tensor.shape}


def _split(body: bytes, header_length: str | None) -> tuple[_Request, bytes]:
    """The JSON part of the body, parsed, and the binary part after it (Inference-Header-Content-Length)."""
    length = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidRequest(
                f"{HEADER_LENGTH} is {header_length!r}; it must be the JSON part's length, at most the body's "
                f"{len(body)} bytes"
            )
        length = int(header_length)
    try:
        return _DECODER.decode(body[:length]), body[length:]
    except msgspec.ValidationError as error:
        raise InvalidRequest(f"the inference request is not valid: {error}") from None
    except msgspec.DecodeError as error:
        raise InvalidRequest(f"the inference request is not valid JSON: {error}") from None


def _parameters(values: dict[str, Any]) -> dict[str, Param]:
    """The request's parameters, each a bool, number or string (the protocol's parameter kinds)."""
    for name, value in values.items():
        if not isinstance(value, (bool, int, float, str)):
            raise InvalidRequest(f"parameter {name!r} is {type(value).__name__}; give a bool, number or string")
    return values


def _infer_request(catalogue: Catalogue, model: str, version: str, parsed: _Request, blobs: bytes) -> InferRequest:
    """The JSON request and its binary part as the protocol's neutral request, each tensor checked."""
    operation = catalogue.operation(model)
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in parsed.inputs:
        size = tensor.parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(blobs):
                raise InvalidRequest(
                    f"input {tensor.name!r} has binary_data_size {size!r}; {len(blobs) - offset} bytes of binary "
                    "data are left for it"
                )
            data = blobs[offset : offset + size]
            offset += size
            add_input(operation, inputs, tensor.name, tensor.datatype, tensor.shape, raw=data)
        elif tensor.data is None:
            raise InvalidRequest(f"input {tensor.name!r} has neither data nor parameters.binary_data_size")
        else:
            add_input(operation, inputs, tensor.name, tensor.datatype, tensor.shape, values=tensor.data)
    if offset != len(blobs):
        raise InvalidRequest(f"the body has {len(blobs) - offset} bytes of binary data that no input claims")
    return InferRequest(
        model=model,
        version=version,
        inputs=inputs,
        parameters=_parameters(parsed.parameters),
        outputs=[output.name for output in parsed.outputs],
    )


def _infer_response(result: InferResult, parsed: _Request) -> web.Response:
    """JSON outputs, or JSON then raw bytes for those asked in binary (Inference-Header-Content-Length)."""
    binary_by_default = parsed.parameters.get("binary_data_output") is True
    asked = {output.name: output.parameters.get("binary_data") for output in parsed.outputs}
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in result.outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": tensors.datatype_of(array), "shape": list(array.shape)}
        binary = asked.get(name)
        if binary is True or (binary is None and binary_by_default):
            blobs.append(tensors.to_raw(array))
            entry["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": result.model, "model_version": str(result.version), "outputs": outputs}
    if parsed.id:
        body["id"] = parsed.id
    if result.parameters:
        body["parameters"] = result.parameters
    header = _ENCODER.encode(body)
    if not blobs:
        return web.Response(body=header, content_type=JSON_TYPE)
    response = web.Response(body=b"".join([header, *blobs]), content_type="application/octet-stream")
    response.headers[HEADER_LENGTH] = str(len(header))
    return response
