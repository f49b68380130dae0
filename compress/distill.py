"""Recovery fine-tune by distillation from the original model: output matching, optional feature
matching, EMA weights. Any student `Denoiser` whose calling convention matches its teacher's works
(a pruned network, a slim student).

The loop runs under `accelerate`: single process on a CPU as is, and unchanged on several
processes or GPUs (``torchrun --nproc_per_node 2 -m compress.distill ...`` on CPUs, ``accelerate launch`` on GPUs).
Training inputs are x_t = alpha_t x0 + sigma_t eps at uniform timesteps, with x0 drawn from the
teacher's own samples (data-free) unless ``data`` is given.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from compress.denoiser import condition_batch, condition_to, select_condition
from compress.training import EMA, FeatureRecorder, LRSchedule, TimeBudget, drop_conditions, self_samples, train_loop, training_target


@dataclass
class DistillConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    ema: float = 0.999  # 0: no EMA
    feature_weight: float = 0.0  # > 0: also match block features (through learned 1x1 projections)
    data_samples: int = 512
    data_solver: str = "dpmpp-2m"
    data_steps: int = 20
    seed: int = 0
    max_seconds: float | None = None  # a wall-clock budget (benchmarks): the LR schedule follows steps or time, whichever runs out first

    @classmethod
    def from_prune(cls, config) -> "DistillConfig":
        return cls(steps=config.finetune_steps, batch_size=config.batch_size, lr=config.lr, ema=config.ema,
                   feature_weight=config.feature_weight, data_samples=config.data_samples,
                   data_solver=config.data_solver, data_steps=config.data_steps, seed=config.seed,
                   max_seconds=config.finetune_seconds)


def feature_layers(module: nn.Module) -> list[nn.Module]:
    """The blocks whose outputs feature matching compares: a UNet's mid and up blocks, a DiT's transformer blocks."""
    inner = getattr(module, "unet", None) or getattr(module, "transformer", None) or module
    if hasattr(inner, "up_blocks"):
        return [inner.mid_block, *inner.up_blocks] if inner.mid_block is not None else list(inner.up_blocks)
    if hasattr(inner, "transformer_blocks"):
        return list(inner.transformer_blocks)
    return []


class _Trainee(nn.Module):
    """The student plus the projections that map its (narrower) features onto the teacher's."""

    def __init__(self, student: nn.Module, adapters: nn.ModuleList):
        super().__init__()
        self.student, self.adapters = student, adapters
        self.recorder = FeatureRecorder(feature_layers(student)) if len(adapters) else None

    def forward(self, x, t, cond):
        out = self.student(x, t, cond)
        if self.recorder is None:
            return out, []
        return out, [adapt(f) for adapt, f in zip(self.adapters, self.recorder.take())]


