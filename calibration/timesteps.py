"""Timestep samplers: which noise levels a calibration set covers.

Each returns, per recorded state, the trajectory it comes from and its level (t, alpha, sigma),
so that the recorder can take every state from the full-precision chain.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calibration.config import CalibrationConfig
from compress.errors import UserError
from compress.schedule import NoiseSchedule


@dataclass(frozen=True)
class Requests:
    """States to record: state k is trajectory ``trajectory[k]`` at timestep ``t[k]`` (level alpha, sigma)."""

    trajectory: np.ndarray  # [N] int
    t: np.ndarray  # [N] float64 (integer-valued except for solvers with fractional timesteps)
    alpha: np.ndarray  # [N]
    sigma: np.ndarray  # [N]

    @property
    def trajectories(self) -> int:
        return int(self.trajectory.max()) + 1


def _on_grid(schedule: NoiseSchedule, trajectory, t) -> Requests:
    t = np.asarray(t, dtype=np.int64)
    return Requests(np.asarray(trajectory, dtype=np.int64), t.astype(np.float64), schedule.alpha(t), schedule.sigma(t))


def ndtc(config: CalibrationConfig, schedule: NoiseSchedule) -> Requests:
    """PTQ4DM: t = round(T * Normal(mean, std)), clamped to [0, T - 1]; every state from its own trajectory."""
    T = schedule.num_train_timesteps
    fractions = np.random.default_rng(config.seed).normal(config.mean, config.std, size=config.samples)
    t = np.clip(np.round(fractions * T), 0, T - 1)
    return _on_grid(schedule, np.arange(config.samples), t)


def _repeat_over_trajectories(samples: int, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """State k is level k % levels of trajectory k // levels: every trajectory records all levels in turn."""
    k = np.arange(samples)
    return k // levels, k % levels


def uniform(config: CalibrationConfig, schedule: NoiseSchedule) -> Requests:
    """Q-Diffusion: T-1, T-1-interval, ... (default interval T // 20: twenty levels) on every trajectory."""
    T = schedule.num_train_timesteps
    interval = config.interval or max(1, T // 20)
    if interval >= T:
        raise UserError(f"calibration interval {interval} leaves no timesteps in a {T}-step schedule")
    levels = np.arange(T - 1, -1, -interval)
    trajectory, which = _repeat_over_trajectories(config.samples, len(levels))
    return _on_grid(schedule, trajectory, levels[which])


def solver(config: CalibrationConfig, schedule: NoiseSchedule, solver_config) -> Requests:
    """The baked solver's own network levels (its plan), in order, on every trajectory."""
    if solver_config is None:
        raise UserError("calibration sampler 'solver' needs the solver to bake (--solver and --steps)")
    plan = solver_config.plan(schedule)
    trajectory, which = _repeat_over_trajectories(config.samples, plan.steps)
    return Requests(trajectory, plan.timesteps[which].astype(np.float64), plan.alpha[:-1][which], plan.sigma[:-1][which])


def sample_requests(config: CalibrationConfig, schedule: NoiseSchedule, solver_config=None) -> Requests:
    if config.sampler == "ndtc":
        return ndtc(config, schedule)
    if config.sampler == "uniform":
        return uniform(config, schedule)
    return solver(config, schedule, solver_config)
