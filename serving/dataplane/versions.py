"""Which versions of a model directory are served: the version policy, the labels, and the default route.

    latest          the newest version (the default)
    latest:N        the N newest
    specific:3,5    exactly these (those present)
    all             every version in the directory

Labels name versions (`stable`, `canary`, ...). They live in `labels.json` beside the version directories,
`{"stable": 3, "canary": 4}`, written atomically (`write_labels`: a temporary file renamed over the old
one) by `python -m serving.dataplane.repository label`, and read by the server on each poll. A labelled
version is served whether or not the policy selects it: the label says that traffic wants it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from serving.dataplane.repository import ModelRepositoryError, list_versions, load_version, read_json_object

LABELS_FILE = "labels.json"
LABEL_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,62}")
LATEST = "latest"  # the default route's name for the newest served version


@dataclass(frozen=True)
class VersionPolicy:
    """A parsed version policy (module docstring); `select` applies it to the versions present."""

    kind: str  # latest | specific | all
    count: int = 1  # latest:N
    versions: tuple[int, ...] = ()  # specific:...

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """`latest`, `latest:N`, `specific:V1,V2` or `all`; ValueError saying what is allowed."""
        kind, _, argument = text.strip().partition(":")
        try:
            if kind == "latest":
                count = int(argument) if argument else 1
                if count >= 1:
                    return cls("latest", count=count)
            elif kind == "specific":
                versions = tuple(sorted({int(part) for part in argument.split(",")}))
                if versions and min(versions) >= 1:
                    return cls("specific", versions=versions)
            elif kind == "all" and not argument:
                return cls("all")
        except ValueError:
            pass
        raise ValueError(f"{text!r} is not a version policy: use latest, latest:N, specific:V1,V2 or all")

    def select(self, present: list[int]) -> list[int]:
        """The versions of `present` (ascending) this policy serves, ascending."""
        if self.kind == "latest":
            return present[-self.count :]
        if self.kind == "specific":
            return [version for version in present if version in self.versions]
        return list(present)


def check_label(label: str) -> str:
    """A label is lower-case letters, digits, '-' and '_', starting with a letter (so never a number)."""
    if not LABEL_PATTERN.fullmatch(label):
        raise ValueError(
            f"label {label!r} is not allowed: lower-case letters, digits, '-' and '_', starting with a letter"
        )
    return label


def read_labels(model_dir: Path) -> dict[str, int]:
    """labels.json of `model_dir` ({} when there is none); ModelRepositoryError naming the file when malformed."""
    path = Path(model_dir) / LABELS_FILE
    labels = read_json_object(path, 'labels (label → version, e.g. {"stable": 3})')
    if labels is None:
        return {}
    for label, version in labels.items():
        try:
            check_label(label)
        except ValueError as exc:
            raise ModelRepositoryError(f"{path}: {exc}") from None
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ModelRepositoryError(f"{path}: label {label!r} must name a version number >= 1, got {version!r}")
    return labels


def write_labels(model_dir: Path, labels: dict[str, int]) -> None:
    """Replace labels.json atomically: readers see the old file or the new one, never a partial one."""
    path = Path(model_dir) / LABELS_FILE
    fd, temporary = tempfile.mkstemp(dir=model_dir, prefix=f".{LABELS_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            json.dump(dict(sorted(labels.items())), stream, indent=2)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it 0600; the server may run as another user
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def set_label(model_dir: Path, label: str, version: int | None) -> str:
    """Point `label` at `version` (which must verify), or remove it (None); returns what was done, in words.

    Servers polling the directory route the label's requests to the new version within their poll interval.
    """
    model_dir = Path(model_dir)
    check_label(label)
    labels = read_labels(model_dir)
    if version is None:
        if labels.pop(label, None) is None:
            raise ValueError(f"{model_dir}: no label {label!r} to remove (labels: {labels or 'none'})")
        write_labels(model_dir, labels)
        return f"{model_dir.name}: removed label {label!r}"
    if version not in list_versions(model_dir):
        raise ValueError(f"{model_dir}: no version {version} (versions: {list_versions(model_dir) or 'none'})")
    load_version(model_dir, version)  # a label never points at a version that would be refused
    before = labels.get(label)
    labels[label] = version
    write_labels(model_dir, labels)
    moved = f" (was {before})" if before is not None and before != version else ""
    return f"{model_dir.name}: {label} -> version {version}{moved}"


def resolve_default(route: str, served: list[int], labels: dict[str, int]) -> int | None:
    """The version the default route names among `served` (ascending): `latest`, a label, or a number."""
    if not served:
        return None
    if route == LATEST:
        return served[-1]
    version = labels.get(route) if not route.isdecimal() else int(route)
    return version if version in served else None
