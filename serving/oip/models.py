"""The models the Open Inference Protocol sees, and one inference on a served version's engine.

Each served version of the model `<name>` (the model directory's) offers seven protocol models:

| model | inputs → outputs (parameters) |
| --- | --- |
| `<name>-encoder` | `x` [-1,1,28,28] FP32 in [0,1] or UINT8 → `mu`, `log_var` [-1,D] FP32 |
| `<name>-decoder` | `z` [-1,D] FP32 → `x` (`output_datatype`) |
| `<name>-sample` | none → `x`, `z` (`num_samples`, `seed`, `offset`, `temperature`, `output_datatype`) |
| `<name>-score` | `x` → the scores, [-1] FP64 each (`importance_samples`, `seed`) |
| `<name>-reconstruct` | `x` → `x`, `z`, the scores (`sample_posterior`, `seed`, `output_datatype`) |
| `<name>-interpolate` | `start`, `end` (latents or images) → `x` [P,S,1,28,28], `z` [P,S,D] (`steps`, `method`) |
| `<name>-traverse` | `origin` (a latent or image) → `x`, `z`, `dimensions`, `values` (`dimensions`, `low`, ...) |

Every one is the typed API's RPC of the same name (encoder: Encode, decoder: Decode), the same engine call
with the same checks and limits, so a seeded request gives the same numbers over both protocols. A version
is a string: a number, a label (`stable`), or empty for the default route; replies name the number that
answered. A transport (`serving.grpc.oip_servicer`) turns its messages into an `InferRequest` and an
`InferResult` back into its own; nothing here knows gRPC or HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from contract.manifest import MAX_VERSION
from contract.scores import ImageScores
from serving.dataplane.engine import OutputDType, VaeEngine
from serving.errors import InvalidRequest, NotFound
from serving.lifecycle.manager import ModelManager, VersionState
from serving.oip import tensors

Param = bool | int | float | str
SERVER_NAME = "vae-serving"  # ServerMetadata's name
# The protocol extensions this server implements, as ServerMetadata names them.
EXTENSIONS = ("model_configuration", "binary_tensor_data", "parameters")
IMAGES = ("FP32", "UINT8")  # what an image input may be sent as
SCORES = ("negative_elbo", "reconstruction", "kl", "complexity", "corrected", "latent_norm", "plugin_negative_elbo")
# Parameters a client of the protocol may send for its own purposes; the server takes no meaning from them.
PROTOCOL_PARAMETERS = frozenset(
    {
        "binary_data_output",
        "binary_data_size",
        "triton_enable_empty_final_response",
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "priority",
        "headers",
    }
)
TIMEOUT = "timeout"  # Triton's deadline parameter, microseconds: every model takes it (`_deadline`)


@dataclass(frozen=True)
class TensorSpec:
    """An input or output: its name, the datatypes it may have, and its shape (-1: any size; "D": latent_dim,
    "I": the image shape's dimensions)."""

    name: str
    datatypes: tuple[str, ...]
    shape: tuple[int | str, ...]

    def dims(self, latent_dim: int, image_shape: Sequence[int]) -> list[int]:
        dims: list[int] = []
        for dim in self.shape:
            dims += list(image_shape) if dim == "I" else [latent_dim] if dim == "D" else [int(dim)]
        return dims


@dataclass(frozen=True)
class InferRequest:
    """One inference, as either transport received it: arrays by input name, parameters by name."""

    model: str
    version: str = ""
    inputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    parameters: Mapping[str, Param] = field(default_factory=dict)
    outputs: Sequence[str] = ()  # the outputs wanted, in this order; empty: all
    deadline: float | None = None  # event-loop time


@dataclass(frozen=True)
class InferResult:
    """The outputs (in order) of the version that answered, and what the reply adds as parameters."""

    model: str
    version: int
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Param]


Outputs = tuple[dict[str, np.ndarray], dict[str, Param]]
Run = Callable[[VaeEngine, "_Arguments"], Awaitable[Outputs]]


@dataclass(frozen=True)
class Operation:
    """One protocol model kind: its tensors, its parameters, and the engine call it makes."""

    kind: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: Mapping[str, type]  # name → the kind its value must be (bool, int, float, str)
    run: Run
    batched: bool  # whether the first dimension of its inputs and outputs is the batch (ModelConfig)
    platform: str = "vae"

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        accepted = ", ".join(repr(spec.name) for spec in self.inputs) or "none"
        raise InvalidRequest(f"{self.kind} has no input {name!r}; its inputs: {accepted}")


