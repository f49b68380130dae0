"""A family of small third-party-style denoisers, for compression on architectures the toolkit did not design.

They differ from the zoo's diffusers UNets the ways users' own models do: none uses diffusers
module names, and each has one of the layers that tripped the toolkit before (a LayerNorm over
the whole (C, H, W) map, BatchNorm, a timestep looked up in an ``nn.Embedding`` table, Gaussian
Fourier features, no normalization at all, no attention). Each is trained for a minute or two on
the digits (``python -m tests.architectures --train``) and its weights are committed under
``tests/data/architectures/`` so the tests never retrain; each factory is a ``python:`` reference:

    compress export python:tests.architectures:layernorm_ddpm --out out/ln
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compress.denoiser import Denoiser, batch_timesteps
from compress.errors import UserError
from compress.schedule import NoiseSchedule

WEIGHTS = Path(__file__).parent / "data" / "architectures"
SAMPLE_SHAPE = (1, 16, 16)
TIMESTEPS = 1000


# ----------------------------------------------------------------------------- 1: LayerNorm over (C, H, W), embedding-table timesteps


class LayerNormBlock(nn.Module):
    """The MNIST-DDPM tutorial's LayerNorm over the whole map at the start of every block, two convs with
    the time embedding added between, in a pre-norm residual: a LayerNorm over the whole map makes a
    block blind to its input's scale, and without the residual stream carrying it, samples drifted
    to +-30 as the network never saw that x_t had left its range."""

    def __init__(self, shape: tuple[int, int, int], out_channels: int, time_dim: int):
        super().__init__()
        self.ln = nn.LayerNorm(shape)
        self.conv1 = nn.Conv2d(shape[0], out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(time_dim, out_channels)
        self.skip = nn.Conv2d(shape[0], out_channels, 1) if shape[0] != out_channels else nn.Identity()

    def forward(self, x, t_emb):
        h = F.silu(self.conv1(self.ln(x)) + self.time(t_emb)[:, :, None, None])
        return self.skip(x) + self.conv2(h)


class LayerNormDDPM(nn.Module):
    def __init__(self, channels=(16, 32), time_dim: int = 64):
        super().__init__()
        c1, c2 = channels
        self.time_table = nn.Embedding(TIMESTEPS, time_dim)
        self.enc1 = LayerNormBlock((1, 16, 16), c1, time_dim)
        self.down1 = nn.Conv2d(c1, c1, 4, 2, 1)
        self.enc2 = LayerNormBlock((c1, 8, 8), c2, time_dim)
        self.down2 = nn.Conv2d(c2, c2, 4, 2, 1)
        self.mid = LayerNormBlock((c2, 4, 4), c2, time_dim)
        self.up2 = nn.ConvTranspose2d(c2, c2, 4, 2, 1)
        self.dec2 = LayerNormBlock((2 * c2, 8, 8), c1, time_dim)
        self.up1 = nn.ConvTranspose2d(c1, c1, 4, 2, 1)
        self.dec1 = LayerNormBlock((2 * c1, 16, 16), c1, time_dim)
        self.head = nn.Conv2d(c1, 1, 3, padding=1)

    def forward(self, sample, timestep, cond=None):
        t = self.time_table(batch_timesteps(timestep, sample.shape[0], sample.device).long().clamp(0, TIMESTEPS - 1))
        h1 = self.enc1(sample, t)
        h2 = self.enc2(self.down1(h1), t)
        m = self.mid(self.down2(h2), t)
        d2 = self.dec2(torch.cat([self.up2(m), h2], 1), t)
        d1 = self.dec1(torch.cat([self.up1(d2), h1], 1), t)
        return self.head(F.silu(d1))


# ----------------------------------------------------------------------------- 2: BatchNorm, sinusoidal MLP timestep, hand-written attention


def sinusoidal(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    angles = timestep.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class BatchNormBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, time_dim: int):
        super().__init__()
        self.conv_a = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(out_channels)
        self.conv_b = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(out_channels)
        self.time = nn.Linear(time_dim, out_channels)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, t_emb):
        h = F.relu(self.bn_a(self.conv_a(x))) + self.time(t_emb)[:, :, None, None]
        return F.relu(self.bn_b(self.conv_b(h)) + self.skip(x))


class SelfAttention(nn.Module):
    """One head over all channels, q/k/v as 1x1 convs: how many hand-written UNets do it."""

    def __init__(self, channels: int):
        super().__init__()
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = (f(x).flatten(2) for f in (self.q, self.k, self.v))
        weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(q.shape[1]), dim=-1)
        return x + self.out((v @ weights.transpose(1, 2)).reshape(b, -1, h, w))


class BatchNormUNet(nn.Module):
    def __init__(self, channels=(24, 48), time_dim: int = 64):
        super().__init__()
        c1, c2 = channels
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.stem = nn.Conv2d(1, c1, 3, padding=1)
        self.enc1 = BatchNormBlock(c1, c1, time_dim)
        self.enc2 = BatchNormBlock(c1, c2, time_dim)
        self.attn = SelfAttention(c2)
        self.dec2 = BatchNormBlock(c2 + c1, c1, time_dim)
        self.dec1 = BatchNormBlock(c1 + c1, c1, time_dim)
        self.head = nn.Conv2d(c1, 1, 3, padding=1)

    def forward(self, sample, timestep, cond=None):
        t = self.time_mlp(sinusoidal(batch_timesteps(timestep, sample.shape[0], sample.device), self.time_dim))
        h0 = self.stem(sample)
        h1 = self.enc1(h0, t)
        h2 = self.attn(self.enc2(F.avg_pool2d(h1, 2), t))
        d2 = self.dec2(torch.cat([h2, F.avg_pool2d(h1, 2)], 1), t)
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="nearest"), h0], 1), t)
        return self.head(d1)


# ----------------------------------------------------------------------------- 3: no normalization, Fourier-feature timestep, FiLM


class FourierFeatures(nn.Module):
    """Score-SDE's Gaussian Fourier projection of the (scaled) timestep: a fixed random buffer."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("frequencies", torch.randn(dim // 2, generator=torch.Generator().manual_seed(0)) * scale)

    def forward(self, timestep):
        angles = 2 * math.pi * (timestep.float() / TIMESTEPS)[:, None] * self.frequencies[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class FiLMBlock(nn.Module):
    def __init__(self, channels: int, time_dim: int, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.film = nn.Linear(time_dim, 2 * channels)

    def forward(self, x, t_emb):
        scale, shift = self.film(t_emb)[:, :, None, None].chunk(2, dim=1)
        h = F.gelu(self.conv1(x)) * (1 + scale) + shift
        return x + self.conv2(F.gelu(h))


class FourierResNet(nn.Module):
    def __init__(self, channels: int = 48, blocks: int = 4, time_dim: int = 64):
        super().__init__()
        self.fourier = FourierFeatures(time_dim)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.GELU())
        self.entry = nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = nn.ModuleList(FiLMBlock(channels, time_dim, dilation=1 + k % 2) for k in range(blocks))
        self.exit = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, sample, timestep, cond=None):
        t = self.time_mlp(self.fourier(batch_timesteps(timestep, sample.shape[0], sample.device)))
        h = self.entry(sample)
        for block in self.blocks:
            h = block(h, t)
        return self.exit(h)


