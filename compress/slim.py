"""Slim students: a narrower copy of the teacher's UNet with wavelet-gated samplers, trained by
spectrum-aware distillation (Spectral Diffusion, "Diffusion Probabilistic Model Made Slim").

    student = slim(teacher, SlimConfig(width=0.5))          # one call: build, distill, return
    save_student(student, "digits-slim")                    # a model folder any command accepts

The student is rebuilt from its JSON description by `build_student_module` (registered as the
"slim" builder in compress.model_folder), so a saved student loads without pickles.
Supported teachers: diffusers UNet2DModel and UNet2DConditionModel (bare or class-token
wrapped, as the zoo's digits-cond). Anything else (a DiT, a python: module) cannot be slimmed:
the student is built from the teacher's architecture config, and those have none we can read.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from math import lcm
from typing import Callable, Iterable

import torch
from torch import nn

from compress.denoiser import ClassTokenUNet, Denoiser, DiffusersUNet, condition_to, draw_conditions
from compress.errors import UserError
from compress.section_config import SectionConfig
from compress.solvers import convert_prediction
from compress.training import EMA, FeatureRecorder, LRSchedule, TimeBudget, drop_conditions, self_samples, train_loop, training_target

DATA_SOURCES = ("auto", "digits", "teacher")


@dataclass
class SlimConfig(SectionConfig):
    section = "slim"

    width: float = 0.5  # channel multiplier; MACs fall roughly with its square
    wavelet_gating: bool = True
    layers_per_block: int | None = None  # None: the teacher's
    steps: int = 2000
    max_minutes: float | None = None  # a time budget: the LR schedule follows whichever runs out first
    budget_clock: str = "wall"  # "cpu": count this process's CPU time, fair on a machine shared with other jobs
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    lambda_feature: float = 0.1
    lambda_freq: float = 0.1
    alpha: float = -1.0  # frequency weights |DFT(x0)|^alpha; -1 weights against the spectrum
    high_noise_weight: float = 1.0  # loss weight clamp(sigma_t/alpha_t, 1, this); 1 = plain DDPM weighting
    # What the student predicts. v: epsilon = sigma*x_t + alpha*v, so at high noise the identity
    # epsilon ~ x_t is built in and v errors are damped by alpha; epsilon students trained for
    # minutes diverged under DDIM (their high-noise errors grow through d(sigma/alpha) ~ 150).
    prediction_type: str = "v_prediction"  # or "teacher": the teacher's own
    ema: float = 0.999  # 0 disables the moving average of the student's weights
    data: str = "auto"  # auto: the digits when the teacher is a 16x16x1 digits model, else teacher samples
    teacher_samples: int = 512  # data "teacher": x0 drawn from the teacher itself (DDIM)
    teacher_sample_steps: int = 25
    seed: int = 0
    log_every: int = 50

    def __post_init__(self):
        self.validate()

    def validate(self) -> "SlimConfig":
        if isinstance(self.width, bool) or not isinstance(self.width, (int, float)) or not 0 < self.width <= 1:
            raise UserError(f"slim width must be in (0, 1] (a channel multiplier such as 0.5), got {self.width!r}")
        for name in ("steps", "batch_size", "teacher_samples", "teacher_sample_steps", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"slim {name} must be a positive integer, got {value!r}")
        if self.layers_per_block is not None and (not isinstance(self.layers_per_block, int) or self.layers_per_block < 1):
            raise UserError(f"slim layers_per_block must be a positive integer or null (the teacher's), got {self.layers_per_block!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise UserError(f"slim max_minutes must be positive or null, got {self.max_minutes!r}")
        if self.budget_clock not in ("wall", "cpu"):
            raise UserError(f"slim budget_clock must be 'wall' or 'cpu', got {self.budget_clock!r}")
        if not self.lr > 0:
            raise UserError(f"slim lr must be positive, got {self.lr!r}")
        if self.warmup < 0:
            raise UserError(f"slim warmup must be >= 0, got {self.warmup!r}")
        for name in ("lambda_feature", "lambda_freq"):
            if getattr(self, name) < 0:
                raise UserError(f"slim {name} must be >= 0, got {getattr(self, name)!r}")
        if not self.high_noise_weight >= 1:
            raise UserError(f"slim high_noise_weight must be >= 1 (1 = uniform weights), got {self.high_noise_weight!r}")
        if self.prediction_type not in ("v_prediction", "teacher"):
            raise UserError(f"slim prediction_type must be 'v_prediction' or 'teacher', got {self.prediction_type!r}")
        if not 0 <= self.ema < 1:
            raise UserError(f"slim ema must be in [0, 1), got {self.ema!r}")
        if self.data not in DATA_SOURCES:
            raise UserError(f"slim data must be one of {', '.join(DATA_SOURCES)}, got {self.data!r}")
        return self


# ----------------------------------------------------------------------------- building

def _teacher_unet(teacher: Denoiser) -> tuple[nn.Module, str]:
    """The teacher's diffusers UNet and how it is wrapped; UserError for what cannot be slimmed."""
    module = teacher.module
    if isinstance(module, ClassTokenUNet):
        unet, wrapper = module.unet, "class-token"
    elif isinstance(module, DiffusersUNet):
        unet, wrapper = module.unet, "diffusers"
    else:
        raise UserError(f"model {teacher.name!r} ({type(module).__name__}) cannot be slimmed: "
                        "slim students are built from a diffusers UNet2DModel or UNet2DConditionModel config")
    kind = type(unet).__name__
    if kind not in ("UNet2DModel", "UNet2DConditionModel"):
        raise UserError(f"model {teacher.name!r} ({kind}) cannot be slimmed: only UNet2DModel and UNet2DConditionModel are supported")
    return unet, wrapper


