"""Evaluate a checkpoint on the test split; prints one JSON line.

    python -m training.evaluate runs/smoke/best.pt --dataset mnist-5k      (also `vae-evaluate`)

neg_elbo       -ELBO per image on the test split (reconstruction + KL, one z sample per image), nats
iwae_nll       importance-weighted bound on -log p(x) (Burda et al.), K = --iwae-samples per image, on the first
               --iwae-images test images; iwae_neg_elbo is -ELBO on those same images from the same samples,
               so iwae_nll <= iwae_neg_elbo always (and both approach the NLL from above)
kl_per_dim     mean KL(q(z|x) || p(z)) of each latent dimension over the test split
active_units   latent dimensions whose Cov_x(E[z|x]) > 0.01 (Burda et al.'s activity test)
knn_acc        accuracy of a k-NN classifier from train latent means to test latent means
For mnist-5k the test split is the validation split (the dataset has no other held-out images).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from training.data import DataError, Dataset, load_dataset
from training.model import VAE, kl_divergence, reparameterize, vae_loss

ACTIVE_UNIT_THRESHOLD = 0.01
EVAL_BATCH = 1000  # images per forward pass (no gradients, so memory stays small)


@torch.no_grad()
def elbo_terms(model: VAE, images: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """(reconstruction, KL) per image, averaged: one z per image drawn from a seeded generator, so repeated
    calls on the same model give the same numbers (a steady signal for early stopping)."""
    generator = torch.Generator(images.device).manual_seed(seed)
    reconstruction = kl = 0.0
    for batch in images.split(EVAL_BATCH):
        mu, log_var = model.encode(batch)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        terms = vae_loss(model.decode_logits(reparameterize(mu, log_var, eps)), batch, mu, log_var)
        reconstruction += terms.reconstruction.item() * len(batch)
        kl += terms.kl.item() * len(batch)
    return reconstruction / len(images), kl / len(images)


@torch.no_grad()
def encode_all(model: VAE, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, log_var) of every image, [N, latent_dim] each."""
    parts = [model.encode(batch) for batch in images.split(EVAL_BATCH)]
    return torch.cat([mu for mu, _ in parts]), torch.cat([log_var for _, log_var in parts])


@torch.no_grad()
def importance_log_weights(model: VAE, image: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
    """log p(x|z) + log p(z) - log q(z|x) for `samples` draws z ~ q(z|x) of one image [1, C, H, W]; shape [samples]."""
    mu, log_var = model.encode(image)
    log_weights = []
    for count in [EVAL_BATCH] * (samples // EVAL_BATCH) + [samples % EVAL_BATCH]:
        if count == 0:
            continue
        eps = torch.randn((count, mu.shape[1]), generator=generator, device=mu.device, dtype=mu.dtype)
        z = reparameterize(mu, log_var, eps)
        logits = model.decode_logits(z)
        log_px_z = (
            -F.binary_cross_entropy_with_logits(logits, image.expand_as(logits), reduction="none").flatten(1).sum(1)
        )
        log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(1)
        log_qz_x = -0.5 * (eps.pow(2) + math.log(2 * math.pi) + log_var).sum(1)
        log_weights.append(log_px_z + log_pz - log_qz_x)
    return torch.cat(log_weights)


def iwae_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """log (1/K) Σ_k w_k from log weights [..., K]: the K-sample importance-weighted lower bound on log p(x)."""
    return torch.logsumexp(log_weights, dim=-1) - math.log(log_weights.shape[-1])


def iwae_nll(model: VAE, images: torch.Tensor, samples: int, seed: int = 0) -> tuple[float, float]:
    """(IWAE estimate of -log p(x), -ELBO from the same samples), both averaged over the images."""
    generator = torch.Generator(images.device).manual_seed(seed)
    nll = neg_elbo = 0.0
    for image in images.split(1):
        log_weights = importance_log_weights(model, image, samples, generator)
        nll -= iwae_bound(log_weights).item()
        neg_elbo -= log_weights.mean().item()
    return nll / len(images), neg_elbo / len(images)


def active_units(mu: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Latent dimensions whose encoder mean varies across inputs: Var_x(E[z_d | x]) > threshold."""
    return int((mu.double().var(dim=0, unbiased=True) > threshold).sum())


def knn_accuracy(
    train_mu: torch.Tensor, train_labels: torch.Tensor, test_mu: torch.Tensor, test_labels: torch.Tensor, k: int = 5
) -> float:
    """Accuracy of k-NN (Euclidean) on latent means: fit on train, score on test."""
    from sklearn.neighbors import KNeighborsClassifier

    classifier = KNeighborsClassifier(n_neighbors=k).fit(train_mu.cpu().numpy(), train_labels.cpu().numpy())
    return float(classifier.score(test_mu.cpu().numpy(), test_labels.cpu().numpy()))


def evaluate(
    model: VAE, dataset: Dataset, iwae_samples: int = 1000, iwae_images: int = 200, knn_k: int = 5, seed: int = 0
) -> dict[str, object]:
    """Every figure of the module docstring, as a JSON-ready dict."""
    model.eval()
    test = dataset.test
    reconstruction, kl = elbo_terms(model, test.images, seed)
    test_mu, test_log_var = encode_all(model, test.images)
    train_mu, _ = encode_all(model, dataset.train.images)
    subset = test.images[: max(0, iwae_images)]
    nll, subset_neg_elbo = iwae_nll(model, subset, iwae_samples, seed) if len(subset) and iwae_samples else (None, None)
    return {
        "dataset": dataset.name,
        "split": "validation (= test: mnist-5k has no test split)" if dataset.test_is_validation else "test",
        "images": len(test),
        "neg_elbo": reconstruction + kl,
        "reconstruction": reconstruction,
        "kl": kl,
        "iwae_nll": nll,
        "iwae_neg_elbo": subset_neg_elbo,
        "iwae_samples": iwae_samples,
        "iwae_images": len(subset),
        "latent_dim": test_mu.shape[1],
        "kl_per_dim": [round(v, 4) for v in kl_divergence(test_mu, test_log_var).mean(0).tolist()],
        "active_units": active_units(test_mu),
        "knn_acc": knn_accuracy(train_mu, dataset.train.labels, test_mu, test.labels, knn_k),
        "knn_k": knn_k,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="a checkpoint written by training (best.pt or last.pt)")
    parser.add_argument("--dataset", help="dataset name (default: the one the checkpoint was trained on)")
    parser.add_argument("--data-dir", help="raw MNIST / Fashion-MNIST files (default: data/)")
    parser.add_argument("--iwae-samples", type=int, default=1000, help="K, importance samples per image")
    parser.add_argument("--iwae-images", type=int, default=200, help="test images in the IWAE estimate (cost ∝ K·n)")
    parser.add_argument("--knn-k", type=int, default=5, help="neighbours of the k-NN classifier")
    parser.add_argument("--seed", type=int, default=0, help="seed of the z samples")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default: cpu)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: device cuda requested but no CUDA GPU is available", file=sys.stderr)
        return 2
    try:
        checkpoint = load_checkpoint(Path(args.checkpoint))
        model = model_from_checkpoint(checkpoint).to(args.device)
        dataset_name = args.dataset or checkpoint.get("dataset") or "auto"
        dataset = load_dataset(dataset_name, args.data_dir, checkpoint.get("train_config", {}).get("split_seed", 0))
        result = evaluate(model, dataset.to(args.device), args.iwae_samples, args.iwae_images, args.knn_k, args.seed)
    except (CheckpointError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": str(args.checkpoint), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
