"""Request fields → data-plane values (the proto enums, the version asked for, the deadline on the loop's clock),
and the data plane's scores → ImageScore messages.

(Tensors ↔ numpy is `serving.api.tensors`, shared with the client.)
"""

from __future__ import annotations

import asyncio

import grpc

from contract.interpolation import Method
from contract.scores import ImageScores
from serving.api import pb
from serving.dataplane.engine import OutputDType
from serving.errors import InvalidRequest

_OUTPUT_DTYPES: dict[int, OutputDType] = {
    pb.DTYPE_UNSPECIFIED: "float32",
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_UINT8: "uint8",
}
_METHODS: dict[int, Method] = {
    pb.INTERPOLATION_METHOD_UNSPECIFIED: "linear",
    pb.LINEAR: "linear",
    pb.SLERP: "slerp",
}


def output_dtype_from_proto(value: int, field: str = "output_dtype") -> OutputDType:
    """DTYPE_UNSPECIFIED and DTYPE_FLOAT32 → "float32", DTYPE_UINT8 → "uint8"; anything else is invalid."""
    if value not in _OUTPUT_DTYPES:
        raise InvalidRequest(f"{field} {value} is not a known DType: use DTYPE_FLOAT32 (default) or DTYPE_UINT8")
    return _OUTPUT_DTYPES[value]


def method_from_proto(value: int) -> Method:
    """INTERPOLATION_METHOD_UNSPECIFIED and LINEAR → "linear", SLERP → "slerp"; anything else is invalid."""
    if value not in _METHODS:
        raise InvalidRequest(f"method {value} is not a known InterpolationMethod: use LINEAR (default) or SLERP")
    return _METHODS[value]


def version_choice(spec: pb.ModelVersionSpec) -> tuple[int | None, str | None]:
    """(number, label) of a request's model_version; (None, None): the default route."""
    choice = spec.WhichOneof("choice")
    if choice == "number":
        if spec.number < 1:
            raise InvalidRequest("model_version.number must be >= 1 (or unset, for the default route)")
        return spec.number, None
    if choice == "label":
        if not spec.label:
            raise InvalidRequest("model_version.label is empty: name a label, or leave model_version unset")
        return None, spec.label
    return None, None


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as event-loop time (what the batcher drops expired work by); None: no deadline."""
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


def image_scores_to_proto(scores: ImageScores) -> list[pb.ImageScore]:
    """One ImageScore per image; `iwae` set only when the scores have it."""
    columns = [
        scores.negative_elbo.tolist(),
        scores.reconstruction.tolist(),
        scores.kl.tolist(),
        scores.complexity.tolist(),
        scores.corrected.tolist(),
        scores.latent_norm.tolist(),
        scores.plugin_negative_elbo.tolist(),
    ]
    messages = [
        pb.ImageScore(
            negative_elbo=nelbo,
            reconstruction=rec,
            kl=kl,
            complexity=complexity,
            corrected=corrected,
            latent_norm=norm,
            plugin_negative_elbo=plugin,
        )
        for nelbo, rec, kl, complexity, corrected, norm, plugin in zip(*columns, strict=True)
    ]
    if scores.iwae is not None:
        for message, iwae in zip(messages, scores.iwae.tolist(), strict=True):
            message.iwae = iwae
    return messages