def _round_up(value: float, unit: int) -> int:
    return max(unit, unit * int(math.ceil(value / unit - 1e-9)))


def slim_unet_config(teacher_config: dict, unet_class: str, width: float, layers_per_block: int | None = None) -> dict:
    """The teacher's config with every block's channels times ``width``, kept divisible by the norm
    groups and, for blocks with attention, by the heads (or head dim) that diffusers derives."""
    config = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    channels = list(config["block_out_channels"])
    groups = config.get("norm_num_groups") or 32
    # Fewer channels than groups cannot be normalised: shrink the groups to a power of two that fits.
    smallest = max(1, round(min(channels) * width))
    while groups > 1 and groups > smallest:
        groups //= 2
    attention = config.get("attention_head_dim")
    attention = attention if isinstance(attention, int) else None
    down_types = list(config.get("down_block_types") or [])
    slim = []
    for i, c in enumerate(channels):
        unit = groups
        has_attention = i < len(down_types) and "Attn" in down_types[i]
        if attention and (has_attention or i == len(channels) - 1):
            # UNet2DModel: heads = channels // head_dim; UNet2DConditionModel reads it as the head count.
            # Either way channels must be a multiple of it (or of a smaller head dim that fits).
            head = attention if unet_class == "UNet2DConditionModel" else min(attention, _round_up(c * width, groups))
            unit = lcm(groups, head)
        slim.append(_round_up(c * width, unit))
    if unet_class == "UNet2DModel" and attention:
        # A head dim larger than the narrowest attention block would leave it with zero heads.
        attn_widths = [w for i, w in enumerate(slim) if (i < len(down_types) and "Attn" in down_types[i]) or i == len(slim) - 1]
        config["attention_head_dim"] = math.gcd(attention, *attn_widths) if min(attn_widths) < attention else attention
    config["block_out_channels"] = slim
    config["norm_num_groups"] = groups
    if layers_per_block is not None:
        config["layers_per_block"] = layers_per_block
    return config


