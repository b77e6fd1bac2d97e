"""contract.repository: versions are listed, loaded and refused exactly when their files disagree with model.json."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from contract.manifest import MAX_VERSION
from contract.repository import (
    MAX_GRAPH_BYTES,
    MAX_MANIFEST_BYTES,
    ModelRepositoryError,
    is_version_name,
    list_versions,
    load_version,
    scan_versions,
    without_paths,
)
from tests.helpers import publish_copy


def copy_model(exported_repository: Path, tmp_path: Path, name: str = "vae-mnist") -> Path:
    """A private copy of the session's exported model directory, free to tamper with."""
    model_dir = tmp_path / name
    shutil.copytree(exported_repository, model_dir)
    return model_dir


def edit_manifest(version_dir: Path, change: Any) -> None:
    path = version_dir / "model.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_load_newest_version_matches_manifest(exported_repository: Path) -> None:
    loaded = load_version(exported_repository)
    assert (loaded.name, loaded.number, loaded.latent_dim, loaded.image_shape) == ("vae-mnist", 1, 20, (1, 28, 28))
    assert loaded.path == exported_repository / "1"
    assert [s.name for s in loaded.encoder.outputs] == ["mu", "log_var"]
    assert loaded.encoder.inputs[0].shape == ("batch", 1, 28, 28)
    assert loaded.decoder.inputs[0].shape == ("batch", 20)
    assert loaded.decoder.outputs[0].dtype == "float32"
    assert loaded.encoder.model_bytes == (exported_repository / "1" / "encoder.onnx").read_bytes()
    assert loaded.manifest.graphs.decoder.sha256 == loaded.decoder.sha256


def test_sessions_built_from_verified_bytes_run_any_batch_size(exported_repository: Path) -> None:
    loaded = load_version(exported_repository)
    decoder = ort.InferenceSession(loaded.decoder.model_bytes, providers=["CPUExecutionProvider"])
    encoder = ort.InferenceSession(loaded.encoder.model_bytes, providers=["CPUExecutionProvider"])
    for batch in (1, 3, 33):
        (images,) = decoder.run(None, {"z": np.zeros((batch, 20), np.float32)})
        assert images.shape == (batch, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
        mu, log_var = encoder.run(None, {"x": images})
        assert mu.shape == log_var.shape == (batch, 20)


def test_list_versions_is_ascending_and_skips_other_entries(exported_repository: Path, tmp_path: Path) -> None:
    model_dir = copy_model(exported_repository, tmp_path)
    for name in ("10", "2", ".export-3-abc", "latest", "01"):
        (model_dir / name).mkdir()
    (model_dir / "7").write_text("a file, not a version")
    assert list_versions(model_dir) == [1, 2, 10]


def test_a_number_beyond_what_the_contract_carries_is_not_a_version(exported_repository: Path, tmp_path: Path) -> None:
    model_dir = copy_model(exported_repository, tmp_path)
    assert is_version_name(str(MAX_VERSION)) and not is_version_name(str(MAX_VERSION + 1))
    publish_copy(model_dir, MAX_VERSION)
    for name in (str(MAX_VERSION + 1), str(2**64), "9" * 200):
        (model_dir / name).mkdir()
    listing = scan_versions(model_dir)
    assert listing.versions == (1, MAX_VERSION)
    assert set(listing.refused) == {str(MAX_VERSION + 1), str(2**64), "9" * 200}
    assert listing.refused[str(2**64)] == f"version number above {MAX_VERSION} (2^63 - 1), the largest a version may be"
    assert load_version(model_dir).number == MAX_VERSION  # the newest version, not the larger names: it loads


def test_pinned_version_loads_and_missing_version_is_named(exported_repository: Path, tmp_path: Path) -> None:
    model_dir = copy_model(exported_repository, tmp_path)
    assert load_version(model_dir, 1).number == 1
    with pytest.raises(ModelRepositoryError, match=r"vae-mnist/4: version not found \(available: 1\)"):
        load_version(model_dir, 4)
    with pytest.raises(ModelRepositoryError, match="model directory not found"):
        load_version(tmp_path / "nothing-here")


def test_tampered_graph_is_refused_naming_the_file(exported_repository: Path, tmp_path: Path) -> None:
    model_dir = copy_model(exported_repository, tmp_path)
    graph = model_dir / "1" / "encoder.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    graph.write_bytes(bytes(data))
    with pytest.raises(ModelRepositoryError, match=r"1/encoder\.onnx: sha256 mismatch"):
        load_version(model_dir)


def test_missing_graph_is_refused_naming_the_file(exported_repository: Path, tmp_path: Path) -> None:
    model_dir = copy_model(exported_repository, tmp_path)
    (model_dir / "1" / "decoder.onnx").unlink()
    with pytest.raises(ModelRepositoryError, match=r"1/decoder\.onnx: graph file missing"):
        load_version(model_dir)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.unlink(), "model.json: manifest missing"),
        (lambda p: p.write_text("{not json"), "model.json: not a JSON object: JSON is malformed"),
        (lambda p: p.write_text("[1, 2]"), "model.json: not a JSON object: Expected object, got array"),
    ],
)
def test_missing_or_malformed_manifest_is_refused(
    exported_repository: Path, tmp_path: Path, damage: Any, message: str
) -> None:
    model_dir = copy_model(exported_repository, tmp_path)
    damage(model_dir / "1" / "model.json")
    with pytest.raises(ModelRepositoryError, match=message):
        load_version(model_dir)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(latent_dim=16), r"model\.json: graphs\.encoder\.outputs .* latent_dim 16"),
        (lambda m: m.update(latent_dim="20"), r"model\.json: Expected int, got str - at \$\.latent_dim"),
        (lambda m: m.update(version=2), r"model\.json: version 2 does not match the directory \(1\)"),
        (lambda m: m["graphs"]["decoder"].update(file="../1/decoder.onnx"), r"must be a plain file name"),
        (lambda m: m["graphs"]["decoder"].update(file=".."), r"must be a plain file name"),
        (lambda m: m.update(format_version=99), r"model\.json: format_version 99 is not supported"),
        (lambda m: m["baseline"].update(active_dimensions=[20]), r"baseline\.active_dimensions must lie in \[0, 20\)"),
    ],
)
def test_manifest_inconsistent_with_the_contract_is_refused(
    exported_repository: Path, tmp_path: Path, change: Any, message: str
) -> None:
    model_dir = copy_model(exported_repository, tmp_path)
    edit_manifest(model_dir / "1", change)
    with pytest.raises(ModelRepositoryError, match=message):
        load_version(model_dir)


