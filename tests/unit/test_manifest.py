"""The manifest schema: one definition that writes and reads model.json, with errors that name the JSON path."""

from __future__ import annotations

import json
from typing import Any

import pytest

from contract import manifest as schema
from tests.helpers import ROOT

# model.json as the format-1 exporter wrote it (training/export.py at 0a08297, before the schema existed): a
# version directory exported then must keep loading.
FORMAT_1 = ROOT / "tests" / "fixtures" / "format-1" / "model.json"


def edited(change: Any) -> bytes:
    manifest = json.loads(FORMAT_1.read_text())
    change(manifest)
    return json.dumps(manifest).encode()


def test_a_manifest_written_before_the_schema_reads_and_writes_back_the_same_json() -> None:
    manifest = schema.decode(FORMAT_1.read_bytes())
    assert (manifest.name, manifest.version, manifest.latent_dim) == ("vae-mnist", 2, 20)
    assert manifest.image.shape == (1, 28, 28)
    assert manifest.graphs.decoder.inputs == (schema.TensorSpec("z", "float32", ("batch", 20)),)
    assert manifest.baseline is not None and manifest.baseline.active_dimensions[:3] == (0, 1, 2)
    assert json.loads(schema.encode(manifest)) == json.loads(FORMAT_1.read_text())


def test_encoding_is_indented_json_in_the_definitions_order() -> None:
    text = schema.encode(schema.decode(FORMAT_1.read_bytes())).decode()
    assert text.startswith('{\n  "format_version": 1,\n  "name": "vae-mnist",\n') and text.endswith("}\n")


def test_a_version_exported_without_a_baseline_reads() -> None:
    assert schema.decode(edited(lambda m: m.pop("baseline"))).baseline is None


def test_fields_a_newer_exporter_adds_are_ignored() -> None:
    assert schema.decode(edited(lambda m: m.update(signed_by="someone"))).name == "vae-mnist"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["graphs"]["decoder"].update(sha256=5), r"Expected str, got int - at \$\.graphs\.decoder\.sha256"),
        (lambda m: m["graphs"]["decoder"].update(sha256="abc"), r"matching regex .* - at \$\.graphs\.decoder\.sha256"),
        (lambda m: m.update(latent_dim="20"), r"Expected int, got str - at \$\.latent_dim"),
        (lambda m: m.update(latent_dim=True), r"Expected int, got bool - at \$\.latent_dim"),
        (lambda m: m.update(latent_dim=0), r"Expected int >= 1 - at \$\.latent_dim"),
        (lambda m: m.update(version=2**63), r"Expected int <= 9223372036854775807 - at \$\.version"),
        (lambda m: m["image"].update(shape=[1, 28]), r"Expected array of length 3 - at \$\.image\.shape"),
        (lambda m: m.pop("graphs"), r"Object missing required field graphs"),
        (lambda m: m.update(graphs=[]), r"Expected object, got array - at \$\.graphs"),
        (lambda m: m["graphs"]["encoder"]["inputs"][0].update(name=3), r"at \$\.graphs\.encoder\.inputs\[0\]\.name"),
        (lambda m: m["baseline"]["score_quantiles"].update({"0.5": "high"}), r"at \$\.baseline\.score_quantiles"),
        (lambda m: m.update(baseline=[]), r"Expected object | null, got array - at \$\.baseline"),
        (lambda m: m.update(format_version=99), r"format_version 99 is not supported \(this reader knows 1\)"),
        (lambda m: m.update(format_version=True), r"format_version True is not supported"),
        (lambda m: m.pop("format_version"), r"format_version None is not supported"),
    ],
)
def test_a_malformed_manifest_is_refused_naming_the_json_path(change: Any, message: str) -> None:
    with pytest.raises(schema.ManifestError, match=message):
        schema.decode(edited(change))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "not a JSON object: JSON is malformed"),
        (b"[1, 2]", r"not a JSON object: Expected object, got array"),
        (b'{"format_version": 1, "training": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ],
)
def test_what_is_not_a_manifest_at_all_is_refused_in_one_line(data: bytes, message: str) -> None:
    with pytest.raises(schema.ManifestError, match=message):
        schema.decode(data)


def test_the_fields_keep_the_order_of_the_files_already_written() -> None:
    written = list(json.loads(FORMAT_1.read_text()))
    assert list(json.loads(schema.encode(schema.decode(FORMAT_1.read_bytes())))) == written
    without_baseline = schema.encode(schema.decode(edited(lambda m: m.pop("baseline"))))
    assert list(json.loads(without_baseline)) == [key for key in written if key != "baseline"]


def test_the_public_view_names_no_path_of_the_exporting_machine() -> None:
    manifest = schema.decode(edited(lambda m: m["training"]["train_config"].update(resume="/srv/runs/a/last.pt")))
    public = json.loads(schema.public_json(manifest))
    assert public["training"]["checkpoint"] == "best.pt"  # was /tmp/fx/run/best.pt
    assert {key: public["training"]["train_config"][key] for key in ("out", "data_dir", "resume")} == {
        "out": "run",
        "data_dir": None,
        "resume": "last.pt",
    }
    assert (
        public["training"]["train_config"]["lr"] == 0.002
        and public["graphs"] == json.loads(FORMAT_1.read_text())["graphs"]
    )
    assert manifest.training.checkpoint == "/tmp/fx/run/best.pt"  # the manifest itself (model.json) keeps them
