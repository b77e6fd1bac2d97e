"""The client's command line: samples and interpolations as PNG grids, and the served model's description.

python -m serving.client --target localhost:50051 sample -n 64 --seed 1 -o samples.png
python -m serving.client --target localhost:50051 interpolate a.png b.png --steps 10 -o strip.png
python -m serving.client --target localhost:50051 info
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from serving.client.client import DEFAULT_TARGET, INTERPOLATION_METHODS, VaeClient, VaeError
from serving.client.images import image_grid, load_image


def _sample_command(client: VaeClient, args: argparse.Namespace) -> str:
    images, _ = client.sample(args.num_samples, seed=args.seed, temperature=args.temperature, output_dtype="uint8")
    image_grid(images, args.columns).save(args.output)
    seed = "random" if args.seed is None else args.seed
    return f"wrote {args.output}: {len(images)} samples (seed {seed}) from version {client.last_model_version}"


def _interpolate_command(client: VaeClient, args: argparse.Namespace) -> str:
    shape = client.model_info().image_shape
    start, end = (load_image(path, shape)[None] for path in (args.start, args.end))
    images, _ = client.interpolate(start, end, args.steps, args.method, output_dtype="uint8")
    image_grid(images.reshape(-1, *images.shape[2:]), columns=args.steps).save(args.output)
    return (
        f"wrote {args.output}: {args.steps} images from {args.start} to {args.end} ({args.method}) "
        f"from version {client.last_model_version}"
    )


def _info_command(client: VaeClient, args: argparse.Namespace) -> str:
    info = client.model_info()
    summary = {
        "name": info.name,
        "version": info.version,
        "latent_dim": info.latent_dim,
        "image_shape": list(info.image_shape),
        "provider": info.provider,
        "health": client.health(),
        "versions": [dataclasses.asdict(row) for row in info.versions],
        "manifest": info.manifest,
    }
    return json.dumps(summary, indent=2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.client", description="Call a running VAE server.")
    parser.add_argument(
        "--target", default=os.environ.get("VAE_TARGET", DEFAULT_TARGET), help="server address [env VAE_TARGET]"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    choose = parser.add_mutually_exclusive_group()
    choose.add_argument("--model-version", type=int, metavar="N", help="ask for this version (default: the server's)")
    choose.add_argument("--label", metavar="NAME", help="ask for the version this label names, e.g. stable")
    env = os.environ.get
    tls = parser.add_argument_group("TLS (plaintext unless one of these is given)")
    tls.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CA certificates")
    tls.add_argument("--tls-ca", type=Path, default=env("VAE_TLS_CA"), help="PEM CA of the server [env VAE_TLS_CA]")
    tls.add_argument(
        "--tls-cert", type=Path, default=env("VAE_TLS_CLIENT_CERT"), help="client certificate [env VAE_TLS_CLIENT_CERT]"
    )
    tls.add_argument("--tls-key", type=Path, default=env("VAE_TLS_CLIENT_KEY"), help="its key [env VAE_TLS_CLIENT_KEY]")
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser("sample", help="draw images from the prior and save them as a PNG grid")
    sample.add_argument("-n", "--num-samples", type=int, default=64, help="how many (default 64)")
    sample.add_argument("--seed", type=int, default=None, help="same seed, same images (default: random)")
    sample.add_argument("--temperature", type=float, default=None, help="prior std multiplier (default 1.0)")
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

    info = commands.add_parser("info", help="print the served model, its provider, health and manifest (JSON)")
    info.set_defaults(run=_info_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tls_files = {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}
        version = {"model_version": args.model_version, "label": args.label}
        with VaeClient(args.target, timeout_s=args.timeout, tls=args.tls, **tls_files, **version) as client:
            print(args.run(client, args))
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
