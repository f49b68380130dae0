"""Training of the zoo models on scikit-learn's digits (2 CPU cores, minutes each)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from compress.errors import UserError
from compress.progress import progress
from compress.schedule import NoiseSchedule
from compress.training import EMA, LRSchedule, drop_conditions, train_loop
from compress.zoo.data import load_digits_tensors
from compress.zoo.models import (
    DIGITS_COND_UNET,
    DIGITS_UNET,
    DigitsClassifier,
    build_digits_cond_unet,
    build_digits_unet,
)

DIFFUSION_ITERATIONS = 2000
RESUME_LR = 5e-4  # a second, gentler phase: what `compress zoo train NAME --resume` continues with
WARMUP_STEPS = 100
EMA_DECAY = 0.999


def zoo_schedule(lr: float) -> LRSchedule:
    """Every zoo model's learning rate: warm-up over 100 steps, then cosine to zero."""
    return LRSchedule(lr, warmup_steps=WARMUP_STEPS)


def train_diffusion(conditional: bool, iterations: int, batch_size: int = 64, lr: float = 2e-3, seed: int = 0, init: dict | None = None):
    """Epsilon-prediction training; ``init`` (a state dict) continues from earlier weights. Returns the EMA weights."""
    torch.manual_seed(seed)
    images, labels = load_digits_tensors("train")
    schedule = NoiseSchedule.from_betas("linear", 1000)
    model = build_digits_cond_unet() if conditional else build_digits_unet()
    if init is not None:
        model.load_state_dict(init)
    ema = EMA(model, EMA_DECAY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x0, y = images[idx], labels[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, schedule.num_train_timesteps, (batch_size,), generator=gen)
        xt = schedule.add_noise(x0, noise, t)
        if conditional:
            pred = model(xt, t.float(), drop_conditions(y, torch.full_like(y, model.num_classes), gen))  # the null label
        else:
            pred = model(xt, t.float()).sample
        return F.mse_loss(pred, noise)

    description = "train " + ("digits-cond" if conditional else "digits")
    result = train_loop(model, optimizer, loss_at, iterations, zoo_schedule(lr), ema=ema, progress=progress, description=description)
    ema.copy_to_module()
    return model.requires_grad_(False), {"iterations": iterations, "batch_size": batch_size, "lr": lr, "seed": seed,
                                         "final_loss": result.mean_loss(100)}


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
    if name == "digits-flow":
        if resume or lr:
            raise UserError("zoo:digits-flow trains in one phase: --resume and --lr do not apply")
        from compress.zoo.flow import train_digits_flow

        return train_digits_flow(out_dir, iterations)
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
