"""Text-to-image pipelines: tiny random SD 1.x (AutoencoderKL, AutoencoderTiny) and SDXL folders, exported and
run as an app runs them (examples/text_to_image_onnx.py: numpy, onnxruntime, tokenizers), against diffusers' own
pipelines from the same latents, prompts and negative prompt."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.cli import main
from compress.errors import UserError
from compress.export_chain import export_artifacts, pipeline_guidance, resolve_solver
from compress.loading import load_pipeline
from tests.tiny_pipelines import build_sd_folder, build_sdxl_folder

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a handwritten seven", "the digit 3"]
NEGATIVE = "blurry"
STEPS = 4


def _example(name: str = "text_to_image_onnx"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {
        "sd-kl": build_sd_folder(root / "sd-kl", vae="kl"),
        "sd-tiny": build_sd_folder(root / "sd-tiny", vae="tiny"),
        "sdxl": build_sdxl_folder(root / "sdxl"),
    }


@pytest.fixture(scope="module")
def exported(folders, tmp_path_factory):
    """The default ONNX export of each folder, made once: name -> (pipeline, records, folder)."""
    made = {}

    def get(name):
        if name not in made:
            out = tmp_path_factory.mktemp(f"export-{name}")
            made[name] = (*_export(folders[name], out), out)
        return made[name]

    return get


def _diffusers_images(folder: Path, noise: torch.Tensor, guidance: float, negative=NEGATIVE, size=(16, 16)) -> np.ndarray:
    import diffusers

    index = json.loads((folder / "model_index.json").read_text())
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    negative = None if negative is None else [negative] * len(PROMPTS)
    out = pipe(PROMPTS, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=guidance, latents=noise.clone(),
               output_type="np", height=size[0], width=size[1])
    return out.images


def _export(folder: Path, out: Path, guidance: float | None = None, formats=("onnx",), output="image", resolution=None):
    pipeline = load_pipeline(f"diffusers:{folder}")
    if resolution:
        pipeline = pipeline.at_resolution(*resolution)
    solver = resolve_solver(pipeline.denoiser, "model", STEPS, guidance=pipeline_guidance(pipeline, guidance))
    return pipeline, export_artifacts(pipeline, solver, out, list(formats), output=output)


@pytest.mark.parametrize("name", ["sd-kl", "sd-tiny", "sdxl"])
def test_exported_pipeline_matches_diffusers_from_prompt_to_image(folders, exported, name):
    pipeline, records, tmp_path = exported(name)
    kinds = {r["kind"] for r in records}
    encoders = {"text_encoder", "text_encoder_2"} if name == "sdxl" else {"text_encoder"}
    assert kinds == encoders | {"sampler", "denoiser", "vae_decoder", "vae_encoder"}
    noise = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    guidance = pipeline.default_guidance_scale
    ours = _example().generate(tmp_path, PROMPTS, NEGATIVE, guidance=guidance, noise=noise.numpy())
    reference = _diffusers_images(folders[name], noise, guidance)
    assert ours.shape == reference.shape == (2, 16, 16, 3)
    assert reference.std() > 0.02  # a real picture, not a constant
    assert np.abs(ours - reference).max() < 1e-3  # the image range is [0, 1]
    sidecar = json.loads((tmp_path / "sampler.json").read_text())
    assert sidecar["outputs"][0]["name"] == "image" and sidecar["outputs"][0]["range"] == [0.0, 1.0]
    assert [i["name"] for i in sidecar["inputs"]][:2] == ["noise", "encoder_hidden_states"]


def test_sdxl_without_a_negative_prompt_uses_zeros_as_diffusers_does(folders, exported):
    pipeline, _, tmp_path = exported("sdxl")
    assert json.loads((tmp_path / "pipeline.json").read_text())["guidance"]["zeros_for_empty_negative_prompt"] is True
    noise = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = _example().generate(tmp_path, PROMPTS, None, guidance=5.0, noise=noise.numpy())
    reference = _diffusers_images(folders["sdxl"], noise, 5.0, negative=None)
    assert np.abs(ours - reference).max() < 1e-3


def test_empty_negative_prompt_is_the_baked_null_condition(folders):
    """SD 1.x: the unconditional branch of host sampling and calibration is the encoded "" (not zeros)."""
    from diffusers import StableDiffusionPipeline

    pipeline = load_pipeline(f"diffusers:{folders['sd-kl']}")
    # diffusers' own encoding of "", the negative embedding its pipeline uses when no negative prompt is given.
    with torch.no_grad():
        reference, _ = StableDiffusionPipeline.from_pretrained(str(folders["sd-kl"])).encode_prompt("", "cpu", 1, False)
    null = pipeline.denoiser.null_condition(1)
    assert null.shape == reference.shape == (1, 77, 32)
    torch.testing.assert_close(null, reference, rtol=1e-5, atol=1e-6)
    assert reference.abs().sum() > 0


def test_guidance_off_exports_one_branch_at_the_asked_resolution_that_matches_diffusers(folders, tmp_path):
    pipeline, _ = _export(folders["sd-kl"], tmp_path, guidance=0.0, resolution=(24, 32))
    sidecar = json.loads((tmp_path / "sampler.json").read_text())
    assert [i["name"] for i in sidecar["inputs"]] == ["noise", "encoder_hidden_states"]
    assert sidecar["guidance"]["enabled"] is False and sidecar["solver"]["network_batch"] == "batch"
    assert sidecar["outputs"][0]["shape"] == ["batch", 3, 24, 32]
    noise = torch.randn(len(PROMPTS), 4, 12, 16, generator=torch.Generator().manual_seed(2))
    ours = _example().generate(tmp_path, PROMPTS, noise=noise.numpy())
    reference = _diffusers_images(folders["sd-kl"], noise, 0.0, negative=None, size=(24, 32))
    assert ours.shape == reference.shape == (2, 24, 32, 3)
    assert np.abs(ours - reference).max() < 1e-3
    with pytest.raises(UserError, match="multiples of 4"):
        pipeline.at_resolution(30, 30)


def test_latent_output_chains_into_the_vae_decoder(folders, exported, tmp_path):
    import onnxruntime as ort

    _export(folders["sd-kl"], tmp_path / "latents", output="latents")
    image_folder = exported("sd-kl")[2]
    sidecar = json.loads((tmp_path / "latents" / "sampler.json").read_text())
    out = sidecar["outputs"][0]
    assert out["name"] == "sample" and out["range"] is None and out["space"] == "latents"
    rng = np.random.default_rng(0)
    feeds = {"noise": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
             "negative_encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
             "guidance_scale": np.array([7.5], np.float32)}

    def run(folder, kind, inputs):
        return ort.InferenceSession(str(folder / f"{kind}.onnx")).run(None, inputs)[0]

    latents = run(tmp_path / "latents", "sampler", feeds)
    decoded = run(image_folder, "vae_decoder", {"latents": latents})
    np.testing.assert_allclose(decoded, run(image_folder, "sampler", feeds), atol=1e-4)


@pytest.mark.parametrize("name", ["sd-kl", "sd-tiny"])
def test_vae_encoder_gives_the_scaled_posterior_mean(exported, name):
    import onnxruntime as ort

    pipeline, _, tmp_path = exported(name)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = ort.InferenceSession(str(tmp_path / "vae_encoder.onnx")).run(None, {"image": image.numpy()})[0]
    vae = pipeline.vae.module
    with torch.no_grad():
        out = vae.encode(image * 2 - 1)
        raw = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latents
    np.testing.assert_allclose(ours, (raw * vae.config.scaling_factor).numpy(), atol=1e-4)


def test_tokenizer_json_pads_and_truncates_like_the_pipeline(exported):
    from tokenizers import Tokenizer

    pipeline, _, tmp_path = exported("sdxl")
    long_prompt = "seven " * 40
    for encoder in pipeline.text_encoders:
        tokenizer = Tokenizer.from_file(str(tmp_path / encoder.tokenizer_name / "tokenizer.json"))
        for prompt in ["", "a handwritten seven", long_prompt]:
            assert tokenizer.encode(prompt).ids == encoder.tokenize([prompt])[0].tolist()
        assert encoder.truncated(long_prompt) and not encoder.truncated("a seven")
    assert json.loads((tmp_path / "text_encoder.json").read_text())["tokenizer"]["truncation"] is True


@pytest.fixture(scope="module")
def sdxl_with_openvino(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl-openvino")
    _export(folders["sdxl"], out, formats=("onnx", "openvino"))
    return out


def test_openvino_ir_of_every_component_matches_onnxruntime(sdxl_with_openvino):
    import onnxruntime as ort
    import openvino as ov

    tmp_path = sdxl_with_openvino
    files = json.loads((tmp_path / "pipeline.json").read_text())["components"]
    assert set(files) == {"text_encoder", "text_encoder_2", "sampler", "denoiser", "vae_decoder", "vae_encoder"}
    core = ov.Core()
    for kind, by_format in files.items():
        onnx_session = ort.InferenceSession(str(tmp_path / by_format["onnx"]))
        feeds = {}
        for i in onnx_session.get_inputs():
            shape = [2 if isinstance(d, str) else d for d in i.shape]
            feeds[i.name] = (np.arange(np.prod(shape)).reshape(shape) % 500).astype(np.int64) if "int64" in i.type else \
                np.random.default_rng(0).random(shape, dtype=np.float32)
        compiled = core.compile_model(str(tmp_path / by_format["openvino"]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        theirs = compiled(feeds)
        for j, out in enumerate(onnx_session.get_outputs()):
            np.testing.assert_allclose(theirs[compiled.outputs[j]], onnx_session.run(None, feeds)[j], atol=1e-3, err_msg=kind)


def test_openvino_app_makes_the_onnxruntime_apps_image(sdxl_with_openvino):
    tmp_path = sdxl_with_openvino
    onnx_image = _example().generate(tmp_path, PROMPTS, NEGATIVE, seed=3)
    openvino_image = _example("text_to_image_openvino").generate(tmp_path, PROMPTS, NEGATIVE, seed=3, config={"INFERENCE_PRECISION_HINT": "f32"})
    assert onnx_image.std() > 0.02
    assert np.abs(openvino_image - onnx_image).max() < 1e-3


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _fails_with(capsys, folder: Path, out: Path, expected: str):
    code = main(["export", f"diffusers:{folder}", "--solver", "model", "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not out.exists()


def test_bad_pipeline_folders_fail_with_one_line(folders, tmp_path, capsys):
    def copy(name):
        target = tmp_path / f"bad-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(folders[name], target)
        return target

    missing_vae = copy("sd-kl")
    _edit_json(missing_vae / "model_index.json", vae=[None, None])
    _fails_with(capsys, missing_vae, tmp_path / "o1", "has no vae")

    wrong_class = copy("sd-kl")
    _edit_json(wrong_class / "model_index.json", _class_name="KandinskyPipeline")
    _fails_with(capsys, wrong_class, tmp_path / "o2", "StableDiffusionPipeline")

    wrong_latents = copy("sd-kl")
    _edit_json(wrong_latents / "vae" / "config.json", latent_channels=8)
    shutil.rmtree(wrong_latents / "vae")
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  latent_channels=8, norm_num_groups=8).save_pretrained(str(wrong_latents / "vae"))
    _fails_with(capsys, wrong_latents, tmp_path / "o3", "8 latent channels but the UNet takes 4")

    other_tokenizer = copy("sd-kl")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(other_tokenizer / "tokenizer"))
    tokenizer.add_tokens([f"word{i}" for i in range(100)])  # 614 tokens for a 514-row embedding
    tokenizer.save_pretrained(str(other_tokenizer / "tokenizer"))
    _fails_with(capsys, other_tokenizer, tmp_path / "o4", "does not belong to this text encoder")


def test_unsupported_export_options_for_pipelines_are_refused(folders, tmp_path):
    pipeline = load_pipeline(f"diffusers:{folders['sd-kl']}")
    solver = resolve_solver(pipeline.denoiser, "ddim", 2)
    with pytest.raises(UserError, match="--output latents applies to latent"):
        export_artifacts(load_pipeline("zoo:digits"), solver, tmp_path / "x", ["onnx"], output="latents")
    with pytest.raises(UserError, match="unknown sampler output"):
        export_artifacts(pipeline, solver, tmp_path / "y", ["onnx"], output="pixels")


def test_onnxruntime_app_makes_a_png_without_torch_diffusers_or_transformers(exported, tmp_path):
    export_dir = exported("sd-kl")[2]
    png = tmp_path / "seven.png"
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['app', {str(export_dir)!r}, 'a handwritten seven', '--negative', 'blurry', '--out', {str(png)!r}]\n"
        f"runpy.run_path({str(ROOT / 'examples' / 'text_to_image_onnx.py')!r}, run_name='__main__')\n"
        "banned = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not banned, banned\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    from PIL import Image

    image = Image.open(png)
    assert image.size == (16, 16) and image.mode == "RGB"


def _run_tiny(folder: Path, out: Path, steps: int, **sections) -> dict:
    """`compress run` on a tiny folder: its own solver as the reference, so the float export should reproduce it."""
    from compress.pipeline import run
    from compress.recipe import parse_recipe

    recipe = parse_recipe({"name": "tiny-t2i", "model": f"diffusers:{folder}", "solver": {"name": "dpmpp-2m", "steps": steps, "guidance_scale": 7.5},
                           "export": {"formats": ["onnx"]}, "bench": {"runs": 1}, **sections})
    return run(recipe, out, log=lambda m: None)


def test_compress_run_takes_a_pipeline_from_prompts_to_validated_int8_images(folders, tmp_path):
    report = _run_tiny(
        folders["sd-kl"], tmp_path / "out", 4,
        calibration={"sampler": "ndtc", "samples": 8, "trajectory_steps": 8, "guidance_scale": 7.5},
        quantize={"denoiser": "w8a8", "decoder": "w8a8", "text_encoder": "int8-weights", "subset_size": 4},
        export={"formats": ["onnx", "openvino"]},
        validate={"reference": {"name": "dpmpp-2m", "steps": 4}, "samples": 4, "prompts": PROMPTS, "negative_prompt": NEGATIVE},
        bench={"runs": 2},
        report={"checks": ["float32/pipeline@*:psnr>=40", "float32-w8a8/pipeline@onnxruntime:psnr>=20"]},
    )
    rows = {(r["artifact"], r["runtime"]): r for r in report["rows"]}
    assert set(rows) >= {("baseline", "diffusers"), ("float32/modules", "torch"), ("float32/pipeline", "onnxruntime"),
                         ("float32/pipeline", "openvino"), ("float32-w8a8/pipeline", "onnxruntime"), ("float32-w8a8/pipeline", "openvino")}
    # The baseline is diffusers' own pipeline with the same scheduler and steps: the float exports reproduce it.
    assert rows[("float32/pipeline", "onnxruntime")]["psnr"] > 50
    from runtimes.openvino_runner import cpu_has_bf16

    if cpu_has_bf16():  # what OpenVINO runs by default on such a CPU gets its own rows
        assert rows[("float32/pipeline", "openvino-bf16")]["runner"]["precision"] == "bf16"
        assert rows[("float32-w8a8/pipeline", "openvino-bf16")]["status"] == "ok"
    assert rows[("float32/pipeline", "openvino")]["runner"]["precision"] == "f32"
    assert all(c["passed"] for c in report["checks"]), report["checks"]
    w8a8 = rows[("float32-w8a8/pipeline", "onnxruntime")]
    assert w8a8["schemes"] == {"text_encoder": "int8-weights", "sampler": "w8a8", "denoiser": "w8a8", "vae_decoder": "w8a8", "vae_encoder": "float32"}
    assert w8a8["bytes_by_component"]["text_encoder"] < 0.5 * rows[("float32/pipeline", "onnxruntime")]["bytes_by_component"]["text_encoder"]
    assert w8a8["latency_sampler_ms"] > 0 and w8a8["latency_text_encoder_ms"] > 0
    quantized = tmp_path / "out" / "artifacts" / "float32-w8a8"
    files = json.loads((quantized / "pipeline.json").read_text())["components"]
    assert files["sampler"] == {"onnx": "sampler.onnx", "openvino": "sampler.xml"}
    assert (quantized / "tokenizer" / "tokenizer.json").is_file()
    assert "diffusers' StableDiffusionPipeline" in (tmp_path / "out" / "report" / "report.md").read_text()


def test_prune_and_slim_act_on_the_pipelines_denoiser_and_leave_the_other_parts(folders, tmp_path):
    report = _run_tiny(
        folders["sd-kl"], tmp_path / "out", 2,
        prune={"method": "magnitude", "ratio": 0.25, "finetune_steps": 5, "data_samples": 8},
        slim={"width": 0.5, "steps": 5, "batch_size": 4, "teacher_samples": 8, "teacher_sample_steps": 2, "warmup": 1},
        validate={"reference": {"name": "dpmpp-2m", "steps": 2}, "samples": 2, "prompts": PROMPTS},
    )
    rows = {(r["artifact"], r["runtime"]): r for r in report["rows"]}
    for variant in ("pruned", "slim"):
        assert rows[(f"{variant}/pipeline", "onnxruntime")]["macs"] < rows[("float32/pipeline", "onnxruntime")]["macs"]
        folder = tmp_path / "out" / "artifacts" / variant
        for kind in ("text_encoder", "vae_decoder"):  # the same weights as the float32 export's
            assert (folder / f"{kind}.onnx").read_bytes() == (tmp_path / "out" / "artifacts" / "float32" / f"{kind}.onnx").read_bytes()
        assert json.loads((folder / "pipeline.json").read_text())["components"]["sampler"] == {"onnx": "sampler.onnx"}


@pytest.mark.parametrize("solver, scheduler", [("dpmpp-2m", "DPMSolverMultistepScheduler"), ("euler", "EulerDiscreteScheduler"),
                                               ("ddim", "DDIMScheduler")])
def test_a_named_solver_keeps_the_pipelines_spacing_and_offset(solver, scheduler, tmp_path):
    """`--solver X` on a pipeline whose scheduler is DDIM 'leading' with steps_offset 1: the timesteps of
    diffusers' X made with from_config of that scheduler, not the CLI's trailing."""
    import diffusers

    from compress.export_chain import resolve_solver
    from compress.loading import load_pipeline
    from tests.tiny_pipelines import build_sd_folder

    folder = build_sd_folder(tmp_path / "sd")
    ddim = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="leading",
                                   steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    ddim.save_pretrained(str(folder / "scheduler"))
    denoiser = load_pipeline(f"diffusers:{folder}").denoiser
    config = resolve_solver(denoiser, solver, 4)
    reference = getattr(diffusers, scheduler).from_config(ddim.config)
    reference.set_timesteps(4)
    assert (config.spacing, config.steps_offset) == ("leading", 1)
    assert [round(float(t)) for t in config.plan(denoiser.schedule).timesteps] == [int(t) for t in reference.timesteps]
    assert resolve_solver(denoiser, solver, 4, spacing="trailing").spacing == "trailing"  # an explicit spacing wins