class _Arguments:
    """An operation's inputs and parameters, read with the checks and messages the caller needs."""

    def __init__(self, operation: Operation, request: InferRequest) -> None:
        self.kind = operation.kind
        self.inputs = request.inputs
        self.parameters = request.parameters
        self.deadline = _deadline(request)
        missing = [spec.name for spec in operation.inputs if spec.name not in request.inputs]
        if missing:
            raise InvalidRequest(f"{self.kind} needs the input(s) {', '.join(map(repr, missing))}")
        if request.parameters:  # most requests send none: this is on every request's path
            self._check_parameters(operation)

    def _check_parameters(self, operation: Operation) -> None:
        unknown = sorted(set(self.parameters) - set(operation.parameters) - PROTOCOL_PARAMETERS - {TIMEOUT})
        if unknown:
            accepted = ", ".join(sorted(operation.parameters)) or "none"
            raise InvalidRequest(
                f"{self.kind} has no parameter {', '.join(map(repr, unknown))}; its parameters: {accepted}"
            )
        for name, kind in operation.parameters.items():
            if name in self.parameters:
                _check_kind(name, self.parameters[name], kind)

    def tensor(self, name: str) -> np.ndarray:
        return self.inputs[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.parameters.get(name, default)

    def number(self, name: str) -> float | None:
        value = self.parameters.get(name)
        return None if value is None else float(value)

    def output_dtype(self) -> OutputDType:
        value = self.parameters.get("output_datatype", "FP32")
        if value not in ("FP32", "UINT8"):
            raise InvalidRequest(f"output_datatype {value!r} is not one of FP32 (default), UINT8")
        return "uint8" if value == "UINT8" else "float32"


def _deadline(request: InferRequest) -> float | None:
    """The request's deadline (event-loop time): the transport's (a gRPC call's), or sooner by Triton's
    `timeout` parameter (microseconds from now, as tritonclient's `infer(timeout=...)` sends it; 0: none)."""
    timeout = request.parameters.get(TIMEOUT)
    if timeout is None:
        return request.deadline
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
        raise InvalidRequest(f"parameter 'timeout' is {timeout!r}; it is microseconds, an integer >= 0 (0: none)")
    if timeout == 0:
        return request.deadline
    deadline = asyncio.get_running_loop().time() + timeout / 1e6
    return deadline if request.deadline is None else min(deadline, request.deadline)


def _check_kind(name: str, value: Param, kind: type) -> None:
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise InvalidRequest(f"parameter {name!r} is {type(value).__name__} {value!r}; expected {kind.__name__}")


def _seed(arguments: _Arguments) -> int | None:
    seed = arguments.get("seed")
    if seed is not None and not 0 <= seed < 2**64:
        raise InvalidRequest(f"parameter 'seed' is {seed}; seeds are 0 .. 2^64 - 1")
    return seed


def _score_outputs(scores: ImageScores) -> dict[str, np.ndarray]:
    outputs = {name: np.asarray(getattr(scores, name), dtype=np.float64) for name in SCORES}
    if scores.iwae is not None:
        outputs["iwae"] = np.asarray(scores.iwae, dtype=np.float64)
    return outputs


async def _encode(engine: VaeEngine, a: _Arguments) -> Outputs:
    mu, log_var = await engine.encode(a.tensor("x"), a.deadline)
    return {"mu": mu, "log_var": log_var}, {}


async def _decode(engine: VaeEngine, a: _Arguments) -> Outputs:
    return {"x": await engine.decode(a.tensor("z"), a.output_dtype(), a.deadline)}, {}


async def _sample(engine: VaeEngine, a: _Arguments) -> Outputs:
    offset = a.get("offset", 0)
    if offset < 0:
        raise InvalidRequest(f"parameter 'offset' is {offset}; it must be >= 0")
    images, latents, seed = await engine.sample(
        a.get("num_samples", 1), _seed(a), a.number("temperature"), a.output_dtype(), a.deadline, offset
    )
    return {"x": images, "z": latents}, {"seed": seed, "offset": offset}


async def _score(engine: VaeEngine, a: _Arguments) -> Outputs:
    scores = await engine.score(a.tensor("x"), a.get("importance_samples", 0), _seed(a), a.deadline)
    return _score_outputs(scores), {}


async def _reconstruct(engine: VaeEngine, a: _Arguments) -> Outputs:
    images, latents, scores = await engine.reconstruct(
        a.tensor("x"), a.get("sample_posterior", False), _seed(a), a.output_dtype(), a.deadline
    )
    return {"x": images, "z": latents, **_score_outputs(scores)}, {}


_METHODS = ("linear", "slerp")


async def _interpolate(engine: VaeEngine, a: _Arguments) -> Outputs:
    method = a.get("method", "linear")
    if method not in _METHODS:
        raise InvalidRequest(f"parameter 'method' is {method!r}; use linear (default) or slerp")
    if "steps" not in a.parameters:
        raise InvalidRequest("interpolate needs the parameter 'steps' (points on each path, ends included)")
    images, latents = await engine.interpolate(
        a.tensor("start"), a.tensor("end"), a.get("steps"), method, a.output_dtype(), a.deadline
    )
    return {"x": images, "z": latents}, {}


def _dimensions(value: Param | None) -> list[int]:
    """The string "0,3,7" → [0, 3, 7]; none or "": every dimension."""
    if value is None or value == "":
        return []
    try:
        return [int(part) for part in str(value).split(",")]
    except ValueError:
        raise InvalidRequest(f"parameter 'dimensions' is {value!r}; give latent dimensions as \"0,3,7\"") from None


async def _traverse(engine: VaeEngine, a: _Arguments) -> Outputs:
    images, latents, dimensions, values = await engine.traverse(
        a.tensor("origin"),
        _dimensions(a.parameters.get("dimensions")),
        a.number("low"),
        a.number("high"),
        a.get("steps"),
        a.get("relative", False),
        a.output_dtype(),
        a.deadline,
    )
    return {"x": images, "z": latents, "dimensions": np.asarray(dimensions, dtype=np.int64), "values": values}, {}


_IMAGE_IN = TensorSpec("x", IMAGES, (-1, "I"))
_IMAGE_OUT = TensorSpec("x", IMAGES, (-1, "I"))
_LATENT = TensorSpec("z", ("FP32",), (-1, "D"))
_SCORE_OUTPUTS = tuple(TensorSpec(name, ("FP64",), (-1,)) for name in SCORES)
_PATHS = (TensorSpec("x", IMAGES, (-1, -1, "I")), TensorSpec("z", ("FP32",), (-1, -1, "D")))

OPERATIONS: dict[str, Operation] = {
    op.kind: op
    for op in (
        Operation(
            "encoder",
            (_IMAGE_IN,),
            (TensorSpec("mu", ("FP32",), (-1, "D")), TensorSpec("log_var", ("FP32",), (-1, "D"))),
            {},
            _encode,
            batched=True,
            platform="onnxruntime_onnx",
        ),
        Operation(
            "decoder",
            (_LATENT,),
            (_IMAGE_OUT,),
            {"output_datatype": str},  # FP32 (default) or UINT8: the images' datatype
            _decode,
            batched=True,
            platform="onnxruntime_onnx",
        ),
        Operation(
            "sample",
            (),
            (_IMAGE_OUT, _LATENT),
            {
                "num_samples": int,  # images to draw (default 1)
                "seed": int,  # 0 .. 2^64 - 1 (unset: the server draws one; scores: 0)
                "offset": int,  # the first row of the seed's draws (default 0)
                "temperature": float,  # scale of the prior's standard deviation (default 1)
                "output_datatype": str,  # FP32 (default) or UINT8: the images' datatype
            },
            _sample,
            batched=False,
        ),
        Operation(
            "score",
            (_IMAGE_IN,),
            (*_SCORE_OUTPUTS, TensorSpec("iwae", ("FP64",), (-1,))),
            {
                "importance_samples": int,  # K > 0 adds the K-sample bound `iwae` (default 0)
                "seed": int,  # 0 .. 2^64 - 1 (unset: the server draws one; scores: 0)
            },
            _score,
            batched=True,
        ),
        Operation(
            "reconstruct",
            (_IMAGE_IN,),
            (_IMAGE_OUT, _LATENT, *_SCORE_OUTPUTS),
            {
                "sample_posterior": bool,  # decode a posterior draw instead of the mean (default false)
                "seed": int,  # 0 .. 2^64 - 1 (unset: the server draws one; scores: 0)
                "output_datatype": str,  # FP32 (default) or UINT8: the images' datatype
            },
            _reconstruct,
            batched=True,
        ),
        Operation(
            "interpolate",
            (TensorSpec("start", IMAGES, (-1, "D")), TensorSpec("end", IMAGES, (-1, "D"))),
            _PATHS,
            {
                "steps": int,  # points on each path, ends included (required)
                "method": str,  # linear (default) or slerp
                "output_datatype": str,  # FP32 (default) or UINT8: the images' datatype
            },
            _interpolate,
            batched=False,
        ),
        Operation(
            "traverse",
            (TensorSpec("origin", IMAGES, (1, "D")),),
            (*_PATHS, TensorSpec("dimensions", ("INT64",), (-1,)), TensorSpec("values", ("FP32",), (-1,))),
            {
                "dimensions": str,  # "0,3,7": the latent dimensions to sweep (default: all)
                "low": float,  # the sweep's first value (default -3)
                "high": float,  # the sweep's last value (default 3)
                "steps": int,  # values in the sweep
                "relative": bool,  # add each value to the origin's own coordinate (default false)
                "output_datatype": str,  # FP32 (default) or UINT8: the images' datatype
            },
            _traverse,
            batched=False,
        ),
    )
}


def add_input(
    operation: Operation,
    inputs: dict[str, np.ndarray],
    name: str,
    datatype: str,
    shape: Sequence[int],
    raw: bytes | None = None,
    values: object = None,
) -> None:
    """One input of a request, as either transport sent it (raw bytes, or typed values), checked against the
    operation (a known name given once, a datatype it takes, data that fills the shape) and added to `inputs`."""
    if name in inputs:
        raise InvalidRequest(f"input {name!r} is given twice")
    accepted = operation.input(name).datatypes
    if raw is not None:
        inputs[name] = tensors.from_raw(name, datatype, shape, raw, accepted)
    else:
        inputs[name] = tensors.from_values(name, datatype, shape, values, accepted)


def version_choice(version: str) -> tuple[int | None, str | None]:
    """A protocol version string → (number, label): "3" → (3, None), "stable" → (None, "stable"), "" → both None."""
    if not version:
        return None, None
    if version.isdigit():
        number = int(version)
        if not 1 <= number <= MAX_VERSION:
            raise NotFound(f"model version {version} is not served: version numbers are 1 .. {MAX_VERSION}")
        return number, None
    return None, version


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True)
class ModelMetadata:
    """ModelMetadata's answer: a model's name, its versions served, platform and tensors."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


@dataclass(frozen=True)
class ModelConfig:
    """ModelConfig's answer (Triton's): the tensors without the batch dimension when max_batch_size > 0."""

    name: str
    platform: str
    max_batch_size: int
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class Catalogue:
    """The protocol models of the versions a `ModelManager` serves, and inference on them."""

    def __init__(self, models: ModelManager) -> None:
        self.models = models
        self._operations = {f"{models.name}-{kind}": operation for kind, operation in OPERATIONS.items()}

    @property
    def model_names(self) -> list[str]:
        return list(self._operations)

    def operation(self, model: str) -> Operation:
        """The operation a protocol model name stands for; NotFound naming the models there are."""
        operation = self._operations.get(model)
        if operation is None:
            raise NotFound(f"model {model!r} is not served; the models: {', '.join(self.model_names)}")
        return operation

    def ready(self, model: str, version: str) -> bool:
        """Whether `model` at `version` (number, label, or "" for the default route) takes requests now."""
        try:
            self.operation(model)
            self.models.engine(*version_choice(version))
        except NotFound:
            return False
        return True

    def metadata(self, model: str, version: str) -> ModelMetadata:
        operation = self.operation(model)
        engine = self.models.engine(*version_choice(version))
        versions = [str(row.version) for row in self.models.status() if row.state is VersionState.AVAILABLE]
        inputs, outputs = self._tensors(operation, engine, batch=True)
        return ModelMetadata(model, versions, operation.platform, inputs, outputs)

    def config(self, model: str, version: str) -> ModelConfig:
        operation = self.operation(model)
        engine = self.models.engine(*version_choice(version))
        inputs, outputs = self._tensors(operation, engine, batch=not operation.batched)
        batch = engine.limits.max_items_per_request if operation.batched else 0
        return ModelConfig(model, operation.platform, batch, inputs, outputs)

    @staticmethod
    def _tensors(
        operation: Operation, engine: VaeEngine, batch: bool
    ) -> tuple[list[TensorMetadata], list[TensorMetadata]]:
        """The tensors' metadata; without their first (batch) dimension unless `batch`."""
        shape_of = engine.version.latent_dim, engine.version.image_shape
        first = 0 if batch else 1

        def described(specs: tuple[TensorSpec, ...]) -> list[TensorMetadata]:
            return [TensorMetadata(s.name, s.datatypes[0], s.dims(*shape_of)[first:]) for s in specs]

        return described(operation.inputs), described(operation.outputs)

    async def infer(self, request: InferRequest) -> InferResult:
        """One engine call of the version the request names; the outputs it asked for, in its order."""
        operation = self.operation(request.model)
        wanted = list(request.outputs)
        seed = request.parameters.get("seed") if self.models.routes_by_request_id else None  # a key for the canary
        route_key = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
        async with self.models.lease(*version_choice(request.version), seed=route_key) as engine:
            arguments = _Arguments(operation, request)
            if wanted:
                known = [spec.name for spec in operation.outputs]
                unknown = [name for name in wanted if name not in known]
                if unknown:
                    raise InvalidRequest(
                        f"{operation.kind} has no output {', '.join(map(repr, unknown))}; its outputs: "
                        + ", ".join(known)
                    )
            outputs, parameters = await operation.run(engine, arguments)
            number = engine.version.number
        if wanted:
            absent = [name for name in wanted if name not in outputs]
            if absent:  # iwae without importance_samples
                raise InvalidRequest(f"output {absent[0]!r} is not computed by this request (see its parameters)")
            outputs = {name: outputs[name] for name in wanted}
        return InferResult(request.model, number, outputs, parameters)
