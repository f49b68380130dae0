"""Stable Diffusion 3 pipeline folders (two CLIPs, an optional T5, an SD3Transformer2DModel on a rectified flow):
loaded, encoded and exported, against diffusers' own StableDiffusion3Pipeline built from tiny random folders."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.errors import UserError
from compress.export_chain import export_artifacts, pipeline_guidance, resolve_solver
from compress.loading import load_pipeline
from tests.bad_folders import copy_folder, edit_index, export_fails_with, replace_model
from tests.tiny_pipelines import _sd3_transformer, _t5_encoder, build_sd3_folder

ROOT = Path(__file__).resolve().parents[1]
# The last prompt is longer than both CLIP's 77 tokens and T5's 256: both truncate.
PROMPTS = ["a handwritten seven", "The Digit 3!", "seven " * 60]
NEGATIVE = "blurry"
STEPS = 4
TOKENS = 77 + 256  # CLIP tokens, then T5's (or the zeros standing in for them)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    return {"t5": build_sd3_folder(root / "sd3-t5", with_t5=True), "clip-only": build_sd3_folder(root / "sd3-clip", with_t5=False)}


def _diffusers_pipeline(folder: Path):
    from diffusers import StableDiffusion3Pipeline

    index = json.loads((folder / "model_index.json").read_text())
    # diffusers loads a folder whose model_index leaves out T5 only when told so.
    absent = {} if index["text_encoder_3"][1] else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", ["t5", "clip-only"])
def test_prompt_encoding_is_stable_diffusion_3s_encode_prompt(folders, name):
    pipeline = load_pipeline(f"diffusers:{folders[name]}")
    pipe = _diffusers_pipeline(folders[name])
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu", negative_prompt=[NEGATIVE] * 3)
        _, empty, _, empty_pooled = pipe.encode_prompt(PROMPTS[:1], None, None, device="cpu")
    ours = pipeline.encode_prompts(PROMPTS)
    ours_negative = pipeline.negative_condition(3, NEGATIVE)
    null = pipeline.denoiser.null_condition(1)  # SD3 guides against the encoded "" (no zeros for an empty prompt)
    assert ours["encoder_hidden_states"].shape == embeds.shape == (3, TOKENS, 32)
    assert ours["pooled_projections"].shape == pooled.shape == (3, 24)
    pairs = [(ours["encoder_hidden_states"], embeds), (ours["pooled_projections"], pooled),
             (ours_negative["encoder_hidden_states"], negative), (ours_negative["pooled_projections"], negative_pooled),
             (null["encoder_hidden_states"], empty), (null["pooled_projections"], empty_pooled)]
    errors = [float((a - b).abs().max()) for a, b in pairs]
    assert max(errors) < 1e-5, errors
    states = ours["encoder_hidden_states"]
    assert states[:, :77, 24:].abs().max() == 0  # the CLIP states (8 + 16 wide) zero-padded to the joint width
    t5_part = states[:, 77:].abs().max()
    assert (t5_part > 0) if name == "t5" else (t5_part == 0)
    assert null["encoder_hidden_states"].abs().sum() > 0
    assert pipeline.default_guidance_scale == 7.0 and pipeline.denoiser.prediction_type == "flow"
    assert pipeline.denoiser.schedule.kind == "flow" and pipeline.denoiser.schedule.shift == 3.0


def test_denoiser_module_is_the_transformers_own_call(folders):
    pipeline = load_pipeline(f"diffusers:{folders['t5']}")
    pipe = _diffusers_pipeline(folders["t5"])
    cond = pipeline.encode_prompts(PROMPTS[:2])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in (1000.0, 937.5, 3.25):  # float timesteps, as the pipeline passes sigma * 1000
            theirs = pipe.transformer(hidden_states=x, timestep=torch.full((2,), t), encoder_hidden_states=cond["encoder_hidden_states"],
                                      pooled_projections=cond["pooled_projections"]).sample
            ours = pipeline.denoiser.module(x, t, cond)
            assert float((ours - theirs).abs().max()) < 1e-6
    assert theirs.std() > 0.1


def test_sd3_folders_whose_parts_disagree_fail_with_one_line(folders, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()

    narrow_joint = copy_folder(folders, "clip-only", bad)
    replace_model(narrow_joint, "transformer", _sd3_transformer(16, 24, seed=0))
    export_fails_with(capsys, narrow_joint, tmp_path / "o1", "the CLIP encoders give 24-wide hidden states (8 + 16) but the transformer's joint_attention_dim is 16")

    wrong_pooled = copy_folder(folders, "clip-only", bad)
    replace_model(wrong_pooled, "transformer", _sd3_transformer(32, 40, seed=0))
    export_fails_with(capsys, wrong_pooled, tmp_path / "o2", "pooled outputs give 24 features (8 + 16) but the transformer's pooled_projection_dim is 40")

    wrong_t5 = copy_folder(folders, "t5", bad)
    replace_model(wrong_t5, "text_encoder_3", _t5_encoder(24, 80, seed=0))
    export_fails_with(capsys, wrong_t5, tmp_path / "o3", "text_encoder_3 gives 24-wide hidden states but the transformer's joint_attention_dim is 32")

    wrong_latents = copy_folder(folders, "clip-only", bad)
    from diffusers import AutoencoderKL

    replace_model(wrong_latents, "vae", AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                                       up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=8, norm_num_groups=8))
    export_fails_with(capsys, wrong_latents, tmp_path / "o4", "the VAE has 8 latent channels but the transformer takes 4")

    not_flow = copy_folder(folders, "clip-only", bad)
    (not_flow / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler", "num_train_timesteps": 1000}))
    export_fails_with(capsys, not_flow, tmp_path / "o5", "not a flow-matching one")

    unpooled = copy_folder(folders, "clip-only", bad)
    edit_index(unpooled, text_encoder=["transformers", "CLIPTextModel"])
    export_fails_with(capsys, unpooled, tmp_path / "o6", "text_encoder is a CLIPTextModel, which is not supported (supported: CLIPTextModelWithProjection)")

    pipeline = load_pipeline(f"diffusers:{folders['clip-only']}")
    with pytest.raises(UserError, match="multiples of 4 .*patch size 2"):
        pipeline.at_resolution(18, 18)
    with pytest.raises(UserError, match="positions for at most 64 pixels"):
        pipeline.at_resolution(68, 68)
    assert pipeline.at_resolution(24, 32).denoiser.sample_shape == (4, 12, 16)


def _flow_solvers_landed() -> bool:
    """The model's own FlowMatchEulerDiscreteScheduler as a baked solver (the flow solvers on main)."""
    from compress.scheduler_config import solver_from_scheduler_config

    try:
        solver_from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, STEPS, 7.0)
    except UserError:
        return False
    return True


