"""scikit-learn's handwritten digits as 16x16 images in [-1, 1], with a fixed held-out split."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0


def load_digits_tensors(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 1, 16, 16] in [-1, 1] and labels [N]; split is 'train', 'heldout' or 'all'."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # [0, 1], 8x8
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = (images * 2 - 1).clamp(-1, 1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    n_held = int(len(labels) * HELD_OUT_FRACTION)
    index = {"heldout": order[:n_held], "train": order[n_held:], "all": order}[split]
    index = torch.as_tensor(np.sort(index))
    return images[index], labels[index]
