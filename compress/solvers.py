"""Diffusion ODE/SDE solvers, each a short function over a sampling plan.

A solver is written once, k-diffusion style, as plain arithmetic on ``x`` and the model's
predictions. Run on tensors, it samples (the host loop). Run on `Linear` symbols, the same
code yields its coefficient table: every state of a deterministic solver is a linear
combination of the initial noise and the network's inputs and outputs so far, so the table
(computed once, in float64) is all the baked sampler graph needs. Nothing about a solver is
written twice.

Conventions: x_t = alpha * x0 + sigma * eps (variance preserving, or rectified flow with
alpha = 1 - sigma: a plan with ``flow``); the plan lists the K
levels the network is evaluated at plus the final level (sigma = 0: a clean sample);
lambda = log(alpha / sigma) is the half log-SNR and rho = sigma / alpha the "VE sigma"
that diffusers' schedulers call ``sigmas``. Step i moves x from level i to ``plan.end(i)``,
which is level i + 1 except in the DDIM/PNDM timestep convention (see `build_plan`).
Coefficients are python floats, so a step is exact float64 arithmetic on symbols and plain
scalar multiplication on tensors.

Each solver reproduces the diffusers scheduler of the same method (DDIMScheduler,
DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, UniPCMultistepScheduler,
DEISMultistepScheduler, PNDMScheduler with skip_prk_steps, EulerDiscreteScheduler, and on flows
FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler and the multistep ones with
``use_flow_sigmas``) step for step, including when each one lowers its order;
`compress.scheduler_config` maps a scheduler config onto a `SolverConfig`.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from compress.errors import UserError, did_you_mean, unknown_choice
from compress.schedule import NoiseSchedule, Schedule, shift_sigmas

SPACINGS = ("linspace", "leading", "trailing", "karras", "logsnr")
# Flow plans: 'trailing' = K levels 1, (K-1)/K, ..., 1/K before the shift (what FluxPipeline
# passes as sigmas); 'linspace' = FlowMatch*DiscreteScheduler's own set_timesteps; 'dpmsolver' and 'unipc' =
# the use_flow_sigmas levels of DPMSolverMultistepScheduler and UniPCMultistepScheduler.
FLOW_SPACINGS = ("trailing", "linspace", "dpmsolver", "unipc")
# Below sigma = 1 by this much a flow plan's first level keeps lambda = log(alpha / sigma) finite (diffusers' UniPC does the same).
FLOW_SIGMA_CAP = 1e-6
# Which diffusers family's timestep rules a plan follows (they differ for linspace and leading):
# multistep = DPMSolver*/UniPC/DEIS, ddim = DDIMScheduler/PNDMScheduler, euler = EulerDiscreteScheduler.
CONVENTIONS = ("multistep", "ddim", "euler")
FINALS = ("zero", "sigma_min")
ROUNDINGS = ("round", "floor", "none")


def _choose(what: str, value, allowed) -> None:
    if value not in allowed:
        raise unknown_choice(what, value, allowed)


# ----------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class SamplingPlan:
    timesteps: np.ndarray  # [K] timesteps fed to the network (fractional for some spacings)
    alpha: np.ndarray  # [K + 1]
    sigma: np.ndarray  # [K + 1]; sigma[K] is where sampling ends
    ends: np.ndarray | None = None  # [K, 2] (alpha, sigma) step i lands on, where that is not level i + 1
    noise_scale: float = 1.0  # x at level 0 = noise_scale * standard normal noise
    flow: bool = False  # rectified flow: alpha = 1 - sigma, and the ODE's natural frame is (x, sigma)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def level(self, i: int) -> tuple[float, float]:
        return float(self.alpha[i]), float(self.sigma[i])

    def end(self, i: int) -> tuple[float, float]:
        """The level step i moves x to."""
        if self.ends is None:
            return self.level(i + 1)
        return float(self.ends[i][0]), float(self.ends[i][1])

    def lam(self, i: int) -> float:
        return _lam(*self.level(i))

    def start(self, noise):
        """x at the first level from standard normal noise (diffusers' Euler starts some spacings below unit variance)."""
        return noise if self.noise_scale == 1.0 else self.noise_scale * noise


def _lam(alpha: float, sigma: float) -> float:
    return math.log(alpha / sigma) if sigma > 0 else math.inf


def _vp_levels(rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, sigma) from rho = sigma / alpha, with alpha^2 + sigma^2 = 1."""
    alpha = 1.0 / np.sqrt(1.0 + rho**2)
    return alpha, rho * alpha


def _grid_timesteps(T: int, steps: int, spacing: str, convention: str, steps_offset: int, last: int) -> np.ndarray:
    """Descending timesteps on (or, for Euler's linspace, between) the training grid."""
    if convention == "multistep":  # K + 1 points with the final 0 dropped
        if spacing == "linspace":
            return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1]
        if spacing == "leading":
            return (np.arange(0, steps + 1) * (last // (steps + 1))).round()[::-1][:-1] + steps_offset
    else:  # DDIM, PNDM and Euler space K points and keep 0
        if spacing == "linspace":
            if convention == "euler":  # unrounded, in float32, as Euler feeds them to the network
                return np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].astype(np.float64)
            return np.linspace(0, T - 1, steps).round()[::-1]
        if spacing == "leading":
            return (np.arange(0, steps) * (T // steps)).round()[::-1] + steps_offset
    return np.arange(last, 0, -T / steps).round() - 1  # trailing, the same everywhere


def _float32_rho_table(alphas_cumprod: np.ndarray) -> np.ndarray:
    """rho per training timestep exactly as diffusers computes it (torch, float32)."""
    import torch

    acp = torch.from_numpy(alphas_cumprod.astype(np.float32))
    return (((1 - acp) / acp) ** 0.5).numpy()


def _timesteps_between(levels: np.ndarray, log_table: np.ndarray) -> np.ndarray:
    """Fractional timesteps of rho levels: linear in log(rho) between neighbouring training timesteps."""
    log_levels = np.log(np.maximum(levels, 1e-10))
    low = np.clip(np.searchsorted(log_table, log_levels, side="right") - 1, 0, len(log_table) - 2)
    w = np.clip((log_table[low] - log_levels) / (log_table[low] - log_table[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def build_plan(
    schedule: NoiseSchedule,
    steps: int,
    spacing: str = "trailing",
    *,
    convention: str = "multistep",
    final: str = "zero",
    steps_offset: int = 0,
    timestep_rounding: str | None = None,
    lambda_min_clipped: float | None = None,
) -> SamplingPlan:
    """The K network levels and the final level, following diffusers' timestep rules.

    linspace/leading/trailing pick training timesteps (Euler's linspace falls between them, and its
    levels are interpolated linearly in rho). karras (rho = 7) and logsnr (uniform in lambda) space
    rho between the schedule's extremes; their levels lie off the grid, and the network gets the
    timestep interpolated in log(rho), rounded per `timestep_rounding` ('floor' reproduces
    DPMSolverMultistepScheduler on squaredcos_cap_v2, 'none' keeps it fractional; Euler never rounds).
    final='zero' ends on a clean sample, 'sigma_min' on the schedule's first level. In the 'ddim'
    convention a step from timestep t lands on t - T // K (or the final level below 0) whatever the
    spacing, then the network is evaluated at the next listed timestep, as DDIMScheduler and
    PNDMScheduler do; those landings go into `SamplingPlan.ends` where they differ from the next level.
    `lambda_min_clipped` drops the noisiest timesteps (lambda below it) from multistep spacings.
    A `FlowSchedule` gets a flow plan (`build_flow_plan`); rounding then defaults to 'none'.
    """
    if schedule.kind == "flow":
        _check_flow_settings(spacing, convention, final, steps_offset, lambda_min_clipped)
        return build_flow_plan(schedule, steps, spacing, timestep_rounding or "none")
    timestep_rounding = timestep_rounding or "round"
    _check_vp_settings(spacing)
    _choose("timestep convention", convention, CONVENTIONS)
    _choose("final level", final, FINALS)
    _choose("timestep rounding", timestep_rounding, ROUNDINGS)
    T = schedule.num_train_timesteps
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    acp = schedule.alphas_cumprod
    rho = np.sqrt((1.0 - acp) / acp)  # increasing with t
    grid = np.arange(T, dtype=np.float64)
    rho_final = 0.0 if final == "zero" else float(rho[0])
    ends, noise_scale = None, 1.0
    if spacing in ("karras", "logsnr"):
        # Off-grid levels between the extremes of the schedule (Euler: of its linspace levels, one
        # level when K = 1), looked up in the float32 table diffusers keeps, so rounding agrees.
        table = _float32_rho_table(acp)
        log_table = np.log(table)
        if convention == "euler":
            base = np.interp(_grid_timesteps(T, steps, "linspace", "euler", 0, T), grid, table)
            lo, hi = float(base[-1]), float(base[0])
            log_lo, log_hi = math.log(lo), math.log(hi)
        else:
            lo, hi = float(table[0]), float(table[-1])
            log_lo, log_hi = float(log_table[0]), float(log_table[-1])
        ramp = np.linspace(0, 1, steps)
        if spacing == "karras":  # Karras et al. 2022, eq. 5, rho = 7
            levels = (hi ** (1 / 7.0) + ramp * (lo ** (1 / 7.0) - hi ** (1 / 7.0))) ** 7.0
        else:
            levels = np.exp(log_hi + ramp * (log_lo - log_hi))
        t = _timesteps_between(levels, log_table)
        if convention == "euler":  # kept fractional, in float32 as Euler feeds them to the network
            t = t.astype(np.float32).astype(np.float64)
            noise_scale = float(_vp_levels(levels[:1])[1][0])  # it starts from rho_max * noise in rho-space
        else:
            t = {"round": np.round, "floor": np.floor, "none": np.asarray}[timestep_rounding](t)
    else:
        if steps > T:
            raise UserError(f"steps ({steps}) cannot exceed the model's {T} training timesteps")
        last = T
        if lambda_min_clipped is not None and convention == "multistep":
            last = T - int(np.sum(-np.log(rho) < lambda_min_clipped))
        t = _grid_timesteps(T, steps, spacing, convention, steps_offset, last)
        levels = np.interp(t, grid, rho)  # exact on the grid; linear in rho between (Euler)
        if convention == "euler" and spacing != "leading":
            noise_scale = float(_vp_levels(levels[:1])[1][0])
    rhos = np.append(levels, rho_final)
    if convention == "ddim" and spacing not in ("karras", "logsnr"):
        landing = t.astype(np.int64) - T // steps
        landed = np.where(landing >= 0, rho[np.clip(landing, 0, None)], rho_final)
        rhos[-1] = landed[-1]
        if np.any(landed[:-1] != levels[1:]):
            ends = np.stack(_vp_levels(landed), axis=1)
    alpha, sigma = _vp_levels(rhos)
    return SamplingPlan(np.asarray(t, dtype=np.float64), alpha, sigma, ends, noise_scale)


def _check_vp_settings(spacing: str) -> None:
    if spacing in FLOW_SPACINGS and spacing not in SPACINGS:
        raise UserError(f"timestep spacing {spacing!r} is for flow-matching models; this model's schedule is variance preserving "
                        f"(spacings: {', '.join(SPACINGS)})")
    _choose("timestep spacing", spacing, SPACINGS)


def _check_flow_settings(spacing: str, convention: str, final: str, steps_offset: int, lambda_min_clipped) -> None:
    """Settings of variance-preserving plans are refused by name on a flow, never silently ignored."""
    if spacing in SPACINGS and spacing not in FLOW_SPACINGS:
        raise UserError(f"timestep spacing {spacing!r} is for variance-preserving schedules; this is a flow-matching model "
                        f"(spacings: {', '.join(FLOW_SPACINGS)})")
    _choose("timestep spacing", spacing, FLOW_SPACINGS)
    for name, value, default in (("timestep convention", convention, "multistep"), ("final level", final, "zero"),
                                 ("steps_offset", steps_offset, 0), ("lambda_min_clipped", lambda_min_clipped, None)):
        if value != default:
            raise UserError(f"{name} {value!r} applies to variance-preserving schedules only; a flow plan ends on a clean sample")


def build_flow_plan(schedule, steps: int, spacing: str = "trailing", timestep_rounding: str = "none") -> SamplingPlan:
    """K flow levels sigma (shifted by the schedule's shift) and the clean end, with network timesteps sigma * T.

    Levels are float32 as diffusers keeps them; 'floor' timesteps are the int64 casts of
    DPMSolverMultistep and UniPC, 'none' the float timesteps of the FlowMatch schedulers.
    """
    _choose("timestep rounding", timestep_rounding, ROUNDINGS)
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    T, shift = schedule.num_train_timesteps, schedule.shift
    if spacing == "trailing":
        sigmas = np.linspace(1.0, 1.0 / steps, steps)
    elif spacing == "linspace":
        # The scheduler's sigma_min is its smallest training level, which a static shift has already moved
        # once at construction (in float32); set_timesteps then shifts the whole linspace again.
        sigma_min = 1.0 / T if schedule.dynamic else float(shift_sigmas(np.float32(1.0 / T), np.float32(shift)))
        sigmas = np.linspace(T, sigma_min * T, steps) / T
    elif spacing == "dpmsolver":
        sigmas = (1.0 - np.linspace(1, 1 / T, steps + 1))[::-1][:-1]
    else:
        sigmas = np.linspace(1, 1 / T, steps + 1)[:-1]
    sigmas = shift_sigmas(sigmas, shift)
    if spacing == "unipc":  # UniPC caps its first level before it takes the timesteps
        sigmas = np.minimum(sigmas, 1 - FLOW_SIGMA_CAP)
    if spacing in ("trailing", "linspace"):  # the FlowMatch schedulers: torch float32 throughout
        sigmas = sigmas.astype(np.float32)
        t = (sigmas * np.float32(T)).astype(np.float64)
    else:  # the multistep ones: timesteps from float64 levels, then float32 levels
        t, sigmas = sigmas * T, sigmas.astype(np.float32)
    t = {"round": np.round, "floor": np.floor, "none": np.asarray}[timestep_rounding](t)
    sigma = np.minimum(np.append(sigmas.astype(np.float64), 0.0), 1 - FLOW_SIGMA_CAP)
    return SamplingPlan(np.asarray(t, dtype=np.float64), 1.0 - sigma, sigma, flow=True)


def spaced_timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "trailing", steps_offset: int = 0, convention: str = "multistep") -> np.ndarray:
    """Descending timesteps fed to the network, following diffusers' schedulers (see `build_plan`)."""
    t = build_plan(schedule, steps, spacing, convention=convention, steps_offset=steps_offset).timesteps
    return t.astype(np.int64) if np.all(t == np.round(t)) else t


def make_plan(schedule: Schedule, timesteps, final: str = "zero") -> SamplingPlan:
    """A plan over given integer timesteps. final='zero' ends on a clean sample; 'sigma_min' on the schedule's first level."""
    t = np.asarray(timesteps, dtype=np.int64)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    end = (1.0, 0.0) if final == "zero" else (float(schedule.alpha(0)), float(schedule.sigma(0)))
    return SamplingPlan(t.astype(np.float64), np.append(alpha, end[0]), np.append(sigma, end[1]), flow=schedule.kind == "flow")


# ----------------------------------------------------------------------------- model predictions


class Predictor:
    """Turns the network's raw output into both parametrizations: (x0, eps). One evaluation each call."""

    def __init__(self, network: Callable, plan: SamplingPlan, prediction_type: str):
        self.network, self.plan, self.prediction_type = network, plan, prediction_type
        if prediction_type == "epsilon":
            check_alpha(plan)

    def __call__(self, x, i: int):
        return self.at(x, self.plan.timesteps[i], self.plan.alpha[i], self.plan.sigma[i])

    def at(self, x, t, alpha, sigma):
        return split_prediction(self.prediction_type, self.network(x, float(t)), x, float(alpha), float(sigma))


# The conversions between parametrizations, for x = alpha * x0 + sigma * eps. alpha and sigma are floats
# (a solver step) or tensors that broadcast per sample (training batches). 'flow' is rectified flow's
# velocity v = eps - x0, defined where alpha + sigma = 1 (a FlowSchedule).


def split_prediction(prediction_type: str, out, x, alpha, sigma):
    """(x0, eps) from a network output ``out`` at ``x``."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha, out
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out, sigma * x + alpha * out
    if prediction_type == "sample":
        return out, (x - alpha * out) / sigma
    if prediction_type == "flow":
        return x - sigma * out, x + alpha * out
    raise UserError(f"unknown prediction type {prediction_type!r}")


def prediction_target(prediction_type: str, x0, eps, alpha, sigma):
    """What a network of ``prediction_type`` should output at x = alpha * x0 + sigma * eps."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow":
        return eps - x0
    raise UserError(f"unknown prediction type {prediction_type!r}")


def convert_prediction(out, from_type: str, to_type: str, x, alpha, sigma):
    """A network output in one parametrization expressed in another (a teacher's in its student's)."""
    if from_type == to_type:
        return out
    return prediction_target(to_type, *split_prediction(from_type, out, x, alpha, sigma), alpha, sigma)


# An epsilon prediction becomes x0 = (x - sigma * eps) / alpha: below this alpha its error is multiplied
# by more than 1000 (trailing spacing on a squaredcos_cap_v2 schedule starts at alpha = 4.9e-5 and
# returned values near 1e5).
MIN_ALPHA = 1e-3


def check_alpha(plan: SamplingPlan) -> None:
    for i in range(plan.steps):
        if plan.alpha[i] < MIN_ALPHA:
            raise UserError(f"the sampling plan evaluates timestep {plan.timesteps[i]:g} where alpha = {plan.alpha[i]:.2g} "
                            f"(alpha_bar {plan.alpha[i] ** 2:.2g}): an epsilon prediction divided by it has its error multiplied by "
                            f"{1 / plan.alpha[i]:.0f}; use --spacing leading or linspace (or explicit --timesteps below it)")


# ----------------------------------------------------------------------------- helpers


def _lincomb(coefs, terms):
    """sum(c * term) with python-float coefficients; works on tensors and on `Linear` symbols."""
    out = float(coefs[0]) * terms[0]
    for c, term in zip(coefs[1:], terms[1:]):
        out = out + float(c) * term
    return out


def _require_steps(plan: SamplingPlan, order: int, name: str) -> None:
    if plan.steps < order:
        raise UserError(f"solver {name!r} of order {order} needs at least {order} steps, got {plan.steps}")


def _choose_option(name: str, option: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"solver {name!r}: {option} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _step_order(plan: SamplingPlan, i: int, order: int, lower_order_final: bool, below: float = 15) -> int:
    """The order a multistep method can use at step i.

    It warms up from first order (one more past output per step), and with `lower_order_final`
    and fewer than `below` steps it lowers the order again towards the end, as diffusers does
    (DPM-Solver and DEIS below 15 steps; UniPC always). A step onto sigma = 0 is first order:
    lambda is infinite there and the higher-order terms blow up.
    """
    p = min(order, i + 1)
    if lower_order_final and plan.steps < below:
        p = min(p, plan.steps - i)
    if i == plan.steps - 1 and plan.end(i)[1] == 0:
        p = 1
    return p


def _phis(z: float, n: int) -> list[float]:
    """[phi_1(z), ..., phi_n(z)] with phi_1(z) = (e^z - 1) / z and phi_{k+1}(z) = (phi_k(z) - 1/k!) / z."""
    out = [math.expm1(z) / z]
    for k in range(1, n):
        out.append((out[-1] - 1.0 / math.factorial(k)) / z)
    return out


def _lagrange_log_integrals(nodes: list[float], start: float, end: float) -> list[float]:
    """For each node j, the integral over r from start to end of L_j(log r).

    L_j is the Lagrange basis polynomial through log(nodes). With r = e^u, an antiderivative of
    p(log r) dr is r * (p - p' + p'' - ...)(log r), which vanishes at r = 0.
    """
    u = np.log(nodes)
    weights = []
    for j in range(len(nodes)):
        basis = np.poly1d([1.0])
        for k in range(len(nodes)):
            if k != j:
                basis = basis * np.poly1d([1.0, -u[k]]) / (u[j] - u[k])
        q, derivative = np.poly1d([0.0]), basis
        for m in range(len(nodes)):
            q = q + (-1) ** m * derivative
            derivative = derivative.deriv()
        primitive = [0.0 if r == 0 else r * float(q(math.log(r))) for r in (start, end)]
        weights.append(primitive[1] - primitive[0])
    return weights


# ----------------------------------------------------------------------------- solvers


def ddim(model, x, plan: SamplingPlan):
    """DDIM (Song et al. 2021, arXiv:2010.02502), eta = 0: the exact ODE step for a frozen x0 and eps."""
    x = plan.start(x)
    for i in range(plan.steps):
        x0, eps = model(x, i)
        a, s = plan.end(i)
        x = a * x0 + s * eps
    return x


def _frame(plan: SamplingPlan, level: tuple[float, float]) -> tuple[float, float]:
    """(c, tau): the probability-flow ODE as dy/dtau with y = x / c.

    Variance preserving: y = x / alpha over tau = sigma / alpha (Karras et al. 2022), slope eps.
    Rectified flow: x itself over sigma, slope the velocity eps - x0 (the frame its Euler sampler uses).
    """
    alpha, sigma = level
    return (1.0, sigma) if plan.flow else (alpha, sigma / alpha)


def _slope(plan: SamplingPlan, x0, eps):
    return eps - x0 if plan.flow else eps


def euler(model, x, plan: SamplingPlan):
    """Euler's method on the probability-flow ODE in the plan's frame (see `_frame`).

    Like diffusers' EulerDiscreteScheduler it returns the final y, which is x itself when the plan
    ends on a clean sample; on a flow it is FlowMatchEulerDiscreteScheduler's x + (sigma' - sigma) v.
    """
    x = plan.start(x)
    for i in range(plan.steps):
        x0, eps = model(x, i)
        (c, tau), (c_next, tau_next) = _frame(plan, plan.level(i)), _frame(plan, plan.end(i))
        x = c_next * (x / c + (tau_next - tau) * _slope(plan, x0, eps))
    return x / _frame(plan, plan.end(plan.steps - 1))[0]


def heun(model, x, plan: SamplingPlan):
    """Heun's method (Karras et al. 2022, Alg. 1) in the plan's frame: an Euler step, the slope where it
    lands, then the step again with the mean of both slopes. The step onto sigma = 0 stays Euler, so K
    steps take 2K - 1 evaluations (diffusers' HeunDiscreteScheduler and FlowMatchHeunDiscreteScheduler)."""
    if plan.ends is not None or plan.sigma[-1] != 0:
        raise UserError("solver 'heun' needs a plan that ends on a clean sample (final level 'zero') and lands on its own levels")
    x = plan.start(x)
    for i in range(plan.steps):
        x0, eps = model(x, i)
        (c, tau), (c_next, tau_next) = _frame(plan, plan.level(i)), _frame(plan, plan.end(i))
        slope = _slope(plan, x0, eps)
        x_euler = c_next * (x / c + (tau_next - tau) * slope)
        if i == plan.steps - 1:
            x = x_euler
            continue
        slope_end = _slope(plan, *model(x_euler, i + 1))
        x = c_next * (x / c + (tau_next - tau) * 0.5 * (slope + slope_end))
    return x / _frame(plan, plan.end(plan.steps - 1))[0]


def ddpm(model, x, plan: SamplingPlan, noise: Callable):
    """Ancestral sampling with the posterior variance (Ho et al. 2020; diffusers' 'fixed_small')."""
    x = plan.start(x)
    for i in range(plan.steps):
        x0, _ = model(x, i)
        ab, ab_prev = plan.level(i)[0] ** 2, plan.end(i)[0] ** 2
        beta = 1 - ab / ab_prev
        mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x
        variance = max((1 - ab_prev) / (1 - ab) * beta, 1e-20)
        x = mean + math.sqrt(variance) * noise(i) if plan.end(i)[1] > 0 else mean
    return x


def _dpmpp_multistep(model, x, plan: SamplingPlan, order: int, lower_order_final: bool, solver_type: str):
    """DPM-Solver++ multistep: exponential integrator in lambda on x0, with finite differences of past x0s."""
    _require_steps(plan, order, f"dpmpp-{order}m")
    _choose_option(f"dpmpp-{order}m", "solver_type", solver_type, ("midpoint", "heun"))
    x = plan.start(x)
    x0s, lams = [], []
    for i in range(plan.steps):
        x0, _ = model(x, i)
        x0s.append(x0)
        lams.append(plan.lam(i))
        (_, s_s), (a_t, s_t) = plan.level(i), plan.end(i)
        h = _lam(a_t, s_t) - lams[-1]
        if h == 0:  # Karras spacing ending at sigma_min repeats its last level
            continue
        p = _step_order(plan, i, order, lower_order_final)
        e = math.expm1(-h)
        x = (s_t / s_s) * x - (a_t * e) * x0
        if p >= 2:
            r0 = (lams[-1] - lams[-2]) / h
            d1 = (x0 - x0s[-2]) / r0
            if p == 2 and solver_type == "midpoint":
                x = x - (0.5 * a_t * e) * d1
            elif p == 2:
                x = x + (a_t * (e / h + 1)) * d1
            else:
                r1 = (lams[-2] - lams[-3]) / h
                d2 = (d1 - (x0s[-2] - x0s[-3]) / r1) / (r0 + r1)
                d1 = d1 + r0 * d2
                x = x + (a_t * (e / h + 1)) * d1 - (a_t * ((e + h) / h**2 - 0.5)) * d2
    return x


def dpmpp_2m(model, x, plan: SamplingPlan, lower_order_final: bool = True, solver_type: str = "midpoint"):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095): second-order multistep on x0 predictions."""
    return _dpmpp_multistep(model, x, plan, 2, lower_order_final, solver_type)


def dpmpp_3m(model, x, plan: SamplingPlan, lower_order_final: bool = True):
    """DPM-Solver++(3M) (Lu et al. 2022, arXiv:2211.01095): third-order multistep on x0 predictions."""
    return _dpmpp_multistep(model, x, plan, 3, lower_order_final, "midpoint")


def dpmpp_2s(model, x, plan: SamplingPlan, lower_order_final: bool = True, solver_type: str = "midpoint"):
    """DPM-Solver++(2S) (Lu et al. 2022, arXiv:2211.01095): singlestep second order over pairs of levels.

    A pair starts with a first-order step to its middle level; the model output there and the one
    at the pair's start then give one second-order step from the start over the whole pair. An odd
    step count (or `lower_order_final`, or ending at sigma = 0) ends with first-order steps, as in
    diffusers' DPMSolverSinglestepScheduler.
    """
    _require_steps(plan, 2, "dpmpp-2s")
    _choose_option("dpmpp-2s", "solver_type", solver_type, ("midpoint", "heun"))
    K = plan.steps
    pairs = K // 2 if (K % 2 or not lower_order_final) else K // 2 - 1
    orders = [1, 2] * pairs + [1] * (K - 2 * pairs)
    if plan.end(K - 1)[1] == 0:
        orders[-1] = 1
    x = plan.start(x)
    for i in range(K):
        x0, _ = model(x, i)
        a_t, s_t = plan.end(i)
        if orders[i] == 1:
            x_start, x0_start, start = x, x0, i
            h = _lam(a_t, s_t) - plan.lam(i)
            x = (s_t / plan.level(i)[1]) * x - (a_t * math.expm1(-h)) * x0
            continue
        h = _lam(a_t, s_t) - plan.lam(start)
        r = (plan.lam(i) - plan.lam(start)) / h
        e = math.expm1(-h)
        d1 = (x0 - x0_start) / r
        x = (s_t / plan.level(start)[1]) * x_start - (a_t * e) * x0_start
        x = x - (0.5 * a_t * e) * d1 if solver_type == "midpoint" else x + (a_t * (e / h + 1)) * d1
    return x


def _unipc_update(x, start, target, x0s, lams, order: int, variant: str, new=None):
    """One UniP step (new is None) or UniC step (new: the x0 predicted at target) of the given order.

    x at level `start` moves to `target` along the exponential integrator in lambda on x0; the
    correction is B(h) times a combination of divided differences of x0 whose weights solve the
    order conditions (Zhao et al. 2023, Alg. 2 and 3). x0s/lams end with the output at `start`.
    """
    (_, s_s), (a_t, s_t) = start, target
    h = _lam(a_t, s_t) - lams[-1]
    if h == 0:
        return x
    z = -h
    m0 = x0s[-1]
    x_next = (s_t / s_s) * x - (a_t * math.expm1(z)) * m0
    rs = [(lams[-1 - k] - lams[-1]) / h for k in range(1, order)]
    ds = [(x0s[-1 - k] - m0) / r for k, r in zip(range(1, order), rs)]
    if new is not None:
        rs.append(1.0)
        ds.append(new - m0)
    if not ds:
        return x_next
    B = z if variant == "bh1" else math.expm1(z)
    if len(ds) == 1:
        rho = [0.5]  # the paper's choice for one unknown: the h -> 0 limit of the order condition
    else:
        phis = _phis(z, len(ds) + 1)
        R = np.array([[r**k for r in rs] for k in range(len(ds))])
        b = np.array([math.factorial(k + 1) * z * phis[k + 1] / B for k in range(len(ds))])
        rho = np.linalg.solve(R, b)
    return x_next - (a_t * B) * _lincomb(rho, ds)


def _unipc(model, x, plan: SamplingPlan, variant: str, order: int, lower_order_final: bool, disable_corrector):
    """UniPC: each new model output first corrects the step that led to it (no extra evaluation),
    then drives the next predictor step; no correction follows the final step."""
    name = f"unipc-{variant}"
    _choose_option(name, "order", order, (1, 2, 3))
    _require_steps(plan, order, name)
    x = plan.start(x)
    x0s, lams = [], []
    x_prev, p = x, 1  # the previous step's start and order: the corrector reads them from step 1 on
    for i in range(plan.steps):
        x0, _ = model(x, i)
        if i > 0 and i - 1 not in disable_corrector:
            x = _unipc_update(x_prev, plan.level(i - 1), plan.end(i - 1), x0s, lams, p, variant, new=x0)
        x0s.append(x0)
        lams.append(plan.lam(i))
        p = _step_order(plan, i, order, lower_order_final, below=math.inf)
        x_prev = x
        x = _unipc_update(x, plan.level(i), plan.end(i), x0s, lams, p, variant)
    return x


def unipc_bh1(model, x, plan: SamplingPlan, order: int = 2, lower_order_final: bool = True, disable_corrector=()):
    """UniPC with B(h) = h (Zhao et al. 2023, arXiv:2302.04867); suggested below 10 unconditional steps."""
    return _unipc(model, x, plan, "bh1", order, lower_order_final, disable_corrector)


def unipc_bh2(model, x, plan: SamplingPlan, order: int = 2, lower_order_final: bool = True, disable_corrector=()):
    """UniPC with B(h) = e^h - 1 (Zhao et al. 2023, arXiv:2302.04867); diffusers' default."""
    return _unipc(model, x, plan, "bh2", order, lower_order_final, disable_corrector)


def _deis(model, x, plan: SamplingPlan, order: int, lower_order_final: bool):
    """DEIS, log-rho multistep: x/alpha moves by the integral of eps over rho = sigma/alpha, with eps
    interpolated by a polynomial in log(rho) through the last `order` outputs."""
    _require_steps(plan, order, f"deis-{order}")
    x = plan.start(x)
    epss, rhos = [], []
    for i in range(plan.steps):
        _, eps = model(x, i)
        (a_s, s_s), (a_t, s_t) = plan.level(i), plan.end(i)
        epss.append(eps)
        rhos.append(s_s / a_s)
        p = _step_order(plan, i, order, lower_order_final)
        weights = _lagrange_log_integrals(rhos[::-1][:p], rhos[-1], s_t / a_t)
        x = a_t * (x / a_s + _lincomb(weights, epss[::-1][:p]))
    return x


def deis_2(model, x, plan: SamplingPlan, lower_order_final: bool = True):
    """DEIS, second order (Zhang & Chen 2023, arXiv:2204.13902; diffusers' 'logrho' multistep)."""
    return _deis(model, x, plan, 2, lower_order_final)


def deis_3(model, x, plan: SamplingPlan, lower_order_final: bool = True):
    """DEIS, third order (Zhang & Chen 2023, arXiv:2204.13902; diffusers' 'logrho' multistep)."""
    return _deis(model, x, plan, 3, lower_order_final)


# Adams-Bashforth weights, newest output first.
_ADAMS_BASHFORTH = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def pndm(model, x, plan: SamplingPlan, combine: str = "eps"):
    """PLMS, the pseudo linear multistep half of PNDM (Liu et al. 2022, arXiv:2202.09778).

    Each step is a DDIM transfer driven by an Adams-Bashforth combination of up to four past
    outputs. The first step is repeated with the mean of its own output and one taken at the next
    level, a second-order start that costs one extra evaluation (diffusers' PNDMScheduler with
    skip_prk_steps, whose timestep list holds that level twice). combine='output' combines the
    raw v-predictions and converts them at the current level, as PNDMScheduler does for
    v-prediction models; 'eps' combines noise predictions (the same for epsilon models).
    """
    _choose_option("pndm", "combine", combine, ("eps", "output"))

    def output(x, i):
        x0, eps = model(x, i)
        if combine == "eps":
            return eps
        a, s = plan.level(i)
        return a * eps - s * x0

    def transfer(x, i, out):
        a, s = plan.level(i)
        eps = out if combine == "eps" else a * out + s * x
        a_t, s_t = plan.end(i)
        return (a_t / a) * x + (s_t - a_t * s / a) * eps

    x = plan.start(x)
    outs = []
    for i in range(plan.steps):
        outs.append(output(x, i))
        if i == 0 and plan.steps > 1:
            ahead = output(transfer(x, 0, outs[0]), 1)
            x = transfer(x, 0, 0.5 * (outs[0] + ahead))
            continue
        weights = _ADAMS_BASHFORTH[min(len(outs), 4)]
        x = transfer(x, i, _lincomb(weights, outs[::-1]))
    return x


@dataclass(frozen=True)
class SolverSpec:
    fn: Callable
    stochastic: bool = False
    order: int = 1  # the order of its formula: it needs at least this many steps
    summary: str = ""
    options: dict = field(default_factory=dict)  # option name -> what it does
    evaluations: str = "K"  # network evaluations for K steps

    def option_names(self) -> list[str]:
        skip = {"model", "x", "plan", "noise"}
        return [p for p in inspect.signature(self.fn).parameters if p not in skip]


_LOWER = {"lower_order_final": "lower the order on the last steps (diffusers' rule; default true)"}
_MIDPOINT = {"solver_type": "'midpoint' (default) or 'heun' second-order term"}
_UNIPC = {
    "order": "1, 2 (default) or 3",
    **_LOWER,
    "disable_corrector": "step indices whose result is not corrected",
}

SOLVERS: dict[str, SolverSpec] = {
    "ddim": SolverSpec(ddim, summary="DDIM, deterministic (eta=0)"),
    "euler": SolverSpec(euler, summary="Euler on the probability-flow ODE (on flows: FlowMatchEuler)"),
    "heun": SolverSpec(heun, summary="Heun, second order (on flows: FlowMatchHeun)", evaluations="2K - 1"),
    "ddpm": SolverSpec(ddpm, stochastic=True, summary="DDPM ancestral sampling (stochastic, host loop only)"),
    "dpmpp-2m": SolverSpec(dpmpp_2m, order=2, summary="DPM-Solver++(2M), multistep", options={**_LOWER, **_MIDPOINT}),
    "dpmpp-3m": SolverSpec(dpmpp_3m, order=3, summary="DPM-Solver++(3M), multistep", options=dict(_LOWER)),
    "dpmpp-2s": SolverSpec(dpmpp_2s, order=2, summary="DPM-Solver++(2S), singlestep over pairs of steps", options={**_LOWER, **_MIDPOINT}),
    "unipc-bh1": SolverSpec(unipc_bh1, order=2, summary="UniPC predictor-corrector, B(h)=h", options=_UNIPC),
    "unipc-bh2": SolverSpec(unipc_bh2, order=2, summary="UniPC predictor-corrector, B(h)=e^h-1", options=_UNIPC),
    "deis-2": SolverSpec(deis_2, order=2, summary="DEIS log-rho multistep, 2nd order", options=dict(_LOWER)),
    "deis-3": SolverSpec(deis_3, order=3, summary="DEIS log-rho multistep, 3rd order", options=dict(_LOWER)),
    "pndm": SolverSpec(
        pndm,
        summary="PLMS (PNDM without Runge-Kutta warm-up)",
        options={"combine": "'eps' (default) or 'output' (diffusers' v-prediction behaviour)"},
        evaluations="K + 1 (K > 1)",
    ),
}


def get_solver(name: str) -> SolverSpec:
    if name not in SOLVERS:
        raise unknown_choice("solver", name, SOLVERS)
    return SOLVERS[name]


def check_solver(name: str, steps: int, options: dict | None = None) -> SolverSpec:
    """Validates a solver choice before anything runs: known name and options, enough steps for its order."""
    spec = get_solver(name)
    options = options or {}
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    known = spec.option_names()
    for key in options:
        if key not in known:
            accepted = ", ".join(known) if known else "none"
            raise UserError(f"solver {name!r} has no option {key!r}{did_you_mean(key, known)} (options: {accepted})")
    order = options.get("order", spec.order)
    if order not in (1, 2, 3):
        raise UserError(f"solver {name!r}: order must be 1, 2 or 3, got {order!r}")
    if steps < order:
        raise UserError(f"solver {name!r} of order {order} needs at least {order} steps, got {steps}")
    return spec


@dataclass(frozen=True)
class SolverConfig:
    """The recipe's `solver` section: which solver, how many steps, which timesteps.

    `options` are the solver function's keyword arguments (e.g. order, lower_order_final,
    solver_type); the remaining fields shape the plan (see `build_plan`).
    """

    name: str = "ddim"
    steps: int = 100
    spacing: str = "trailing"
    guidance_scale: float | None = None
    options: dict = field(default_factory=dict)  # solver-specific keyword arguments
    final: str = "zero"  # 'zero' (clean sample) or 'sigma_min' (the schedule's first level)
    convention: str = "multistep"  # timestep rules: 'multistep', 'ddim' (DDIM/PNDM) or 'euler'
    steps_offset: int = 0  # added to 'leading' timesteps
    timestep_rounding: str | None = None  # off-grid network timesteps: 'round', 'floor' or 'none'; None: VP rounds, flows keep floats
    lambda_min_clipped: float | None = None  # multistep spacings skip timesteps with lambda below this
    timesteps: tuple[int, ...] | None = None  # explicit (e.g. searched) timesteps; they set `steps`

    def __post_init__(self):
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
            object.__setattr__(self, "steps", len(self.timesteps))

    def validate(self) -> SolverSpec:
        if self.timesteps is not None:
            t = self.timesteps
            if not all(a > b for a, b in zip(t, t[1:])) or (t and t[-1] < 0):
                raise UserError(f"timesteps must be distinct, descending and non-negative, got {list(t)}")
        spec = check_solver(self.name, self.steps, self.options)
        _choose("timestep spacing", self.spacing, SPACINGS + tuple(s for s in FLOW_SPACINGS if s not in SPACINGS))
        _choose("timestep convention", self.convention, CONVENTIONS)
        _choose("final level", self.final, FINALS)
        if self.timestep_rounding is not None:
            _choose("timestep rounding", self.timestep_rounding, ROUNDINGS)
        return spec

    def plan(self, schedule: Schedule) -> SamplingPlan:
        self.validate()
        if self.timesteps is not None:
            if self.timesteps[0] >= schedule.num_train_timesteps:
                raise UserError(f"timestep {self.timesteps[0]} is beyond the model's {schedule.num_train_timesteps} training timesteps")
            return make_plan(schedule, self.timesteps, self.final)
        return build_plan(
            schedule,
            self.steps,
            self.spacing,
            convention=self.convention,
            final=self.final,
            steps_offset=self.steps_offset,
            timestep_rounding=self.timestep_rounding,
            lambda_min_clipped=self.lambda_min_clipped,
        )

    def table(self, schedule: Schedule, prediction_type: str) -> "SolverTable":
        """The coefficient table of this solver on this schedule."""
        return compile_solver(self.name, self.plan(schedule), prediction_type, **self.options)


# ----------------------------------------------------------------------------- coefficient tables


class Linear:
    """A linear combination of basis vectors, indexed as the basis of `SolverTable`."""

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
    """The solver as a straight-line program over tensors, in the order the host loop computes.

    Values start as [noise]. Row r appends weights[r] . values; where calls[r], the network is then
    evaluated on that value at the next of `timesteps` and its output is appended as well. The last
    row is the sample. Model predictions (x0, eps) are values of their own, as in the host loop, so
    no row re-expands an old prediction into large weights that cancel in float32.
    """

    timesteps: np.ndarray  # [E]
    weights: np.ndarray  # [R, V] float64; row r uses only values made before it
    calls: np.ndarray  # [R] bool, E of them true

    @property
    def evaluations(self) -> int:
        return len(self.timesteps)


def compile_solver(name: str, plan: SamplingPlan, prediction_type: str, **options) -> SolverTable:
    """Run the solver once on symbols to get its coefficient table."""
    spec = get_solver(name)
    if spec.stochastic:
        raise UserError(f"solver {name!r} is stochastic and cannot be baked into a graph; use a deterministic one such as 'ddim'")
    rows: list[tuple[dict[int, float], bool, int]] = []  # (combination, is a network input, its value index)
    timesteps: list[float] = []
    count = 1  # values so far: the noise

    def new_value(combination: Linear, call: bool) -> int:
        nonlocal count
        rows.append((dict(combination.coef), call, count))
        count += 2 if call else 1
        return count - (2 if call else 1)

    def network(x: Linear, t: float) -> Linear:
        index = new_value(x, call=True)
        x.coef = {index: 1.0}  # the input is a tensor at run time: later uses of x refer to it
        timesteps.append(t)
        return Linear({index + 1: 1.0})

    def materialize(v: Linear) -> Linear:
        return v if list(v.coef.values()) == [1.0] else Linear({new_value(v, call=False): 1.0})

    class Recording(Predictor):
        def at(self, x, t, alpha, sigma):
            x0, eps = super().at(x, t, alpha, sigma)
            return materialize(x0), materialize(eps)

    final = spec.fn(Recording(network, plan, prediction_type), Linear({0: 1.0}), plan, **options)
    return _program(rows, final, timesteps)


def _program(rows, final: Linear, timesteps) -> SolverTable:
    """Drops predictions the solver never used and numbers the remaining values densely."""
    used, kept = set(final.coef), []
    for combination, call, index in reversed(rows):
        if call or index in used:
            kept.append((combination, call, index))
            used |= combination.keys()
    number = {0: 0}
    for _, call, index in reversed(kept):
        number[index] = len(number)
        if call:
            number[index + 1] = len(number)
    combinations = [c for c, _, _ in reversed(kept)] + [final.coef]
    weights = np.zeros((len(combinations), len(number)))
    for r, combination in enumerate(combinations):
        for k, w in combination.items():
            weights[r, number[k]] = w
    calls = np.array([call for _, call, _ in reversed(kept)] + [False])
    return SolverTable(np.array(timesteps, dtype=np.float64), weights, calls)


def run_table(table: SolverTable, network: Callable, noise):
    """Apply a coefficient table in the tensors' own precision; ``network(x, t)`` returns the raw output."""
    values = [noise]
    timesteps = iter(table.timesteps)
    for row, call in zip(table.weights[:-1], table.calls):
        values.append(combine_values(row, values))
        if call:
            values.append(network(values[-1], float(next(timesteps))))
    return combine_values(table.weights[-1], values)


def combine_values(weights: np.ndarray, values: list):
    """sum(w * v) with the largest weight factored out, the way the host loop computes
    x0 = (x - sigma * out) / alpha: the terms cancel before the large scale multiplies them."""
    terms = [(float(w), v) for w, v in zip(weights, values) if w != 0.0]
    top = max(range(len(terms)), key=lambda k: abs(terms[k][0]))
    scale = terms[top][0]
    out = terms[top][1]
    for k, (w, v) in enumerate(terms):
        if k != top:
            out = out + (w / scale) * v
    return out if scale == 1.0 else scale * out
