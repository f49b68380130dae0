"""Image grids for samples."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def to_uint8(samples: torch.Tensor, data_range=(-1.0, 1.0)) -> np.ndarray:
    lo, hi = data_range
    x = ((samples.float().clamp(lo, hi) - lo) / (hi - lo) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()  # NHWC


def save_grid(samples: torch.Tensor, path: Path, data_range=(-1.0, 1.0), scale: int = 4, columns: int | None = None) -> Path:
    """Writes an N-image grid (1 or 3 channels; other channel counts show the first) as PNG."""
    from PIL import Image

    images = to_uint8(samples, data_range)
    if images.shape[-1] not in (1, 3):
        images = images[..., :1]
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    pad = 1
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path
