"""The contract from a second language: examples/node (grpc-js, the .proto loaded at run time) against a real server.

Each answer the Node client prints (`--json`) must equal what the Python stub gets for the same request, so
both languages read the same bytes the same way: float32 little-endian tensors, uint64 seeds, optional
fields. Node.js and npm are required (not skipped): `npm ci` installs the example's pinned packages once,
and again only when package-lock.json changes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from serving.api import pb, pb_grpc
from serving.api.tensors import fill_tensor, tensor_from_proto
from tests.helpers import ROOT, Pki, ServerThread, file_lock, make_pki, running_server

EXAMPLE = ROOT / "examples" / "node"
# sha256 of the package-lock.json that node_modules was installed from: `npm ci` runs again when it differs.
INSTALLED_LOCK = EXAMPLE / "node_modules" / ".installed-from-lock.sha256"
SCORE_FIELDS = (
    "negative_elbo",
    "reconstruction",
    "kl",
    "complexity",
    "corrected",
    "iwae",
    "latent_norm",
    "plugin_negative_elbo",
)


class NodeClient:
    """`node examples/node/vae_client.mjs --target <server> ...`, run to completion with a bounded timeout."""

    def __init__(self, node: str, target: str, *flags: str) -> None:
        self.command = [node, str(EXAMPLE / "vae_client.mjs"), "--target", target, "--timeout", "20", *flags]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.command, *args], capture_output=True, text=True, timeout=60, check=False)

    def json(self, *args: str) -> Any:
        result = self.run("--json", *args)
        assert result.returncode == 0, f"node client failed ({result.returncode}): {result.stderr}"
        return json.loads(result.stdout)


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the example's packages installed by `npm ci` (skipped when the lock is unchanged)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(
            "Node.js 18+ and npm are required by this test (examples/node proves the contract from a second "
            "language): install them, e.g. `apt-get install nodejs npm` or NodeSource's nodejs package"
        )
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 18:
        pytest.fail(f"Node.js 18 or newer is required by examples/node; found {version}")
    lock_digest = hashlib.sha256((EXAMPLE / "package-lock.json").read_bytes()).hexdigest()
    with file_lock(Path(tempfile.gettempdir()) / "vae-service-npm-ci.lock"):  # one npm ci at a time
        _install(npm, lock_digest)
    return node


def _install(npm: str, lock_digest: str) -> None:
    """`npm ci` in examples/node unless what is installed was installed from this lock."""
    if not INSTALLED_LOCK.exists() or INSTALLED_LOCK.read_text() != lock_digest:
        installed = subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
            cwd=EXAMPLE,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert installed.returncode == 0, f"npm ci failed in {EXAMPLE}:\n{installed.stderr}"
        INSTALLED_LOCK.write_text(lock_digest)


@pytest.fixture(scope="module")
def node_client(node: str, vae_server: ServerThread) -> NodeClient:
    return NodeClient(node, vae_server.target)


@pytest.fixture(scope="module")
def stub(vae_server: ServerThread) -> Iterator[pb_grpc.VaeServiceStub]:
    """The raw Python stub: the reference every Node answer is compared with."""
    with grpc.insecure_channel(vae_server.target) as channel:
        yield pb_grpc.VaeServiceStub(channel)


def from_node(tensor: dict[str, Any]) -> np.ndarray:
    """A tensor the Node client decoded and printed (shape, dtype, values) as numpy."""
    return np.array(tensor["values"], dtype=tensor["dtype"]).reshape(tensor["shape"])


def test_node_model_info_equals_the_python_stubs(node_client: NodeClient, stub: pb_grpc.VaeServiceStub) -> None:
    info = node_client.json("info")
    expected = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert (info["name"], info["version"], info["latent_dim"]) == (expected.name, str(expected.version), 20)
    assert info["image_shape"] == [str(d) for d in expected.image_shape] == ["1", "28", "28"]


def test_node_sample_decodes_the_same_float32_tensors_as_python(
    node_client: NodeClient, stub: pb_grpc.VaeServiceStub
) -> None:
    reply = node_client.json("sample", "--num", "4", "--seed", "7")
    expected = stub.Sample(pb.SampleRequest(num_samples=4, seed=7), timeout=30)
    assert reply["images"]["shape"] == [4, 1, 28, 28] and reply["latents"]["shape"] == [4, 20]
    np.testing.assert_array_equal(from_node(reply["images"]), tensor_from_proto(expected.images, "images"))
    np.testing.assert_array_equal(from_node(reply["latents"]), tensor_from_proto(expected.latents, "latents"))
    assert reply["model_version"] == str(expected.model_version)
    pixels = node_client.json("sample", "--num", "4", "--seed", "7", "--uint8")["images"]
    expected_pixels = stub.Sample(pb.SampleRequest(num_samples=4, seed=7, output_dtype=pb.DTYPE_UINT8), timeout=30)
    assert pixels["dtype"] == "uint8"
    np.testing.assert_array_equal(from_node(pixels), tensor_from_proto(expected_pixels.images, "images"))


def test_node_sample_offset_regenerates_one_row_of_a_seeded_sample(
    node_client: NodeClient, stub: pb_grpc.VaeServiceStub
) -> None:
    rows = stub.Sample(pb.SampleRequest(num_samples=4, seed=7), timeout=30)
    reply = node_client.json("sample", "--num", "1", "--seed", "7", "--offset", "3")
    assert (reply["seed"], reply["offset"]) == ("7", "3")
    np.testing.assert_array_equal(from_node(reply["latents"]), tensor_from_proto(rows.latents, "latents")[3:4])
    np.testing.assert_array_equal(from_node(reply["images"]), tensor_from_proto(rows.images, "images")[3:4])


def test_node_score_of_uint8_images_equals_the_python_stubs(
    node_client: NodeClient, stub: pb_grpc.VaeServiceStub, tmp_path: Path
) -> None:
    drawn = stub.Sample(pb.SampleRequest(num_samples=3, seed=11, output_dtype=pb.DTYPE_UINT8), timeout=30)
    pixels = tensor_from_proto(drawn.images, "images")  # digits as the model draws them, [3, 1, 28, 28]
    np.save(tmp_path / "digits.npy", pixels[:, 0])  # [3, 28, 28]: the client adds the channel axis
    reply = node_client.json("score", str(tmp_path / "digits.npy"), "--importance", "4", "--seed", "3")
    request = pb.ScoreRequest(importance_samples=4, seed=3)
    fill_tensor(request.images, pixels)
    expected = stub.Score(request, timeout=30)
    assert reply["model_version"] == str(expected.model_version) and len(reply["scores"]) == 3
    for got, want in zip(reply["scores"], expected.scores, strict=True):
        assert want.HasField("iwae")
        assert got == {field: getattr(want, field) for field in SCORE_FIELDS}  # float64 exactly, through JSON

    without_iwae = node_client.json("score", str(tmp_path / "digits.npy"))["scores"]
    request.importance_samples = 0
    request.ClearField("seed")
    one_draw = stub.Score(request, timeout=30)
    assert [score["iwae"] for score in without_iwae] == [None] * 3
    assert [score["negative_elbo"] for score in without_iwae] == [score.negative_elbo for score in one_draw.scores]
    assert [s["plugin_negative_elbo"] for s in without_iwae] == [s.plugin_negative_elbo for s in expected.scores]


def test_node_client_reports_the_status_code_of_a_bad_request(node_client: NodeClient) -> None:
    result = node_client.run("sample", "--num", "0")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: INVALID_ARGUMENT: ") and "num_samples" in result.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_node_client_connects_with_tls_trusting_the_servers_ca(node: str, exported_repository: Path, pki: Pki) -> None:
    with running_server(exported_repository, tls_cert=pki.server.cert, tls_key=pki.server.key) as server:
        reply = NodeClient(node, server.target, "--tls-ca", str(pki.ca)).json("sample", "--num", "2", "--seed", "1")
        refused = NodeClient(node, server.target).run("sample", "--num", "2")
    assert reply["images"]["shape"] == [2, 1, 28, 28]
    assert refused.returncode == 1 and refused.stderr.startswith("error: UNAVAILABLE: ")
