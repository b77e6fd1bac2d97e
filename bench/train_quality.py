"""Default training recipe vs the tutorial's plain recipe, on the same mnist-5k split (4,500 train / 500 validation).

    python -m bench.train_quality                 (5-15 minutes on 2 CPU cores, depending on their load)

Plain: Adam 1e-3, batch 128, 20 epochs, constant learning rate, no KL warm-up, fp32. Default: TrainConfig's
defaults. Both are scored on the validation split (mnist-5k's test split) from their best checkpoint (the
lowest validation loss, which for the plain recipe is generous: the tutorial keeps its last epoch).
Prints each recipe's validation negative ELBO and IWAE NLL (nats, lower is better) and the differences.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from training.train import TrainConfig, train

PLAIN: dict[str, Any] = {
    "epochs": 20,
    "batch_size": 128,
    "lr": 1e-3,
    "lr_schedule": "constant",
    "warmup_epochs": 0,
    "patience": 0,
    "precision": "fp32",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-quality", help="parent of the two run directories")
    parser.add_argument("--iwae-images", type=int, default=500, help="validation images in the IWAE estimate")
    parser.add_argument("--iwae-samples", type=int, default=1000, help="importance samples per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override the default recipe")
    args = parser.parse_args()

    base = TrainConfig(
        dataset="mnist-5k",
        seed=args.seed,
        plots=False,
        eval_iwae_images=args.iwae_images,
        eval_iwae_samples=args.iwae_samples,
    )
    overrides: dict[str, Any] = {}
    for item in args.set:
        name, value = item.split("=", 1)
        kind = type(getattr(base, name))
        overrides[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    default = replace(base, **overrides)
    recipes = {"plain": replace(base, **PLAIN), "default": default}
    results = {}
    for name, config in recipes.items():
        started = time.perf_counter()
        result = train(replace(config, out=str(Path(args.out) / name)))
        epochs = sum(1 for _ in (Path(args.out) / name / "metrics.jsonl").open())
        results[name] = {**result, "epochs_run": epochs, "seconds": time.perf_counter() - started}

    print(
        f"\n{'recipe':8} {'epochs':>6} {'val -ELBO':>10} {'IWAE NLL':>9} {'rec':>7} {'KL':>6} {'AU':>3} {'seconds':>8}"
    )
    for name, r in results.items():
        print(
            f"{name:8} {r['epochs_run']:6d} {r['neg_elbo']:10.2f} {r['iwae_nll']:9.2f} {r['reconstruction']:7.2f} "
            f"{r['kl']:6.2f} {r['active_units']:3d} {r['seconds']:8.0f}"
        )
    gain = results["plain"]["neg_elbo"] - results["default"]["neg_elbo"]
    gain_iwae = results["plain"]["iwae_nll"] - results["default"]["iwae_nll"]
    print(f"default is {gain:.2f} nats better in validation -ELBO ({gain_iwae:.2f} in IWAE NLL)")
    keys = ("neg_elbo", "iwae_nll", "epochs_run")
    figures = {f"{name}_{key}": r[key] for name, r in results.items() for key in keys}
    print(json.dumps({"neg_elbo_gain": gain, "iwae_nll_gain": gain_iwae, **figures}))


if __name__ == "__main__":
    main()
