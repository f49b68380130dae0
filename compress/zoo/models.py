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

# google/ddpm-cifar10-32, the DDPM CIFAR-10 UNet as diffusers converted it: 35.7M parameters,
# attention at 16x16 with one head over all channels (attention_head_dim None).
DDPM_CIFAR10_UNET = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
    norm_num_groups=32,
    attention_head_dim=None,
)


def build_digits_unet(config: dict | None = None) -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(**(config or DIGITS_UNET))


def build_digits_cond_unet(config: dict | None = None, num_classes: int = 10) -> nn.Module:
    from diffusers import UNet2DConditionModel

    from compress.denoiser import ClassTokenUNet

    return ClassTokenUNet(UNet2DConditionModel(**(config or DIGITS_COND_UNET)), num_classes)


def ddpm_cifar10_architecture(seed: int = 0):
    """The DDPM CIFAR-10 UNet with random weights: a benchmark subject of real size that needs no download."""
    from diffusers import UNet2DModel

    from compress.denoiser import Denoiser, DiffusersUNet
    from compress.schedule import NoiseSchedule

    torch.manual_seed(seed)
    unet = UNet2DModel(**DDPM_CIFAR10_UNET)
    return Denoiser(DiffusersUNet(unet).eval(), NoiseSchedule.from_betas("linear", 1000), "epsilon", (3, 32, 32),
                    name="ddpm-cifar10-arch", source=f"random weights, seed {seed}")


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
