"""vae-models: the operator's commands on a model directory (a console script of the package).

    vae-models check models/vae-mnist [--version N]     verify every version (or one), as the server would
    vae-models promote models/vae-mnist 3               point `stable` (or --label NAME) at version 3
    vae-models label models/vae-mnist canary 4          point any label at a version
    vae-models label models/vae-mnist canary --remove   remove a label

Servers polling the directory follow a label within their poll interval (at once on SIGHUP). A label never
points at a version that fails verification. Exit status 0 when everything asked for succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from contract.labels import check_label, read_labels, write_labels
from contract.repository import ModelRepositoryError, list_versions, load_version, scan_versions

PROMOTED_LABEL = "stable"


def set_label(model_dir: Path, label: str, version: int | None) -> str:
    """Point `label` at `version` (which must verify), or remove it (None); returns what was done, in words."""
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


def check(model_dir: Path, version: int | None = None) -> bool:
    """Print one verdict line per version (all, or only `version`); True when every one passed.

    Checking all, a directory named by a number no version may have (above 2^63 - 1) gets a FAILED line too:
    the server ignores it."""
    listing = scan_versions(model_dir)
    versions = [version] if version is not None else list(listing.versions)
    refused = {} if version is not None else listing.refused
    if not versions and not refused:
        raise ModelRepositoryError(f"{model_dir}: no versions (expected integer-named subdirectories)")
    labels_of: dict[int, list[str]] = {}
    for label, number in sorted(read_labels(model_dir).items()):
        labels_of.setdefault(number, []).append(label)
    all_ok = True
    for number in versions:
        try:
            loaded = load_version(model_dir, number)
        except ModelRepositoryError as exc:
            print(f"{model_dir.name} {number}: FAILED: {exc}")
            all_ok = False
            continue
        labels = f", labels {', '.join(labels_of[number])}" if number in labels_of else ""
        print(
            f"{loaded.name} {loaded.number}: ok (latent_dim {loaded.latent_dim}, "
            f"encoder sha256 {loaded.encoder.sha256[:12]}, decoder sha256 {loaded.decoder.sha256[:12]}, "
            f"created {loaded.manifest.created_at}{labels})"
        )
    for name, reason in refused.items():  # named above every version, so printed after them
        print(f"{model_dir.name} {name}: FAILED: {model_dir / name}: {reason}")
    return all_ok and not refused


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vae-models", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check", help="verify every version (or one) of a model directory")
    check_parser.add_argument("model_dir", type=Path, help="e.g. models/vae-mnist")
    check_parser.add_argument("--version", type=int, default=None, help="check only this version")
    promote = commands.add_parser("promote", help=f"point {PROMOTED_LABEL} (or --label) at a version that verifies")
    promote.add_argument("model_dir", type=Path, help="e.g. models/vae-mnist")
    promote.add_argument("version", type=int, help="the version to promote")
    promote.add_argument("--label", default=PROMOTED_LABEL, help=f"the label to move (default {PROMOTED_LABEL})")
    label = commands.add_parser("label", help="point a label (stable, canary, ...) at a version, or remove it")
    label.add_argument("model_dir", type=Path, help="e.g. models/vae-mnist")
    label.add_argument("label", help="lower-case letters, digits, - and _, starting with a letter")
    label.add_argument("version", type=int, nargs="?", help="a version that verifies")
    label.add_argument("--remove", action="store_true", help="remove the label instead")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "label" and (args.version is None) != args.remove:
        parser.error("label: give a VERSION, or --remove")
    try:
        if args.command == "check":
            return 0 if check(args.model_dir, args.version) else 1
        version = None if args.command == "label" and args.remove else args.version
        print(set_label(args.model_dir, args.label, version))
    except (ModelRepositoryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
