"""Calibration sets: timestep samplers, states from the full-precision chain, storage, CLI errors.

Tiny random models built in place; every test runs in a few seconds on one core.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from calibration import CalibrationConfig, calibrate, check_calibration_matches, load_calibration, model_identity, save_calibration
from calibration.timesteps import sample_requests
from compress.denoiser import ClassTokenUNet, Denoiser
from compress.errors import UserError
from compress.schedule import NoiseSchedule
from compress.solvers import SolverConfig
from tests.conftest import assert_one_line_error
from tests.tiny_models import tiny_cond_unet, tiny_denoiser

SCHEDULE = NoiseSchedule.from_betas()


pytestmark = pytest.mark.usefixtures("one_thread")


def diffusers_timesteps(scheduler_class, solver: SolverConfig) -> list[float]:
    """What diffusers' own scheduler runs on SCHEDULE (its default linear betas) at the solver's spacing and steps."""
    scheduler = scheduler_class.from_config(DDPMScheduler().config, timestep_spacing=solver.spacing)
    scheduler.set_timesteps(solver.steps)
    return [float(t) for t in scheduler.timesteps]


def class_denoiser() -> Denoiser:
    module = ClassTokenUNet(tiny_cond_unet(cross_dim=8), num_classes=3).eval()
    return Denoiser(module, SCHEDULE, "epsilon", (1, 8, 8), conditioning="class", num_classes=3, name="tiny-class")


# ----------------------------------------------------------------------------- timestep samplers


def test_ndtc_timesteps_follow_the_clamped_normal():
    config = CalibrationConfig(sampler="ndtc", samples=20000, seed=3)
    t = sample_requests(config, SCHEDULE).t / 1000
    # Normal(0.4, 0.4) clamped to [0, 0.999]: the mass below 0 piles up at t = 0.
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    assert abs(np.mean(t == 0) - phi(-1.0)) < 0.01
    assert abs(np.mean(t >= 0.999) - (1 - phi((0.999 - 0.4) / 0.4))) < 0.01
    inside = t[(t > 0) & (t < 0.999)]
    assert abs(np.median(inside) - 0.45) < 0.03  # the truncated normal's median lies above the mean 0.4
    samples = np.random.default_rng(3).normal(0.4, 0.4, 20000)
    assert abs(np.mean(t) - np.mean(np.clip(np.round(samples * 1000), 0, 999) / 1000)) < 1e-9
    # every state comes from its own trajectory
    assert len(np.unique(sample_requests(config, SCHEDULE).trajectory)) == 20000


def test_ndtc_mean_and_std_are_configurable():
    t = sample_requests(CalibrationConfig(sampler="ndtc", samples=5000, mean=0.5, std=0.1), SCHEDULE).t
    assert abs(t.mean() - 500) < 5 and abs(t.std() - 100) < 5


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' DPM-Solver on numpy 2, not ours
def test_uniform_and_solver_timesteps():
    uniform = sample_requests(CalibrationConfig(sampler="uniform", samples=45), SCHEDULE)
    assert list(np.unique(uniform.t)[::-1]) == list(range(999, -1, -50))
    assert uniform.trajectories == 3  # twenty levels per trajectory
    solver = SolverConfig("dpmpp-2m", 4)
    requests = sample_requests(CalibrationConfig(sampler="solver", samples=8), SCHEDULE, solver)
    assert list(requests.t[:4]) == diffusers_timesteps(DPMSolverMultistepScheduler, solver)
    with pytest.raises(UserError, match="needs the solver"):
        sample_requests(CalibrationConfig(sampler="solver", samples=8), SCHEDULE)


# ----------------------------------------------------------------------------- recording


def test_states_are_the_inputs_of_the_full_precision_chain():
    """With the solver's own DDIM plan as the chain, the recorded states are exactly what the host loop feeds the network."""
    from compress.sampling import sample

    denoiser = tiny_denoiser()
    solver = SolverConfig("ddim", 5)
    calib = calibrate(denoiser, CalibrationConfig(sampler="solver", samples=10, trajectory_steps=5, seed=1), solver)
    seen = []
    inner = denoiser.module

    class Spy(torch.nn.Module):
        def forward(self, x, t, cond=None):
            seen.append(x.clone())
            return inner(x, t, cond)

    denoiser.module = Spy()
    sample(denoiser, solver, calib.noise, show_progress=False, device="cpu")
    expected = torch.stack(seen, 1).flatten(0, 1)  # trajectory-major, as recorded
    assert torch.allclose(calib.sample, expected, atol=1e-5)
    assert torch.allclose(calib.sample[0], calib.noise[0])  # t = 999 is the start of the chain
    assert calib.timestep.tolist()[:5] == diffusers_timesteps(DDIMScheduler, solver)