def test_manifest_shapes_that_the_graph_does_not_have_are_refused(exported_repository: Path, tmp_path: Path) -> None:
    """latent_dim and every declared shape say 16, consistently, but the graphs were exported with 20."""

    def claim_latent_16(manifest: dict[str, Any]) -> None:
        manifest["latent_dim"] = 16
        for graph in manifest["graphs"].values():
            for spec in graph["inputs"] + graph["outputs"]:
                if spec["shape"] == ["batch", 20]:
                    spec["shape"] = ["batch", 16]

    model_dir = copy_model(exported_repository, tmp_path)
    edit_manifest(model_dir / "1", claim_latent_16)
    with pytest.raises(ModelRepositoryError, match=r"1/encoder\.onnx: graph outputs .*\[batch,20\].* manifest's"):
        load_version(model_dir)


def test_swapped_graphs_with_matching_checksums_are_refused_by_signature(
    exported_repository: Path, tmp_path: Path
) -> None:
    model_dir = copy_model(exported_repository, tmp_path)
    version_dir = model_dir / "1"
    encoder, decoder = (version_dir / "encoder.onnx"), (version_dir / "decoder.onnx")
    encoder_bytes, decoder_bytes = encoder.read_bytes(), decoder.read_bytes()
    encoder.write_bytes(decoder_bytes)
    decoder.write_bytes(encoder_bytes)

    def swap_checksums(manifest: dict[str, Any]) -> None:
        encoder_entry, decoder_entry = manifest["graphs"]["encoder"], manifest["graphs"]["decoder"]
        for key in ("sha256", "size_bytes"):
            encoder_entry[key], decoder_entry[key] = decoder_entry[key], encoder_entry[key]

    edit_manifest(version_dir, swap_checksums)
    with pytest.raises(ModelRepositoryError, match=r"1/encoder\.onnx: graph inputs \[z float32"):
        load_version(model_dir)


