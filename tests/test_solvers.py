"""Solvers against diffusers: our host loop and our baked coefficient table reproduce each
diffusers scheduler's own loop on the same tiny random UNet, from the same noise, to 1e-4.

The network is a random tiny UNet kept in a trained model's output range (see `TrainedLike`),
so that x0 = (x - sigma * eps) / alpha stays O(1) at high noise and 1e-4 is a real tolerance.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
    UNet2DModel,
    UniPCMultistepScheduler,
)
from torch import nn

from compress.denoiser import ClassTokenUNet, Denoiser, DiffusersUNet, guided
from compress.errors import UserError
from compress.sampling import sample
from compress.schedule import FlowSchedule, NoiseSchedule
from compress.scheduler_config import solver_from_scheduler_config
from compress.solvers import SOLVERS, SolverConfig, compile_solver, get_solver, run_table

TOL = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
SHAPE = (1, 8, 8)
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
COSINE = dict(beta_schedule="squaredcos_cap_v2")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models run fastest on one thread, and the machine is shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    yield
    torch.set_num_threads(threads)


class TrainedLike(nn.Module):
    """A random network answering in a trained model's range.

    The exact denoiser for data ~ N(0, 0.5^2) gives the bulk of the prediction and the random
    UNet adds an x- and t-dependent part scaled by alpha, so the x0 it implies stays O(1).
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction_type: str, std: float = 0.5):
        super().__init__()
        self.net, self.prediction_type, self.var = net, prediction_type, std**2
        self.acp = schedule.alphas_cumprod

    def forward(self, x, t, cond=None):
        acp = float(np.interp(float(t), np.arange(len(self.acp)), self.acp))
        a, s = acp**0.5, (1 - acp) ** 0.5
        x0 = (a * self.var / (a * a * self.var + s * s)) * x
        eps = (s / (a * a * self.var + s * s)) * x
        exact = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[self.prediction_type]
        return exact + (0.1 * a) * self.net(x, t, cond)


def tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    return DiffusersUNet(unet).eval()


def tiny_class_unet(num_classes: int) -> nn.Module:
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=4,
    )
    return ClassTokenUNet(unet, num_classes).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def class_unet():
    return tiny_class_unet(3)


