"""Out-of-distribution detection through the gRPC API: AUROC of the raw and the complexity-corrected score.

    python -m bench.ood                      # `make bench-ood`: trains both models (~10 min on 2 cores)
    python -m bench.ood --quick              # the smoke run the tests do (tiny models, few images)

Two VAEs, each trained with the project's recipe (`training.train`, `--epochs` epochs on at most
`--train-limit` images: mnist-5k has 4,500, Fashion-MNIST's first 12,000 keep the run short) and exported
(`training.export`), are served by a real server (`python -m serving.server`), and every image is scored
with the Score RPC:
  (a) trained on mnist-5k: in-distribution its validation images, out-of-distribution Fashion-MNIST's test
      images;
  (b) trained on Fashion-MNIST: in-distribution its test images, out-of-distribution the mnist-5k digits
      (the direction where likelihood is known to fail: Nalisnick et al., ICLR 2019).
AUROC is the probability that an out-of-distribution image scores higher than an in-distribution one (1:
perfect, 0.5: chance, below 0.5: the score ranks the wrong way). Prints a table, writes JSON to `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from bench.server_process import ServerProcess
from serving.client import VaeClient
from training.data import load_dataset
from training.export import export
from training.train import TrainConfig, train

SCORES = ("negative_elbo", "corrected", "iwae")
BATCH = 128  # images per Score call (x importance samples within the server's items per request)


def train_and_export(dataset: str, epochs: int, limit: int | None, work: Path) -> Path:
    """A model trained on `dataset`, exported as version 1 of <work>/models/<dataset>; returns the model dir."""
    config = replace(
        TrainConfig(),
        dataset=dataset,
        out=str(work / "runs" / dataset),
        epochs=epochs,
        limit=limit,
        warmup_epochs=min(10, epochs // 3),
        eval_iwae_images=0,
        plots=False,
    )
    train(config)
    return export(Path(config.out) / "best.pt", work / "models", dataset).parent


def score_images(target: str, images: np.ndarray, importance_samples: int) -> dict[str, np.ndarray]:
    """Every score of every image, through the Score RPC in batches."""
    columns: dict[str, list[np.ndarray]] = {name: [] for name in SCORES}
    batch = max(1, min(BATCH, 1024 // max(1, importance_samples)))
    with VaeClient(target, timeout_s=120) as client:
        for start in range(0, len(images), batch):
            scores = client.score(images[start : start + batch], importance_samples, seed=0)
            columns["negative_elbo"].append(scores.negative_elbo)
            columns["corrected"].append(scores.corrected)
            if scores.iwae is not None:
                columns["iwae"].append(scores.iwae)
    return {name: np.concatenate(parts) for name, parts in columns.items() if parts}


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(score of an out-of-distribution image > score of an in-distribution one)."""
    labels = np.concatenate([np.zeros(len(inside)), np.ones(len(outside))])
    return float(roc_auc_score(labels, np.concatenate([inside, outside])))


def run_case(
    name: str, model_dir: Path, inside: np.ndarray, outside: np.ndarray, importance_samples: int
) -> dict[str, Any]:
    with ServerProcess.vae_server("--model-dir", str(model_dir), "--intra-op-threads", "2") as server:
        started = time.perf_counter()
        scored_in = score_images(server.target, inside, importance_samples)
        scored_out = score_images(server.target, outside, importance_samples)
        seconds = time.perf_counter() - started
    return {
        "case": name,
        "in_distribution_images": len(inside),
        "out_of_distribution_images": len(outside),
        "auroc": {score: auroc(scored_in[score], scored_out[score]) for score in scored_in},
        "median": {
            score: {"in": float(np.median(scored_in[score])), "out": float(np.median(scored_out[score]))}
            for score in scored_in
        },
        "score_seconds": round(seconds, 1),
    }


def images_of(split: Any, count: int | None) -> np.ndarray:
    return np.ascontiguousarray(split.head(count).images.numpy())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ood", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20, help="training epochs of each model (default 20)")
    parser.add_argument("--images", type=int, default=2000, help="images per side of each case (default 2000)")
    parser.add_argument(
        "--train-limit", type=int, default=12000, help="training images per model, at most (default 12000)"
    )
    parser.add_argument("--importance-samples", type=int, default=0, help="K for the iwae score (default 0: none)")
    parser.add_argument("--quick", action="store_true", help="tiny models and 64 images a side: a smoke run")
    parser.add_argument("--out", type=Path, default=Path("bench/results/ood.json"), help="results JSON")
    args = parser.parse_args(argv)
    epochs, images, limit = (1, 64, 256) if args.quick else (args.epochs, args.images, args.train_limit)
    mnist, fashion = load_dataset("mnist-5k"), load_dataset("fashion-mnist")
    with tempfile.TemporaryDirectory(prefix="bench-ood-") as tmp:
        work = Path(tmp)
        cases = [
            run_case(
                "(a) trained on mnist-5k: mnist-5k validation vs Fashion-MNIST test",
                train_and_export("mnist-5k", epochs, limit, work),
                images_of(mnist.validation, images),
                images_of(fashion.test, images),
                args.importance_samples,
            ),
            run_case(
                "(b) trained on Fashion-MNIST: Fashion-MNIST test vs mnist-5k",
                train_and_export("fashion-mnist", epochs, limit, work),
                images_of(fashion.test, images),
                images_of(mnist.train, images),
                args.importance_samples,
            ),
        ]
    result = {"epochs": epochs, "importance_samples": args.importance_samples, "cases": cases}
    print(f"{'case':<68} {'score':<14} {'AUROC':>6}  {'median in':>10} {'median out':>10}")
    for case in cases:
        for score, value in case["auroc"].items():
            median = case["median"][score]
            print(f"{case['case']:<68} {score:<14} {value:6.3f}  {median['in']:10.1f} {median['out']:10.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
