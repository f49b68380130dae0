"""Training of the zoo models on scikit-learn's digits (2 CPU cores, minutes each)."""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from compress.progress import progress
from compress.schedule import NoiseSchedule
from compress.zoo.data import load_digits_tensors
from compress.zoo.models import (
    DIGITS_COND_UNET,
    DIGITS_UNET,
    DigitsClassifier,
    build_digits_cond_unet,
    build_digits_unet,
)

LABEL_DROPOUT = 0.1
DIFFUSION_ITERATIONS = 2000
RESUME_LR = 5e-4  # a second, gentler phase: what `compress zoo train NAME --resume` continues with


def _lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def optimizer_step(model: torch.nn.Module, optimizer, loss: torch.Tensor, step: int, iterations: int, lr: float, ema: torch.nn.Module | None = None) -> None:
    """One step of every zoo training loop: warm-up + cosine learning rate, gradient clipping at 1, EMA."""
    for group in optimizer.param_groups:
        group["lr"] = _lr_at(step, iterations, lr)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if ema is not None:
        _ema_update(ema, model, decay=min(0.999, (1 + step) / (10 + step)))


def train_diffusion(conditional: bool, iterations: int, batch_size: int = 64, lr: float = 2e-3, seed: int = 0, init: dict | None = None):
    """Epsilon-prediction training; ``init`` (a state dict) continues from earlier weights."""
    torch.manual_seed(seed)
    images, labels = load_digits_tensors("train")
    schedule = NoiseSchedule.from_betas("linear", 1000)
    model = build_digits_cond_unet() if conditional else build_digits_unet()
    if init is not None:
        model.load_state_dict(init)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in progress(range(iterations), description="train " + ("digits-cond" if conditional else "digits")):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x0, y = images[idx], labels[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, schedule.num_train_timesteps, (batch_size,), generator=gen)
        xt = schedule.add_noise(x0, noise, t)
        if conditional:
            drop = torch.rand(batch_size, generator=gen) < LABEL_DROPOUT
            y = torch.where(drop, torch.full_like(y, 10), y)
            pred = model(xt, t.float(), y)
        else:
            pred = model(xt, t.float()).sample
        loss = F.mse_loss(pred, noise)
        optimizer_step(model, optimizer, loss, step, iterations, lr, ema)
        losses.append(loss.item())
    final_loss = sum(losses[-100:]) / len(losses[-100:])
    return ema, {"iterations": iterations, "batch_size": batch_size, "lr": lr, "seed": seed, "final_loss": final_loss}


def train_classifier(epochs: int = 30, seed: int = 0):
    torch.manual_seed(seed)
    images, labels = load_digits_tensors("train")
    held_x, held_y = load_digits_tensors("heldout")
    model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in progress(range(epochs), description="train digits-classifier"):
        order = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), 64):
            idx = order[i : i + 64]
            # Shifts and noise so generated digits, never pixel-perfect, are still read correctly.
            x = torch.roll(images[idx], shifts=tuple(torch.randint(-1, 2, (2,), generator=gen).tolist()), dims=(2, 3))
            x = (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
            loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(held_x).argmax(1) == held_y).float().mean().item()
    return model, {"epochs": epochs, "seed": seed, "heldout_accuracy": accuracy}


def save_checkpoint(model: torch.nn.Module, path: Path, metadata: dict) -> None:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={k: json.dumps(v) for k, v in metadata.items()})


def train_zoo_model(name: str, out_dir: Path, iterations: int | None = None, resume: bool = False, lr: float | None = None) -> Path:
    """Trains a zoo model into out_dir; ``resume`` continues a diffusion model's checkpoint there (a second phase).
    digits-t2i becomes the folder out_dir/digits-t2i, written in a sibling folder and renamed at the end."""
    if name == "digits-t2i":  # a pipeline folder, not one safetensors file
        from compress.zoo.t2i import train_digits_t2i

        return train_digits_t2i(out_dir, iterations, resume, lr)
    start = time.time()
    path = out_dir / f"{name}.safetensors"
    phases = []
    if name == "digits-classifier":
        model, info = train_classifier()
        config = {}
    elif name in ("digits", "digits-cond"):
        conditional = name == "digits-cond"
        init = None
        if resume:
            from safetensors.torch import load_file

            from compress.zoo import read_metadata

            init, earlier = load_file(str(path)), read_metadata(path)["training"]
            phases = earlier.get("phases", [earlier])
        model, info = train_diffusion(conditional, iterations or DIFFUSION_ITERATIONS, lr=lr or (RESUME_LR if resume else 2e-3), init=init)
        config = DIGITS_COND_UNET if conditional else DIGITS_UNET
    else:
        raise ValueError(name)
    info["train_seconds"] = round(time.time() - start, 1)
    info["threads"] = torch.get_num_threads()
    if phases:
        info = {"phases": phases + [info], "train_seconds": round(sum(p["train_seconds"] for p in phases) + info["train_seconds"], 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".partial")
    save_checkpoint(model, staging, {"name": name, "config": config, "training": info})
    staging.replace(path)
    return path