def noise_for(seed: int = 0) -> torch.Tensor:
    return torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def diffusers_loop(scheduler, model, noise, steps, cond=None, null=None, guidance_scale=None):
    """The loop a diffusers pipeline runs, with classifier-free guidance done by hand."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        if guidance_scale is None:
            out = model(x_in, t, cond)
        else:
            uncond, conditional = model(torch.cat([x_in, x_in]), t, torch.cat([null, cond])).chunk(2)
            out = uncond + guidance_scale * (conditional - uncond)
        x = scheduler.step(out, t, x).prev_sample
    return x


@torch.no_grad()
def ours(denoiser: Denoiser, solver: SolverConfig, noise, cond=None):
    """(host loop through compress.sampling, baked table applied by run_table)."""
    host = sample(denoiser, solver, noise, cond=cond, device="cpu", show_progress=False)
    null = denoiser.null_condition(noise.shape[0]) if cond is not None else None
    table = compile_solver(solver.name, solver.plan(denoiser.schedule), denoiser.prediction_type, **solver.options)
    baked = run_table(table, lambda x, t: guided(denoiser.module, x, t, cond, null, solver.guidance_scale), noise)
    return host, baked


def make_denoiser(scheduler, net, prediction_type, **kw) -> Denoiser:
    schedule = NoiseSchedule.from_scheduler_config(dict(scheduler.config))
    module = TrainedLike(net, schedule, prediction_type)
    return Denoiser(module, schedule, prediction_type, SHAPE, scheduler_config=dict(scheduler.config), **kw)


def config_of(scheduler) -> dict:
    return {"_class_name": type(scheduler).__name__, **dict(scheduler.config)}


# Each case: a diffusers scheduler and the SolverConfig meant to reproduce it (given the steps).
CASES = {
    "ddim": (DDIMScheduler, dict(clip_sample=False), lambda K: SolverConfig("ddim", K, "leading", convention="ddim")),
    "ddim-sd": (
        DDIMScheduler,
        dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **SD_BETAS),
        lambda K: SolverConfig("ddim", K, "leading", convention="ddim", steps_offset=1, final="sigma_min"),
    ),
    "ddim-linspace": (
        DDIMScheduler,
        dict(clip_sample=False, timestep_spacing="linspace"),
        lambda K: SolverConfig("ddim", K, "linspace", convention="ddim"),
    ),
    "ddim-trailing": (
        DDIMScheduler,
        dict(clip_sample=False, timestep_spacing="trailing"),
        lambda K: SolverConfig("ddim", K, "trailing", convention="ddim"),
    ),
    "dpmpp-2m": (DPMSolverMultistepScheduler, {}, lambda K: SolverConfig("dpmpp-2m", K, "linspace")),
    "dpmpp-3m": (DPMSolverMultistepScheduler, dict(solver_order=3), lambda K: SolverConfig("dpmpp-3m", K, "linspace")),
    "dpmpp-2m-heun": (
        DPMSolverMultistepScheduler,
        dict(solver_type="heun", final_sigmas_type="sigma_min", timestep_spacing="trailing", lower_order_final=False),
        lambda K: SolverConfig("dpmpp-2m", K, "trailing", final="sigma_min", options=dict(solver_type="heun", lower_order_final=False)),
    ),
    "dpmpp-3m-leading": (
        DPMSolverMultistepScheduler,
        dict(solver_order=3, timestep_spacing="leading", steps_offset=1, **SD_BETAS),
        lambda K: SolverConfig("dpmpp-3m", K, "leading", steps_offset=1),
    ),
    "dpmpp-2s": (DPMSolverSinglestepScheduler, {}, lambda K: SolverConfig("dpmpp-2s", K, "linspace", options=dict(lower_order_final=False))),
    "dpmpp-2s-sigma_min": (
        DPMSolverSinglestepScheduler,
        dict(final_sigmas_type="sigma_min"),
        lambda K: SolverConfig("dpmpp-2s", K, "linspace", final="sigma_min", options=dict(lower_order_final=False)),
    ),
    "unipc-bh2": (UniPCMultistepScheduler, {}, lambda K: SolverConfig("unipc-bh2", K, "linspace")),
    "unipc-bh2-3": (UniPCMultistepScheduler, dict(solver_order=3), lambda K: SolverConfig("unipc-bh2", K, "linspace", options=dict(order=3))),
    # diffusers' bh1 returns NaN on a last step onto sigma = 0, so it is compared ending at sigma_min.
    "unipc-bh1": (
        UniPCMultistepScheduler,
        dict(solver_type="bh1", final_sigmas_type="sigma_min"),
        lambda K: SolverConfig("unipc-bh1", K, "linspace", final="sigma_min"),
    ),
    "unipc-bh1-3": (
        UniPCMultistepScheduler,
        dict(solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min", timestep_spacing="trailing"),
        lambda K: SolverConfig("unipc-bh1", K, "trailing", final="sigma_min", options=dict(order=3)),
    ),
    "deis-2": (DEISMultistepScheduler, {}, lambda K: SolverConfig("deis-2", K, "linspace", final="sigma_min")),
    "deis-3": (DEISMultistepScheduler, dict(solver_order=3), lambda K: SolverConfig("deis-3", K, "linspace", final="sigma_min")),
    "pndm": (
        PNDMScheduler,
        dict(skip_prk_steps=True),
        lambda K: SolverConfig("pndm", K, "leading", convention="ddim", final="sigma_min"),
    ),
    "pndm-sd": (
        PNDMScheduler,
        dict(skip_prk_steps=True, steps_offset=1, **SD_BETAS),
        lambda K: SolverConfig("pndm", K, "leading", convention="ddim", final="sigma_min", steps_offset=1),
    ),
    "euler": (EulerDiscreteScheduler, {}, lambda K: SolverConfig("euler", K, "linspace", convention="euler")),
    "euler-leading": (
        EulerDiscreteScheduler,
        dict(timestep_spacing="leading", steps_offset=1, **SD_BETAS),
        lambda K: SolverConfig("euler", K, "leading", convention="euler", steps_offset=1),
    ),
    "euler-trailing": (
        EulerDiscreteScheduler,
        dict(timestep_spacing="trailing", final_sigmas_type="sigma_min"),
        lambda K: SolverConfig("euler", K, "trailing", convention="euler", final="sigma_min"),
    ),
    "heun": (HeunDiscreteScheduler, {}, lambda K: SolverConfig("heun", K, "linspace", convention="euler")),
    "heun-leading": (
        HeunDiscreteScheduler,
        dict(timestep_spacing="leading", steps_offset=1, **SD_BETAS),
        lambda K: SolverConfig("heun", K, "leading", convention="euler", steps_offset=1),
    ),
    # Karras and log-SNR spacings: levels off the integer grid.
    "dpmpp-2m-karras": (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True), lambda K: SolverConfig("dpmpp-2m", K, "karras")),
    "dpmpp-3m-karras": (
        DPMSolverMultistepScheduler,
        dict(use_karras_sigmas=True, solver_order=3, **SD_BETAS),
        lambda K: SolverConfig("dpmpp-3m", K, "karras"),
    ),
    "dpmpp-2m-logsnr": (DPMSolverMultistepScheduler, dict(use_lu_lambdas=True), lambda K: SolverConfig("dpmpp-2m", K, "logsnr")),
    "dpmpp-2s-karras": (
        DPMSolverSinglestepScheduler,
        dict(use_karras_sigmas=True),
        lambda K: SolverConfig("dpmpp-2s", K, "karras", options=dict(lower_order_final=False)),
    ),
    "unipc-bh2-karras": (UniPCMultistepScheduler, dict(use_karras_sigmas=True), lambda K: SolverConfig("unipc-bh2", K, "karras")),
    "deis-2-karras": (DEISMultistepScheduler, dict(use_karras_sigmas=True), lambda K: SolverConfig("deis-2", K, "karras", final="sigma_min")),
    "euler-karras": (EulerDiscreteScheduler, dict(use_karras_sigmas=True), lambda K: SolverConfig("euler", K, "karras", convention="euler")),
    # The cosine schedule. Started at t = 999 its alpha is 7e-5, and an epsilon model's x0 = (x - sigma * eps)
    # / alpha carries float32 rounding times 1.4e4 (diffusers' own result is only good to ~5e-4 there), so the
    # cosine runs use v-prediction, or epsilon with the noisiest levels clipped or not visited.
    "ddim-cosine": (
        DDIMScheduler,
        dict(clip_sample=False, timestep_spacing="trailing", **COSINE),
        lambda K: SolverConfig("ddim", K, "trailing", convention="ddim"),
    ),
    "ddim-cosine-leading": (DDIMScheduler, dict(clip_sample=False, **COSINE), lambda K: SolverConfig("ddim", K, "leading", convention="ddim")),
    "dpmpp-2m-cosine": (DPMSolverMultistepScheduler, dict(**COSINE), lambda K: SolverConfig("dpmpp-2m", K, "linspace")),
    "unipc-bh2-cosine": (UniPCMultistepScheduler, dict(timestep_spacing="trailing", **COSINE), lambda K: SolverConfig("unipc-bh2", K, "trailing")),
    "dpmpp-3m-cosine-clipped": (
        DPMSolverMultistepScheduler,
        dict(solver_order=3, lambda_min_clipped=-5.1, **COSINE),
        lambda K: SolverConfig("dpmpp-3m", K, "linspace", lambda_min_clipped=-5.1),
    ),
}


def cosine_prediction(case: str) -> str:
    return "epsilon" if case in ("ddim-cosine-leading", "dpmpp-3m-cosine-clipped") else "v_prediction"


# (case, steps, prediction type)
RUNS = (
    [(case, K, "epsilon") for case in CASES if "karras" not in case and "cosine" not in case and "logsnr" not in case for K in (4, 10)]
    + [(case, 8, "epsilon") for case in ("ddim-trailing", "dpmpp-3m", "unipc-bh2-3", "deis-3", "pndm", "euler", "dpmpp-2s")]
    + [(case, 6, "epsilon") for case in ("ddim-trailing", "pndm", "dpmpp-2s", "euler-trailing")]
    + [(case, 8, "v_prediction") for case in ("ddim", "dpmpp-2m", "dpmpp-3m", "dpmpp-2s", "unipc-bh2", "unipc-bh1", "deis-2", "pndm", "euler")]
    + [(case, 8, "sample") for case in ("ddim", "dpmpp-2m", "unipc-bh2", "deis-3", "euler-leading")]
    + [(case, K, "epsilon") for case in CASES if "karras" in case or "logsnr" in case for K in (4, 10)]
    + [(case, K, cosine_prediction(case)) for case in CASES if "cosine" in case for K in (4, 10)]
    + [("dpmpp-2m-karras", 8, "v_prediction"), ("unipc-bh2-karras", 8, "sample"), ("euler-karras", 8, "v_prediction")]
)

_reference: dict[tuple, torch.Tensor] = {}


def reference(case: str, steps: int, prediction_type: str, net) -> tuple[Denoiser, torch.Tensor]:
    cls, kwargs, _ = CASES[case]
    scheduler = cls(prediction_type=prediction_type, **kwargs)
    denoiser = make_denoiser(scheduler, net, prediction_type)
    key = (case, steps, prediction_type)
    if key not in _reference:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _reference[key] = diffusers_loop(scheduler, denoiser.module, noise_for(), steps)
    return denoiser, _reference[key]


@pytest.mark.parametrize("case,steps,prediction_type", RUNS, ids=[f"{c}-{k}-{p}" for c, k, p in RUNS])
def test_matches_diffusers(case, steps, prediction_type, unet):
    denoiser, expected = reference(case, steps, prediction_type, unet)
    assert torch.isfinite(expected).all() and expected.abs().max() > 0.05
    solver = CASES[case][2](steps)
    if solver.name == "pndm" and prediction_type == "v_prediction":
        solver = dataclasses.replace(solver, options={"combine": "output"})  # PNDMScheduler combines raw v outputs
    host, baked = ours(denoiser, solver, noise_for())
    assert (host - expected).abs().max() < TOL
    assert (baked - expected).abs().max() < TOL


# The same (case, steps, prediction) as above where possible, so the diffusers loops are reused.
SCHEDULER_CONFIG_RUNS = [(case, 10, cosine_prediction(case) if "cosine" in case else "epsilon") for case in CASES] + [
    ("pndm", 8, "v_prediction"),
    ("euler", 8, "v_prediction"),
    ("dpmpp-2s", 6, "epsilon"),
    ("ddim-trailing", 6, "epsilon"),
    ("dpmpp-3m", 2, "epsilon"),
    ("unipc-bh2-3", 1, "epsilon"),
]


@pytest.mark.parametrize("case,steps,prediction_type", SCHEDULER_CONFIG_RUNS, ids=[f"{c}-{k}-{p}" for c, k, p in SCHEDULER_CONFIG_RUNS])
def test_scheduler_config_reproduces_its_loop(case, steps, prediction_type, unet):
    """Honouring the model's own scheduler: its config alone gives the solver that reproduces it."""
    denoiser, expected = reference(case, steps, prediction_type, unet)
    solver = solver_from_scheduler_config(denoiser.scheduler_config | {"_class_name": CASES[case][0].__name__}, steps)
    host = sample(denoiser, solver, noise_for(), device="cpu", show_progress=False)
    assert (host - expected).abs().max() < TOL


