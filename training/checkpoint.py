"""Checkpoints that describe themselves: the model's config travels with its weights.

A checkpoint is a plain dict of tensors and primitives, so it loads with `torch.load(weights_only=True)`
(no pickled classes, nothing executed on load):

    model_args    asdict(VAEConfig): rebuilds the network, all that export needs
    model         state_dict
    train_config  asdict(TrainConfig) of the run that wrote it
    dataset       the dataset actually used (e.g. "mnist-5k")
    epoch         epochs completed
    metrics       the latest validation metrics (floats), e.g. {"val_loss": ..., "val_reconstruction": ...}
    optimizer     optimizer state_dict (for resume); absent in exported-only checkpoints
    extra         anything else a run needs to resume (RNG state, early-stopping counters)
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from contract.files import atomic_replace
from training.model import VAE, VAEConfig


class CheckpointError(Exception):
    """A checkpoint file is missing, corrupt, or not a VAE checkpoint of this project."""


REQUIRED_KEYS = ("model_args", "model")


def save_checkpoint(path: Path, model: VAE, **fields: Any) -> None:
    """Write atomically (temp file + rename), so a crash never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model_args": asdict(model.config), "model": model.state_dict(), **fields}
    with atomic_replace(path) as temporary:
        torch.save(payload, temporary)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (weights_only) and check it has what it needs to rebuild the model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a VAE checkpoint (needs keys {', '.join(REQUIRED_KEYS)})")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any]) -> VAE:
    """Rebuild the VAE from a loaded checkpoint, in eval mode."""
    try:
        model = VAE(VAEConfig(**checkpoint["model_args"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint does not match the VAE: {exc}") from None
    return model.eval()