def build_student_module(builder_args: dict) -> nn.Module:
    """The student network with random weights, from the JSON arguments stored in its model folder."""
    import diffusers

    from compress.wavelets import replace_samplers

    try:
        unet_class, config, wrapper = builder_args["unet_class"], builder_args["config"], builder_args["wrapper"]
    except (KeyError, TypeError) as e:
        raise UserError(f"slim model description lacks {e}") from None
    if unet_class not in ("UNet2DModel", "UNet2DConditionModel") or wrapper not in ("diffusers", "class-token"):
        raise UserError(f"slim model description names an unsupported network {unet_class!r} / {wrapper!r}")
    try:
        unet = getattr(diffusers, unet_class).from_config(config)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"cannot build the slim {unet_class}: {str(e).splitlines()[0]}") from None
    if builder_args.get("wavelet_gating", True):
        try:
            replace_samplers(unet)
        except ValueError as e:
            raise UserError(f"this UNet cannot take wavelet-gated samplers ({e}); use --no-wavelet-gating") from None
    module = ClassTokenUNet(unet, int(builder_args["num_classes"])) if wrapper == "class-token" else DiffusersUNet(unet)
    module.slim_builder_args = builder_args  # what save_student writes next to the weights
    return module


def student_builder_args(teacher: Denoiser, config: SlimConfig) -> dict:
    unet, wrapper = _teacher_unet(teacher)
    unet_class = type(unet).__name__
    args = {
        "unet_class": unet_class,
        "config": slim_unet_config(unet.config, unet_class, config.width, config.layers_per_block),
        "wavelet_gating": config.wavelet_gating,
        "wrapper": wrapper,
    }
    if wrapper == "class-token":
        args["num_classes"] = teacher.module.num_classes
    return args


def build_student(teacher: Denoiser, config: SlimConfig) -> Denoiser:
    """The untrained student Denoiser: the teacher's description around a slim network."""
    torch.manual_seed(config.seed)
    module = build_student_module(student_builder_args(teacher, config))
    return Denoiser(
        module.train(),
        teacher.schedule,
        teacher.prediction_type if config.prediction_type == "teacher" else config.prediction_type,
        tuple(teacher.sample_shape),
        conditioning=teacher.conditioning,
        num_classes=teacher.num_classes,
        cond_shape=teacher.cond_shape,
        data_range=teacher.data_range,
        name=f"{teacher.name}-slim{config.width:g}",
        source=f"slim:{teacher.source or teacher.name}",
        scheduler_config=teacher.scheduler_config,
        has_null_condition=teacher.has_null_condition,
    )


def save_student(student: Denoiser, folder) -> None:
    from compress.model_folder import save_model_folder

    args = getattr(student.module, "slim_builder_args", None)
    if args is None:
        raise UserError(f"model {student.name!r} is not a slim student")
    save_model_folder(student, folder, "slim", args)


def _probe_inputs(denoiser: Denoiser) -> tuple:
    """One sample at mid-schedule; class models without a null label get label 0."""
    cond = denoiser.null_condition(1)
    if denoiser.conditioning == "class" and not denoiser.has_null_condition:
        cond = torch.zeros(1, dtype=torch.long)
    return torch.zeros(1, *denoiser.sample_shape), torch.full((1,), denoiser.schedule.num_train_timesteps / 2), cond


def network_cost(denoiser: Denoiser) -> dict:
    """MACs of one network evaluation per sample and parameters (torch-pruning's counter, as compress.stats)."""
    import torch_pruning as tp

    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(denoiser.module.cpu(), example_inputs=_probe_inputs(denoiser))
    return {"macs": int(macs), "parameters": int(params)}


# ----------------------------------------------------------------------------- features

def feature_tap(unet: nn.Module):
    """Hooks on the UNet's down, mid and up blocks: the multi-scale features to match."""
    return FeatureRecorder(list(unet.down_blocks) + ([unet.mid_block] if unet.mid_block is not None else []) + list(unet.up_blocks))


# ----------------------------------------------------------------------------- training data

