"""The KServe Python SDK's REST and gRPC clients against the server: readiness, and the decoder and sampler.

Run by tests/system/test_oip_clients.py in the clients' own virtual environment (the SDK pins protobuf < 7),
in a process of its own (the SDK and tritonclient both register the `inference` protobuf package):
`OIP_GRPC=HOST:PORT OIP_HTTP=http://HOST:PORT python kserve_calls.py` (environment variables: importing
`kserve` parses the command line for its own server's flags). It imports nothing of this repository and
prints one JSON object: what each check returned, and the outputs as sha256 of their bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from typing import Any

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

LATENTS = np.random.default_rng(2025).standard_normal((4, 20)).astype(np.float32)
DECODER = "vae-mnist-decoder"


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def decoder_request(binary: bool, request_id: str, **parameters: Any) -> InferRequest:
    latents = InferInput("z", list(LATENTS.shape), "FP32")
    if binary:
        latents.set_data_from_numpy(LATENTS, binary_data=True)
    else:  # typed values: JSON "data" over REST, contents.fp32_contents over gRPC
        latents = InferInput("z", list(LATENTS.shape), "FP32", data=LATENTS.ravel().tolist())
    return InferRequest(model_name=DECODER, infer_inputs=[latents], request_id=request_id, parameters=parameters)


async def rest(base: str) -> dict[str, Any]:
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=60))
    try:
        found: dict[str, Any] = {
            "live": await client.is_server_live(base),
            "ready": await client.is_server_ready(base),
            "model_ready": await client.is_model_ready(base, DECODER),
        }
        binary = await client.infer(base, decoder_request(True, "b", binary_data_output=True), model_name=DECODER)
        plain = await client.infer(base, decoder_request(False, "j"), model_name=DECODER)
        found["decoder"] = {"binary": digest(binary.outputs[0].as_numpy()), "json": digest(plain.outputs[0].as_numpy())}
        found["ids"] = [binary.id, plain.id]
        try:
            await client.infer(base, InferRequest(model_name="vae-mnist-nothing", infer_inputs=[]), model_name="x")
        except Exception as error:  # the SDK raises httpx's or its own errors: what the caller sees is the text
            found["error"] = str(error)
    finally:
        await client.close()
    return found


async def grpc(target: str) -> dict[str, Any]:
    client = InferenceGRPCClient(target, timeout=60, retries=0)
    try:
        found: dict[str, Any] = {
            "live": await client.is_server_live(),
            "ready": await client.is_server_ready(),
            "model_ready": await client.is_model_ready(DECODER),
        }
        raw = await client.infer(decoder_request(True, "r"))
        typed = await client.infer(decoder_request(False, "t"))
        found["decoder"] = {"raw": digest(raw.outputs[0].as_numpy()), "typed": digest(typed.outputs[0].as_numpy())}
        found["versions"] = [raw.model_version, typed.model_version]
    finally:
        await client.close()
    return found


def main() -> None:
    print(
        json.dumps(
            {"rest": asyncio.run(rest(os.environ["OIP_HTTP"])), "grpc": asyncio.run(grpc(os.environ["OIP_GRPC"]))}
        )
    )


if __name__ == "__main__":
    main()
