"""zoo:digits-flow, the committed StableDiffusion3Pipeline folder: diffusers loads it offline (without T5, as SD3
folders that drop it do), the toolkit loads it as a rectified flow with SD3's shift, and its samples show the
prompted digits."""
import json

import numpy as np
import pytest
import torch

from compress.loading import load_pipeline
from compress.schedule import FlowSchedule
from compress.zoo import ZOO, pipeline_folder, training_info
from compress.zoo.flow import T5_TOKENS, TEXT_TOKENS
from compress.zoo.t2i import digit_prompts

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(pipeline_folder("digits-flow")), text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_is_a_standard_sd3_pipeline():
    folder = pipeline_folder("digits-flow")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"] and index["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert list((folder / part).glob("*.safetensors")) and not list((folder / part).glob("*.bin"))
    assert ZOO["digits-flow"].kind == "pipeline" and training_info("digits-flow")["phases"][0]["phase"] == "transformer"


def test_the_toolkit_loads_it_as_a_flow():
    pipeline = load_pipeline("zoo:digits-flow")
    d = pipeline.denoiser
    assert isinstance(d.schedule, FlowSchedule) and d.schedule.shift == 3.0 and d.prediction_type == "flow"
    assert d.sample_shape == (4, 8, 8) and pipeline.image_shape == (3, 16, 16)
    assert d.condition_shapes()["encoder_hidden_states"] == (TEXT_TOKENS + T5_TOKENS, 96)


def test_diffusers_generates_16x16_from_a_prompt(pipe):
    images = pipe(["a handwritten seven", "the digit 3"], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all() and 0 <= images.min() and images.max() <= 1


@pytest.mark.slow
def test_samples_are_the_prompted_digits():
    from compress.metrics import DigitsJudge
    from compress.sampling import make_noise, sample
    from compress.solvers import SolverConfig
    from runtimes.text_to_image import digit_view

    pipeline = load_pipeline("zoo:digits-flow")
    prompts, labels = digit_prompts(128)
    latents = sample(pipeline.denoiser, SolverConfig("euler", 20, "linspace", guidance_scale=1.5), make_noise(pipeline.denoiser, 128, 0),
                     cond=pipeline.encode_prompts(prompts), show_progress=False)
    assert DigitsJudge().agreement(digit_view(pipeline.decode(latents)), labels) >= 0.93  # measured: 98% on 256 prompts
