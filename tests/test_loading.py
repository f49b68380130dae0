"""Model references: diffusers pipeline and model folders, python factories, DiT; schedules match diffusers."""
import json

import numpy as np
import pytest
import torch

from compress.errors import UserError
from compress.loading import ScheduleFlags, load_model
from compress.schedule import NoiseSchedule
from tests.conftest import assert_one_line_error
from tests.tiny_models import tiny_cond_unet, tiny_dit, tiny_unet


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedule_matches_diffusers(beta_schedule):
    from diffusers import DDPMScheduler

    ours = NoiseSchedule.from_betas(beta_schedule, 1000, 0.00085, 0.012)
    theirs = DDPMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012).alphas_cumprod
    np.testing.assert_array_equal(ours.alphas_cumprod, theirs.double().numpy())


def save_pipeline(folder, unet, scheduler, sub="unet"):
    unet.save_pretrained(folder / sub)
    scheduler.save_pretrained(folder / "scheduler")
    index = {"_class_name": "DiffusionPipeline", sub: ["diffusers", type(unet).__name__], "scheduler": ["diffusers", type(scheduler).__name__]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def text_pipeline(tmp_path):
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    return save_pipeline(tmp_path / "pipe", tiny_cond_unet(), scheduler)


def test_diffusers_pipeline_folder(text_pipeline):
    d = load_model(f"diffusers:{text_pipeline}")
    assert d.conditioning == "text" and d.cond_shape == (77, 16)
    assert d.prediction_type == "v_prediction"
    assert d.sample_shape == (1, 8, 8)
    assert d.scheduler_config["_class_name"] == "DPMSolverMultistepScheduler"
    np.testing.assert_allclose(d.schedule.alphas_cumprod, NoiseSchedule.from_betas("scaled_linear", 1000, 0.00085, 0.012).alphas_cumprod)
    out = d.module(torch.randn(2, *d.sample_shape), 500.0, d.null_condition(2))
    assert out.shape == (2, *d.sample_shape)


def test_sample_cli_on_pipeline_folder(text_pipeline, tmp_path, cli):
    grid = tmp_path / "grid.png"
    result = cli("sample", f"diffusers:{text_pipeline}", "--steps", "4", "--n", "4", "--out", grid)
    assert result.returncode == 0, result.stderr
    from PIL import Image

    assert Image.open(grid).size[0] > 8


def test_bare_model_folder_takes_schedule_from_flags(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "bare")
    d = load_model(f"diffusers:{tmp_path / 'bare'}", ScheduleFlags(beta_schedule="squaredcos_cap_v2", prediction_type="sample"))
    assert d.conditioning == "none" and d.prediction_type == "sample" and d.scheduler_config is None
    np.testing.assert_array_equal(d.schedule.alphas_cumprod, NoiseSchedule.from_betas("squaredcos_cap_v2").alphas_cumprod)


def test_dit_pipeline_is_class_conditional(tmp_path):
    from diffusers import DDIMScheduler

    folder = save_pipeline(tmp_path / "dit", tiny_dit(), DDIMScheduler(), sub="transformer")
    d = load_model(f"diffusers:{folder}")
    assert d.conditioning == "class" and d.num_classes == 10 and d.sample_shape == (4, 8, 8)
    out = d.module(torch.randn(2, 4, 8, 8), 10.0, torch.tensor([1, 2]))
    assert out.shape == (2, 4, 8, 8)


def test_python_factory_through_cli(tmp_path, cli):
    grid = tmp_path / "g.png"
    result = cli("sample", "python:tests.tiny_models:tiny_denoiser", "--steps", "3", "--n", "2", "--out", grid)
    assert result.returncode == 0, result.stderr
    assert grid.is_file()


def test_python_bare_module_needs_sample_shape(tmp_path, cli):
    assert_one_line_error(cli("sample", "python:tests.tiny_models:tiny_module", "--out", tmp_path / "g.png"), "--sample-shape")
    ok = cli("sample", "python:tests.tiny_models:tiny_module", "--sample-shape", "1,8,8", "--steps", "2", "--n", "2", "--out", tmp_path / "g.png")
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize(
    "reference, fragment",
    [
        ("zoo:digitz", "did you mean 'zoo:digits'"),
        ("digits", "bad model reference"),
        ("diffusers:/no/such/folder", "does not exist"),
        ("python:no_such_module:make", "cannot import"),
        ("python:tests.tiny_models:missing", "no callable"),
        ("python:tests.tiny_models:failing_factory", "the factory raised FileNotFoundError: weights.pt"),
        ("zoo:digits-classifier", "not a diffusion model"),
    ],
)
def test_bad_references_exit_2(reference, fragment, cli, tmp_path):
    result = cli("sample", reference, "--out", tmp_path / "g.png")
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "g.png").exists()


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(UserError, match="neither a diffusers pipeline"):
        load_model(f"diffusers:{tmp_path / 'junk'}")


def test_corrupt_model_weights(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot load"):
        load_model(f"diffusers:{tmp_path / 'bad'}")


def test_model_folder_never_imports_what_the_file_names(tmp_path, cli):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({"format": "diffusion-compress-model", "version": 1, "builder": "os:system",
                                                   "builder_args": {}, "denoiser": {}}))
    (folder / "model.safetensors").write_bytes(b"")
    assert_one_line_error(cli("sample", folder, "--steps", "2", "--n", "1", "--out", tmp_path / "g.png"), "unknown builder 'os:system'")
    (folder / "model.json").write_text(json.dumps({"format": "diffusion-compress-model", "version": 99, "builder": "pruned"}))
    assert_one_line_error(cli("sample", folder, "--steps", "2", "--n", "1", "--out", tmp_path / "g.png"), "version 99 is not supported")
    (folder / "model.json").write_text("{")
    assert_one_line_error(cli("sample", folder, "--steps", "2", "--n", "1", "--out", tmp_path / "g.png"), "cannot read model folder")
