"""The pictures of a training run (matplotlib, Agg backend, PNG), all drawn from the best checkpoint.

loss_curves.png      train vs validation: total, reconstruction and KL in separate panels, per epoch
samples.png          8x8 grid of decoded prior samples z ~ N(0, I)
reconstructions.png  test images beside their reconstructions (decoded encoder means)
interpolations.png   strips between pairs of test digits, linear and spherical (slerp) in latent space
latent_pca.png       test-set latent means projected to 2D by PCA, coloured by label
latent_tsne.png      the same by t-SNE
traversals.png       each latent dimension swept from -3 to 3 with the others at 0
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torchvision.utils import make_grid

from contract.interpolation import interpolate
from training.data import Dataset
from training.evaluate import encode_all
from training.model import VAE

INTERPOLATION_STEPS = 10
INTERPOLATION_PAIRS = ((1, 7), (3, 8), (4, 9), (0, 6))  # label pairs (digits that look alike make good strips)
TRAVERSAL_STEPS = 11


def draw_all(
    model: VAE, dataset: Dataset, history: list[dict[str, Any]], out: Path, plot_points: int = 2000, seed: int = 0
) -> list[Path]:
    """Draw every picture of the module docstring into `out`; returns their paths."""
    model.eval()
    out = Path(out)
    test = dataset.test
    with torch.no_grad():
        mu, _ = encode_all(model, test.images[:plot_points])
    labels = test.labels[:plot_points].cpu()
    legend_title = "class" if dataset.name == "fashion-mnist" else "digit"
    paths = [
        loss_curves(history, out / "loss_curves.png"),
        prior_samples(model, out / "samples.png", seed),
        reconstructions(model, test.images[:32], out / "reconstructions.png"),
        interpolations(model, test.images, test.labels, out / "interpolations.png"),
        latent_projection(mu.cpu(), labels, "pca", out / "latent_pca.png", seed, legend_title),
        latent_projection(mu.cpu(), labels, "tsne", out / "latent_tsne.png", seed, legend_title),
        traversals(model, out / "traversals.png"),
    ]
    return paths


def loss_curves(history: list[dict[str, Any]], path: Path) -> Path:
    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("loss", "total loss (rec + beta·KL)"), ("reconstruction", "reconstruction (BCE)"), ("kl", "KL"))
    for axis, (key, title) in zip(axes, panels, strict=True):
        axis.plot(epochs, [row[f"train_{key}"] for row in history], label="train", marker=".")
        axis.plot(epochs, [row[f"val_{key}"] for row in history], label="validation", marker=".")
        axis.set(title=title, xlabel="epoch", ylabel="nats per image")
        axis.grid(alpha=0.3)
        axis.legend()
    if history:
        best = min(history, key=lambda row: row["val_loss"])
        axes[0].axvline(best["epoch"], color="grey", linestyle="--", linewidth=1)
        axes[0].annotate(
            f"best {best['val_loss']:.1f}",
            (best["epoch"], best["val_loss"]),
            textcoords="offset points",
            xytext=(5, 10),
        )
    return _save(figure, path)


@torch.no_grad()
def prior_samples(model: VAE, path: Path, seed: int = 0, count: int = 64) -> Path:
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn((count, model.config.latent_dim), generator=generator).to(_device(model))
    figure = _image_grid_figure(model.decode(z), nrow=8, title="64 samples from the prior z ~ N(0, I)")
    return _save(figure, path)


@torch.no_grad()
def reconstructions(model: VAE, images: torch.Tensor, path: Path) -> Path:
    mu, _ = model.encode(images)
    decoded = model.decode(mu)
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for axis, batch, title in ((axes[0], images, "original"), (axes[1], decoded, "reconstruction (decoded mean)")):
        axis.imshow(_grid(batch, nrow=8), cmap="gray", vmin=0, vmax=1)
        axis.set_title(title)
        axis.axis("off")
    return _save(figure, path)


@torch.no_grad()
def interpolations(model: VAE, images: torch.Tensor, labels: torch.Tensor, path: Path) -> Path:
    starts, ends, names = [], [], []
    for a, b in INTERPOLATION_PAIRS:
        first_a, first_b = torch.nonzero(labels == a).flatten(), torch.nonzero(labels == b).flatten()
        if len(first_a) and len(first_b):
            starts.append(images[first_a[0]])
            ends.append(images[first_b[0]])
            names.append(f"{a}→{b}")
    z0, _ = model.encode(torch.stack(starts))
    z1, _ = model.encode(torch.stack(ends))
    figure, axes = plt.subplots(2 * len(names), 1, figsize=(INTERPOLATION_STEPS * 0.9, 2.0 * len(names)))
    for index, name in enumerate(names):
        for row, method in enumerate(("linear", "slerp")):
            path_z = interpolate(z0.cpu().numpy(), z1.cpu().numpy(), INTERPOLATION_STEPS, method)[index]
            decoded = model.decode(torch.from_numpy(path_z).to(z0.device))
            axis = axes[2 * index + row]
            axis.imshow(_grid(decoded, nrow=INTERPOLATION_STEPS), cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_ylabel(f"{name}\n{method}", rotation=0, ha="right", va="center")
    figure.suptitle("interpolation between test digits: linear and spherical (slerp)")
    return _save(figure, path)


def latent_projection(
    mu: torch.Tensor, labels: torch.Tensor, method: str, path: Path, seed: int = 0, legend_title: str = "digit"
) -> Path:
    """Scatter of latent means projected to 2D by PCA or t-SNE, one colour per label, with a legend."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    points = mu.double().numpy()
    if method == "pca":
        projected = PCA(n_components=2, random_state=seed).fit_transform(points)
    else:
        perplexity = max(2.0, min(30.0, (len(points) - 1) / 3))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        # One thread: Barnes-Hut's OpenMP threads spin when the cores are shared (15 s instead of 0.2 s for
        # 100 points here, measured); single-threaded it takes ~10 s for 2,000 points on this CPU.
        with threadpool_limits(1):
            projected = tsne.fit_transform(points)
    figure, axis = plt.subplots(figsize=(7, 6))
    for label in sorted(set(labels.tolist())):
        chosen = (labels == label).numpy()
        axis.scatter(
            projected[chosen, 0], projected[chosen, 1], s=6, alpha=0.7, color=plt.cm.tab10(label % 10), label=str(label)
        )
    axis.legend(title=legend_title, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axis.set_title(f"latent means of {len(points)} test images, {'PCA' if method == 'pca' else 't-SNE'}")
    axis.set_xticks([])
    axis.set_yticks([])
    return _save(figure, path)


@torch.no_grad()
def traversals(model: VAE, path: Path) -> Path:
    latent_dim = model.config.latent_dim
    values = torch.linspace(-3, 3, TRAVERSAL_STEPS)
    z = torch.zeros(latent_dim, TRAVERSAL_STEPS, latent_dim)
    for dim in range(latent_dim):
        z[dim, :, dim] = values
    decoded = model.decode(z.reshape(-1, latent_dim).to(_device(model)))
    figure = _image_grid_figure(decoded, nrow=TRAVERSAL_STEPS, title="each latent dimension from -3 (left) to 3")
    axis = figure.axes[0]
    axis.axis("on")
    axis.set_xticks([])
    axis.set_yticks([30 * dim + 15 for dim in range(latent_dim)], [f"z{dim}" for dim in range(latent_dim)])
    return _save(figure, path)


def _grid(images: torch.Tensor, nrow: int) -> Any:
    return make_grid(images.float().cpu(), nrow=nrow, padding=2, pad_value=1.0)[0].numpy()


def _image_grid_figure(images: torch.Tensor, nrow: int, title: str) -> plt.Figure:
    rows = -(-len(images) // nrow)
    figure, axis = plt.subplots(figsize=(0.6 * nrow + 1, 0.6 * rows + 0.8))
    axis.imshow(_grid(images, nrow), cmap="gray", vmin=0, vmax=1)
    axis.set_title(title)
    axis.axis("off")
    return figure


def _device(model: VAE) -> torch.device:
    return next(model.parameters()).device


def _save(figure: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
