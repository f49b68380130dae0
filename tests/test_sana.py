"""Sana pipeline folders (a masked Gemma2 encoder behind SanaPipeline's complex human instruction, a SanaTransformer2DModel
with linear attention, the AutoencoderDC, a flow schedule): loaded, encoded and exported, against diffusers' own SanaPipeline
built from tiny random folders, with DPMSolverMultistepScheduler on flow sigmas (Sana's checkpoints) and FlowMatchEuler."""
from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

from compress.export_chain import export_artifacts, pipeline_guidance, resolve_solver
from compress.loading import load_pipeline
from tests.bad_folders import copy_folder, edit_index, export_fails_with, replace_model
from tests.test_pixart import _app, _diffusers_pipeline, _edit_json
from tests.tiny_pipelines import _gemma_encoder, _sana_transformer, build_sana_folder

# Upper case and outer spaces: SanaPipeline lowercases and strips prompts; the last one is longer than the 300 tokens it keeps.
PROMPTS = ["a handwritten seven", "  The Digit 3!  ", "seven " * 60]
NEGATIVE = "Blurry"
STEPS = 4
TOKENS = 300  # SanaPipeline's max_sequence_length


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sana")
    return {"dpm": build_sana_folder(root / "dpm", scheduler="dpm"), "euler": build_sana_folder(root / "euler", scheduler="euler")}


def _call_default(name: str):
    from diffusers import SanaPipeline

    return inspect.signature(SanaPipeline.__call__).parameters[name].default


def test_prompt_encoding_is_sanas_encode_prompt(folders):
    pipeline = load_pipeline(f"diffusers:{folders['dpm']}")
    pipe = _diffusers_pipeline(folders["dpm"])
    instruction = _call_default("complex_human_instruction")
    assert instruction and _call_default("max_sequence_length") == TOKENS
    with torch.no_grad():  # what SanaPipeline.__call__ encodes: the instruction before prompts, none before negative prompts
        embeds, mask, negative, negative_mask = pipe.encode_prompt(PROMPTS, True, negative_prompt=NEGATIVE, device="cpu",
                                                                   complex_human_instruction=instruction)
        _, _, empty, empty_mask = pipe.encode_prompt(PROMPTS[:1], True, negative_prompt="", device="cpu", complex_human_instruction=instruction)
    ours = pipeline.encode_prompts(PROMPTS)
    ours_negative = pipeline.negative_condition(3, NEGATIVE)
    null = pipeline.denoiser.null_condition(1)  # Sana guides against the encoded "" and its mask
    assert ours["encoder_hidden_states"].shape == embeds.shape == negative.shape == (3, TOKENS, 32)
    pairs = [(ours["encoder_hidden_states"], embeds), (ours["encoder_attention_mask"], mask),
             (ours_negative["encoder_hidden_states"], negative), (ours_negative["encoder_attention_mask"], negative_mask),
             (null["encoder_hidden_states"], empty), (null["encoder_attention_mask"], empty_mask)]
    errors = [float((a - b.float()).abs().max()) for a, b in pairs]
    assert max(errors) < 1e-5, errors
    # The kept tokens: <bos>, the instruction's last token, then the prompt; the long prompt fills all 300, "" is its <bos> alone.
    assert mask[:, -1].tolist() == [0, 0, 1] and null["encoder_attention_mask"].sum() == 1
    with torch.no_grad():  # the instruction matters: without it the prompt's states differ (Gemma attends causally over it)
        plain, _, _, _ = pipe.encode_prompt(PROMPTS[:1], False, device="cpu", complex_human_instruction=None)
    assert float((plain - embeds[:1]).abs().max()) > 1e-3
    d = pipeline.denoiser
    assert pipeline.default_guidance_scale == 4.5 and d.prediction_type == "flow" and d.schedule.kind == "flow" and d.schedule.shift == 3.0
    assert d.sample_shape == (4, 16, 16) and pipeline.image_shape == (3, 32, 32)


