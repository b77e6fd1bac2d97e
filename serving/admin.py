"""vae-models: the operator's commands on a model directory (a console script of the package).

    vae-models check models/vae-mnist [--version N]       verify every version (or one), as the server would
    vae-models canary models/vae-mnist 4 --weight 0.05    make version 4 the canary, taking 5 % of the default route
    vae-models canary models/vae-mnist --weight 0.2       change the canary's share (0: shadow scoring only)
    vae-models canary models/vae-mnist --remove           end the canary (label and weight)
    vae-models promote models/vae-mnist 4                 point `stable` (or --label NAME) at version 4, if the
                                                          running server's evidence allows (below)
    vae-models label models/vae-mnist canary 4            point any label at a version
    vae-models label models/vae-mnist canary --remove     remove a label

Servers polling the directory follow a label or weight within their poll interval (at once on SIGHUP). A label
never points at a version that fails verification.

`promote` moves a label only on evidence: it asks the running server (`--target`, as the client's) for
CompareVersions on the version, its scores against stable's on the same live inputs, and refuses, printing the
figures, when there are fewer than `--min-pairs` paired inputs or when the upper end of the median paired
difference's 95 % interval is above `--margin` nats (the candidate may be worse than stable by more than the
margin). `--force` moves the label anyway and says so on stderr, with whatever evidence there was.

Exit status 0 when everything asked for succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from contract.labels import check_label, read_labels, read_routes, write_labels
from contract.repository import ModelRepositoryError, list_versions, load_version, scan_versions
from serving.client import VaeError, VersionComparison
from serving.client.cli import add_server_arguments, connect

PROMOTED_LABEL = "stable"
CANARY_LABEL = "canary"
DEFAULT_MARGIN_NATS = 1.0  # the same margin as the "canary scores live inputs worse" alert
DEFAULT_MIN_PAIRS = 200


def set_label(model_dir: Path, label: str, version: int | None) -> str:
    """Point `label` at `version` (which must verify), or remove it (None); returns what was done, in words."""
    model_dir = Path(model_dir)
    check_label(label)
    routes = read_routes(model_dir)
    labels = dict(routes.labels)
    if version is None:
        if labels.pop(label, None) is None:
            raise ValueError(f"{model_dir}: no label {label!r} to remove (labels: {labels or 'none'})")
        write_labels(model_dir, labels, routes.canary_weight)
        return f"{model_dir.name}: removed label {label!r}"
    _check_version(model_dir, version)
    before = labels.get(label)
    labels[label] = version
    write_labels(model_dir, labels, routes.canary_weight)
    moved = f" (was {before})" if before is not None and before != version else ""
    return f"{model_dir.name}: {label} -> version {version}{moved}"


def _check_version(model_dir: Path, version: int) -> None:
    """ValueError or ModelRepositoryError unless `version` is there and verifies: a label never points at a
    version the server would refuse."""
    if version not in list_versions(model_dir):
        raise ValueError(f"{model_dir}: no version {version} (versions: {list_versions(model_dir) or 'none'})")
    load_version(model_dir, version)


def set_canary(model_dir: Path, version: int | None, weight: float | None, remove: bool = False) -> str:
    """Point the canary label at `version` (None: leave it) and set its share of the default route (None: leave
    it); `remove` ends the canary: the label, and the weight (the servers' --canary-weight again)."""
    model_dir = Path(model_dir)
    routes = read_routes(model_dir)
    labels = dict(routes.labels)
    if remove:
        labels.pop(CANARY_LABEL, None)
        write_labels(model_dir, labels)
        return f"{model_dir.name}: no canary (label and weight removed)"
    if version is not None:
        _check_version(model_dir, version)
        labels[CANARY_LABEL] = version
    elif CANARY_LABEL not in labels:
        raise ValueError(f"{model_dir}: no canary label: name its version (vae-models canary DIR VERSION)")
    weight = routes.canary_weight if weight is None else weight
    write_labels(model_dir, labels, weight)
    share = "the servers' --canary-weight" if weight is None else f"{weight * 100:g}%"
    return f"{model_dir.name}: canary -> version {labels[CANARY_LABEL]}, taking {share} of the default route"


def verdict(comparison: VersionComparison, margin: float, min_pairs: int) -> str | None:
    """Why the evidence does not allow promoting the candidate (None: it does)."""
    if comparison.paired_inputs < min_pairs:
        why = f" ({comparison.note})" if comparison.note else ""
        return (
            f"version {comparison.candidate} has {comparison.paired_inputs} paired inputs, fewer than the "
            f"{min_pairs} needed{why}"
        )
    if not comparison.median_difference_high <= margin:  # NaN (no pairs, with --min-pairs 0) is no evidence either
        return (
            f"version {comparison.candidate} may score live inputs worse than stable by more than the margin: the "
            f"upper end of the median difference's interval is {comparison.median_difference_high:+.3f} nats, "
            f"above {margin:g}"
        )
    return None


def describe(comparison: VersionComparison) -> str:
    """The evidence in one line."""
    c = comparison
    if c.paired_inputs == 0:
        return f"version {c.candidate} against stable {c.stable}: no paired inputs" + (f" ({c.note})" if c.note else "")
    return (
        f"version {c.candidate} against stable {c.stable} on {c.paired_inputs} paired inputs: median difference "
        f"{c.median_difference:+.3f} nats ({c.confidence:.0%} interval {c.median_difference_low:+.3f} .. "
        f"{c.median_difference_high:+.3f}), worse on {c.share_worse:.1%}; median negative ELBO "
        f"{c.candidate_median_negative_elbo:.2f} against {c.stable_median_negative_elbo:.2f}; "
        f"{c.dropped} dropped, {c.abandoned} abandoned (shadow fraction {c.shadow_fraction:g})"
    )


def promote(model_dir: Path, version: int, label: str, args: argparse.Namespace) -> str:
    """Ask the server for the evidence on `version`, then move `label` to it if the evidence allows (or --force).
    ValueError with the figures when it refuses."""
    _check_version(Path(model_dir), version)
    try:
        with connect(args) as client:
            comparison = client.compare_versions(version)
        refusal, evidence = verdict(comparison, args.margin, args.min_pairs), describe(comparison)
    except VaeError as exc:
        refusal, evidence = f"cannot read the evidence from {args.target}: {exc}", "none"
    if refusal is not None and not args.force:
        raise ValueError(f"not promoted: {refusal}\nevidence: {evidence}\n(--force promotes anyway)")
    done = set_label(model_dir, label, version)
    if refusal is not None:
        print(f"warning: promoted with --force, against the evidence: {refusal}; evidence: {evidence}", file=sys.stderr)
        return done
    return f"{done}\nevidence: {evidence}"


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
    promote_parser = commands.add_parser(
        "promote", help=f"point {PROMOTED_LABEL} (or --label) at a version, if the running server's evidence allows"
    )
    promote_parser.add_argument("model_dir", type=Path, help="e.g. models/vae-mnist")
    promote_parser.add_argument("version", type=int, help="the version to promote")
    promote_parser.add_argument("--label", default=PROMOTED_LABEL, help=f"the label to move (default {PROMOTED_LABEL})")
    promote_parser.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN_NATS,
        help=f"nats the candidate may score worse than stable, median paired (default {DEFAULT_MARGIN_NATS:g})",
    )
    promote_parser.add_argument(
        "--min-pairs", type=int, default=DEFAULT_MIN_PAIRS, help=f"paired inputs needed (default {DEFAULT_MIN_PAIRS})"
    )
    promote_parser.add_argument("--force", action="store_true", help="promote whatever the evidence, saying so")
    add_server_arguments(promote_parser)
    canary = commands.add_parser("canary", help="point the canary label at a version and set its share of traffic")
    canary.add_argument("model_dir", type=Path, help="e.g. models/vae-mnist")
    canary.add_argument("version", type=int, nargs="?", help="the canary's version (default: the one it names)")
    canary.add_argument("--weight", type=_weight, help="its share of the requests naming no version, 0 .. 1")
    canary.add_argument("--remove", action="store_true", help="end the canary: remove the label and the weight")
    label = commands.add_parser("label", help="point a label (stable, canary, ...) at a version, or remove it")
    label.add_argument("model_dir", type=Path, help="e.g. models/vae-mnist")
    label.add_argument("label", help="lower-case letters, digits, - and _, starting with a letter")
    label.add_argument("version", type=int, nargs="?", help="a version that verifies")
    label.add_argument("--remove", action="store_true", help="remove the label instead")
    return parser


def _weight(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a share of requests: give 0 .. 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "label" and (args.version is None) != args.remove:
        parser.error("label: give a VERSION, or --remove")
    if args.command == "canary" and args.remove == (args.version is not None or args.weight is not None):
        parser.error("canary: give a VERSION and/or --weight, or --remove")
    try:
        if args.command == "check":
            return 0 if check(args.model_dir, args.version) else 1
        if args.command == "promote":
            print(promote(args.model_dir, args.version, args.label, args))
        elif args.command == "canary":
            print(set_canary(args.model_dir, args.version, args.weight, args.remove))
        else:
            print(set_label(args.model_dir, args.label, None if args.remove else args.version))
    except (ModelRepositoryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
