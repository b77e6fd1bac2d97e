"""The client's command line: samples, interpolations, reconstructions and traversals as PNG grids, scores as
a table, and the served model's description.

python -m serving.client --target localhost:50051 sample -n 64 --seed 1 -o samples.png
python -m serving.client --target localhost:50051 interpolate a.png b.png --steps 10 -o strip.png
python -m serving.client --target localhost:50051 score a.png b.png --importance-samples 100
python -m serving.client --target localhost:50051 reconstruct a.png b.png -o reconstructions.png
python -m serving.client --target localhost:50051 traverse a.png --steps 9 -o traversal.png
python -m serving.client --target localhost:50051 info
python -m serving.client --target localhost:50051 compare
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from serving.client.client import DEFAULT_TARGET, INTERPOLATION_METHODS, VaeClient
from serving.client.images import image_grid, load_image
from serving.client.results import VaeError


def _sample_command(client: VaeClient, args: argparse.Namespace) -> str:
    drawn = client.sample(
        args.num_samples, seed=args.seed, temperature=args.temperature, output_dtype="uint8", offset=args.offset
    )
    image_grid(drawn.images, args.columns).save(args.output)
    rows = f"rows {drawn.offset}..{drawn.offset + len(drawn.images) - 1} of seed {drawn.seed}"
    return f"wrote {args.output}: {len(drawn.images)} samples ({rows}) from version {drawn.model_version}"


def _load_images(client: VaeClient, paths: list[Path]) -> np.ndarray:
    shape = client.model_info().image_shape
    return np.stack([load_image(path, shape) for path in paths])


def _score_command(client: VaeClient, args: argparse.Namespace) -> str:
    scores = client.score(_load_images(client, args.images), args.importance_samples, args.seed)
    columns = ["negative_elbo", "reconstruction", "kl", "complexity", "corrected", "plugin_negative_elbo"]
    columns += ["iwae"] if scores.iwae is not None else []
    widths = [max(14, len(name)) for name in columns]
    width = max(len("image"), *(len(str(path)) for path in args.images))
    lines = [f"{'image':<{width}}  " + "  ".join(f"{name:>{w}}" for name, w in zip(columns, widths, strict=True))]
    for row, path in enumerate(args.images):
        cells = (f"{getattr(scores, name)[row]:{w}.2f}" for name, w in zip(columns, widths, strict=True))
        lines.append(f"{path!s:<{width}}  " + "  ".join(cells))
    lines.append(f"nats; higher: less like the training data (version {scores.model_version})")
    return "\n".join(lines)


def _reconstruct_command(client: VaeClient, args: argparse.Namespace) -> str:
    images = _load_images(client, args.images)
    result = client.reconstruct(images, args.sample_posterior, args.seed, output_dtype="uint8")
    pairs = np.stack([images, result.images], axis=1).reshape(-1, *images.shape[1:])
    image_grid(pairs, columns=2).save(args.output)
    worst = float(result.scores.negative_elbo.max())
    return (
        f"wrote {args.output}: {len(images)} rows of (image, reconstruction), negative ELBO up to {worst:.1f} nats, "
        f"from version {result.model_version}"
    )


def _traverse_command(client: VaeClient, args: argparse.Namespace) -> str:
    (image,) = _load_images(client, [args.image])
    grid = client.traverse(image[None], args.dimensions or (), args.low, args.high, args.steps, output_dtype="uint8")
    rows = grid.dimensions
    if args.active_only and grid.active_dimensions:
        keep = [row for row, dim in enumerate(rows) if dim in grid.active_dimensions]
        grid_images, rows = grid.images[keep], tuple(rows[row] for row in keep)
    else:
        grid_images = grid.images
    image_grid(grid_images.reshape(-1, *grid_images.shape[2:]), columns=len(grid.values)).save(args.output)
    return (
        f"wrote {args.output}: dimensions {list(rows)} (one per row) over {grid.values[0]:g}..{grid.values[-1]:g}; "
        f"active dimensions {list(grid.active_dimensions) or 'unknown'}; version {grid.model_version}"
    )


def _interpolate_command(client: VaeClient, args: argparse.Namespace) -> str:
    shape = client.model_info().image_shape
    start, end = (load_image(path, shape)[None] for path in (args.start, args.end))
    path = client.interpolate(start, end, args.steps, args.method, output_dtype="uint8")
    image_grid(path.images.reshape(-1, *path.images.shape[2:]), columns=args.steps).save(args.output)
    return (
        f"wrote {args.output}: {args.steps} images from {args.start} to {args.end} ({args.method}) "
        f"from version {path.model_version}"
    )


def _info_command(client: VaeClient, args: argparse.Namespace) -> str:
    info = client.model_info()
    summary = {
        "name": info.name,
        "version": info.model_version,
        "latent_dim": info.latent_dim,
        "image_shape": list(info.image_shape),
        "provider": info.provider,
        "health": client.health(),
        "versions": [dataclasses.asdict(row) for row in info.versions],
        "manifest": info.manifest,
    }
    return json.dumps(summary, indent=2)


def _compare_command(client: VaeClient, args: argparse.Namespace) -> str:
    compared = client.compare_versions(args.model_version, args.label)
    fields = {name: None if value != value else value for name, value in dataclasses.asdict(compared).items()}
    return json.dumps(fields, indent=2)  # NaN (no pairs) as null: JSON has no NaN


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.client", description="Call a running VAE server.")
    add_server_arguments(parser)
    parser.add_argument(
        "--request-id",
        metavar="ID",
        help="send x-request-id: ID with each call (the server's log lines and trace name it)",
    )
    choose = parser.add_mutually_exclusive_group()
    choose.add_argument("--model-version", type=int, metavar="N", help="ask for this version (default: the server's)")
    choose.add_argument("--label", metavar="NAME", help="ask for the version this label names, e.g. stable")
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser("sample", help="draw images from the prior and save them as a PNG grid")
    sample.add_argument("-n", "--num-samples", type=int, default=64, help="how many (default 64)")
    sample.add_argument("--seed", type=int, default=None, help="same seed, same images (default: random)")
    sample.add_argument("--temperature", type=float, default=None, help="prior std multiplier (default 1.0)")
    sample.add_argument("--offset", type=int, default=0, help="first row of the seed's draws (default 0)")
    sample.add_argument("--columns", type=int, default=None, help="grid width (default: square)")
    sample.add_argument("-o", "--output", type=Path, default=Path("samples.png"), help="PNG to write")
    sample.set_defaults(run=_sample_command)

    interp = commands.add_parser("interpolate", help="decode the path between two images; save it as a PNG strip")
    interp.add_argument("start", type=Path, help="first image (PNG; grayscale, resized to the model's size)")
    interp.add_argument("end", type=Path, help="last image")
    interp.add_argument("--steps", type=int, default=10, help="images in the strip, both ends included (default 10)")
    interp.add_argument(
        "--method", choices=sorted(INTERPOLATION_METHODS), default="linear", help="path in latent space"
    )
    interp.add_argument("-o", "--output", type=Path, default=Path("strip.png"), help="PNG to write")
    interp.set_defaults(run=_interpolate_command)

    score = commands.add_parser("score", help="print a table of how well the model explains each image (nats)")
    score.add_argument("images", type=Path, nargs="+", help="PNG images (grayscale, resized to the model's size)")
    score.add_argument("--importance-samples", type=int, default=0, help="K for the iwae column (default 0: none)")
    score.add_argument("--seed", type=int, default=None, help="seed of the importance samples (default 0)")
    score.set_defaults(run=_score_command)

    recon = commands.add_parser("reconstruct", help="save each image beside its reconstruction as a PNG grid")
    recon.add_argument("images", type=Path, nargs="+", help="PNG images")
    recon.add_argument("--sample-posterior", action="store_true", help="decode a posterior draw, not the mean")
    recon.add_argument("--seed", type=int, default=None, help="seed of the posterior draws (default 0)")
    recon.add_argument("-o", "--output", type=Path, default=Path("reconstructions.png"), help="PNG to write")
    recon.set_defaults(run=_reconstruct_command)

    traverse = commands.add_parser("traverse", help="sweep each latent dimension from an image; save the grid")
    traverse.add_argument("image", type=Path, help="the origin (PNG)")
    traverse.add_argument("--dimensions", type=int, nargs="+", default=None, help="which (default: all)")
    traverse.add_argument("--active-only", action="store_true", help="leave out the dimensions the model does not use")
    traverse.add_argument("--low", type=float, default=None, help="first value (default -3)")
    traverse.add_argument("--high", type=float, default=None, help="last value (default 3)")
    traverse.add_argument("--steps", type=int, default=None, help="values per dimension (default 9)")
    traverse.add_argument("-o", "--output", type=Path, default=Path("traversal.png"), help="PNG to write")
    traverse.set_defaults(run=_traverse_command)

    info = commands.add_parser("info", help="print the served model, its provider, health and manifest (JSON)")
    info.set_defaults(run=_info_command)

    compare = commands.add_parser(
        "compare", help="print the canary (or --model-version/--label) against stable on the same live inputs (JSON)"
    )
    compare.set_defaults(run=_compare_command)
    return parser


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """--target, --timeout and the TLS flags: where the server is and how to reach it (`connect`)."""
    env = os.environ.get
    parser.add_argument("--target", default=env("VAE_TARGET", DEFAULT_TARGET), help="server address [env VAE_TARGET]")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    tls = parser.add_argument_group("TLS (plaintext unless one of these is given)")
    tls.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CA certificates")
    tls.add_argument("--tls-ca", type=Path, default=env("VAE_TLS_CA"), help="PEM CA of the server [env VAE_TLS_CA]")
    tls.add_argument(
        "--tls-cert", type=Path, default=env("VAE_TLS_CLIENT_CERT"), help="client certificate [env VAE_TLS_CLIENT_CERT]"
    )
    tls.add_argument("--tls-key", type=Path, default=env("VAE_TLS_CLIENT_KEY"), help="its key [env VAE_TLS_CLIENT_KEY]")


def connect(args: argparse.Namespace, **version: Any) -> VaeClient:
    """A client of the server `add_server_arguments`' flags name; ValueError for --tls-cert without --tls-key."""
    tls_files = {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}
    return VaeClient(args.target, timeout_s=args.timeout, tls=args.tls, **tls_files, **version)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with connect(args, model_version=args.model_version, label=args.label) as client:
            print(args.run(client if args.request_id is None else client.with_request_id(args.request_id), args))
    except VaeError as exc:
        print(f"error: {args.target}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # --tls-cert without --tls-key
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `... info | head`: the reader has what it wanted, as with any Unix tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 0
    except OSError as exc:  # reading or writing a PNG, reading a TLS file
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