OFF_GRID = [
    (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True)),
    (DPMSolverMultistepScheduler, dict(use_lu_lambdas=True, final_sigmas_type="sigma_min")),
    (DPMSolverMultistepScheduler, dict(lambda_min_clipped=-3.0, timestep_spacing="trailing")),
    (DPMSolverSinglestepScheduler, dict(use_karras_sigmas=True)),
    (UniPCMultistepScheduler, dict(use_karras_sigmas=True)),
    (DEISMultistepScheduler, dict(use_karras_sigmas=True)),
    (EulerDiscreteScheduler, dict(use_karras_sigmas=True)),
    (EulerDiscreteScheduler, dict()),
    (DDIMScheduler, dict(clip_sample=False, timestep_spacing="linspace")),
]


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("cls,kwargs", OFF_GRID, ids=[f"{c.__name__}-{'-'.join(k) or 'default'}" for c, k in OFF_GRID])
def test_plan_levels_match_diffusers(cls, kwargs, beta_schedule):
    """Timesteps fed to the network are identical, off-grid levels agree to float32 (K = 2..40).

    Covers what the sampling loops cannot: DPM-Solver with Karras sigmas on the cosine schedule
    truncates its timesteps, and duplicates the first one so that diffusers' own loop fails.
    """
    for steps in range(2, 41, 3):
        scheduler = cls(beta_schedule=beta_schedule, **kwargs)
        scheduler.set_timesteps(steps)
        solver = solver_from_scheduler_config(config_of(scheduler), steps)
        plan = solver.plan(NoiseSchedule.from_scheduler_config(dict(scheduler.config)))
        np.testing.assert_array_equal(plan.timesteps, scheduler.timesteps.numpy().astype(np.float64))
        if hasattr(scheduler, "sigmas"):  # rho = sigma / alpha, which diffusers calls sigmas
            np.testing.assert_allclose(plan.sigma / plan.alpha, scheduler.sigmas.numpy(), rtol=2e-6)


