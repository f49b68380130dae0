"""PixArt pipeline folders (one masked T5 in front of a PixArtTransformer2DModel with learned sigma, a VP schedule with
DPMSolverMultistepScheduler): loaded, encoded and exported, against diffusers' own PixArtAlphaPipeline and
PixArtSigmaPipeline built from tiny random folders, including folders whose transformer is saved under the name
Transformer2DModel, as PixArt's checkpoints on the hub are."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.export_chain import export_artifacts, pipeline_guidance, resolve_solver
from compress.loading import load_pipeline
from tests.bad_folders import copy_folder, edit_index, export_fails_with, replace_model
from tests.tiny_pipelines import _pixart_transformer, _t5_encoder, build_pixart_folder

ROOT = Path(__file__).resolve().parents[1]
# Upper case and outer spaces: the pipelines lowercase and strip prompts; the last one is longer than 120 T5 tokens.
PROMPTS = ["a handwritten seven", "  The Digit 3!  ", "seven " * 60]
NEGATIVE = "Blurry"
STEPS = 4
TOKENS = {"alpha-legacy": 120, "alpha": 120, "sigma": 300}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixart")
    return {"alpha-legacy": build_pixart_folder(root / "alpha-legacy", legacy_class_name=True),
            "alpha": build_pixart_folder(root / "alpha", legacy_class_name=False),
            "sigma": build_pixart_folder(root / "sigma", legacy_class_name=False, sigma=True)}


def _diffusers_pipeline(folder: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", ["alpha-legacy", "alpha", "sigma"])
def test_prompt_encoding_is_pixarts_encode_prompt(folders, name):
    pipeline = load_pipeline(f"diffusers:{folders[name]}")
    pipe = _diffusers_pipeline(folders[name])
    assert type(pipe.transformer).__name__ == "PixArtTransformer2DModel"  # diffusers maps the legacy name too
    assert pipeline.class_name == type(pipe).__name__
    with torch.no_grad():
        # clean_caption=True (the __call__ default) needs bs4 and ftfy; without them it falls back to this very path.
        embeds, mask, negative, negative_mask = pipe.encode_prompt(PROMPTS, True, negative_prompt=NEGATIVE, device="cpu", clean_caption=False,
                                                                   max_sequence_length=TOKENS[name])
        _, _, empty, empty_mask = pipe.encode_prompt(PROMPTS[:1], True, negative_prompt="", device="cpu", clean_caption=False,
                                                     max_sequence_length=TOKENS[name])
    ours = pipeline.encode_prompts(PROMPTS)
    ours_negative = pipeline.negative_condition(3, NEGATIVE)
    null = pipeline.denoiser.null_condition(1)  # PixArt guides against the encoded "" and its mask
    assert ours["encoder_hidden_states"].shape == embeds.shape == (3, TOKENS[name], 32)
    assert ours["encoder_attention_mask"].shape == mask.shape == (3, TOKENS[name])
    pairs = [(ours["encoder_hidden_states"], embeds), (ours["encoder_attention_mask"], mask),
             (ours_negative["encoder_hidden_states"], negative), (ours_negative["encoder_attention_mask"], negative_mask),
             (null["encoder_hidden_states"], empty), (null["encoder_attention_mask"], empty_mask)]
    errors = [float((a - b.float()).abs().max()) for a, b in pairs]
    assert max(errors) < 1e-5, errors
    assert mask[:, -1].tolist() == [0, 0, 1] and null["encoder_attention_mask"].sum() == 1  # padding masked; "" is its </s> alone
    d = pipeline.denoiser
    assert pipeline.default_guidance_scale == 4.5 and d.prediction_type == "epsilon" and d.schedule.kind == "vp"
    assert d.sample_shape == (4, 8, 8) and pipeline.image_shape == (3, 16, 16)


@pytest.mark.parametrize("name", ["alpha-legacy", "sigma"])
def test_denoiser_module_is_the_transformers_own_call(folders, name):
    pipeline = load_pipeline(f"diffusers:{folders[name]}")
    pipe = _diffusers_pipeline(folders[name])
    cond = pipeline.encode_prompts(PROMPTS[:2])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in (999, 500, 1):  # the scheduler's integer timesteps, as the pipelines pass them
            theirs = pipe.transformer(x, encoder_hidden_states=cond["encoder_hidden_states"], encoder_attention_mask=cond["encoder_attention_mask"].long(),
                                      timestep=torch.full((2,), t), added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            assert theirs.shape[1] == 8  # learned sigma: the pipelines keep the first half
            ours = pipeline.denoiser.module(x, float(t), cond)
            assert float((ours - theirs[:, :4]).abs().max()) < 1e-6
    assert theirs.std() > 0.1
    with torch.no_grad():  # the mask matters: without it the padding tokens take part in the cross-attention
        unmasked = pipeline.denoiser.module(x, 500.0, {**cond, "encoder_attention_mask": torch.ones_like(cond["encoder_attention_mask"])})
        masked = pipeline.denoiser.module(x, 500.0, cond)
    assert float((unmasked - masked).abs().max()) > 1e-4


def test_micro_conditions_follow_the_resolution(folders, tmp_path):
    """PixArt-alpha at 1024 px conditions on the image's resolution and aspect ratio (use_additional_conditions)."""
    from compress.denoiser import PixArtTransformer

    transformer = _pixart_transformer(32, seed=5, use_additional_conditions=True)
    pipeline = load_pipeline(f"diffusers:{folders['alpha']}").at_resolution(24, 16)
    module = PixArtTransformer(transformer, vae_downscale=2)
    cond = pipeline.encode_prompts(PROMPTS[:2])
    x = torch.randn(2, 4, 12, 8, generator=torch.Generator().manual_seed(1))
    # What PixArtAlphaPipeline builds for a 24 x 16 image (height, width; height / width).
    added = {"resolution": torch.tensor([[24.0, 16.0]]).repeat(2, 1), "aspect_ratio": torch.tensor([[1.5]]).repeat(2, 1)}
    with torch.no_grad():
        theirs = transformer(x, encoder_hidden_states=cond["encoder_hidden_states"], encoder_attention_mask=cond["encoder_attention_mask"],
                             timestep=torch.full((2,), 700), added_cond_kwargs=added).sample[:, :4]
        ours = module(x, 700.0, cond)
        other = transformer(x, encoder_hidden_states=cond["encoder_hidden_states"], encoder_attention_mask=cond["encoder_attention_mask"],
                            timestep=torch.full((2,), 700), added_cond_kwargs={k: v * 2 for k, v in added.items()}).sample[:, :4]
    assert float((ours - theirs).abs().max()) < 1e-6
    assert float((ours - other).abs().max()) > 1e-4


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_pixart_folders_whose_parts_disagree_fail_with_one_line(folders, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()

    wrong_caption = copy_folder(folders, "alpha", bad)
    replace_model(wrong_caption, "text_encoder", _t5_encoder(24, 80, seed=0))
    export_fails_with(capsys, wrong_caption, tmp_path / "o1", "text_encoder gives 24-wide hidden states but the transformer's caption_channels is 32")

    not_pixart = copy_folder(folders, "alpha-legacy", bad)
    _edit_json(not_pixart / "transformer" / "config.json", norm_type="layer_norm")
    export_fails_with(capsys, not_pixart, tmp_path / "o2", "norm_type 'layer_norm', not a PixArt transformer")

    flow = copy_folder(folders, "sigma", bad)
    (flow / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler"}))
    export_fails_with(capsys, flow, tmp_path / "o3", "is a flow-matching one")

    other_transformer = copy_folder(folders, "alpha", bad)
    edit_index(other_transformer, transformer=["diffusers", "SD3Transformer2DModel"])
    export_fails_with(capsys, other_transformer, tmp_path / "o4",
                "transformer is a SD3Transformer2DModel, which is not supported (supported: PixArtTransformer2DModel, Transformer2DModel)")

    # The transformer alone (saved under its legacy name), or a folder without its T5: it cannot run without the text encoder.
    export_fails_with(capsys, folders["alpha-legacy"] / "transformer", tmp_path / "o6", "a PixArtTransformer2DModel is conditioned by its pipeline's text encoders")
    no_t5 = copy_folder(folders, "alpha-legacy", bad)
    edit_index(no_t5, remove=("text_encoder", "tokenizer"))
    export_fails_with(capsys, no_t5, tmp_path / "o7", "load the whole PixArtAlphaPipeline or PixArtSigmaPipeline folder")

    unknown = copy_folder(folders, "alpha", bad)
    _edit_json(unknown / "model_index.json", _class_name="PixArtGammaPipeline")
    export_fails_with(capsys, unknown, tmp_path / "o5", "pipeline class 'PixArtGammaPipeline' is not supported (supported: ")


def _app(name: str = "text_to_image_onnx"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["alpha-legacy", "sigma"])
def test_exported_pixart_pipeline_matches_diffusers_from_prompt_to_image(folders, name, tmp_path):
    import onnxruntime as ort

    pipeline = load_pipeline(f"diffusers:{folders[name]}")
    guidance = pipeline_guidance(pipeline, None)
    solver = resolve_solver(pipeline.denoiser, "model", STEPS, guidance=guidance)
    assert solver.name == "dpmpp-2m" and guidance == 4.5
    records = export_artifacts(pipeline, solver, tmp_path, ["onnx"])
    assert {r["kind"] for r in records} == {"text_encoder", "sampler", "denoiser", "vae_decoder", "vae_encoder"}
    sidecar = json.loads((tmp_path / "sampler.json").read_text())
    assert [i["name"] for i in sidecar["inputs"]] == ["noise", "encoder_hidden_states", "encoder_attention_mask", "negative_encoder_hidden_states",
                                                     "negative_encoder_attention_mask", "guidance_scale"]
    assert sidecar["guidance"]["kind"] == "classifier-free" and sidecar["solver"]["network_batch"] == "2 x batch"
    info = json.loads((tmp_path / "pipeline.json").read_text())
    assert info["text_encoders"] == [{"name": "text_encoder", "tokenizer": "tokenizer", "pooled": False, "attention_mask": True}]
    assert info["tokenizers"]["tokenizer"]["lowercase"] is True and info["tokenizers"]["tokenizer"]["max_length"] == TOKENS[name]

    # An app's path: tokenizer.json (which lowercases and strips, as the pipeline does), the T5 encoder and its mask, the sampler.
    prompts = PROMPTS[:2]
    noise = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = _app().generate(tmp_path, prompts, NEGATIVE, noise=noise.numpy())
    pipe = _diffusers_pipeline(folders[name])
    # No resolution binning (the tiny sample size has no bins; the export keeps the size it was given) and no caption cleaning.
    call = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=guidance, height=16, width=16, use_resolution_binning=False,
                clean_caption=False)
    reference = pipe(prompts, latents=noise.clone(), output_type="np", **call).images
    assert ours.shape == reference.shape == (2, 16, 16, 3)
    assert reference.std() > 0.02  # a real picture, not a constant
    image_error = float(np.abs(ours - reference).max())
    assert image_error < 1e-3, image_error  # the image range is [0, 1]

    # The bare denoiser graph on diffusers' own embeddings and mask.
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt(prompts, False, device="cpu", clean_caption=False, max_sequence_length=TOKENS[name])
        theirs = pipe.transformer(noise, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=torch.full((2,), 812),
                                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :4]
    bare = {"sample": noise.numpy(), "timestep": np.full((2,), 812, np.float32), "encoder_hidden_states": embeds.numpy(),
            "encoder_attention_mask": mask.float().numpy()}
    session = ort.InferenceSession(str(tmp_path / "denoiser.onnx"))
    tolerance = 1e-4 * max(1.0, float(theirs.abs().max()))
    assert np.abs(session.run(None, bare)[0] - theirs.numpy()).max() < tolerance
    three = {k: np.concatenate([v, v[:1]]) for k, v in bare.items()}  # another batch than the traced one
    assert np.abs(session.run(None, three)[0][:2] - theirs.numpy()).max() < tolerance
    print(f"PixArt {name}: image max abs diff {image_error:.2e}")


def test_compress_runs_reference_is_the_pixart_pipelines_own_call(folders):
    """`compress run`'s baseline: no resolution binning or caption cleaning, the pipeline's own "" without a negative prompt."""
    from runtimes.text_to_image import diffusers_images, diffusers_pipeline

    pipe = diffusers_pipeline(folders["sigma"], "dpmpp-2m")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = diffusers_images(pipe, PROMPTS[:2], noise, STEPS, 4.5, show_progress=False)
    direct = pipe(PROMPTS[:2], num_inference_steps=STEPS, guidance_scale=4.5, latents=noise.clone(), height=16, width=16,
                  use_resolution_binning=False, clean_caption=False, output_type="np").images
    assert torch.equal(images, torch.from_numpy(direct).permute(0, 3, 1, 2).float())
