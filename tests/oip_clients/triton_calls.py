"""Every model of the server through tritonclient (grpc sync, grpc.aio, grpc streaming, http binary and JSON).

Run by tests/system/test_oip_clients.py in the clients' own virtual environment (tritonclient needs
protobuf < 7): `python triton_calls.py --grpc HOST:PORT --http HOST:PORT`. It imports nothing of this
repository and prints one JSON object: for each way of calling, each model's outputs as sha256 of their bytes
(the test computes the same from the typed API), and the errors the server sent.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import queue
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

NAME = "vae-mnist"
RNG = np.random.default_rng(2024)
IMAGES = RNG.integers(0, 256, size=(3, 1, 28, 28), dtype=np.uint8)
LATENTS = RNG.standard_normal((4, 20)).astype(np.float32)

# model → (inputs {name: array}, parameters): the same requests the test makes through the typed API
CALLS: dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]] = {
    "encoder": ({"x": IMAGES}, {}),
    "decoder": ({"z": LATENTS}, {}),
    "sample": ({}, {"num_samples": 4, "seed": 11, "offset": 2}),
    "score": ({"x": IMAGES}, {"importance_samples": 2, "seed": 5}),
    "reconstruct": ({"x": IMAGES}, {"seed": 5}),
    "interpolate": ({"start": LATENTS[:2], "end": LATENTS[2:]}, {"steps": 5}),
    "traverse": ({"origin": LATENTS[:1]}, {"dimensions": "0,3", "steps": 4}),
}


def datatype(array: np.ndarray) -> str:
    return "UINT8" if array.dtype == np.uint8 else "FP32"


def digests(result: Any, names: list[str]) -> dict[str, str]:
    return {name: hashlib.sha256(np.ascontiguousarray(result.as_numpy(name)).tobytes()).hexdigest() for name in names}


def output_names(metadata: Any) -> list[str]:
    outputs = metadata["outputs"] if isinstance(metadata, dict) else metadata.outputs
    return [output["name"] if isinstance(output, dict) else output.name for output in outputs]


def grpc_inputs(inputs: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    tensors = []
    for name, array in inputs.items():
        tensor = grpcclient.InferInput(name, list(array.shape), datatype(array))
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def http_inputs(inputs: dict[str, np.ndarray], binary: bool) -> list[httpclient.InferInput]:
    tensors = []
    for name, array in inputs.items():
        tensor = httpclient.InferInput(name, list(array.shape), datatype(array))
        tensor.set_data_from_numpy(array, binary_data=binary)
        tensors.append(tensor)
    return tensors


def grpc_calls(target: str) -> dict[str, Any]:
    client = grpcclient.InferenceServerClient(target)
    found: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(f"{NAME}-decoder", "1"),
        "extensions": list(client.get_server_metadata().extensions),
        "decoder_max_batch_size": client.get_model_config(f"{NAME}-decoder").config.max_batch_size,
        "outputs": {},
        "versions": {},
    }
    for kind, (inputs, parameters) in CALLS.items():
        model = f"{NAME}-{kind}"
        names = [name for name in output_names(client.get_model_metadata(model)) if name != "iwae" or parameters]
        result = client.infer(model, grpc_inputs(inputs), parameters=parameters)
        found["outputs"][kind] = digests(result, names)
        found["versions"][kind] = result.get_response().model_version
    bad = grpcclient.InferInput("z", [1, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
    try:
        client.infer(f"{NAME}-decoder", [bad])
    except InferenceServerException as error:
        found["error"] = {"status": error.status(), "message": error.message()}
    return found


def grpc_stream(target: str) -> dict[str, Any]:
    """start_stream / async_stream_infer: one decoder request per latent, and one bad request."""
    client = grpcclient.InferenceServerClient(target)
    replies: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    for row in range(len(LATENTS)):
        client.async_stream_infer(f"{NAME}-decoder", grpc_inputs({"z": LATENTS[row : row + 1]}), request_id=str(row))
    client.async_stream_infer(f"{NAME}-decoder", grpc_inputs({"z": np.zeros((1, 3), np.float32)}), request_id="bad")
    got = [replies.get(timeout=60) for _ in range(len(LATENTS) + 1)]
    client.stop_stream()
    rows = {result.get_response().id: digests(result, ["x"])["x"] for result, error in got if error is None}
    errors = [str(error) for _, error in got if error is not None]
    return {"rows": rows, "errors": errors}


async def grpc_aio(target: str) -> dict[str, Any]:
    """grpc.aio: infer, and stream_infer over an async generator of requests."""
    async with aioclient.InferenceServerClient(target) as client:
        result = await client.infer(f"{NAME}-decoder", grpc_inputs({"z": LATENTS}))
        unary = digests(result, ["x"])["x"]

        async def requests() -> Any:
            for row in range(len(LATENTS)):
                yield {"model_name": f"{NAME}-decoder", "inputs": grpc_inputs({"z": LATENTS[row : row + 1]}),
                       "request_id": str(row)}  # fmt: skip

        rows = {}
        async for result, error in client.stream_infer(requests()):
            assert error is None, error
            rows[result.get_response().id] = digests(result, ["x"])["x"]
            if len(rows) == len(LATENTS):
                break
    return {"decoder": unary, "stream_rows": rows}


def http_calls(url: str) -> dict[str, Any]:
    client = httpclient.InferenceServerClient(url)
    found: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(f"{NAME}-decoder"),
        "decoder_max_batch_size": client.get_model_config(f"{NAME}-decoder")["max_batch_size"],
    }
    for binary in (True, False):
        outputs = {}
        for kind, (inputs, parameters) in CALLS.items():
            model = f"{NAME}-{kind}"
            names = [name for name in output_names(client.get_model_metadata(model)) if name != "iwae" or parameters]
            requested = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in names]
            result = client.infer(model, http_inputs(inputs, binary), outputs=requested, parameters=parameters)
            outputs[kind] = digests(result, names)
        found["binary" if binary else "json"] = outputs
    bad = httpclient.InferInput("z", [1, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
    try:
        client.infer(f"{NAME}-decoder", [bad])
    except InferenceServerException as error:
        found["error"] = {"status": error.status(), "message": error.message()}
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc", required=True)
    parser.add_argument("--http", required=True)
    args = parser.parse_args()
    report = {
        "grpc": grpc_calls(args.grpc),
        "grpc_stream": grpc_stream(args.grpc),
        "grpc_aio": asyncio.run(grpc_aio(args.grpc)),
        "http": http_calls(args.http),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