def _adapter(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> nn.Module:
    if student_feature.dim() == 4:
        return nn.Conv2d(student_feature.shape[1], teacher_feature.shape[1], 1)
    return nn.Linear(student_feature.shape[-1], teacher_feature.shape[-1])


def distill(student, teacher, config: DistillConfig, data: torch.Tensor | None = None, cond: torch.Tensor | None = None,
            log=lambda m: None, accelerator=None) -> dict:
    """Fine-tunes ``student.module`` in place towards ``teacher``; returns a summary of the run."""
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    started = time.perf_counter()  # the time budget counts drawing the teacher's samples too
    device = accelerator.device
    teacher_module = teacher.module.to(device).eval()  # only ever run under no_grad: the caller's model stays as it was
    source = "given" if data is not None else "teacher samples"
    if data is None:
        # Every process draws the same pool (same seed): no communication needed.
        data, cond = self_samples(teacher, config.data_samples, config.seed + 7, config.data_solver, config.data_steps)
    data = data.cpu()
    module = student.module.to(device).train()
    teacher_recorder = FeatureRecorder(feature_layers(teacher_module)) if config.feature_weight > 0 else None
    adapters = _adapters(module, teacher_module, teacher_recorder, data, cond, teacher.schedule.num_train_timesteps, device)
    trainee = _Trainee(module, adapters)
    optimizer = torch.optim.AdamW(trainee.parameters(), lr=config.lr, weight_decay=0.0)
    trainee, optimizer = accelerator.prepare(trainee, optimizer)
    ema = EMA(module, config.ema) if config.ema > 0 else None
    generator = torch.Generator().manual_seed(config.seed * 1000 + accelerator.process_index)
    T = teacher.schedule.num_train_timesteps

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(0, data.shape[0], (config.batch_size,), generator=generator)
        x0 = data[idx]
        c = condition_to(select_condition(cond, idx), device)
        if c is not None and teacher.supports_guidance:
            # Teach the null condition too, so classifier-free guidance keeps working after pruning.
            c = drop_conditions(c, teacher.null_condition(condition_batch(c), device), generator)
        t = torch.randint(0, T, (config.batch_size,), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        xt, _ = training_target(teacher, x0, eps, t)
        xt, tf = xt.to(device), t.float().to(device)
        with torch.no_grad():
            target = teacher_module(xt, tf, c)
            teacher_features = teacher_recorder.take() if teacher_recorder else []
        out, features = trainee(xt, tf, c)
        loss = nn.functional.mse_loss(out, target)
        if features:
            loss = loss + config.feature_weight * sum(nn.functional.mse_loss(f, g) for f, g in zip(features, teacher_features)) / len(features)
        return loss

    def report(step: int, losses: list[float]) -> None:
        done = step + 1
        if done % max(1, config.steps // 10) == 0 or done == config.steps:
            log(f"finetune {done}/{config.steps}: distillation loss {sum(losses[-50:]) / len(losses[-50:]):.4g}")

    result = train_loop(trainee, optimizer, loss_at, config.steps, lr_schedule(config), budget=TimeBudget(config.max_seconds, started=started),
                        ema=ema, accelerator=accelerator, on_step=report)
    if result.out_of_time:
        log(f"finetune stopped at step {result.steps}: time budget of {config.max_seconds:.0f} s reached")
    if ema is not None:
        ema.copy_to_module()
    if teacher_recorder:
        teacher_recorder.close()
    inner = accelerator.unwrap_model(trainee)  # under DDP the trainee is wrapped
    if inner.recorder is not None:
        inner.recorder.close()
    student.module = inner.student.eval()
    return {
        "steps": result.steps,
        "seconds": round(time.perf_counter() - started, 1),
        "final_loss": float(result.mean_loss(50)),
        "processes": accelerator.num_processes,
        "ema": config.ema,
        "feature_weight": config.feature_weight,
        "data": source,
    }


def lr_schedule(config: DistillConfig) -> LRSchedule:
    """Linear warm-up over the first 5% of the budget (steps or time), then cosine down to a tenth."""
    return LRSchedule(config.lr, warmup_share=0.05, floor=0.1)


def _adapters(module, teacher_module, teacher_recorder, data, cond, num_train_timesteps: int, device) -> nn.ModuleList:
    """One projection per matched feature, sized by a probe of both networks at mid-schedule (none without feature matching)."""
    if teacher_recorder is None:
        return nn.ModuleList()
    probe = FeatureRecorder(feature_layers(module))
    x = data[:2].to(device)
    t = torch.full((2,), num_train_timesteps // 2, dtype=torch.float32, device=device)
    c = condition_to(select_condition(cond, slice(0, 2)), device)
    with torch.no_grad():
        module(x, t, c)
        teacher_module(x, t, c)
    adapters = nn.ModuleList(_adapter(s, f) for s, f in zip(probe.take(), teacher_recorder.take())).to(device)
    probe.close()
    return adapters


def parameter_checksum(module: nn.Module) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def main(argv=None) -> int:
    """``accelerate launch -m compress.distill STUDENT_FOLDER TEACHER --steps N --out DIR`` (GPUs), or on CPU processes
    ``torchrun --nproc_per_node N -m compress.distill ...`` (``accelerate launch --cpu`` starts only one without an MPI setup)."""
    import argparse
    import json
    from pathlib import Path

    from accelerate import Accelerator

    from compress.loading import load_model
    from compress.model_folder import CONFIG_FILE, save_model_folder

    parser = argparse.ArgumentParser(prog="python -m compress.distill", description="Distillation fine-tune of a saved student.")
    parser.add_argument("student", help="a model folder (pruned or slim)")
    parser.add_argument("teacher", help="the original model reference")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--feature-weight", type=float, default=0.0)
    parser.add_argument("--data-samples", type=int, default=64)
    parser.add_argument("--data-steps", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, help="a time budget: stop when it runs out (process 0's clock)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # cpu=True on a machine without GPUs: only then does Accelerator join the other CPU processes (gloo).
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    student, teacher = load_model(args.student), load_model(args.teacher)
    folder_config = json.loads(Path(args.student, CONFIG_FILE).read_text())
    config = DistillConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema=args.ema, feature_weight=args.feature_weight,
                           data_samples=args.data_samples, data_steps=args.data_steps, max_seconds=args.max_seconds)
    summary = distill(student, teacher, config, log=accelerator.print, accelerator=accelerator)
    print(f"rank {accelerator.process_index} of {accelerator.num_processes}: {summary['steps']} steps, "
          f"checksum {parameter_checksum(student.module)}", flush=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        student.extra = {**student.extra, "finetune": summary}
        save_model_folder(student, args.out, folder_config["builder"], folder_config["builder_args"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