def test_denoiser_module_is_the_transformers_own_call(folders):
    pipeline = load_pipeline(f"diffusers:{folders['dpm']}")
    pipe = _diffusers_pipeline(folders["dpm"])
    cond = pipeline.encode_prompts(PROMPTS[:2])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in (999, 500.5, 1):
            theirs = pipe.transformer(x, encoder_hidden_states=cond["encoder_hidden_states"], encoder_attention_mask=cond["encoder_attention_mask"].long(),
                                      timestep=torch.full((2,), float(t))).sample
            ours = pipeline.denoiser.module(x, float(t), cond)
            assert float((ours - theirs).abs().max()) < 1e-6
        unmasked = pipeline.denoiser.module(x, 500.0, {**cond, "encoder_attention_mask": torch.ones_like(cond["encoder_attention_mask"])})
        masked = pipeline.denoiser.module(x, 500.0, cond)
    assert theirs.std() > 0.1
    assert float((unmasked - masked).abs().max()) > 1e-4  # the padding would take part in the cross-attention


def test_sana_folders_whose_parts_disagree_fail_with_one_line(folders, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()

    wrong_caption = copy_folder(folders, "dpm", bad)
    replace_model(wrong_caption, "text_encoder", _gemma_encoder(48, 120, seed=0))
    export_fails_with(capsys, wrong_caption, tmp_path / "o1", "text_encoder gives 48-wide hidden states but the transformer's caption_channels is 32")

    not_flow = copy_folder(folders, "dpm", bad)
    (not_flow / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DPMSolverMultistepScheduler"}))
    export_fails_with(capsys, not_flow, tmp_path / "o2", "Sana's transformer predicts a flow velocity, but its scheduler is a 'DPMSolverMultistepScheduler'")

    sprint = copy_folder(folders, "euler", bad)
    replace_model(sprint, "transformer", _sana_transformer(32, seed=0, guidance_embeds=True))
    export_fails_with(capsys, sprint, tmp_path / "o3", "guidance embedding (guidance_embeds, Sana-Sprint)")

    other_vae = copy_folder(folders, "dpm", bad)
    _edit_json(other_vae / "model_index.json", vae=["diffusers", "AutoencoderKL"])
    export_fails_with(capsys, other_vae, tmp_path / "o4", "vae is a AutoencoderKL, which is not supported (supported: AutoencoderDC)")

    no_gemma = copy_folder(folders, "dpm", bad)
    edit_index(no_gemma, remove=("text_encoder", "tokenizer"))
    export_fails_with(capsys, no_gemma, tmp_path / "o5", "load the whole SanaPipeline folder")
    export_fails_with(capsys, folders["dpm"] / "transformer", tmp_path / "o6", "a SanaTransformer2DModel is conditioned by its pipeline's text encoders")

    # Core ML's static shapes cannot take prompts and negative prompts of different token counts: refused before any file is written.
    export_fails_with(capsys, folders["dpm"], tmp_path / "o7", "SanaPipeline's text_encoder takes prompts of 1313 tokens (behind its instruction) "
                      "and negative prompts of 300; Core ML packages have static shapes", ("--format", "coreml"))


# Sana's checkpoints sample with the DPM-Solver on flow sigmas; FlowMatchEuler (the same code path but the plan) runs with -m slow.
@pytest.mark.parametrize("name", ["dpm", pytest.param("euler", marks=pytest.mark.slow)])
def test_exported_sana_pipeline_matches_diffusers_from_prompt_to_image(folders, name, tmp_path):
    import onnxruntime as ort

    pipeline = load_pipeline(f"diffusers:{folders[name]}")
    guidance = pipeline_guidance(pipeline, None)
    solver = resolve_solver(pipeline.denoiser, "model", STEPS, guidance=guidance)
    assert solver.name == {"dpm": "dpmpp-2m", "euler": "euler"}[name] and guidance == 4.5
    records = export_artifacts(pipeline, solver, tmp_path, ["onnx"])
    assert {r["kind"] for r in records} == {"text_encoder", "sampler", "denoiser", "vae_decoder", "vae_encoder"}
    sidecar = json.loads((tmp_path / "sampler.json").read_text())
    assert [i["name"] for i in sidecar["inputs"]] == ["noise", "encoder_hidden_states", "encoder_attention_mask", "negative_encoder_hidden_states",
                                                     "negative_encoder_attention_mask", "guidance_scale"]
    info = json.loads((tmp_path / "pipeline.json").read_text())
    tokenizer = info["tokenizers"]["tokenizer"]
    assert tokenizer["prefix"] == "\n".join(_call_default("complex_human_instruction")) and tokenizer["negative_max_length"] == TOKENS
    assert tokenizer["max_length"] == pipeline.text_encoders[0].prompt_length > TOKENS

    # An app's path: tokenizer.json (lowercasing, stripping, then the instruction) for prompts, negative_tokenizer.json for the
    # negative prompt, the Gemma2 encoder on both lengths, the sampler with the AutoencoderDC decoder.
    prompts = PROMPTS[:2]
    noise = torch.randn(len(prompts), 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = _app().generate(tmp_path, prompts, NEGATIVE, noise=noise.numpy())
    pipe = _diffusers_pipeline(folders[name])
    reference = pipe(prompts, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=guidance, height=32, width=32,
                     use_resolution_binning=False, latents=noise.clone(), output_type="np").images
    assert ours.shape == reference.shape == (2, 32, 32, 3)
    assert reference.std() > 0.02  # a real picture, not a constant
    image_error = float(np.abs(ours - reference).max())
    assert image_error < 1e-3, image_error  # the image range is [0, 1]

    # The text encoder graph on diffusers' own ids: a prompt's (instruction + prompt) and a negative prompt's (300 tokens).
    session = ort.InferenceSession(str(tmp_path / "text_encoder.onnx"))
    encoder = pipeline.text_encoders[0]
    with torch.no_grad():
        embeds, mask, negative, _ = pipe.encode_prompt(prompts, True, negative_prompt=NEGATIVE, device="cpu",
                                                       complex_human_instruction=_call_default("complex_human_instruction"))
    for ids, theirs in ((encoder.tokenize(prompts), embeds), (encoder.tokenize([NEGATIVE] * 2, negative=True), negative)):
        assert np.abs(session.run(None, {"input_ids": ids.numpy()})[0] - theirs.numpy()).max() < 1e-4
    print(f"Sana {name}: image max abs diff {image_error:.2e}")


def test_compress_runs_reference_is_the_sana_pipelines_own_call(folders):
    """`compress run`'s baseline with Sana's own solver name: DPMSolver++ on the folder's flow sigmas and flow shift."""
    from runtimes.text_to_image import diffusers_images, diffusers_pipeline

    pipe = diffusers_pipeline(folders["dpm"], "dpmpp-2m")
    assert pipe.scheduler.config.flow_shift == 3.0 and pipe.scheduler.config.use_flow_sigmas
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    images = diffusers_images(pipe, PROMPTS[:2], noise, STEPS, 4.5, show_progress=False)
    direct = _diffusers_pipeline(folders["dpm"])(PROMPTS[:2], num_inference_steps=STEPS, guidance_scale=4.5, latents=noise.clone(), height=32,
                                                 width=32, use_resolution_binning=False, output_type="np").images
    assert torch.equal(images, torch.from_numpy(direct).permute(0, 3, 1, 2).float())


@pytest.mark.slow
def test_openvino_ir_of_a_sana_export_makes_the_onnx_apps_image(folders, tmp_path):
    """The IR keeps the text encoder's dynamic token axis: prompts (instruction + prompt) and negative prompts both run."""
    from runtimes.text_to_image import PipelineRunner

    pipeline = load_pipeline(f"diffusers:{folders['dpm']}")
    solver = resolve_solver(pipeline.denoiser, "model", STEPS, guidance=pipeline_guidance(pipeline, None))
    export_artifacts(pipeline, solver, tmp_path, ["onnx", "openvino"])
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).numpy()
    onnx_images = _app().generate(tmp_path, PROMPTS[:2], NEGATIVE, noise=noise)
    ir_images = np.asarray(PipelineRunner(tmp_path, "openvino").generate(PROMPTS[:2], noise, NEGATIVE)).transpose(0, 2, 3, 1)
    assert np.abs(ir_images - onnx_images).max() < 1e-4
