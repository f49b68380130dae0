"""Tiny randomly initialised models built in place (no hub downloads), for architecture coverage."""
from __future__ import annotations

import torch
from torch import nn

from compress.denoiser import Denoiser, DiffusersTransformer, DiffusersUNet
from compress.schedule import NoiseSchedule


def tiny_unet(seed: int = 0, channels: int = 1, size: int = 8):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8)


def tiny_cond_unet(seed: int = 0, channels: int = 1, size: int = 8, cross_dim: int = 16):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                cross_attention_dim=cross_dim, attention_head_dim=2)


def tiny_dit(seed: int = 0, channels: int = 4, size: int = 8, num_classes: int = 10):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=channels, out_channels=channels,
                                 num_layers=2, sample_size=size, patch_size=2, num_embeds_ada_norm=num_classes)


class ScaledOutput(nn.Module):
    """Random networks give outputs far from N(0, 1); scaling keeps sampled values in a realistic range."""

    def __init__(self, inner: nn.Module, scale: float = 0.1):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, sample, timestep, cond=None):
        return self.scale * self.inner(sample, timestep, cond)


def tiny_denoiser() -> Denoiser:
    """A python:tests.tiny_models:tiny_denoiser factory target."""
    return Denoiser(ScaledOutput(DiffusersUNet(tiny_unet())).eval(), NoiseSchedule.from_betas(), sample_shape=(1, 8, 8), name="tiny")


def failing_factory() -> nn.Module:
    """A factory whose own code fails, as a user's does when its checkpoint is missing."""
    raise FileNotFoundError("weights.pt")


def tiny_module() -> nn.Module:
    """A factory that returns a bare module: the sample shape must come from --sample-shape."""
    return ScaledOutput(DiffusersUNet(tiny_unet()))


def text_denoiser() -> Denoiser:
    return Denoiser(DiffusersUNet(tiny_cond_unet(cross_dim=8)).eval(), NoiseSchedule.from_betas(), "epsilon", (1, 8, 8),
                    conditioning="text", cond_shape=(4, 8), name="tiny-text")


def dit_denoiser() -> Denoiser:
    return Denoiser(DiffusersTransformer(tiny_dit(channels=4, num_classes=3)).eval(), NoiseSchedule.from_betas(), "epsilon", (4, 8, 8),
                    conditioning="class", num_classes=3, name="tiny-dit")
