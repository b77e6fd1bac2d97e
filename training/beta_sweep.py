"""The beta study: train one short run per beta on mnist-5k, then tabulate and plot the trade-off.

    python -m training.beta_sweep --out runs/beta-sweep            (also `make beta-sweep`)

Writes <out>/beta-<beta>/ (an ordinary run directory each), <out>/beta_sweep.json, <out>/beta_sweep.md (a
markdown table) and <out>/beta_sweep.png (reconstruction, KL, active units and k-NN accuracy against beta).
All figures are on mnist-5k's validation split (its test split), from each run's best checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from contract.settings import SettingError
from training.data import DataError
from training.train import TrainConfig, train

BETAS = (0.5, 1.0, 2.0, 4.0, 8.0)
COLUMNS = (  # key in the evaluation, column title, format
    ("beta", "beta", "{:g}"),
    ("reconstruction", "reconstruction (nats)", "{:.1f}"),
    ("kl", "KL (nats)", "{:.1f}"),
    ("neg_elbo", "-ELBO (nats)", "{:.1f}"),
    ("iwae_nll", "IWAE NLL (nats)", "{:.1f}"),
    ("active_units", "active units", "{:d}"),
    ("knn_acc", "k-NN accuracy", "{:.3f}"),
    ("epochs", "epochs", "{:d}"),
)


def sweep(base: TrainConfig, betas: tuple[float, ...], out: Path) -> list[dict[str, Any]]:
    """Train one run per beta (all else equal) and return one row of the table per run."""
    rows = []
    for beta in betas:
        run = out / f"beta-{beta:g}"
        result = train(replace(base, beta=beta, out=str(run)))
        epochs = sum(1 for _ in (run / "metrics.jsonl").open())
        rows.append({**{key: result[key] for key, _, _ in COLUMNS if key in result}, "beta": beta, "epochs": epochs})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + " ---: |" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    betas = [row["beta"] for row in rows]
    panels = (
        ("reconstruction", "reconstruction (nats)"),
        ("kl", "KL (nats)"),
        ("active_units", "active units"),
        ("knn_acc", "k-NN accuracy of latent means"),
    )
    figure, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for axis, (key, title) in zip(axes, panels, strict=True):
        axis.plot(betas, [row[key] for row in rows], marker="o")
        axis.set_xscale("log", base=2)
        axis.set_xticks(betas, [f"{beta:g}" for beta in betas])
        axis.set(title=title, xlabel="beta")
        axis.grid(alpha=0.3)
    figure.suptitle("beta-VAE on mnist-5k: validation figures against beta")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/beta-sweep", help="directory of the runs and the table")
    parser.add_argument("--betas", type=float, nargs="+", default=list(BETAS))
    parser.add_argument("--epochs", type=int, default=30, help="epochs per run (short runs)")
    parser.add_argument("--dataset", default="mnist-5k")
    parser.add_argument("--iwae-images", type=int, default=100, help="validation images in each IWAE estimate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        base = TrainConfig(
            dataset=args.dataset, epochs=args.epochs, seed=args.seed, plots=False, eval_iwae_images=args.iwae_images
        )
        rows = sweep(base, tuple(args.betas), out)
    except (SettingError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = markdown_table(rows)
    (out / "beta_sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "beta_sweep.md").write_text(table)
    plot(rows, out / "beta_sweep.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