MINIMAL_CONFIGS = [
    {"_class_name": "DDIMScheduler", "clip_sample": False},
    {"_class_name": "PNDMScheduler", "skip_prk_steps": True},
    {"_class_name": "EulerDiscreteScheduler"},
    {"_class_name": "HeunDiscreteScheduler"},
    {"_class_name": "DPMSolverMultistepScheduler"},
    {"_class_name": "DPMSolverSinglestepScheduler"},
    {"_class_name": "UniPCMultistepScheduler"},
    {"_class_name": "DEISMultistepScheduler"},
]


@pytest.mark.parametrize("config", MINIMAL_CONFIGS, ids=[c["_class_name"] for c in MINIMAL_CONFIGS])
def test_scheduler_config_defaults_match_diffusers(config, unet):
    """Missing keys mean diffusers' defaults: a config naming only the class reproduces the default loop."""
    import diffusers

    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    denoiser = make_denoiser(scheduler, unet, "epsilon")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = diffusers_loop(scheduler, denoiser.module, noise_for(), 7)
    host, _ = ours(denoiser, solver_from_scheduler_config(config, 7), noise_for())
    assert (host - expected).abs().max() < TOL


GUIDED = [("ddim", 8), ("dpmpp-2m", 8), ("unipc-bh2", 6), ("euler-leading", 8), ("dpmpp-2m-karras", 8)]


