"""The training loop that the zoo's models, pruning's distillation fine-tune and slim students share.

    result = train_loop(model, optimizer, loss_at, steps, LRSchedule(2e-3, warmup_steps=100), ema=EMA(model, 0.999))

Each step sets the learning rate from the `LRSchedule`, takes ``loss_at(step)`` (the caller draws its batch
there), backpropagates it (through `accelerate` when an Accelerator is given, so several processes or GPUs
average their gradients), clips the gradients at norm 1, steps the optimizer and updates the `EMA`. A run
ends after its steps or when its `TimeBudget` is spent, whichever comes first; the schedule follows
whichever of the two is further along.

Also here, what the trainers' batches are made of: x_t and the network's target for its prediction type,
label dropout for classifier-free guidance, the model's own samples as a data-free training set, and the
recorder of block features that distillation matches.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from compress.denoiser import condition_batch, draw_conditions, map_condition
from compress.sampling import make_noise, sample
from compress.solvers import SolverConfig, prediction_target

# Share of conditions replaced by the null condition in training: it keeps the unconditional branch that
# classifier-free guidance needs.
LABEL_DROPOUT = 0.1
MAX_GRAD_NORM = 1.0


# ----------------------------------------------------------------------------- schedule, budget, EMA


@dataclass(frozen=True)
class LRSchedule:
    """A linear warm-up, then a cosine from ``peak`` down to ``floor`` x peak at the end of the budget.

    The warm-up lasts ``warmup_steps`` steps (the cosine then runs over the steps after it), or
    ``warmup_share`` of the whole budget, counted in steps or time alike (distillation fine-tunes that are
    often cut by a time budget).
    """

    peak: float
    warmup_steps: int = 0
    warmup_share: float = 0.0
    floor: float = 0.0

    def lr(self, step: int, steps: int, time_share: float = 0.0) -> float:
        """The rate of ``step`` (from 0) of ``steps``, with ``time_share`` of the time budget spent."""
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        step_share = (step - self.warmup_steps) / max(1, steps - self.warmup_steps)
        done = min(1.0, max(step_share, time_share))
        if done < self.warmup_share:
            return self.peak * max(0.1, done / self.warmup_share)  # a tenth, not zero, at the first step
        progress = (done - self.warmup_share) / (1 - self.warmup_share)
        return self.peak * (self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class TimeBudget:
    """A limit on a run's time on one clock: wall time, or this process's CPU time (which other jobs on a
    shared machine do not use up)."""

    seconds: float | None = None  # None: no limit, the steps alone end the run
    clock: Callable[[], float] = time.perf_counter
    started: float | None = None  # the clock's reading the budget counts from; None: the loop's start

    def spent(self, accelerator=None) -> float:
        return agreed_seconds(accelerator, self.clock() - self.started, self.seconds)

    def share(self, seconds: float) -> float:
        return 0.0 if self.seconds is None else seconds / self.seconds

    def ran_out(self, seconds: float) -> bool:
        return self.seconds is not None and seconds >= self.seconds


def agreed_seconds(accelerator, seconds: float, budget: float | None) -> float:
    """Process 0's elapsed time, on every process; 0 without a time ``budget`` (nothing reads it then).

    A time budget read off each process's own clock can stop them at different steps, and the
    ones still training then wait in the next gradient all-reduce for good.
    """
    if budget is None:
        return 0.0  # and no collective per step
    if accelerator is None or accelerator.num_processes == 1:
        return seconds
    from accelerate.utils import broadcast

    return float(broadcast(torch.tensor([seconds], device=accelerator.device), from_process=0).item())


class EMA:
    """An exponential moving average of a module's parameters: the weights a run hands back.

    The decay warms up as (1 + step) / (10 + step) until it reaches ``decay``: in a short run a plain 0.999
    would leave the average close to the initial weights.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.module, self.decay = module, decay
        self.average = [p.detach().clone() for p in module.parameters()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        weight = 1 - min(self.decay, (1 + step) / (10 + step))
        for average, p in zip(self.average, self.module.parameters()):
            average.lerp_(p.detach(), weight)

    @torch.no_grad()
    def copy_to_module(self) -> None:
        for average, p in zip(self.average, self.module.parameters()):
            p.copy_(average)


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per step taken
    out_of_time: bool = False  # the time budget, not the steps, ended the run

    @property
    def steps(self) -> int:
        return len(self.losses)

    def mean_loss(self, last: int) -> float:
        """The mean of the last ``last`` steps' losses (0 when no step ran)."""
        tail = self.losses[-last:]
        return sum(tail) / max(1, len(tail))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(model: nn.Module, optimizer, loss: torch.Tensor, accelerator=None) -> None:
    """Backward, gradients of ``model`` clipped at norm 1, one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    if accelerator is None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    else:
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()


def train_loop(model: nn.Module, optimizer, loss_at: Callable[[int], torch.Tensor], steps: int, schedule: LRSchedule, *,
               budget: TimeBudget | None = None, ema: EMA | None = None, accelerator=None,
               progress: Callable[..., Iterable] | None = None, description: str = "train",
               on_step: Callable[[int, list[float]], None] | None = None) -> TrainResult:
    """Up to ``steps`` optimizer steps on ``loss_at(step)``; stops early when ``budget`` runs out.

    ``model`` is what the gradients are clipped over (the optimizer may hold more, such as a loss's own
    projections); ``progress`` wraps the step range (compress.progress.progress); ``on_step(step, losses)``
    follows every step (logging, loss curves). The first step always runs, so a budget that setup spent
    (a distillation drawing its teacher's samples) still changes the weights.
    """
    budget = budget or TimeBudget()
    if budget.started is None:
        budget = dataclasses.replace(budget, started=budget.clock())
    spent = budget.spent(accelerator)
    result = TrainResult()
    step_range = range(steps)
    for step in progress(step_range, description=description) if progress else step_range:
        set_lr(optimizer, schedule.lr(step, steps, budget.share(spent)))
        loss = loss_at(step)
        optimizer_step(model, optimizer, loss, accelerator)
        if ema is not None:
            ema.update(step)
        result.losses.append(loss.item())
        if on_step is not None:
            on_step(step, result.losses)
        spent = budget.spent(accelerator)  # every process calls it once per step: the collectives stay paired
        if budget.ran_out(spent):
            result.out_of_time = True
            break
    return result


# ----------------------------------------------------------------------------- batches


def training_target(denoiser, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = alpha_t x0 + sigma_t eps, and what the network should output there for its prediction type."""
    alpha, sigma = denoiser.schedule.alpha_sigma(t, x0.dim(), x0.device)
    return alpha * x0 + sigma * eps, prediction_target(denoiser.prediction_type, x0, eps, alpha, sigma)


def drop_conditions(cond, null, generator: torch.Generator, rate: float = LABEL_DROPOUT):
    """``cond`` with a random ``rate`` of its rows replaced by ``null`` (one draw per row from ``generator``; a dict
    condition drops all its parts of a row together)."""
    drop = torch.rand(condition_batch(cond), generator=generator) < rate
    return map_condition(lambda c, n: torch.where(drop.view(-1, *[1] * (c.dim() - 1)).to(c.device), n, c), cond, null)


def seeded_conditions(denoiser, count: int, seed: int):
    """`draw_conditions` from a generator of its own seed: the same conditions on every process and run."""
    return draw_conditions(denoiser, count, torch.Generator().manual_seed(seed))


def self_samples(denoiser, count: int, seed: int, solver: str = "dpmpp-2m", steps: int = 20, device=None):
    """Samples of the model itself and their conditions: data-free stand-ins for its training set."""
    cond = seeded_conditions(denoiser, count, seed)
    x0 = sample(denoiser, SolverConfig(solver, steps), make_noise(denoiser, count, seed + 1), cond,
                device=device or denoiser.device, show_progress=False)
    return x0, cond


class FeatureRecorder:
    """Forward hooks that keep each layer's output until `take` (features to match in distillation)."""

    def __init__(self, layers):
        self.features: list[torch.Tensor] = []
        self.handles = [layer.register_forward_hook(self._hook) for layer in layers]

    def _hook(self, module, args, output):
        self.features.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[torch.Tensor]:
        out, self.features = self.features, []
        return out

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
