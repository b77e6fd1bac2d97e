"""The gRPC contract: generated code is current, names and field numbers never change, serving has no torch."""

from __future__ import annotations

from pathlib import Path

from serving import codegen
from serving.api import SERVICE_NAME, pb

# The public contract (proto/vae/v1/vae.proto): message → {field: number}. Adding is allowed; renaming or
# renumbering is not, so these never change.
CONTRACT = {
    "Tensor": {"shape": 1, "dtype": 2, "data": 3},
    "EncodeRequest": {"images": 1},
    "EncodeResponse": {"mu": 1, "log_var": 2},
    "DecodeRequest": {"latents": 1, "output_dtype": 2},
    "DecodeResponse": {"images": 1},
    "SampleRequest": {"num_samples": 1, "seed": 2, "temperature": 3, "output_dtype": 4},
    "SampleResponse": {"images": 1, "latents": 2},
    "InterpolateRequest": {"start": 1, "end": 2, "steps": 3, "method": 4, "output_dtype": 5},
    "InterpolateResponse": {"images": 1, "latents": 2},
    "ImageScore": {
        "negative_elbo": 1,
        "reconstruction": 2,
        "kl": 3,
        "complexity": 4,
        "corrected": 5,
        "iwae": 6,
        "latent_norm": 7,
        "plugin_negative_elbo": 8,
    },
    "ScoreRequest": {"images": 1, "importance_samples": 2, "seed": 3, "model_version": 4},
    "GetModelInfoRequest": {},
    "ModelInfo": {"name": 1, "version": 2, "latent_dim": 3, "image_shape": 4, "provider": 5, "manifest_json": 6},
}
METHODS = {
    "Encode": ("EncodeRequest", "EncodeResponse", False),
    "Decode": ("DecodeRequest", "DecodeResponse", False),
    "Sample": ("SampleRequest", "SampleResponse", False),
    "Interpolate": ("InterpolateRequest", "InterpolateResponse", False),
    "GetModelInfo": ("GetModelInfoRequest", "ModelInfo", False),
    "SampleStream": ("SampleRequest", "SampleResponse", True),
}


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    fresh = codegen.generate(tmp_path)
    for path in fresh:
        committed = codegen.ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} missing: run `make proto`"
        assert committed.read_bytes() == path.read_bytes(), f"{committed} is stale: run `make proto`"


def test_service_messages_and_field_numbers_match_the_contract() -> None:
    assert SERVICE_NAME == "vae.v1.VaeService"
    assert pb.DESCRIPTOR.package == "vae.v1"
    for message, fields in CONTRACT.items():
        descriptor = pb.DESCRIPTOR.message_types_by_name[message]
        actual = {field.name: field.number for field in descriptor.fields}
        assert {name: actual.get(name) for name in fields} == fields, message
    service = pb.DESCRIPTOR.services_by_name["VaeService"]
    for name, (request, response, streams) in METHODS.items():
        method = service.methods_by_name[name]
        assert (method.input_type.name, method.output_type.name, method.server_streaming) == (
            request,
            response,
            streams,
        )
    assert dict(pb.DType.items()) == {"DTYPE_UNSPECIFIED": 0, "DTYPE_FLOAT32": 1, "DTYPE_UINT8": 2}
    assert dict(pb.InterpolationMethod.items()) == {"INTERPOLATION_METHOD_UNSPECIFIED": 0, "LINEAR": 1, "SLERP": 2}


def test_every_field_of_the_proto_is_documented() -> None:
    lines = codegen.VAE.source.read_text().splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        is_field = stripped.endswith(";") and "=" in stripped and not stripped.startswith(("//", "syntax", "package"))
        if is_field or (stripped.startswith(("rpc ", "message ", "enum "))):
            assert lines[number - 1].strip().startswith("//"), f"vae.proto line {number + 1} has no comment: {stripped}"