def _training_data(teacher: Denoiser, config: SlimConfig) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """x0 images (and class labels when the teacher is class-conditional) the distillation draws from."""
    is_digits = tuple(teacher.sample_shape) == (1, 16, 16) and tuple(teacher.data_range) == (-1.0, 1.0)
    if config.data == "digits" and not is_digits:
        raise UserError(f"slim data 'digits' needs a 16x16x1 model with data in [-1, 1]; {teacher.name!r} has shape {tuple(teacher.sample_shape)}")
    if config.data == "digits" or (config.data == "auto" and is_digits):
        from compress.zoo.data import load_digits_tensors

        images, labels = load_digits_tensors("train")
        return images, (labels if teacher.conditioning == "class" else None), "digits"
    # No training set travels with a model: draw x0 from the teacher itself (data-free distillation).
    images, cond = self_samples(teacher, config.teacher_samples, config.seed + 1, "ddim", config.teacher_sample_steps, device="cpu")
    if teacher.space == "pixels":  # latents have no data range to clamp to
        images = images.clamp(*teacher.data_range)
    # Text conditions are drawn afresh for every batch; only class labels stay paired with their images.
    labels = cond if teacher.conditioning == "class" else None
    return images, labels, f"teacher ddim-{config.teacher_sample_steps}"


# ----------------------------------------------------------------------------- distillation

def slim(teacher: Denoiser, config: SlimConfig | None = None, progress: Callable[..., Iterable] | None = None) -> Denoiser:
    """Builds a slim student of ``teacher`` and trains it by spectrum-aware distillation.

    ``progress`` wraps the step range (compress.progress.progress has the right signature).
    The student's ``extra["slim"]`` records width, gating, MACs and parameters of both networks,
    the loss curve and the wall time.
    """
    config = (config or SlimConfig()).validate()
    teacher_unet, _ = _teacher_unet(teacher)
    student = build_student(teacher, config)
    student_unet = student.module.unet
    teacher_cost, student_cost = network_cost(teacher), network_cost(student)
    start, cpu_start = time.perf_counter(), time.process_time()

    images, labels, data_source = _training_data(teacher, config)
    teacher_module = teacher.module.eval()
    # Frozen while it teaches; the caller's flags come back afterwards (the teacher may be pruned or tuned next).
    grad_flags = [p.requires_grad for p in teacher_module.parameters()]
    teacher_module.requires_grad_(False)
    taps = feature_tap(teacher_unet), feature_tap(student_unet)
    try:
        curve = _distil(student, teacher, config, images, labels, taps, progress)
    finally:
        for tap in taps:
            tap.close()
        for p, flag in zip(teacher_module.parameters(), grad_flags):
            p.requires_grad_(flag)
    student.extra = {"slim": {
        "teacher": teacher.source or teacher.name,
        "width": config.width,
        "wavelet_gating": config.wavelet_gating,
        "prediction_type": student.prediction_type,
        "block_out_channels": list(student_unet.config.block_out_channels),
        "layers_per_block": student_unet.config.layers_per_block,
        "macs_teacher": teacher_cost["macs"],
        "macs_student": student_cost["macs"],
        "params_teacher": teacher_cost["parameters"],
        "params_student": student_cost["parameters"],
        "mac_reduction": round(teacher_cost["macs"] / student_cost["macs"], 3),
        "data": data_source,
        "steps": curve[-1]["step"] if curve else 0,
        "train_seconds": round(time.perf_counter() - start, 1),
        "train_cpu_seconds": round(time.process_time() - cpu_start, 1),
        "threads": torch.get_num_threads(),
        "final_losses": {k: v for k, v in curve[-1].items() if k != "step"} if curve else {},
        "loss_curve": curve,
        "config": config.to_dict(),
    }}
    teacher_module.cpu()
    return student


