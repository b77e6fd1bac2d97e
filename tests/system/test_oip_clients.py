"""Clients nobody on the project wrote, unchanged, against a real server: tritonclient's gRPC (sync, asyncio,
streaming) and HTTP (binary and JSON) clients call every model of the Open Inference Protocol, and get what
the typed API answers for the same requests, bit for bit; the KServe SDK's REST and gRPC clients check
readiness and infer.

They run in their own virtual environment (.venv-oip, `make oip-clients`: both need protobuf < 7), each in a
process of its own, through tests/oip_clients/triton_calls.py and kserve_calls.py, which print what they got
(outputs as sha256 digests).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.client import VaeClient
from tests.helpers import ROOT, ServerThread, running_server

CLIENTS_PYTHON = ROOT / ".venv-oip" / "bin" / "python"
SCRIPTS = ROOT / "tests" / "oip_clients"

# What triton_calls.py sends (its RNG, seed 2024, draws the images, then the latents).
RNG = np.random.default_rng(2024)
IMAGES = RNG.integers(0, 256, size=(3, 1, 28, 28), dtype=np.uint8)
LATENTS = RNG.standard_normal((4, 20)).astype(np.float32)
SCORES = ("negative_elbo", "reconstruction", "kl", "complexity", "corrected", "latent_norm", "plugin_negative_elbo")


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def typed_answers(client: VaeClient) -> dict[str, dict[str, str]]:
    """The same requests as triton_calls.py's CALLS through the typed API, as digests by model and output."""
    encoded = client.encode(IMAGES)
    sampled = client.sample(4, seed=11, offset=2)
    scored = client.score(IMAGES, importance_samples=2, seed=5)
    rebuilt = client.reconstruct(IMAGES, seed=5)
    path = client.interpolate(LATENTS[:2], LATENTS[2:], steps=5)
    sweep = client.traverse(LATENTS[:1], dimensions=(0, 3), steps=4)
    assert scored.iwae is not None
    return {
        "encoder": {"mu": digest(encoded.mu), "log_var": digest(encoded.log_var)},
        "decoder": {"x": digest(client.decode(LATENTS).images)},
        "sample": {"x": digest(sampled.images), "z": digest(sampled.latents)},
        "score": {**{name: digest(getattr(scored, name)) for name in SCORES}, "iwae": digest(scored.iwae)},
        "reconstruct": {
            "x": digest(rebuilt.images),
            "z": digest(rebuilt.latents),
            **{name: digest(getattr(rebuilt.scores, name)) for name in SCORES},
        },
        "interpolate": {"x": digest(path.images), "z": digest(path.latents)},
        "traverse": {
            "x": digest(sweep.images),
            "z": digest(sweep.latents),
            "dimensions": digest(np.asarray(sweep.dimensions, dtype=np.int64)),
            "values": digest(sweep.values),
        },
    }


@pytest.fixture(scope="module")
def server(exported_repository: Path) -> Iterator[ServerThread]:
    with running_server(exported_repository) as running:
        yield running


def run_clients(script: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """What a script of tests/oip_clients printed, run with the clients' own Python."""
    assert CLIENTS_PYTHON.exists(), f"{CLIENTS_PYTHON} missing: run `make oip-clients` (part of `make test`)"
    command = [str(CLIENTS_PYTHON), str(SCRIPTS / script), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    report: dict[str, Any] = json.loads(result.stdout)
    return report


@pytest.fixture(scope="module")
def triton_report(server: ServerThread) -> dict[str, Any]:
    return run_clients("triton_calls.py", "--grpc", server.target, "--http", server.http_url.removeprefix("http://"))


def test_tritonclient_grpc_calls_every_model_and_gets_the_typed_api_s_answers(
    triton_report: dict[str, Any], server: ServerThread
) -> None:
    grpc = triton_report["grpc"]
    assert (grpc["live"], grpc["ready"], grpc["model_ready"]) == (True, True, True)
    assert "binary_tensor_data" in grpc["extensions"]
    assert grpc["decoder_max_batch_size"] == server.config.limits.max_items_per_request
    with VaeClient(server.target) as client:
        assert grpc["outputs"] == typed_answers(client)
    assert set(grpc["versions"].values()) == {"1"}
    assert grpc["error"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "expected [N, 20]" in grpc["error"]["message"]


def test_tritonclient_grpc_streams_and_asyncio_client_work(triton_report: dict[str, Any], server: ServerThread) -> None:
    with VaeClient(server.target) as client:
        rows = {str(row): digest(client.decode(LATENTS[row : row + 1]).images) for row in range(len(LATENTS))}
        whole = digest(client.decode(LATENTS).images)
    stream = triton_report["grpc_stream"]
    assert stream["rows"] == rows
    (error,) = stream["errors"]
    assert "INVALID_ARGUMENT" in error and "request id 'bad'" in error
    assert triton_report["grpc_aio"] == {"decoder": whole, "stream_rows": rows}


def test_tritonclient_http_binary_and_json_call_every_model(
    triton_report: dict[str, Any], server: ServerThread
) -> None:
    http = triton_report["http"]
    assert (http["live"], http["ready"], http["model_ready"]) == (True, True, True)
    assert http["decoder_max_batch_size"] == server.config.limits.max_items_per_request
    with VaeClient(server.target) as client:
        expected = typed_answers(client)
    assert http["binary"] == expected
    assert http["json"] == expected
    assert http["error"] == {"status": "400", "message": "latents has shape [1, 3]; expected [N, 20] (latent_dim 20)"}


def test_the_kserve_sdk_checks_readiness_and_infers_over_rest_and_grpc(server: ServerThread) -> None:
    report = run_clients("kserve_calls.py", env={**os.environ, "OIP_GRPC": server.target, "OIP_HTTP": server.http_url})
    latents = np.random.default_rng(2025).standard_normal((4, 20)).astype(np.float32)
    with VaeClient(server.target) as client:
        expected = digest(client.decode(latents).images)
    rest, grpc = report["rest"], report["grpc"]
    assert (rest["live"], rest["ready"], rest["model_ready"]) == (True, True, True)
    assert rest["decoder"] == {"binary": expected, "json": expected} and rest["ids"] == ["b", "j"]
    assert "'404 Not Found'" in rest["error"] and "vae-mnist-decoder" in rest["error"]
    assert (grpc["live"], grpc["ready"], grpc["model_ready"]) == (True, True, True)
    assert grpc["decoder"] == {"raw": expected, "typed": expected} and grpc["versions"] == ["1", "1"]
