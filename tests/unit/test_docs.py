"""The documents a newcomer reads: the README stays a front door, the generated reference matches the code, and
every path or module a document, docstring or comment names exists in the repository (a clone is
self-contained)."""

from __future__ import annotations

import re
import runpy
import subprocess
from pathlib import Path

from tests.helpers import ROOT

DOCUMENTS = [
    ROOT / "README.md",
    ROOT / "SECURITY.md",
    ROOT / "deploy" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "examples").glob("*/README.md")),
]


def test_the_configuration_reference_is_what_the_code_defines() -> None:
    generate = runpy.run_path(str(ROOT / "docs" / "generate.py"))  # what `make docs` runs, without writing
    assert (ROOT / "docs" / "configuration.md").read_text() == generate["render"](), "stale: run `make docs`"


def test_the_readme_is_a_front_door() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme) <= 12_000
    for page in ("training", "model-repository", "serving", "configuration", "performance", "operations"):
        assert f"docs/{page}.md" in readme


def test_no_document_refers_to_issue_numbers() -> None:
    pattern = re.compile(r"\bissues?\s*#?\d+|\bthe issue\b|(?<![\w/&])#\d+", re.IGNORECASE)
    hits = [
        f"{path.relative_to(ROOT)}: {line}"
        for path in DOCUMENTS
        for line in path.read_text().splitlines()
        if pattern.search(line)
    ]
    assert hits == []


def test_relative_links_between_documents_resolve() -> None:
    broken = []
    for path in DOCUMENTS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" not in target and not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert broken == []


# Paths of the repository's own folders, and the top-level documents, as text names them. A name with a
# placeholder (<date>, {cpu,gpu}, *, $VAR) stands for many files and is not checked.
_PATH = re.compile(
    r"(?<![\w./@-])((?:contract|serving|training|tests|bench|docs|deploy|proto|examples|\.ci)/[\w./<>{},*$-]*)"
)
_TOP_DOCUMENT = re.compile(r"(?<![\w./-])([A-Z]+\.md)\b")
_MODULE = re.compile(r"(?<![\w./-])((?:contract|serving|training|tests|bench)(?:\.[a-z_][a-z0-9_]*)+)(?![\w-])")
_FILE_SUFFIXES = {"md", "json", "png", "py", "txt", "yaml", "proto", "jsonl", "pt", "onnx"}
_NOT_PATHS = {
    "deploy/vae-server",  # kubectl's name of the Deployment (deploy/NAME), not a folder
    "serving/proto/vae/v1/vae.proto",  # the virtual path the .proto is compiled under (docs/development.md)
}
_NOT_MODULES = ("serving.kserve.io",)  # KServe's API group (apiVersion serving.kserve.io/v1beta1), and its CRDs' files
_TEXT_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".mjs", ".proto", ".env", ".txt")
_TEXT_NAMES = ("Makefile", "Dockerfile", ".dockerignore", "run", "vae-models")


def _repository_texts() -> list[Path]:
    """The files of the checkout a reader reads (tracked or new), without fixtures and generated code."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [
        ROOT / name
        for name in listed
        if (name.endswith(_TEXT_SUFFIXES) or Path(name).name in _TEXT_NAMES)
        and not name.startswith(("tests/fixtures/", "serving/proto/"))
        and name != "tests/unit/test_docs.py"  # names missing paths on purpose, below
        and (ROOT / name).is_file()
    ]


def _names_a_module(dotted: str) -> bool:
    """Whether `a.b.c` is a module of the repository, or an attribute defined in one (`a.b.function`)."""
    parts = dotted.split(".")
    for length in range(len(parts), 1, -1):
        base = ROOT.joinpath(*parts[:length])
        source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if source.is_file():
            rest = parts[length:]
            return not rest or (len(rest) == 1 and re.search(rf"\b{rest[0]}\b", source.read_text()) is not None)
    return False


def _unresolved(line: str) -> list[str]:
    names = [m.group(1).rstrip(".,") for m in _PATH.finditer(line)]
    missing = [
        name
        for name in names
        if name not in _NOT_PATHS and not any(c in name for c in "<>{}*$") and not (ROOT / name).exists()
    ]
    missing += [name for name in _TOP_DOCUMENT.findall(line) if not (ROOT / name).exists()]
    modules = (m.group(1) for m in _MODULE.finditer(line))
    missing += [
        name
        for name in modules
        if name.rsplit(".", 1)[-1] not in _FILE_SUFFIXES
        and not name.startswith(_NOT_MODULES)
        and not _names_a_module(name)
    ]
    return missing


def test_every_path_and_module_the_repository_names_exists() -> None:
    broken = [
        f"{path.relative_to(ROOT)}:{number}: {name}"
        for path in _repository_texts()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        for name in _unresolved(line)
    ]
    assert broken == []


def test_the_path_check_sees_what_is_missing() -> None:
    assert _unresolved("see `serving/dataplane/repository.py` and DESIGN.md") == [
        "serving/dataplane/repository.py",
        "DESIGN.md",
    ]
    assert _unresolved("serving.dataplane.repository, contract.scores.no_such_name") == [
        "serving.dataplane.repository",
        "contract.scores.no_such_name",
    ]
    assert (
        _unresolved("contract/repository.py, contract.scores.kl_nats, docs/serving.md, bench/results/x-<date>.json")
        == []
    )
    assert _unresolved("apiVersion: serving.kserve.io/v1beta1") == []
