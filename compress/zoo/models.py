"""Architectures of the zoo models. Configs live here; weights live in checkpoints/."""
from __future__ import annotations

import torch
from torch import nn

DIGITS_UNET = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=16,
)

DIGITS_COND_UNET = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    cross_attention_dim=64,
    attention_head_dim=4,  # diffusers reads this as the number of heads for this class
)


def build_digits_unet(config: dict | None = None) -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(**(config or DIGITS_UNET))


def build_digits_cond_unet(config: dict | None = None, num_classes: int = 10) -> nn.Module:
    from diffusers import UNet2DConditionModel

    from compress.denoiser import ClassTokenUNet

    return ClassTokenUNet(UNet2DConditionModel(**(config or DIGITS_COND_UNET)), num_classes)


class DigitsClassifier(nn.Module):
    """Small CNN; its 128-d penultimate features define the FD metric."""

    def __init__(self, num_classes: int = 10, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