def test_guided_sets_hold_conditional_and_unconditional_inputs():
    denoiser = class_denoiser()
    calib = calibrate(denoiser, CalibrationConfig(samples=6, trajectory_steps=10, guidance_scale=2.0))
    assert len(calib) == 12 and calib.header["counts"]["guided"]
    assert calib.condition[1::2].tolist() == [3] * 6  # the null label
    assert torch.equal(calib.condition[0::2], calib.noise_condition)  # ndtc: one state per trajectory
    assert torch.equal(calib.sample[0::2], calib.sample[1::2])
    with pytest.raises(UserError, match="unconditional"):
        calibrate(tiny_denoiser(), CalibrationConfig(samples=2, guidance_scale=2.0))


# ----------------------------------------------------------------------------- storage


def test_save_and_reload_bit_for_bit(tmp_path):
    denoiser = class_denoiser()
    config = CalibrationConfig(sampler="uniform", samples=8, trajectory_steps=10, interval=250, seed=7, guidance_scale=1.5)
    calib = calibrate(denoiser, config)
    path = save_calibration(calib, tmp_path / "calib.safetensors")
    again = load_calibration(path)
    for name in ("sample", "timestep", "condition", "noise", "noise_condition"):
        a, b = getattr(calib, name), getattr(again, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert again.header == calib.header
    header = again.header
    # That the header identifies this model and schedule is test_a_set_from_another_model_is_refused's to show.
    assert header["sampler"] == "uniform" and header["seed"] == 7
    assert header["timesteps"] == {"values": [999.0, 749.0, 499.0, 249.0], "counts": [2, 2, 2, 2]}
    assert header["counts"] == {"states": 8, "inputs": 16, "trajectories": 2, "guided": True}
    assert CalibrationConfig.from_dict(header["config"]) == config
    assert not list(tmp_path.glob(".*partial"))


def test_a_set_from_another_model_is_refused():
    denoiser = tiny_denoiser()
    calib = calibrate(denoiser, CalibrationConfig(samples=2, trajectory_steps=4))
    check_calibration_matches(calib, model_identity(denoiser))
    other = tiny_denoiser()
    with torch.no_grad():
        next(other.module.parameters()).add_(1.0)
    with pytest.raises(UserError, match="weights hash"):
        check_calibration_matches(calib, model_identity(other))
    cosine = Denoiser(denoiser.module, NoiseSchedule.from_betas("squaredcos_cap_v2"), sample_shape=(1, 8, 8))
    with pytest.raises(UserError, match="schedule fingerprint"):
        check_calibration_matches(calib, model_identity(cosine))


def test_config_is_a_recipe_section():
    section = {"sampler": "uniform", "samples": 64, "interval": 25, "guidance_scale": 3.0}
    config = CalibrationConfig(**section)
    assert CalibrationConfig(**config.to_dict()) == config
    with pytest.raises(UserError, match="did you mean 'samples'"):
        CalibrationConfig.from_dict({"sampels": 3})
    with pytest.raises(UserError, match="unknown calibration sampler"):
        CalibrationConfig(sampler="normal")


def test_corrupt_files_are_one_line_errors(tmp_path, cli):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="corrupt"):
        load_calibration(bad)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(UserError, match="not a calibration set"):
        load_calibration(tmp_path / "plain.safetensors")
    result = cli("quantize", "python:tests.tiny_models:tiny_denoiser", "--calib", bad, "--out", tmp_path / "q")
    assert_one_line_error(result, "corrupt")
    assert not (tmp_path / "q").exists()


def test_cli_calibrate(tmp_path, cli):
    out = tmp_path / "calib.safetensors"
    result = cli("calibrate", "python:tests.tiny_models:tiny_denoiser", "--sampler", "solver", "--solver", "ddim", "--steps", "3",
                 "--samples", "6", "--trajectory-steps", "6", "--out", out)
    assert result.returncode == 0, result.stderr
    calib = load_calibration(out)
    assert calib.header["sampler"] == "solver" and len(calib) == 6 and calib.header["solver"]["name"] == "ddim"
    result = cli("calibrate", "python:tests.tiny_models:tiny_denoiser", "--samples", "0", "--out", out)
    assert_one_line_error(result, "samples")
