"""Turn generated images into a PNG grid a person can look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def image_grid(images: Tensor, rows: int, pad: int = 2, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """(N, C, H, W) images → one uint8 array (rows of N/rows images), C=1 gives a grey-scale grid."""
    if images.ndim != 4:
        raise ValueError(f"Expected (N, C, H, W) images, got shape {tuple(images.shape)}.")
    n, c, h, w = images.shape
    if n % rows:
        raise ValueError(f"{n} images do not fill {rows} rows evenly.")
    cols = n // rows
    lo, hi = value_range
    x = ((images.detach().float().cpu().clamp(lo, hi) - lo) / (hi - lo) * 255).round().to(torch.uint8)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = x[i].permute(1, 2, 0).numpy()
    return grid[..., 0] if c == 1 else grid


def save_image_grid(images: Tensor, path: str | Path, rows: int, scale: int = 3) -> Path:
    """Write ``images`` as a PNG grid, upscaled ``scale``× with nearest-neighbour for visibility."""
    from PIL import Image

    grid = image_grid(images, rows)
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
