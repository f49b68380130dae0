"""Flow solvers against diffusers: FlowMatchEuler, FlowMatchHeun, and DPM-Solver++ / UniPC with flow
sigmas, each read from its scheduler config and run from the same noise on the same network; our host
loop and our baked coefficient table match diffusers' loop to 1e-4.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler
from torch import nn

from compress.denoiser import Denoiser
from compress.errors import UserError
from compress.sampling import sample
from compress.schedule import FlowSchedule, dynamic_shift, schedule_from_scheduler_config
from compress.scheduler_config import solver_from_scheduler_config
from compress.solvers import SolverConfig, compile_solver, run_table
from tests.test_solvers import SHAPE, TOL, noise_for, tiny_unet

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


class FlowTrainedLike(nn.Module):
    """The exact velocity for data ~ N(0, 0.5^2) plus a random UNet's x- and t-dependent part."""

    def __init__(self, net: nn.Module, num_train_timesteps: int = 1000, std: float = 0.5):
        super().__init__()
        self.net, self.var, self.T = net, std**2, num_train_timesteps

    def forward(self, x, t, cond=None):
        s = float(t) / self.T
        a = 1 - s
        denominator = a * a * self.var + s * s
        x0, eps = (a * self.var / denominator) * x, (s / denominator) * x
        return eps - x0 + 0.1 * self.net(x, t, cond)


@pytest.fixture(scope="module")
def network():
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    return FlowTrainedLike(tiny_unet())


@torch.no_grad()
def diffusers_flow_loop(scheduler, model, noise, steps, **set_timesteps):
    scheduler.set_timesteps(steps, **set_timesteps)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    return x


def config_of(scheduler) -> dict:
    return {"_class_name": type(scheduler).__name__, **dict(scheduler.config)}


SD3 = dict(shift=3.0)
FLOW_DPM = dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
CASES = {
    "euler-sd3": (FlowMatchEulerDiscreteScheduler, SD3),
    "euler-unshifted": (FlowMatchEulerDiscreteScheduler, {}),
    "heun-sd3": (FlowMatchHeunDiscreteScheduler, SD3),
    "dpmpp-2m-flow": (DPMSolverMultistepScheduler, FLOW_DPM),
    "dpmpp-2m-flow-heun": (DPMSolverMultistepScheduler, dict(solver_type="heun", lower_order_final=False, **FLOW_DPM)),
    "unipc-flow": (UniPCMultistepScheduler, FLOW_DPM),
    "unipc-flow-3": (UniPCMultistepScheduler, dict(solver_order=3, **FLOW_DPM)),
}


def ours(denoiser, solver, noise):
    host = sample(denoiser, solver, noise, device="cpu", show_progress=False)
    table = compile_solver(solver.name, solver.plan(denoiser.schedule), "flow", **solver.options)
    baked = run_table(table, denoiser.module, noise)
    return host, baked


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_flow_scheduler_reproduced(case, steps, network):
    cls, kwargs = CASES[case]
    scheduler = cls(**kwargs)
    config = config_of(scheduler)
    schedule = schedule_from_scheduler_config(config)
    assert isinstance(schedule, FlowSchedule)
    denoiser = Denoiser(network, schedule, "flow", SHAPE, scheduler_config=config)
    solver = solver_from_scheduler_config(config, steps)
    noise = noise_for(steps)
    reference = diffusers_flow_loop(cls(**kwargs), network, noise, steps)
    host, baked = ours(denoiser, solver, noise)
    assert torch.isfinite(reference).all()
    assert (host - reference).abs().max() < TOL, (case, steps, float((host - reference).abs().max()))
    assert (baked - reference).abs().max() < TOL, (case, steps, float((baked - reference).abs().max()))


@pytest.mark.parametrize("tokens", [256, 1024, 4096])
def test_dynamic_shift_follows_the_image_token_count(tokens, network):
    """FLUX-style: use_dynamic_shifting, mu from the image's token count, the pipeline's own sigmas 1 .. 1/K."""
    kwargs = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    config = config_of(FlowMatchEulerDiscreteScheduler(**kwargs))
    schedule = schedule_from_scheduler_config(config).at_sequence_length(tokens)
    mu = float(np.log(dynamic_shift(tokens)))
    denoiser = Denoiser(network, schedule, "flow", SHAPE, scheduler_config=config)
    steps, noise = 4, noise_for(tokens)
    for spacing, extra in (("linspace", {}), ("trailing", {"sigmas": np.linspace(1.0, 1 / steps, steps)})):
        reference = diffusers_flow_loop(FlowMatchEulerDiscreteScheduler(**kwargs), network, noise, None if extra else steps, mu=mu, **extra)
        host, baked = ours(denoiser, SolverConfig("euler", steps, spacing), noise)
        assert (host - reference).abs().max() < TOL, spacing
        assert (baked - reference).abs().max() < TOL, spacing


def test_flow_plan_refuses_variance_preserving_settings():
    schedule = FlowSchedule(shift=3.0)
    for config, needle in (
        (SolverConfig("dpmpp-2m", 4, "leading"), "'leading' is for variance-preserving"),
        (SolverConfig("dpmpp-2m", 4, "karras"), "'karras' is for variance-preserving"),
        (SolverConfig("dpmpp-2m", 4, "trailing", final="sigma_min"), "final level"),
        (SolverConfig("euler", 4, "trailing", convention="euler"), "timestep convention"),
    ):
        with pytest.raises(UserError, match=needle):
            config.plan(schedule)
    with pytest.raises(UserError, match="for flow-matching models"):
        SolverConfig("ddim", 4, "unipc").plan(schedule_from_scheduler_config({"_class_name": "DDIMScheduler"}))


@pytest.mark.parametrize("config, needle", [
    (dict(_class_name="FlowMatchEulerDiscreteScheduler", invert_sigmas=True), "invert_sigmas"),
    (dict(_class_name="FlowMatchEulerDiscreteScheduler", stochastic_sampling=True), "stochastic_sampling"),
    (dict(_class_name="FlowMatchEulerDiscreteScheduler", use_dynamic_shifting=True, time_shift_type="linear"), "time_shift_type"),
    (dict(_class_name="DPMSolverMultistepScheduler", use_flow_sigmas=True, prediction_type="epsilon"), "flow_prediction"),
    (dict(_class_name="DEISMultistepScheduler", use_flow_sigmas=True, prediction_type="flow_prediction"), "use_flow_sigmas"),
])
def test_unsupported_flow_scheduler_settings_are_named(config, needle):
    with pytest.raises(UserError, match=needle):
        solver_from_scheduler_config(config, 4)
