"""Searched timestep schedules: the K timesteps whose few-step samples land closest to a teacher.

In the spirit of AutoDiffusion and the timestep aligner, but as a plain coordinate descent on
integer timesteps: move one timestep at a time by a step size that halves whenever no move
helps, keep the move when the final samples (on a few calibration noises) get closer to a
many-step teacher's from the same noise. The result is a list of timesteps that a recipe or a
sidecar stores and that `SolverConfig(timesteps=...)` reuses.

No move may shrink a gap between neighbouring timesteps below T / (4K). Without that floor the
descent can park two timesteps side by side (DDIM at 6 steps found 828 then 827), a local
minimum that spends one network evaluation on a step of nothing.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from compress.denoiser import Denoiser, guided
from compress.progress import progress
from compress.sampling import make_noise, sample
from compress.solvers import SolverConfig, run_table

SEARCH_SEED = 10_000  # calibration noises; validation uses other seeds, so the search cannot overfit them


@dataclass(frozen=True)
class SearchResult:
    timesteps: list[int]
    start_timesteps: list[int]
    error_start: float  # MSE to the teacher on the search noises, before and after
    error_found: float
    evaluations: int

    def as_dict(self) -> dict:
        return self.__dict__ | {"method": "coordinate-descent", "seed": SEARCH_SEED}


@torch.no_grad()
def search_timesteps(
    denoiser: Denoiser,
    solver: SolverConfig,
    cond: torch.Tensor | None = None,
    noises: int = 16,
    teacher: SolverConfig | None = None,
    max_sweeps: int = 4,
) -> SearchResult:
    T = denoiser.schedule.num_train_timesteps
    teacher = teacher or SolverConfig("ddim", 250, guidance_scale=solver.guidance_scale)
    noise = make_noise(denoiser, noises, SEARCH_SEED)
    if cond is None and denoiser.conditioning == "class":
        cond = torch.arange(noises) % denoiser.num_classes
    target = sample(denoiser, teacher, noise, cond, device="cpu", show_progress=False)
    module = denoiser.module.cpu().eval()
    null = denoiser.null_condition(noises) if cond is not None else None

    def network(x, t):
        return guided(module, x, t, cond, null, solver.guidance_scale)

    evaluations = 0

    def error(timesteps: list[int]) -> float:
        nonlocal evaluations
        evaluations += 1
        table = dataclasses.replace(solver, timesteps=tuple(timesteps)).table(denoiser.schedule, denoiser.prediction_type)
        return float(torch.mean((run_table(table, network, noise) - target) ** 2))

    # A flow plan starts at t = T (pure noise); explicit timesteps stay on the grid below it.
    start = [min(int(t), T - 1) for t in np.round(solver.plan(denoiser.schedule).timesteps)]
    # A quarter of an even spacing: the first move, and the narrowest gap a move may leave.
    step = min_gap = max(1, T // (4 * len(start)))
    best, best_error = list(start), error(start)
    first_error = best_error
    steps = []
    while step >= 1:
        steps.append(step)
        step //= 2
    for step in progress(steps, description="schedule search"):
        for _ in range(max_sweeps):
            improved = False
            for i in range(len(best)):
                for move in (step, -step):
                    candidate = list(best)
                    candidate[i] += move
                    if not _allowed(candidate, best, T, min_gap):
                        continue
                    e = error(candidate)
                    if e < best_error:
                        best, best_error, improved = candidate, e, True
                        break
            if not improved:
                break
    return SearchResult(best, start, first_error, best_error, evaluations)


def _allowed(candidate: list[int], current: list[int], T: int, min_gap: int) -> bool:
    """Inside [0, T), strictly decreasing, and no gap shrunk below ``min_gap`` (narrower start gaps may stay)."""
    if not all(0 <= t < T for t in candidate):
        return False
    gaps = [a - b for a, b in zip(candidate, candidate[1:])]
    old_gaps = [a - b for a, b in zip(current, current[1:])]
    return all(g > 0 and (g >= min_gap or g >= old) for g, old in zip(gaps, old_gaps))
