"""FLUX pipeline folders (CLIP pooled + T5 in front of a FluxTransformer2DModel on packed latents, a rectified flow with a
dynamic or static shift): loaded, encoded and exported, against diffusers' own FluxPipeline built from tiny random folders.

Two styles: guidance-distilled (``guidance_embeds``, FLUX-dev: the guidance scale is an input of the network, one branch)
and guidance-free (FLUX-schnell)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.cli import main
from compress.errors import UserError
from compress.export_chain import export_artifacts, pipeline_guidance, resolve_solver
from compress.loading import load_pipeline
from tests.bad_folders import copy_folder, edit_index, export_fails_with, replace_model
from tests.tiny_pipelines import _flux_transformer, _text_encoder, build_flux_folder

ROOT = Path(__file__).resolve().parents[1]
# The last prompt is longer than CLIP's 77 tokens (T5's 512 take it whole).
PROMPTS = ["a handwritten seven", "The Digit 3!", "seven " * 60]
STEPS = 4
SIZE = 16  # pixels per side: 8x8 latents, 4x4 = 16 packed image tokens


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {"dev": build_flux_folder(root / "flux-dev", guidance_embeds=True), "schnell": build_flux_folder(root / "flux-schnell", guidance_embeds=False)}


def _diffusers_pipeline(folder: Path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_prompt_encoding_is_fluxs_encode_prompt(folders, name):
    pipeline = load_pipeline(f"diffusers:{folders[name]}")
    pipe = _diffusers_pipeline(folders[name])
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, device="cpu")
    ours = pipeline.encode_prompts(PROMPTS)
    assert ours["encoder_hidden_states"].shape == embeds.shape == (3, 512, 32)
    assert ours["pooled_projections"].shape == pooled.shape == (3, 16)
    assert float((ours["encoder_hidden_states"] - embeds).abs().max()) < 1e-5
    assert float((ours["pooled_projections"] - pooled).abs().max()) < 1e-5
    assert text_ids.abs().max() == 0  # what the wrapper builds inside: zeros
    d = pipeline.denoiser
    assert d.prediction_type == "flow" and d.schedule.kind == "flow" and not d.has_null_condition and d.null_text is None
    # FluxPipeline's default size: 128 latents per side (here 256 px), with the dynamic shift of 64 x 64 image tokens.
    assert d.sample_shape == (4, 128, 128)
    if name == "dev":
        assert d.guidance_embedded and d.supports_guidance and pipeline.default_guidance_scale == 3.5
        mu = 4096 * (1.15 - 0.5) / (4096 - 256) + 0.5 - 256 * (1.15 - 0.5) / (4096 - 256)
        assert d.schedule.shift == pytest.approx(np.exp(mu))
        assert pipeline.at_resolution(SIZE, SIZE).denoiser.schedule.shift == pytest.approx(np.exp(16 * (0.65 / 3840) + 0.5 - 256 * 0.65 / 3840))
    else:
        assert not d.guidance_embedded and not d.supports_guidance and pipeline.default_guidance_scale is None
        assert d.schedule.shift == 1.0 and pipeline.at_resolution(SIZE, SIZE).denoiser.schedule.shift == 1.0


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_denoiser_module_is_the_transformers_own_call(folders, name):
    pipeline = load_pipeline(f"diffusers:{folders[name]}").at_resolution(24, SIZE)  # not square: rows and columns of the ids differ
    pipe = _diffusers_pipeline(folders[name])
    cond = pipeline.encode_prompts(PROMPTS[:2])
    x = torch.randn(2, 4, 12, 8, generator=torch.Generator().manual_seed(0))
    packed = pipe._pack_latents(x, 2, 4, 12, 8)
    image_ids = pipe._prepare_latent_image_ids(2, 6, 4, "cpu", torch.float32)
    guidance = torch.full((2,), 3.5) if name == "dev" else None
    with torch.no_grad():
        for t in (1000.0, 812.5, 3.25):  # the pipeline's float timesteps sigma * 1000, passed on divided by 1000
            theirs = pipe.transformer(hidden_states=packed, timestep=torch.full((2,), t) / 1000, guidance=guidance,
                                      pooled_projections=cond["pooled_projections"], encoder_hidden_states=cond["encoder_hidden_states"],
                                      txt_ids=torch.zeros(512, 3), img_ids=image_ids).sample
            theirs = pipe._unpack_latents(theirs, 24, SIZE, pipe.vae_scale_factor)
            given = {**cond, "guidance": guidance} if name == "dev" else cond
            ours = pipeline.denoiser.module(x, t, given)
            assert float((ours - theirs).abs().max()) < 1e-6
    assert theirs.std() > 0.1
    if name == "dev":  # the guidance value matters, and a missing one is the user's error
        with torch.no_grad():
            other = pipeline.denoiser.module(x, 500.0, {**cond, "guidance": torch.full((2,), 1.0)})
            again = pipeline.denoiser.module(x, 500.0, {**cond, "guidance": guidance})
        assert float((other - again).abs().max()) > 1e-3
        with pytest.raises(UserError, match="guidance-distilled"):
            pipeline.denoiser.module(x, 500.0, cond)


def test_model_solver_is_fluxpipelines_own_loop(folders):
    """--solver model: FluxPipeline's sigmas linspace(1, 1/K, K), shifted for the image's token count."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    for name in ("dev", "schnell"):
        pipeline = load_pipeline(f"diffusers:{folders[name]}").at_resolution(SIZE, SIZE)
        solver = resolve_solver(pipeline.denoiser, "model", STEPS, guidance=pipeline_guidance(pipeline, None))
        assert (solver.name, solver.spacing) == ("euler", "trailing")
        config = json.loads((folders[name] / "scheduler" / "scheduler_config.json").read_text())
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(16, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
        plan = solver.plan(pipeline.denoiser.schedule)
        assert np.abs(plan.timesteps - scheduler.timesteps.double().numpy()).max() < 1e-3
        # The plan keeps its first level a hair below 1 (solvers.FLOW_SIGMA_CAP), where the scheduler starts at 1.
        assert np.abs(plan.sigma - scheduler.sigmas.double().numpy()).max() < 2e-6


def test_guidance_settings_follow_the_model(folders, tmp_path, capsys):
    dev = load_pipeline(f"diffusers:{folders['dev']}")
    assert pipeline_guidance(dev, None) == 3.5 and pipeline_guidance(dev, 1.0) == 1.0  # a guidance embedding takes any value
    schnell = load_pipeline(f"diffusers:{folders['schnell']}")
    assert pipeline_guidance(schnell, None) is None
    code = main(["export", f"diffusers:{folders['schnell']}", "--solver", "model", "--steps", "2", "--guidance", "3", "--resolution", "16x16",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "has neither" in err, err


def test_flux_folders_whose_parts_disagree_fail_with_one_line(folders, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()

    narrow_joint = copy_folder(folders, "schnell", bad)
    replace_model(narrow_joint, "transformer", _flux_transformer(24, 16, False, seed=0))
    export_fails_with(capsys, narrow_joint, tmp_path / "o1", "text_encoder_2 gives 32-wide hidden states but the transformer's joint_attention_dim is 24")

    wrong_pooled = copy_folder(folders, "schnell", bad)
    replace_model(wrong_pooled, "text_encoder", _text_encoder(24, None, seed=0))
    export_fails_with(capsys, wrong_pooled, tmp_path / "o2", "text_encoder's pooled output has 24 features but the transformer's pooled_projection_dim is 16")

    wrong_latents = copy_folder(folders, "schnell", bad)
    replace_model(wrong_latents, "transformer", _flux_transformer(32, 16, False, seed=0, in_channels=8))
    export_fails_with(capsys, wrong_latents, tmp_path / "o3", "the VAE has 4 latent channels (16 packed in 2x2 patches) but the transformer takes 8")

    not_flow = copy_folder(folders, "dev", bad)
    (not_flow / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler", "num_train_timesteps": 1000}))
    export_fails_with(capsys, not_flow, tmp_path / "o4", "not a flow-matching one")

    projected = copy_folder(folders, "dev", bad)
    edit_index(projected, text_encoder=["transformers", "CLIPTextModelWithProjection"])
    export_fails_with(capsys, projected, tmp_path / "o5", "text_encoder is a CLIPTextModelWithProjection, which is not supported (supported: CLIPTextModel)")

    no_t5 = copy_folder(folders, "dev", bad)
    edit_index(no_t5, text_encoder_2=[None, None])
    export_fails_with(capsys, no_t5, tmp_path / "o6", "has no text_encoder_2")

    other_transformer = copy_folder(folders, "dev", bad)
    edit_index(other_transformer, transformer=["diffusers", "SD3Transformer2DModel"])
    export_fails_with(capsys, other_transformer, tmp_path / "o7", "transformer is a SD3Transformer2DModel, which is not supported (supported: FluxTransformer2DModel)")

    export_fails_with(capsys, folders["dev"] / "transformer", tmp_path / "o8", "a FluxTransformer2DModel is conditioned by its pipeline's text encoders: load the whole FluxPipeline folder")

    pipeline = load_pipeline(f"diffusers:{folders['dev']}")
    with pytest.raises(UserError, match="multiples of 4 .*latent packing 2"):
        pipeline.at_resolution(18, 18)


def _app(name: str = "text_to_image_onnx"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_exported_flux_pipeline_matches_diffusers_from_prompt_to_image(folders, name, tmp_path):
    """FLUX-dev: the sampler with the decoder baked in, through the ONNX app; FLUX-schnell: the sampler's latents
    (``--output latents``), then the VAE decoder, each compared with diffusers."""
    import onnxruntime as ort

    pipeline = load_pipeline(f"diffusers:{folders[name]}").at_resolution(SIZE, SIZE)
    guidance = pipeline_guidance(pipeline, None)
    solver = resolve_solver(pipeline.denoiser, "model", STEPS, guidance=guidance)
    formats, output = ["onnx"], "image" if name == "dev" else "latents"
    records = export_artifacts(pipeline, solver, tmp_path, formats, output=output)
    kinds = {"text_encoder", "text_encoder_2", "sampler", "denoiser", "vae_decoder", "vae_encoder"}
    assert {(r["kind"], r["format"]) for r in records} == {(k, f) for k in kinds for f in formats}
    sidecar = json.loads((tmp_path / "sampler.json").read_text())
    names = [i["name"] for i in sidecar["inputs"]]
    if name == "dev":  # one branch: no negative inputs; the scale goes to the guidance embedding
        assert names == ["noise", "encoder_hidden_states", "pooled_projections", "guidance_scale"]
        assert sidecar["guidance"] == {"enabled": True, "kind": "embedded", "default_scale": 3.5}
        assert sidecar["solver"]["network_batch"] == "batch"
    else:
        assert names == ["noise", "encoder_hidden_states", "pooled_projections"] and not sidecar["guidance"]["enabled"]
    assert sidecar["conditioning"]["unconditional"].startswith("not available")
    info = json.loads((tmp_path / "pipeline.json").read_text())
    assert info["text_layout"] == {"channels": ["text_encoder_2"], "pad_channels_to": None, "sequence": [], "zero_tokens": 0}
    assert info["pooled_input"] == "pooled_projections"

    prompts = PROMPTS[:2]
    noise = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe = _diffusers_pipeline(folders[name])
    packed = pipe._pack_latents(noise.clone(), len(prompts), 4, 8, 8)
    call = dict(num_inference_steps=STEPS, latents=packed, height=SIZE, width=SIZE, guidance_scale=3.5 if guidance is None else guidance)
    reference = pipe(prompts, output_type="np", **call).images
    assert reference.shape == (2, SIZE, SIZE, 3) and reference.std() > 0.02  # a real picture, not a constant
    # An app's path: tokenizer.json files, both encoders joined as pipeline.json says, the sampler (then the VAE decoder).
    if output == "image":
        image = _app().generate(tmp_path, prompts, noise=noise.numpy())
    else:
        feeds = {**_app().encode(tmp_path, info, prompts), "noise": noise.numpy()}
        sampler = ort.InferenceSession(str(tmp_path / "sampler.onnx"))
        latents = sampler.run(None, feeds)[0]
        # The batch is dynamic (exported at 2): one prompt alone gives its row.
        single = sampler.run(None, {k: v[:1] for k, v in feeds.items()})[0]
        assert np.abs(single - latents[:1]).max() < 1e-5
        image = ort.InferenceSession(str(tmp_path / "vae_decoder.onnx")).run(None, {"latents": latents})[0].transpose(0, 2, 3, 1)
        theirs = pipe._unpack_latents(pipe(prompts, output_type="latent", **call).images, SIZE, SIZE, pipe.vae_scale_factor).numpy()
        scale = float(np.abs(theirs).max())
        latent_error = float(np.abs(latents - theirs).max())
        assert latent_error < 1e-3 * scale, (latent_error, scale)
        print(f"FLUX-{name}: latents max abs diff {latent_error:.2e} (range {scale:.2f})")
    image_error = float(np.abs(image - reference).max())
    assert image_error < 1e-3, image_error  # the image range is [0, 1]
    print(f"FLUX-{name}: image max abs diff {image_error:.2e}")

    # The bare denoiser graph on diffusers' own embeddings, guidance per sample where the model embeds it.
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device="cpu")
    denoiser = ort.InferenceSession(str(tmp_path / "denoiser.onnx"))
    assert [i.name for i in denoiser.get_inputs()] == ["sample", "timestep", "encoder_hidden_states", "pooled_projections"] + (["guidance"] if name == "dev" else [])
    bare = {"sample": noise.numpy(), "timestep": np.full((2,), 812.5, np.float32), "encoder_hidden_states": embeds.numpy(), "pooled_projections": pooled.numpy()}
    cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    if name == "dev":
        bare["guidance"] = np.full((2,), 3.5, np.float32)
        cond["guidance"] = torch.full((2,), 3.5)
    with torch.no_grad():
        expected = pipeline.denoiser.module(noise, 812.5, cond).numpy()
    assert np.abs(denoiser.run(None, bare)[0] - expected).max() < 1e-4 * max(1.0, float(np.abs(expected).max()))
    three = {k: np.concatenate([v, v[:1]]) for k, v in bare.items()}  # another batch than the traced one
    assert np.abs(denoiser.run(None, three)[0][:2] - expected).max() < 1e-4 * max(1.0, float(np.abs(expected).max()))
    schedule = json.loads((tmp_path / "denoiser.json").read_text())["schedule"]
    assert schedule["kind"] == "flow" and schedule["shift"] == pytest.approx(pipeline.denoiser.schedule.shift)


@pytest.mark.slow
def test_openvino_ir_of_a_flux_dev_export_makes_the_onnx_apps_image(folders, tmp_path):
    """The IR keeps the interface's names where conversion folds an input away (timestep / 1000 * 1000)."""
    pipeline = load_pipeline(f"diffusers:{folders['dev']}").at_resolution(SIZE, SIZE)
    solver = resolve_solver(pipeline.denoiser, "model", STEPS, guidance=pipeline_guidance(pipeline, None))
    export_artifacts(pipeline, solver, tmp_path, ["onnx", "openvino"])
    prompts = PROMPTS[:2]
    seeded = _app().generate(tmp_path, prompts, seed=3, guidance=2.0)
    openvino = _app("text_to_image_openvino").generate(tmp_path, prompts, seed=3, guidance=2.0, config={"INFERENCE_PRECISION_HINT": "f32"})
    assert np.abs(openvino - seeded).max() < 1e-3
    assert np.abs(_app().generate(tmp_path, prompts, seed=3) - seeded).max() > 1e-4  # the guidance value reaches the network


def test_compress_runs_reference_is_fluxpipelines_own_call(folders):
    """`compress run`'s baseline: the toolkit's [B, C, H, W] noise packed for FluxPipeline, the pipeline's own FlowMatch Euler."""
    from runtimes.text_to_image import diffusers_images, diffusers_pipeline

    pipe = diffusers_pipeline(folders["dev"], "euler")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = diffusers_images(pipe, PROMPTS[:2], noise, STEPS, 2.0, show_progress=False)
    direct = pipe(PROMPTS[:2], num_inference_steps=STEPS, guidance_scale=2.0, latents=pipe._pack_latents(noise.clone(), 2, 4, 8, 8),
                  height=SIZE, width=SIZE, output_type="np").images
    assert torch.equal(images, torch.from_numpy(direct).permute(0, 3, 1, 2).float())
    with pytest.raises(UserError, match="FluxPipeline samples with FlowMatchEulerDiscreteScheduler only"):
        diffusers_pipeline(folders["dev"], "dpmpp-2m")