# ----------------------------------------------------------------------------- 4: a plain CNN, the timestep as an input channel


class PlainCNN(nn.Module):
    """Encoder-decoder of plain convolutions; the network sees t/T as a constant extra input channel."""

    def __init__(self, channels=(32, 64)):
        super().__init__()
        c1, c2 = channels
        self.encoder = nn.Sequential(nn.Conv2d(2, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU())
        self.decoder = nn.Sequential(nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.ReLU(), nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(c1, 1, 3, padding=1))

    def forward(self, sample, timestep, cond=None):
        t = (batch_timesteps(timestep, sample.shape[0], sample.device) / TIMESTEPS).reshape(-1, 1, 1, 1).expand(sample.shape[0], 1, *sample.shape[2:])
        return self.decoder(self.encoder(torch.cat([sample, t], 1)))


# ----------------------------------------------------------------------------- the family


# name: (class, what sets it apart, training iterations at batch 64)
FAMILY = {
    "layernorm_ddpm": (LayerNormDDPM, "LayerNorm over (C,H,W) in every block, nn.Embedding timestep table, skip concats", 3000),
    "batchnorm_unet": (BatchNormUNet, "BatchNorm2d, sinusoidal timestep MLP, hand-written 1x1-conv self-attention", 2137),
    "fourier_resnet": (FourierResNet, "no normalization, Gaussian Fourier-feature timestep, FiLM scale/shift, dilated convs", 1570),
    "plain_cnn": (PlainCNN, "plain conv encoder-decoder, no attention, no normalization, timestep as an input channel", 5355),
}


def build(name: str, weights: bool = True) -> Denoiser:
    """The family member ``name`` as a Denoiser (epsilon, 1000-step linear schedule), trained weights if committed."""
    from safetensors.torch import load_file

    cls = FAMILY[name][0]
    torch.manual_seed(0)
    module = cls()
    path = WEIGHTS / f"{name}.safetensors"
    if weights:
        if not path.is_file():
            raise UserError(f"{path} is missing; train it with 'python -m tests.architectures --train {name}'")
        module.load_state_dict(load_file(str(path)))
    return Denoiser(module.eval(), NoiseSchedule.from_betas("linear", TIMESTEPS), "epsilon", SAMPLE_SHAPE, name=name.replace("_", "-"),
                    source=f"python:tests.architectures:{name}")


def layernorm_ddpm() -> Denoiser:
    return build("layernorm_ddpm")


def batchnorm_unet() -> Denoiser:
    return build("batchnorm_unet")


def fourier_resnet() -> Denoiser:
    return build("fourier_resnet")


def plain_cnn() -> Denoiser:
    return build("plain_cnn")


def train(name: str, iterations: int | None = None, batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> dict:
    """Epsilon training on the digits (about a minute or two each on 2 cores); writes the EMA weights into WEIGHTS."""
    import time

    from safetensors.torch import save_file

    from compress.training import EMA, train_loop
    from compress.zoo.data import load_digits_tensors
    from compress.zoo.train import EMA_DECAY, zoo_schedule

    iterations = iterations or FAMILY[name][2]
    torch.manual_seed(seed)
    denoiser = build(name, weights=False)
    model = denoiser.module.train()
    ema = EMA(model, EMA_DECAY)
    images, _ = load_digits_tensors("train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)

    def loss_at(step: int) -> torch.Tensor:
        x0 = images[torch.randint(0, len(images), (batch_size,), generator=gen)]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, TIMESTEPS, (batch_size,), generator=gen)
        return F.mse_loss(model(denoiser.schedule.add_noise(x0, noise, t), t.float()), noise)

    started = time.time()
    result = train_loop(model, optimizer, loss_at, iterations, zoo_schedule(lr), ema=ema)
    ema.copy_to_module()  # BatchNorm's running statistics are buffers: the model keeps its trained ones
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(WEIGHTS / f"{name}.safetensors"))
    return {"name": name, "iterations": iterations, "seconds": round(time.time() - started, 1),
            "final_loss": round(result.mean_loss(100), 4)}


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", nargs="*", metavar="NAME", help="train these members (default: all)")
    parser.add_argument("--iterations", type=int, default=None, help="default: each member's own count in FAMILY")
    args = parser.parse_args()
    for member in args.train or list(FAMILY):
        print(json.dumps(train(member, args.iterations)), flush=True)
