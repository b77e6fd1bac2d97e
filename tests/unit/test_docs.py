"""The documents a newcomer reads: the README stays a front door, the generated reference matches the code."""

from __future__ import annotations

import re
import runpy

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
