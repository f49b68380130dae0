"""A flow-matching diffusers folder (pixel UNet + FlowMatchEulerDiscreteScheduler) through `compress export`:
the baked sampler reproduces diffusers' own loop, and an explicit solver samples the model's flow,
never a variance-preserving schedule it was not trained with."""
from __future__ import annotations

import json
import logging

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compress.loading import load_model
from compress.sampling import sample
from compress.schedule import FlowSchedule
from compress.solvers import SolverConfig
from tests.conftest import assert_one_line_error
from tests.test_flow_solvers import diffusers_flow_loop

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def flow_folder(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    folder = tmp_path_factory.mktemp("flow") / "pixel-flow"
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(folder / "unet")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    return folder


def run_sampler(folder, noise: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(folder / "sampler.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["sample"], {"noise": noise})[0]


def test_a_flow_folder_loads_as_a_flow(flow_folder):
    denoiser = load_model(f"diffusers:{flow_folder}")
    assert isinstance(denoiser.schedule, FlowSchedule) and denoiser.schedule.shift == 3.0
    assert denoiser.prediction_type == "flow"


def test_model_solver_export_matches_diffusers(flow_folder, tmp_path, cli):
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    out = tmp_path / "art"
    result = cli("export", f"diffusers:{flow_folder}", "--solver", "model", "--steps", "4", "--format", "onnx", "--batch-size", "2", "--out", out)
    assert result.returncode == 0, result.stderr
    sidecar = json.loads((out / "sampler.json").read_text())
    assert sidecar["solver"]["name"] == "euler" and sidecar["model"]["prediction_type"] == "flow"
    assert json.loads((out / "denoiser.json").read_text())["schedule"]["kind"] == "flow"
    noise = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    unet = UNet2DModel.from_pretrained(flow_folder / "unet").eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(flow_folder / "scheduler")
    reference = diffusers_flow_loop(scheduler, lambda x, t: unet(x, t).sample, noise, 4).numpy()
    baked = run_sampler(out, noise.numpy())
    assert np.abs(baked - reference).max() < 1e-3 * np.abs(reference).max()


def test_an_explicit_solver_samples_the_flow(flow_folder, tmp_path, cli):
    out = tmp_path / "art"
    result = cli("export", f"diffusers:{flow_folder}", "--solver", "dpmpp-2m", "--steps", "4", "--format", "onnx", "--batch-size", "1", "--out", out)
    assert result.returncode == 0, result.stderr
    sigmas = json.loads((out / "sampler.json").read_text())["solver"]["sigmas"]
    # The folder's own FlowMatchEuler levels (shift 3), as the pipeline would set them: the named solver keeps them.
    from diffusers import FlowMatchEulerDiscreteScheduler

    reference = FlowMatchEulerDiscreteScheduler.from_pretrained(str(flow_folder / "scheduler"))
    reference.set_timesteps(4)
    np.testing.assert_allclose(sigmas[:4], reference.sigmas[:4].numpy(), rtol=1e-5)
    denoiser = load_model(f"diffusers:{flow_folder}")
    noise = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    host = sample(denoiser, SolverConfig("dpmpp-2m", 4, spacing="linspace"), noise, device="cpu", show_progress=False).numpy()
    assert np.abs(run_sampler(out, noise.numpy()) - host).max() < 1e-3 * np.abs(host).max()


def test_variance_preserving_settings_are_refused_on_a_flow(flow_folder, tmp_path, cli):
    result = cli("export", f"diffusers:{flow_folder}", "--solver", "dpmpp-2m", "--spacing", "leading", "--steps", "4", "--out", tmp_path / "a")
    assert_one_line_error(result, "'leading' is for variance-preserving schedules")
    assert not (tmp_path / "a").exists()


def test_timestep_search_on_a_flow(flow_folder):
    from compress.schedule_search import search_timesteps

    denoiser = load_model(f"diffusers:{flow_folder}")
    found = search_timesteps(denoiser, SolverConfig("dpmpp-2m", 3), noises=4, teacher=SolverConfig("euler", 40))
    assert found.error_found <= found.error_start
    assert all(0 <= t < 1000 for t in found.timesteps) and found.timesteps == sorted(found.timesteps, reverse=True)
