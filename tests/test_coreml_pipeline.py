"""Core ML export of text-to-image pipelines: tiny random SD 1.x and SDXL folders, every package checked structurally.

Core ML predicts only on macOS: here each package is read back as a spec (names, shapes and dtypes
against its sidecar, op counts, the weight file) and the comparison with onnxruntime skips, saying
so. Converting the unrolled sampler takes most of the time; those tests are marked slow.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.components import Pipeline, TextEncoderGraph
from compress.errors import UserError
from compress.export_chain import export_artifacts, pipeline_guidance, resolve_solver
from compress.loading import load_pipeline
from export.coreml_export import SIDECAR_SUFFIX, _coreml_sidecar, _drop_aliases, _write_package, export_pipeline_coreml, inspect_package
from export.sidecar import PIPELINE_FILE, text_encoder_sidecar
from runtimes.runners import get_runner
from tests.conftest import run_cli
from tests.tiny_models import tiny_denoiser
from tests.tiny_pipelines import build_sd_folder, build_sdxl_folder

ROOT = Path(__file__).resolve().parents[1]
CORE_ML_PREDICTION = get_runner("coreml-cpu").available()
STEPS = 2
SDXL_KINDS = {"text_encoder", "text_encoder_2", "sampler", "denoiser", "vae_decoder", "vae_encoder"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {"sd": build_sd_folder(root / "sd", vae="kl"), "sdxl": build_sdxl_folder(root / "sdxl")}


@pytest.fixture(scope="module")
def sdxl_export(folders, tmp_path_factory):
    """ONNX and Core ML of the SDXL folder in one folder, as `compress export --format onnx --format coreml` writes it."""
    pipeline = load_pipeline(f"diffusers:{folders['sdxl']}")
    solver = resolve_solver(pipeline.denoiser, "model", STEPS, guidance=pipeline_guidance(pipeline, None))
    out = tmp_path_factory.mktemp("sdxl-coreml")
    records = export_artifacts(pipeline, solver, out, ["onnx", "coreml"])
    return pipeline, out, [r for r in records if r["format"] == "coreml"]


def _interface(features) -> list[tuple]:
    return [(f["name"], f["shape"], f["dtype"]) for f in features]


def _check_against_sidecars(out: Path, files: dict) -> dict:
    """Each Core ML package of pipeline.json has its sidecar's interface; returns kind -> package structure."""
    structures = {}
    for kind, by_format in files.items():
        path = out / by_format["coreml"]
        assert path.name == f"{kind}.mlpackage" and path.is_dir(), kind
        sidecar = json.loads((out / f"{kind}{SIDECAR_SUFFIX}").read_text())
        assert sidecar["format"] == "coreml" and sidecar["file"] == path.name and sidecar["batch"] == {"dynamic": False, "size": 1}
        structure = inspect_package(path)
        assert structure["model_type"] == "mlProgram"
        assert _interface(structure["inputs"]) == _interface(sidecar["inputs"]), kind
        assert _interface(structure["outputs"]) == _interface(sidecar["outputs"]), kind
        assert json.loads(structure["metadata"]["diffusion_compress.kind"]) == kind
        structures[kind] = structure
    return structures


# ----------------------------------------------------------------------------- fast


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.export on its own treespec API
def test_text_encoder_converts_once_its_whole_length_slice_alias_is_dropped(folders, tmp_path):
    """CLIP slices position_ids to the (static, full) length: torch.export leaves `aten.alias`, which coremltools cannot convert."""
    pipeline = load_pipeline(f"diffusers:{folders['sd']}")
    graph = TextEncoderGraph(pipeline.text_encoders[0])
    example = graph.example_inputs(1)
    with torch.no_grad():
        program = torch.export.export(graph.eval(), example).run_decompositions({})
        assert _drop_aliases(program) >= 1
        assert not [n for n in program.graph.nodes if n.target == torch.ops.aten.alias.default]
        torch.testing.assert_close(program.module()(*example), graph(*example), rtol=1e-5, atol=1e-6)
    settings = {"weights": "float", "activations": "float", "deployment_target": "iOS16", "compute_precision": "float16"}
    sidecar = text_encoder_sidecar(pipeline.text_encoders[0], "coreml", "text_encoder.mlpackage", 1)
    record = _write_package(graph, "text_encoder", _coreml_sidecar(sidecar), tmp_path, settings)
    structure = inspect_package(tmp_path / record["path"])
    assert structure["inputs"] == [{"name": "input_ids", "shape": [1, 77], "dtype": "int32"}]
    assert structure["outputs"] == [{"name": "hidden_states", "shape": [1, 77, 32], "dtype": "float32"}]
    written = json.loads((tmp_path / "text_encoder.coreml.json").read_text())
    assert written["inputs"][0]["dtype"] == "int32" and "no int64 inputs" in written["inputs"][0]["note"]
    assert json.loads(structure["metadata"]["diffusion_compress.tokenizer"])["file"] == "tokenizer/tokenizer.json"


def test_bad_pipeline_options_are_refused_before_any_work(folders, tmp_path):
    pipeline = load_pipeline(f"diffusers:{folders['sd']}")
    solver = resolve_solver(pipeline.denoiser, "ddim", 1)
    with pytest.raises(UserError, match="fixed positive batch"):
        export_pipeline_coreml(pipeline, solver, tmp_path, batch_size=None)
    with pytest.raises(UserError, match="weights option 'int4'"):
        export_pipeline_coreml(pipeline, solver, tmp_path, weights="int4")
    with pytest.raises(UserError, match="unknown sampler output"):
        export_pipeline_coreml(pipeline, solver, tmp_path, output="pixels")
    with pytest.raises(UserError, match="not a text-to-image pipeline"):
        export_pipeline_coreml(Pipeline(tiny_denoiser()), solver, tmp_path)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- conversions (slow)