needs_flow_solvers = pytest.mark.skipif(not _flow_solvers_landed(), reason="needs the flow-matching solvers (FlowMatchEuler read by --solver model)")


def _app(name: str = "text_to_image_onnx"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_flow_solvers
@pytest.mark.parametrize("name", ["t5", "clip-only"])
def test_exported_sd3_pipeline_matches_diffusers_from_prompt_to_image(folders, name, tmp_path):
    import onnxruntime as ort

    size = (16, 16) if name == "t5" else (24, 32)  # the folder's own size, and a wider one (the positional grid cropped to it)
    pipeline = load_pipeline(f"diffusers:{folders[name]}").at_resolution(*size)
    guidance = pipeline_guidance(pipeline, None)
    solver = resolve_solver(pipeline.denoiser, "model", STEPS, guidance=guidance)
    formats = ["onnx", "openvino"] if name == "t5" else ["onnx"]
    records = export_artifacts(pipeline, solver, tmp_path, formats)
    encoders = {"text_encoder", "text_encoder_2"} | ({"text_encoder_3"} if name == "t5" else set())
    assert {(r["kind"], r["format"]) for r in records} == {(k, f) for k in encoders | {"sampler", "denoiser", "vae_decoder", "vae_encoder"} for f in formats}
    sidecar = json.loads((tmp_path / "sampler.json").read_text())
    assert [i["name"] for i in sidecar["inputs"]] == ["noise", "encoder_hidden_states", "pooled_projections", "negative_encoder_hidden_states",
                                                     "negative_pooled_projections", "guidance_scale"]
    assert sidecar["guidance"]["default_scale"] == 7.0 and sidecar["prediction_type"] == "flow"

    # An app's path: tokenizer.json files, every text encoder, the layout of pipeline.json, the sampler with the decoder baked in.
    prompts = PROMPTS[:2]
    noise = torch.randn(len(prompts), 4, size[0] // 2, size[1] // 2, generator=torch.Generator().manual_seed(0))
    ours = _app().generate(tmp_path, prompts, NEGATIVE, noise=noise.numpy())
    pipe = _diffusers_pipeline(folders[name])
    reference = pipe(prompts, negative_prompt=[NEGATIVE] * len(prompts), num_inference_steps=STEPS, guidance_scale=guidance,
                     latents=noise.clone(), output_type="np", height=size[0], width=size[1]).images
    assert ours.shape == reference.shape == (2, *size, 3)
    assert reference.std() > 0.02  # a real picture, not a constant
    assert np.abs(ours - reference).max() < 1e-3  # the image range is [0, 1]
    if "openvino" in formats:  # the OpenVINO app chains the same files in IR, T5 included
        seeded = _app().generate(tmp_path, prompts, NEGATIVE, seed=3)
        openvino = _app("text_to_image_openvino").generate(tmp_path, prompts, NEGATIVE, seed=3, config={"INFERENCE_PRECISION_HINT": "f32"})
        assert np.abs(openvino - seeded).max() < 1e-3

    # The bare denoiser graph on diffusers' own embeddings, at a float timestep.
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=False)
        theirs = pipe.transformer(hidden_states=noise, timestep=torch.full((2,), 812.5), encoder_hidden_states=embeds, pooled_projections=pooled).sample
    denoiser = ort.InferenceSession(str(tmp_path / "denoiser.onnx")).run(None, {
        "sample": noise.numpy(), "timestep": np.full((2,), 812.5, np.float32), "encoder_hidden_states": embeds.numpy(), "pooled_projections": pooled.numpy()})[0]
    assert np.abs(denoiser - theirs.numpy()).max() < 1e-4 * max(1.0, float(theirs.abs().max()))
    bare = json.loads((tmp_path / "denoiser.json").read_text())["schedule"]
    assert bare["kind"] == "flow" and bare["shift"] == 3.0 and "alphas_cumprod" not in bare
    layout = json.loads((tmp_path / "pipeline.json").read_text())["text_layout"]
    assert layout == {"channels": ["text_encoder", "text_encoder_2"], "pad_channels_to": 32,
                      "sequence": ["text_encoder_3"] if name == "t5" else [], "zero_tokens": 0 if name == "t5" else 256}


@needs_flow_solvers
def test_compress_run_validates_sd3_against_its_own_flow_scheduler(folders, tmp_path):
    """The baseline is diffusers' StableDiffusion3Pipeline with FlowMatchEuler (not a VP Euler built from its config)."""
    from compress.pipeline import run
    from compress.recipe import parse_recipe

    recipe = parse_recipe({"name": "tiny-sd3", "model": f"diffusers:{folders['clip-only']}",
                           "solver": {"name": "euler", "steps": STEPS, "spacing": "linspace", "guidance_scale": 7.0},
                           "export": {"formats": ["onnx"]}, "bench": {"runs": 1},
                           "validate": {"reference": {"name": "euler", "steps": STEPS}, "samples": 2, "prompts": PROMPTS[:2], "negative_prompt": NEGATIVE}})
    report = run(recipe, tmp_path / "out", log=lambda m: None)
    rows = {(r["artifact"], r["runtime"]): r for r in report["rows"]}
    assert rows[("float32/modules", "torch")]["psnr"] > 60
    assert rows[("float32/pipeline", "onnxruntime")]["psnr"] > 60
    assert rows[("baseline", "diffusers")]["macs"] > 0


@pytest.mark.slow
@needs_flow_solvers
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.export on its own treespec API
def test_sd3_core_ml_packages_match_their_sidecars(folders, tmp_path):
    """Every SD3 component converts (T5's where.ScalarOther included); Core ML predicts only on macOS, so checked structurally."""
    from tests.test_coreml_pipeline import _check_against_sidecars

    pipeline = load_pipeline(f"diffusers:{folders['t5']}")
    solver = resolve_solver(pipeline.denoiser, "model", 2, guidance=pipeline_guidance(pipeline, None))
    records = export_artifacts(pipeline, solver, tmp_path, ["onnx", "coreml"])
    kinds = {"text_encoder", "text_encoder_2", "text_encoder_3", "sampler", "denoiser", "vae_decoder", "vae_encoder"}
    assert {r["kind"] for r in records if r["format"] == "coreml"} == kinds
    files = json.loads((tmp_path / "pipeline.json").read_text())["components"]
    structures = _check_against_sidecars(tmp_path, files)
    assert structures["text_encoder_3"]["inputs"] == [{"name": "input_ids", "shape": [1, 256], "dtype": "int32"}]
    assert [f["name"] for f in structures["sampler"]["inputs"]] == [
        "noise", "encoder_hidden_states", "pooled_projections", "negative_encoder_hidden_states", "negative_pooled_projections", "guidance_scale"]
    assert structures["sampler"]["inputs"][1]["shape"] == [1, TOKENS, 32]