def _distil(student: Denoiser, teacher: Denoiser, config: SlimConfig, images, labels, taps, progress) -> list[dict]:
    """Trains ``student.module`` towards the (frozen) teacher; returns the loss curve, each term averaged per ``log_every`` steps."""
    from accelerate import Accelerator

    from compress.spectral_loss import SpectralDistillationLoss, noise_level_weights

    t_tap, s_tap = taps
    teacher_module = teacher.module
    with torch.no_grad():
        probe = _probe_inputs(teacher)
        teacher_module(*probe)
        student.module.eval()(*probe)
    widths_t = [f.shape[1] for f in t_tap.take()]
    widths_s = [f.shape[1] for f in s_tap.take()]
    criterion = SpectralDistillationLoss(widths_s, widths_t, config.lambda_feature, config.lambda_freq, config.alpha)
    student.module.train()
    optimizer = torch.optim.AdamW(list(student.module.parameters()) + list(criterion.parameters()), lr=config.lr, weight_decay=0.0)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    module, criterion, optimizer = accelerator.prepare(student.module, criterion, optimizer)
    device = accelerator.device
    teacher_module.to(device)
    ema = EMA(accelerator.unwrap_model(module), config.ema) if config.ema else None

    gen = torch.Generator().manual_seed(config.seed)
    T = teacher.schedule.num_train_timesteps
    t_weights = noise_level_weights(teacher.schedule, config.high_noise_weight)
    want_features = config.lambda_feature > 0
    curve, window = [], {}

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(images), (config.batch_size,), generator=gen)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, T, (config.batch_size,), generator=gen)  # uniform, as in DDPM training
        cond = _training_condition(teacher, labels, idx, gen)
        xt, target = training_target(student, x0, noise, t)
        alpha, sigma = (v.to(device) for v in teacher.schedule.alpha_sigma(t))
        x0, xt, target, tf = x0.to(device), xt.to(device), target.to(device), t.float().to(device)
        cond = condition_to(cond, device)
        with torch.no_grad():
            t_tap.take()
            teacher_pred = convert_prediction(teacher_module(xt, tf, cond), teacher.prediction_type, student.prediction_type, xt, alpha, sigma)
            teacher_features = t_tap.take()
        s_tap.take()
        student_pred = module(xt, tf, cond)
        student_features = s_tap.take()
        terms = criterion(student_pred, teacher_pred, target, x0,
                          student_features if want_features else (), teacher_features if want_features else (),
                          sample_weights=t_weights[t].to(device))
        for k, v in terms.items():
            window.setdefault(k, []).append(float(v.detach()))
        return terms["total"]

    def record(step: int, losses: list[float]) -> None:
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            curve.append({"step": step + 1, **_window_means(window)})

    clock = time.process_time if config.budget_clock == "cpu" else time.perf_counter
    budget = TimeBudget(None if config.max_minutes is None else 60 * config.max_minutes, clock)
    result = train_loop(module, optimizer, loss_at, config.steps, LRSchedule(config.lr, warmup_steps=config.warmup), budget=budget,
                        ema=ema, accelerator=accelerator, progress=progress, description=f"slim width {config.width:g}", on_step=record)
    if window:  # stopped by the time budget between two points of the curve
        curve.append({"step": result.steps, **_window_means(window)})
    if ema is not None:
        ema.copy_to_module()
    student.module = accelerator.unwrap_model(module).cpu().eval()
    return curve


def _window_means(window: dict[str, list[float]]) -> dict[str, float]:
    """Each loss term's mean over the steps since the last point of the curve; empties the window."""
    means = {k: sum(v) / len(v) for k, v in window.items()}
    window.clear()
    return means


def _training_condition(teacher: Denoiser, labels, idx, gen) -> torch.Tensor | None:
    if teacher.conditioning == "class":
        cond = labels[idx]
    elif teacher.conditioning == "text":
        cond = draw_conditions(teacher, len(idx), gen)
    else:
        return None
    if teacher.has_null_condition:
        cond = drop_conditions(cond, teacher.null_condition(len(idx)), gen)
    return cond