@pytest.mark.slow
def test_sd_coreml_only_export_from_the_cli(folders, tmp_path):
    out = tmp_path / "sd"
    result = run_cli("export", f"diffusers:{folders['sd']}", "--solver", "model", "--steps", STEPS, "--format", "coreml", "--out", out, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "sampler.mlpackage" in result.stdout
    assert not list(out.glob("*.onnx")) and not (out / "sampler.json").exists()
    assert (out / "tokenizer" / "tokenizer.json").is_file()  # the app tokenizes with it, whatever the format
    pipeline_json = json.loads((out / PIPELINE_FILE).read_text())
    files = pipeline_json["components"]
    assert set(files) == {"text_encoder", "sampler", "denoiser", "vae_decoder", "vae_encoder"}
    assert all(list(by_format) == ["coreml"] for by_format in files.values()), files
    structures = _check_against_sidecars(out, files)
    sampler = structures["sampler"]
    assert [f["name"] for f in sampler["inputs"]] == ["noise", "encoder_hidden_states", "negative_encoder_hidden_states", "guidance_scale"]
    assert sampler["outputs"] == [{"name": "image", "shape": [1, 3, 16, 16], "dtype": "float32"}]
    assert json.loads(sampler["metadata"]["diffusion_compress.guidance"]) == {"enabled": True, "default_scale": 7.5}
    # The decoder is baked in after the unrolled steps: each evaluation's convolutions, then the decoder's.
    nfe = json.loads((out / "sampler.coreml.json").read_text())["solver"]["nfe"]
    assert sampler["ops"]["conv"] == nfe * structures["denoiser"]["ops"]["conv"] + structures["vae_decoder"]["ops"]["conv"]
    # Weights once: the UNet's and the decoder's, not one copy per step.
    assert sampler["weight_file_bytes"] <= 1.25 * (structures["denoiser"]["weight_file_bytes"] + structures["vae_decoder"]["weight_file_bytes"])


@pytest.mark.slow
def test_sdxl_packages_match_their_sidecars_and_pipeline_json(sdxl_export):
    pipeline, out, records = sdxl_export
    assert {r["kind"] for r in records} == SDXL_KINDS
    files = json.loads((out / PIPELINE_FILE).read_text())["components"]
    assert set(files) == SDXL_KINDS
    assert all(set(by_format) == {"onnx", "coreml"} for by_format in files.values()), files
    structures = _check_against_sidecars(out, files)
    assert structures["text_encoder_2"]["inputs"] == [{"name": "input_ids", "shape": [1, 77], "dtype": "int32"}]
    assert structures["text_encoder_2"]["outputs"] == [{"name": "hidden_states", "shape": [1, 77, 32], "dtype": "float32"},
                                                       {"name": "pooled", "shape": [1, 16], "dtype": "float32"}]
    assert [f["name"] for f in structures["sampler"]["inputs"]] == [
        "noise", "encoder_hidden_states", "text_embeds", "time_ids", "negative_encoder_hidden_states", "negative_text_embeds", "guidance_scale"]
    assert structures["sampler"]["inputs"][1]["shape"] == [1, 77, 48]  # both encoders' hidden states, concatenated
    for record in records:
        assert Path(record["path"]).parent == out and record["batch_size"] == 1 and record["weights"] == "float"
        weights = Path(record["path"]) / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
        assert record["weight_file_bytes"] == weights.stat().st_size  # the file on disk, not inspect_package's reading of it
    unet_and_decoder = sum(p.numel() * 2 for m in (pipeline.denoiser.module, pipeline.vae.module) for p in m.parameters())
    assert structures["sampler"]["weight_file_bytes"] <= 1.25 * unet_and_decoder


@pytest.mark.slow
@pytest.mark.skipif(not CORE_ML_PREDICTION[0], reason=CORE_ML_PREDICTION[1])
def test_coreml_packages_match_onnxruntime(sdxl_export):
    """Every component, Core ML (float16 compute) against the ONNX model of the same folder, from the same inputs."""
    import coremltools as ct
    import onnxruntime as ort

    _, out, _ = sdxl_export
    files = json.loads((out / PIPELINE_FILE).read_text())["components"]
    rng = np.random.default_rng(0)
    for kind, by_format in files.items():
        session = ort.InferenceSession(str(out / by_format["onnx"]))
        sidecar = json.loads((out / f"{kind}{SIDECAR_SUFFIX}").read_text())
        feeds = {}
        for spec in sidecar["inputs"]:
            if spec["name"] == "input_ids":
                feeds[spec["name"]] = np.asarray([[512] + [40 + i % 50 for i in range(10)] + [513] * 66], np.int64)
            elif spec["name"] == "guidance_scale":
                feeds[spec["name"]] = np.array([5.0], np.float32)
            elif spec["name"] == "time_ids":
                feeds[spec["name"]] = np.array([[16, 16, 0, 0, 16, 16]], np.float32)
            elif spec["name"] == "timestep":
                feeds[spec["name"]] = np.array([500.0], np.float32)
            else:
                x = rng.random(spec["shape"]) if spec["name"] == "image" else rng.standard_normal(spec["shape"])
                feeds[spec["name"]] = x.astype(np.float32)
        expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        model = ct.models.MLModel(str(out / by_format["coreml"]), compute_units=ct.ComputeUnit.CPU_ONLY)
        actual = model.predict({k: v.astype(np.int32) if v.dtype == np.int64 else v for k, v in feeds.items()})
        for name, value in expected.items():
            scale = max(1.0, float(np.abs(value).max()))
            assert np.abs(np.asarray(actual[name], np.float32) - value).max() <= 2e-2 * scale, (kind, name)