def test_unloadable_graph_with_matching_checksum_is_refused(exported_repository: Path, tmp_path: Path) -> None:
    model_dir = copy_model(exported_repository, tmp_path)
    garbage = b"not an onnx model"
    (model_dir / "1" / "decoder.onnx").write_bytes(garbage)
    from contract.repository import sha256_hex

    edit_manifest(
        model_dir / "1", lambda m: m["graphs"]["decoder"].update(sha256=sha256_hex(garbage), size_bytes=len(garbage))
    )
    with pytest.raises(ModelRepositoryError, match=r"1/decoder\.onnx: onnxruntime cannot load the graph"):
        load_version(model_dir)


def test_version_copied_under_another_name_is_refused(exported_repository: Path, tmp_path: Path) -> None:
    model_dir = copy_model(exported_repository, tmp_path, name="vae-fashion")
    with pytest.raises(ModelRepositoryError, match=r"name 'vae-mnist' does not match the directory \('vae-fashion'\)"):
        load_version(model_dir)


def test_a_graph_larger_than_its_manifest_says_is_refused_without_being_read(
    exported_repository: Path, tmp_path: Path
) -> None:
    model_dir = copy_model(exported_repository, tmp_path)
    declared = json.loads((model_dir / "1" / "model.json").read_text())["graphs"]["decoder"]["size_bytes"]
    os.truncate(model_dir / "1" / "decoder.onnx", 2 * 1024**3)  # sparse: 2 GiB that take no disk and, unread, no memory
    with pytest.raises(
        ModelRepositoryError,
        match=rf"1/decoder\.onnx: 2147483648 bytes, but the manifest says size_bytes {declared}: the file changed",
    ):
        load_version(model_dir)


def test_a_graph_above_the_maximum_is_refused_without_being_read(exported_repository: Path, tmp_path: Path) -> None:
    model_dir = copy_model(exported_repository, tmp_path)
    huge = MAX_GRAPH_BYTES + 1
    os.truncate(model_dir / "1" / "decoder.onnx", huge)
    edit_manifest(model_dir / "1", lambda m: m["graphs"]["decoder"].update(size_bytes=huge))  # the manifest agrees
    with pytest.raises(
        ModelRepositoryError, match=rf"1/decoder\.onnx: {huge} bytes, more than the {MAX_GRAPH_BYTES} bytes \(256 MiB\)"
    ):
        load_version(model_dir)


def test_a_manifest_over_the_size_limit_is_refused_before_it_is_read(exported_repository: Path, tmp_path: Path) -> None:
    model_dir = copy_model(exported_repository, tmp_path)
    os.truncate(model_dir / "1" / "model.json", MAX_MANIFEST_BYTES + 1)
    with pytest.raises(
        ModelRepositoryError, match=r"1/model\.json: 1048577 bytes, more than the 1048576 bytes \(1 MiB\)"
    ):
        load_version(model_dir)


def test_a_graph_that_is_not_a_regular_file_is_refused_without_blocking(
    exported_repository: Path, tmp_path: Path
) -> None:
    model_dir = copy_model(exported_repository, tmp_path)
    (model_dir / "1" / "decoder.onnx").unlink()
    os.mkfifo(model_dir / "1" / "decoder.onnx")  # opening it to read would wait for a writer
    with pytest.raises(ModelRepositoryError, match=r"1/decoder\.onnx: the graph is not a regular file"):
        load_version(model_dir)


def test_what_a_client_sees_of_an_error_names_files_relative_to_the_model_directory(tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / "vae-mnist"
    error = f"{model_dir}/3/decoder.onnx: sha256 mismatch (manifest 12ab…, file 34cd…): the file changed after export"
    assert without_paths(error, model_dir) == error.replace(f"{model_dir}/", "")
    elsewhere = "onnxruntime cannot load the graph: /src/onnxruntime/core/graph/model.cc:180 Load failed (x=/etc/x)"
    assert without_paths(elsewhere, model_dir) == "onnxruntime cannot load the graph: model.cc:180 Load failed (x=x)"