@pytest.mark.parametrize("case,steps", GUIDED, ids=[f"{c}-{k}" for c, k in GUIDED])
def test_guided_class_conditional(case, steps, class_unet):
    cls, kwargs, solver_for = CASES[case]
    scheduler = cls(**kwargs)
    denoiser = make_denoiser(scheduler, class_unet, "epsilon", conditioning="class", num_classes=3)
    labels = torch.tensor([0, 2])
    null = torch.full((2,), 3, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = diffusers_loop(scheduler, denoiser.module, noise_for(3), steps, cond=labels, null=null, guidance_scale=3.0)
    solver = dataclasses.replace(solver_for(steps), guidance_scale=3.0)
    host, baked = ours(denoiser, solver, noise_for(3), cond=labels)
    assert (host - expected).abs().max() < TOL
    assert (baked - expected).abs().max() < TOL
    # Guidance matters here: the conditional sample differs from the unguided one.
    plain = sample(denoiser, solver_for(steps), noise_for(3), cond=labels, device="cpu", show_progress=False)
    assert (plain - host).abs().max() > 1e-3


# ----------------------------------------------------------------------------- structure of the solvers


@pytest.mark.parametrize("name", [n for n in SOLVERS if not SOLVERS[n].stochastic])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_tables_are_linear_and_evaluate_as_documented(name, prediction_type):
    schedule = NoiseSchedule.from_betas()
    plan = SolverConfig(name, 6, "trailing").plan(schedule)
    table = compile_solver(name, plan, prediction_type)
    assert table.evaluations == {"pndm": 7, "heun": 11}.get(name, 6)
    assert table.calls.sum() == table.evaluations and not table.calls[-1]
    assert table.weights.dtype == np.float64 and np.all(np.isfinite(table.weights))
    made = 1  # the noise
    for row, call in zip(table.weights, table.calls):  # each row combines only values made before it
        assert not row[made:].any() and row[:made].any()
        made += 2 if call else 1
    assert made == table.weights.shape[1] + 1


@pytest.mark.parametrize("spacing,convention", [("linspace", "ddim"), ("karras", "multistep"), ("trailing", "euler"), ("unipc", "flow")])
def test_coefficients_are_python_floats(spacing, convention, monkeypatch):
    """A numpy scalar times a tensor is not a plain scalar product, so every coefficient must be a float."""
    from compress import solvers

    multiply, divide = solvers.Linear.__mul__, solvers.Linear.__truediv__

    def strict(operation):
        def checked(self, scalar):
            assert type(scalar) in (float, int), type(scalar)
            return operation(self, scalar)

        return checked

    monkeypatch.setattr(solvers.Linear, "__mul__", strict(multiply))
    monkeypatch.setattr(solvers.Linear, "__rmul__", strict(multiply))
    monkeypatch.setattr(solvers.Linear, "__truediv__", strict(divide))
    flow = convention == "flow"
    schedule = FlowSchedule(shift=3.0) if flow else NoiseSchedule.from_betas()
    for name in [n for n in SOLVERS if not SOLVERS[n].stochastic and not (n == "heun" and convention == "ddim")]:
        for prediction_type in ("flow",) if flow else ("epsilon", "v_prediction", "sample"):
            options = {"combine": "output"} if name == "pndm" else {}
            config = SolverConfig(name, 7, spacing, options=options, **({} if flow else {"convention": convention}))
            config.table(schedule, prediction_type)


def test_the_noise_is_the_only_input_of_the_first_evaluation():
    plan = SolverConfig("euler", 5, "linspace", convention="euler").plan(NoiseSchedule.from_betas())
    table = compile_solver("euler", plan, "epsilon")
    assert 0.99 < plan.noise_scale < 1.0  # diffusers' Euler starts linspace from sigma_max * noise
    assert table.weights[0, 0] == pytest.approx(plan.noise_scale)


def test_positional_solver_config_still_works():
    config = SolverConfig("dpmpp-2m", 12, "trailing", 2.0, {"lower_order_final": False})
    assert (config.name, config.steps, config.spacing, config.guidance_scale) == ("dpmpp-2m", 12, "trailing", 2.0)
    assert config.plan(NoiseSchedule.from_betas()).steps == 12


def test_explicit_timesteps_set_the_plan():
    config = SolverConfig("dpmpp-2m", timesteps=[999, 600.0, 300, 50], final="sigma_min")
    plan = config.plan(NoiseSchedule.from_betas())
    assert config.steps == 4 and list(plan.timesteps) == [999, 600, 300, 50]
    assert plan.sigma[-1] == pytest.approx(NoiseSchedule.from_betas().sigma(0))
    with pytest.raises(UserError, match="descending"):
        SolverConfig("ddim", timesteps=[10, 500]).plan(NoiseSchedule.from_betas())
    with pytest.raises(UserError, match="beyond"):
        SolverConfig("ddim", timesteps=[1000, 500]).plan(NoiseSchedule.from_betas())


# ----------------------------------------------------------------------------- user errors


SCHEDULE = NoiseSchedule.from_betas()


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: SolverConfig("ddim", 0).plan(SCHEDULE), "steps must be at least 1"),
        (lambda: SolverConfig("dpmpp-2m", -3).plan(SCHEDULE), "steps must be at least 1"),
        (lambda: get_solver("dpmpp2m"), "did you mean 'dpmpp-2m'"),
        (lambda: SolverConfig("unipc_bh2", 10).plan(SCHEDULE), "did you mean 'unipc-bh2'"),
        (lambda: SolverConfig("dpmpp-3m", 2).plan(SCHEDULE), "needs at least 3 steps, got 2"),
        (lambda: SolverConfig("deis-3", 2).plan(SCHEDULE), "needs at least 3 steps"),
        (lambda: SolverConfig("dpmpp-2s", 1).plan(SCHEDULE), "needs at least 2 steps"),
        (lambda: SolverConfig("unipc-bh2", 2, options={"order": 3}).plan(SCHEDULE), "needs at least 3 steps"),
        (lambda: SolverConfig("unipc-bh1", 10, options={"order": 4}).plan(SCHEDULE), "order must be 1, 2 or 3"),
        (lambda: compile_solver("dpmpp-3m", SolverConfig("ddim", 2).plan(SCHEDULE), "epsilon"), "needs at least 3 steps"),
        (lambda: SolverConfig("dpmpp-2m", 10, options={"lower_order_finale": False}).plan(SCHEDULE), "did you mean 'lower_order_final'"),
        (lambda: SolverConfig("dpmpp-2m", 10, options={"solver_type": "rk4"}).table(SCHEDULE, "epsilon"), "solver_type"),
        (lambda: SolverConfig("ddim", 10, "karas").plan(SCHEDULE), "did you mean 'karras'"),
        (lambda: SolverConfig("ddim", 10, final="sigma").plan(SCHEDULE), "did you mean 'sigma_min'"),
        (lambda: SolverConfig("ddim", 2000).plan(SCHEDULE), "cannot exceed"),
        (lambda: compile_solver("ddpm", SolverConfig("ddpm", 4).plan(SCHEDULE), "epsilon"), "stochastic"),
    ],
)
def test_user_errors(make, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        make()


@pytest.mark.parametrize(
    "config,setting",
    [
        ({"_class_name": "DDIMScheduler"}, "clip_sample"),  # diffusers' default clips x0
        ({"_class_name": "DDIMScheduler", "clip_sample": False, "thresholding": True}, "thresholding"),
        ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
        ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, "algorithm_type"),
        ({"_class_name": "DPMSolverMultistepScheduler", "use_exponential_sigmas": True}, "use_exponential_sigmas"),
        ({"_class_name": "DPMSolverMultistepScheduler", "euler_at_final": True, "final_sigmas_type": "sigma_min"}, "euler_at_final"),
        ({"_class_name": "DPMSolverSinglestepScheduler", "solver_order": 3}, "solver_order"),
        ({"_class_name": "UniPCMultistepScheduler", "predict_x0": False}, "predict_x0"),
        ({"_class_name": "UniPCMultistepScheduler", "rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({"_class_name": "PNDMScheduler"}, "skip_prk_steps"),  # diffusers' default runs Runge-Kutta first
        ({"_class_name": "PNDMScheduler", "skip_prk_steps": True, "timestep_spacing": "linspace"}, "timestep_spacing"),
        ({"_class_name": "EulerDiscreteScheduler", "interpolation_type": "log_linear"}, "interpolation_type"),
        ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True, "timestep_spacing": "leading"}, "timestep_spacing"),
        ({"_class_name": "EulerDiscreteScheduler", "prediction_type": "flow_prediction"}, "prediction_type"),
        ({"_class_name": "EulerAncestralDiscreteScheduler"}, "stochastic"),
        ({"_class_name": "LMSDiscreteScheduler"}, "not supported"),
    ],
)
def test_scheduler_config_rejects_what_it_cannot_reproduce(config, setting):
    with pytest.raises(UserError, match=setting):
        solver_from_scheduler_config(config, 8)


def test_scheduler_config_rejects_zero_steps():
    with pytest.raises(UserError, match="steps must be at least 1"):
        solver_from_scheduler_config({"_class_name": "UniPCMultistepScheduler"}, 0)


def test_keys_of_other_schedulers_are_ignored_like_diffusers_does():
    # A DPM-Solver config copied from a DDIM one keeps clip_sample, which DPM-Solver never reads.
    config = {"_class_name": "DPMSolverMultistepScheduler", "clip_sample": True, "set_alpha_to_one": False}
    assert solver_from_scheduler_config(config, 10).name == "dpmpp-2m"


def test_a_plan_that_divides_an_epsilon_by_a_vanishing_alpha_is_refused_with_the_setting_to_change():
    cosine = NoiseSchedule.from_betas("squaredcos_cap_v2")
    with pytest.raises(UserError, match=r"timestep 999 where alpha = 4.9e-05.*--spacing leading"):
        SolverConfig("ddim", 4, spacing="trailing").table(cosine, "epsilon")
    SolverConfig("ddim", 4, spacing="leading").table(cosine, "epsilon")
    SolverConfig("ddim", 4, spacing="trailing").table(cosine, "v_prediction")  # no division by alpha there
