"""PNG in and out for the client CLI: image grids and strips, and digits read from files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

PADDING = 2  # pixels of black between grid cells


def image_grid(images: np.ndarray, columns: int | None = None) -> Image.Image:
    """[N, 1, H, W] float32 in [0, 1] or uint8 → one grayscale grid image, `columns` wide (default ~square)."""
    pixels = images if images.dtype == np.uint8 else np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    count, _, height, width = pixels.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.zeros((rows * (height + PADDING) + PADDING, columns * (width + PADDING) + PADDING), np.uint8)
    for index in range(count):
        top = PADDING + (index // columns) * (height + PADDING)
        left = PADDING + (index % columns) * (width + PADDING)
        grid[top : top + height, left : left + width] = pixels[index, 0]
    return Image.fromarray(grid, mode="L")


def load_image(path: Path, image_shape: tuple[int, ...]) -> np.ndarray:
    """A PNG (or any format pillow reads) as a [1, H, W] uint8 array: grayscale, resized to the model's size."""
    _, height, width = image_shape
    with Image.open(path) as image:
        gray = image.convert("L")
        if gray.size != (width, height):
            gray = gray.resize((width, height), Image.Resampling.LANCZOS)
        return np.asarray(gray, dtype=np.uint8)[None]
