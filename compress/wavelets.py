"""Haar wavelets and the wavelet-gated samplers of Spectral Diffusion ("Diffusion Probabilistic
Model Made Slim", CVPR 2023).

The transforms are written with strided slicing, additions and ``pixel_shuffle`` only, so the
exported graphs hold standard operators (Slice, Add, Sub, Mul, DepthToSpace) on every backend:
ONNX, Core ML through ``torch.export``, OpenVINO. The orthonormal 2x2 Haar basis is its own
inverse, so ``haar_idwt(*haar_dwt(x)) == x`` up to rounding.

Band naming: LH holds differences along the width (vertical edges), HL along the height,
HH along both diagonals.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BANDS = ("LL", "LH", "HL", "HH")


def haar_dwt(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level of the orthonormal 2D Haar transform: [B, C, H, W] -> four [B, C, H/2, W/2] bands."""
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"haar_dwt needs an even height and width, got {tuple(x.shape[-2:])}")
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return (
        (a + b + c + d) * 0.5,
        (a - b + c - d) * 0.5,
        (a + b - c - d) * 0.5,
        (a - b - c + d) * 0.5,
    )


def haar_idwt(ll: torch.Tensor, lh: torch.Tensor, hl: torch.Tensor, hh: torch.Tensor) -> torch.Tensor:
    """Inverse of `haar_dwt`: four [B, C, h, w] bands -> [B, C, 2h, 2w]."""
    a = (ll + lh + hl + hh) * 0.5
    b = (ll - lh + hl - hh) * 0.5
    c = (ll + lh - hl - hh) * 0.5
    d = (ll - lh - hl + hh) * 0.5
    # pixel_shuffle reads channel c*4 + 2r + s into pixel (2i + r, 2j + s): interleave a, b, c, d per channel.
    stacked = torch.stack((a, b, c, d), dim=2).flatten(1, 2)
    return F.pixel_shuffle(stacked, 2)


class BandGate(nn.Module):
    """g = sigmoid(FFN(avgpool(x))): one gate per band and output channel, from the global context of x."""

    def __init__(self, in_channels: int, gated_channels: int, bands: int = 4, reduction: int = 4):
        super().__init__()
        hidden = max(8, in_channels // reduction)
        self.bands, self.gated_channels = bands, gated_channels
        self.ffn = nn.Sequential(nn.Linear(in_channels, hidden), nn.SiLU(), nn.Linear(hidden, bands * gated_channels))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        pooled = x.mean(dim=(2, 3))
        gates = torch.sigmoid(self.ffn(pooled))
        return [g[:, :, None, None] for g in gates.chunk(self.bands, dim=1)]


class WaveletGatedDownsample(nn.Module):
    """WG-Down, a drop-in for diffusers' Downsample2D: DWT, gated sum of the bands, 3x3 conv.

    The conv runs at the low resolution, as Downsample2D's strided conv does, so MACs match it
    (plus the tiny gate FFN).
    """

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.gate = BandGate(channels, channels)
        self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        gates = self.gate(hidden_states)
        bands = haar_dwt(hidden_states)
        mixed = gates[0] * bands[0] + gates[1] * bands[1] + gates[2] * bands[2] + gates[3] * bands[3]
        return self.conv(mixed)


class WaveletGatedUpsample(nn.Module):
    """WG-Up, a drop-in for diffusers' Upsample2D: 1x1 conv to four bands, gate each, IDWT.

    The 1x1 conv plus IDWT is a learned 2x2 sub-pixel upsampler (as a stride-2 transposed
    conv); at the low resolution it costs 1/9 of Upsample2D's 3x3 conv at the high one, and
    the 3x3 convs of the ResNet that follows supply the spatial context.
    """

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.conv = nn.Conv2d(channels, 4 * self.out_channels, 1)
        self.gate = BandGate(channels, self.out_channels)

    def forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        gates = self.gate(hidden_states)
        bands = self.conv(hidden_states).chunk(4, dim=1)
        return haar_idwt(*(g * b for g, b in zip(gates, bands)))


def replace_samplers(unet: nn.Module) -> int:
    """Swaps every Downsample2D/Upsample2D of a diffusers UNet for its wavelet-gated form; returns how many."""
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    replaced = 0
    for block in list(getattr(unet, "down_blocks", [])) + list(getattr(unet, "up_blocks", [])):
        for attr, kind, gated in (("downsamplers", Downsample2D, WaveletGatedDownsample), ("upsamplers", Upsample2D, WaveletGatedUpsample)):
            samplers = getattr(block, attr, None)
            if samplers is None:
                continue
            for i, old in enumerate(samplers):
                if not isinstance(old, kind):
                    raise ValueError(f"{type(block).__name__}.{attr}[{i}] is a {type(old).__name__}, not a {kind.__name__}")
                samplers[i] = gated(old.channels, old.out_channels)
                replaced += 1
    return replaced
