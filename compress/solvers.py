"""Diffusion ODE/SDE solvers, each a short function over a sampling plan.

A solver is written once, k-diffusion style, as plain arithmetic on ``x`` and the model's
predictions. Run on tensors, it samples (the host loop). Run on `Linear` symbols, the same
code yields its coefficient table: every state of a deterministic solver is a linear
combination of the initial noise and the network outputs seen so far, so the table
(computed once, in float64) is all the baked sampler graph needs. Nothing about a solver is
written twice.

Conventions: x_t = alpha * x0 + sigma * eps (variance preserving); the plan lists the K
levels the network is evaluated at plus the final level (sigma = 0: a clean sample);
lambda = log(alpha / sigma) is the half log-SNR.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from compress.errors import UserError
from compress.schedule import NoiseSchedule

SPACINGS = ("linspace", "leading", "trailing")


# ----------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class SamplingPlan:
    timesteps: np.ndarray  # [K] timesteps fed to the network
    alpha: np.ndarray  # [K + 1]
    sigma: np.ndarray  # [K + 1]; sigma[K] is where sampling ends

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def lam(self, i: int) -> float:
        return math.log(self.alpha[i] / self.sigma[i]) if self.sigma[i] > 0 else math.inf


def spaced_timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "trailing", steps_offset: int = 0) -> np.ndarray:
    """Descending integer timesteps, following diffusers' multistep schedulers."""
    T = schedule.num_train_timesteps
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    if steps > T:
        raise UserError(f"steps ({steps}) cannot exceed the model's {T} training timesteps")
    if spacing == "linspace":
        t = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        t = (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        t = np.arange(T, 0, -T / steps).round() - 1
    else:
        raise UserError(f"unknown timestep spacing {spacing!r}; expected one of {', '.join(SPACINGS)}")
    return t.astype(np.int64)


def make_plan(schedule: NoiseSchedule, timesteps, final: str = "zero") -> SamplingPlan:
    """final='zero' ends on a clean sample; 'sigma_min' ends on the schedule's first level."""
    t = np.asarray(timesteps, dtype=np.int64)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    end = (1.0, 0.0) if final == "zero" else (float(schedule.alpha(0)), float(schedule.sigma(0)))
    return SamplingPlan(t.astype(np.float64), np.append(alpha, end[0]), np.append(sigma, end[1]))


# ----------------------------------------------------------------------------- model predictions


class Predictor:
    """Turns the network's raw output into both parametrizations: (x0, eps). One evaluation each call."""

    def __init__(self, network: Callable, plan: SamplingPlan, prediction_type: str):
        self.network, self.plan, self.prediction_type = network, plan, prediction_type

    def __call__(self, x, i: int):
        return self.at(x, self.plan.timesteps[i], self.plan.alpha[i], self.plan.sigma[i])

    def at(self, x, t, alpha, sigma):
        out = self.network(x, float(t))
        a, s = float(alpha), float(sigma)
        if self.prediction_type == "epsilon":
            return (x - s * out) / a, out
        if self.prediction_type == "v_prediction":
            return a * x - s * out, s * x + a * out
        if self.prediction_type == "sample":
            return out, (x - a * out) / s
        raise UserError(f"unknown prediction type {self.prediction_type!r}")


# ----------------------------------------------------------------------------- solvers


def ddim(model, x, plan: SamplingPlan):
    """DDIM (eta = 0): the exact solution of the probability-flow ODE for a frozen x0."""
    for i in range(plan.steps):
        x0, eps = model(x, i)
        x = plan.alpha[i + 1] * x0 + plan.sigma[i + 1] * eps
    return x


def euler(model, x, plan: SamplingPlan):
    """Euler on the ODE in sigma-space (x/alpha as a function of sigma/alpha), as in Karras et al."""
    for i in range(plan.steps):
        x0, eps = model(x, i)
        s, s_next = plan.sigma[i] / plan.alpha[i], plan.sigma[i + 1] / plan.alpha[i + 1]
        x = plan.alpha[i + 1] * (x / plan.alpha[i] + (s_next - s) * eps)
    return x


def ddpm(model, x, plan: SamplingPlan, noise: Callable):
    """Ancestral sampling with the posterior variance (diffusers' 'fixed_small')."""
    for i in range(plan.steps):
        x0, _ = model(x, i)
        ab, ab_prev = plan.alpha[i] ** 2, plan.alpha[i + 1] ** 2
        beta = 1 - ab / ab_prev
        mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x
        variance = max((1 - ab_prev) / (1 - ab) * beta, 1e-20)
        x = mean + math.sqrt(variance) * noise(i) if plan.sigma[i + 1] > 0 else mean
    return x


@dataclass(frozen=True)
class SolverSpec:
    fn: Callable
    stochastic: bool = False
    order: int = 1
    summary: str = ""
    options: dict = field(default_factory=dict)


SOLVERS: dict[str, SolverSpec] = {
    "ddim": SolverSpec(ddim, summary="DDIM, deterministic (eta=0)"),
    "euler": SolverSpec(euler, summary="Euler on the probability-flow ODE"),
    "ddpm": SolverSpec(ddpm, stochastic=True, summary="DDPM ancestral sampling (stochastic, host loop only)"),
}


def get_solver(name: str) -> SolverSpec:
    if name not in SOLVERS:
        import difflib

        close = difflib.get_close_matches(name, SOLVERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown solver {name!r}{hint} (available: {', '.join(SOLVERS)})")
    return SOLVERS[name]


@dataclass(frozen=True)
class SolverConfig:
    """The recipe's `solver` section: which solver, how many steps, which timesteps."""

    name: str = "ddim"
    steps: int = 100
    spacing: str = "trailing"
    guidance_scale: float | None = None
    options: dict = field(default_factory=dict)  # solver-specific keyword arguments

    def plan(self, schedule: NoiseSchedule) -> SamplingPlan:
        get_solver(self.name)
        return make_plan(schedule, spaced_timesteps(schedule, self.steps, self.spacing))


# ----------------------------------------------------------------------------- coefficient tables


class Linear:
    """A linear combination of basis vectors (0 = the initial noise, e >= 1 = the e-th network output)."""

    __slots__ = ("coef",)

    def __init__(self, coef: dict[int, float]):
        self.coef = coef

    def _combine(self, other, sign: float) -> "Linear":
        if not isinstance(other, Linear):
            return NotImplemented
        out = dict(self.coef)
        for k, v in other.coef.items():
            out[k] = out.get(k, 0.0) + sign * v
        return Linear(out)

    def __add__(self, other):
        return self._combine(other, 1.0)

    def __sub__(self, other):
        return self._combine(other, -1.0)

    def __mul__(self, scalar):
        if isinstance(scalar, Linear):
            raise TypeError("a solver step must stay linear in the network outputs")
        return Linear({k: v * float(scalar) for k, v in self.coef.items()})

    __rmul__ = __mul__

    def __truediv__(self, scalar):
        return self * (1.0 / float(scalar))

    def __neg__(self):
        return self * -1.0

    def __pos__(self):
        return self

    def vector(self, size: int) -> np.ndarray:
        v = np.zeros(size)
        for k, c in self.coef.items():
            v[k] = c
        return v


@dataclass(frozen=True)
class SolverTable:
    """Network input of evaluation e = weights[e] . [noise, out_1, ..., out_e]; the sample = weights[E] . [...]."""

    timesteps: np.ndarray  # [E]
    weights: np.ndarray  # [E + 1, E + 1], lower triangular, float64

    @property
    def evaluations(self) -> int:
        return len(self.timesteps)


def compile_solver(name: str, plan: SamplingPlan, prediction_type: str, **options) -> SolverTable:
    """Run the solver once on symbols to get its coefficient table."""
    spec = get_solver(name)
    if spec.stochastic:
        raise UserError(f"solver {name!r} is stochastic and cannot be baked into a graph; use a deterministic one such as 'ddim'")
    calls: list[tuple[Linear, float]] = []

    def network(x: Linear, t: float) -> Linear:
        calls.append((x, t))
        return Linear({len(calls): 1.0})

    final = spec.fn(Predictor(network, plan, prediction_type), Linear({0: 1.0}), plan, **options)
    size = len(calls) + 1
    weights = np.stack([x.vector(size) for x, _ in calls] + [final.vector(size)])
    return SolverTable(np.array([t for _, t in calls]), weights)


def run_table(table: SolverTable, network: Callable, noise):
    """Apply a coefficient table in the tensors' own precision; ``network(x, t)`` returns the raw output."""
    basis = [noise]
    for e, t in enumerate(table.timesteps):
        basis.append(network(_combine(table.weights[e], basis), float(t)))
    return _combine(table.weights[-1], basis)


def _combine(weights: np.ndarray, basis: list):
    terms = [float(w) * b for w, b in zip(weights, basis) if w != 0.0]
    out = terms[0]
    for term in terms[1:]:
        out = out + term
    return out
