"""Core ML export: packages for tiny unconditional and class-conditional (guided) models, checked structurally.

Core ML can only predict on macOS; elsewhere the packages are read back as specs (inputs,
outputs, op counts, weight file) and the prediction tests skip, saying so. Converting an unrolled
sampler takes tens of seconds even for tiny models, so those tests are marked slow and use few steps.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from compress.denoiser import ClassTokenUNet, Denoiser
from compress.errors import UserError
from compress.schedule import NoiseSchedule
from compress.solvers import SolverConfig
from export.coreml_export import DEBUG_MAPPING, export_coreml, inspect_package
from export.sampler_graph import SamplerGraph
from runtimes.runners import get_runner
from tests.conftest import run_cli
from tests.tiny_models import tiny_cond_unet, tiny_denoiser

ROOT = Path(__file__).resolve().parents[1]
CORE_ML_PREDICTION = get_runner("coreml-cpu").available()


def class_denoiser() -> Denoiser:
    module = ClassTokenUNet(tiny_cond_unet(cross_dim=8), num_classes=3).eval()
    return Denoiser(module, NoiseSchedule.from_betas(), "sample", (1, 8, 8), conditioning="class", num_classes=3, name="tiny-class")


def folder_sha256(path: Path) -> str:
    """The package digest by its documented definition (each file's relative path, a NUL, its bytes; files in path
    order), computed apart from export.coreml_export, whose own function wrote the record."""
    digest = hashlib.sha256()
    for file in sorted((f for f in path.rglob("*") if f.is_file()), key=lambda f: f.relative_to(path).as_posix()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def by_kind(records) -> dict:
    return {r["kind"]: r for r in records}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory):
    denoiser, solver = tiny_denoiser(), SolverConfig("dpmpp-2m", 2)
    out = tmp_path_factory.mktemp("coreml_unconditional")
    return denoiser, solver, out, by_kind(export_coreml(denoiser, solver, out))


@pytest.fixture(scope="module")
def class_guided(tmp_path_factory):
    denoiser, solver = class_denoiser(), SolverConfig("euler", 1, guidance_scale=2.0)
    out = tmp_path_factory.mktemp("coreml_class")
    return denoiser, solver, out, by_kind(export_coreml(denoiser, solver, out, batch_size=2))


# ----------------------------------------------------------------------------- structure (any OS)


@pytest.mark.slow
def test_unconditional_packages_match_their_sidecars(unconditional):
    denoiser, solver, out, records = unconditional
    assert sorted(p.name for p in out.iterdir()) == ["denoiser.coreml.json", "denoiser.mlpackage", "sampler.coreml.json", "sampler.mlpackage"]
    for kind, record in records.items():
        path = out / f"{kind}.mlpackage"
        assert record["path"] == str(path) and record["format"] == "coreml"
        assert record["bytes"] == sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        assert record["sha256"] == folder_sha256(path)
        assert not (path / DEBUG_MAPPING).exists()
        sidecar = json.loads(Path(record["sidecar"]).read_text())
        assert sidecar["format"] == "coreml" and sidecar["file"] == f"{kind}.mlpackage"
        structure = inspect_package(path)
        assert structure["model_type"] == "mlProgram"
        assert [(f["name"], f["shape"], f["dtype"]) for f in structure["inputs"]] == [(s["name"], s["shape"], s["dtype"]) for s in sidecar["inputs"]]
        assert [(f["name"], f["dtype"]) for f in structure["outputs"]] == [("sample" if kind == "sampler" else "prediction", "float32")]
    sampler = inspect_package(out / "sampler.mlpackage")
    assert sampler["inputs"] == [{"name": "noise", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    # Two unrolled steps evaluate the network twice: twice the denoiser's convolutions.
    assert sampler["ops"]["conv"] == 2 * inspect_package(out / "denoiser.mlpackage")["ops"]["conv"]
    metadata = {k: json.loads(v) for k, v in sampler["metadata"].items() if k.startswith("diffusion_compress.")}
    assert metadata["diffusion_compress.solver"]["name"] == "dpmpp-2m" and metadata["diffusion_compress.solver"]["steps"] == 2
    scheduler = DPMSolverMultistepScheduler.from_config(DDPMScheduler().config, timestep_spacing=solver.spacing)
    scheduler.set_timesteps(solver.steps)
    assert metadata["diffusion_compress.timesteps"] == [float(t) for t in scheduler.timesteps]  # what diffusers' own loop runs
    assert metadata["diffusion_compress.guidance"] == {"enabled": False, "kind": None, "default_scale": None}
    assert metadata["diffusion_compress.interface"]["outputs"][0]["name"] == "sample"


@pytest.mark.slow
def test_sampler_package_stores_the_weights_once(unconditional):
    denoiser, _, out, records = unconditional
    float16_bytes = sum(p.numel() * 2 for p in denoiser.module.parameters())
    weight_file = records["sampler"]["weight_file_bytes"]
    assert weight_file == (out / "sampler.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size
    assert 0.9 * float16_bytes <= weight_file <= 1.25 * float16_bytes, (weight_file, float16_bytes)  # two copies would be 2x


@pytest.mark.slow
def test_class_conditional_guided_package(class_guided):
    _, _, out, records = class_guided
    sampler = inspect_package(out / "sampler.mlpackage")
    # Core ML has no int64 inputs: labels are int32 in the package and in its sidecar.
    assert sampler["inputs"] == [
        {"name": "noise", "shape": [2, 1, 8, 8], "dtype": "float32"},
        {"name": "class_labels", "shape": [2], "dtype": "int32"},
        {"name": "guidance_scale", "shape": [1], "dtype": "float32"},
    ]
    assert sampler["outputs"] == [{"name": "sample", "shape": [2, 1, 8, 8], "dtype": "float32"}]
    sidecar = json.loads(Path(records["sampler"]["sidecar"]).read_text())
    assert sidecar["inputs"][1]["dtype"] == "int32" and sidecar["batch"] == {"dynamic": False, "size": 2}
    assert json.loads(sampler["metadata"]["diffusion_compress.guidance"]) == {"enabled": True, "kind": "classifier-free", "default_scale": 2.0}
    denoiser = inspect_package(out / "denoiser.mlpackage")
    assert [f["name"] for f in denoiser["inputs"]] == ["sample", "timestep", "class_labels"]


@pytest.mark.slow
@pytest.mark.parametrize("weights, op", [("int8", "constexpr_affine_dequantize"), ("palettize6", "constexpr_lut_to_dense")])
def test_weight_compression(tmp_path, weights, op):
    denoiser = tiny_denoiser()
    records = by_kind(export_coreml(denoiser, SolverConfig("ddim", 1), tmp_path, weights=weights))
    float16_bytes = sum(p.numel() * 2 for p in denoiser.module.parameters())
    for record in records.values():
        assert record["weights"] == weights
        structure = inspect_package(record["path"])
        assert structure["ops"].get(op, 0) > 0, structure["ops"]
        # Tensors under coremltools' 2048-element threshold stay float16, so the saving is partial on a tiny model.
        assert record["weight_file_bytes"] < 0.85 * float16_bytes


@pytest.mark.slow
def test_export_cli_writes_all_three_formats(tmp_path):
    out = tmp_path / "all"
    result = run_cli("export", "python:tests.tiny_models:tiny_denoiser", "--steps", "1", "--solver", "ddim",
                     "--format", "onnx", "--format", "openvino", "--format", "coreml", "--out", out, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for name in ("sampler.onnx", "sampler.json", "sampler.xml", "sampler.bin", "sampler.openvino.json", "sampler.mlpackage", "sampler.coreml.json"):
        assert (out / name).exists(), name
    assert "wrote" in result.stdout and "sampler.mlpackage" in result.stdout


# ----------------------------------------------------------------------------- refusals (fast)


def test_bad_options_are_refused_before_any_work(tmp_path):
    denoiser, solver = tiny_denoiser(), SolverConfig("ddim", 1)
    with pytest.raises(UserError, match="weights option 'int4'"):
        export_coreml(denoiser, solver, tmp_path, weights="int4")
    with pytest.raises(UserError, match="fixed positive batch"):
        export_coreml(denoiser, solver, tmp_path, batch_size=0)
    with pytest.raises(UserError, match="deployment target"):
        export_coreml(denoiser, solver, tmp_path, deployment_target="iOS12")
    with pytest.raises(UserError, match="iOS17"):
        export_coreml(denoiser, solver, tmp_path, activations="int8", deployment_target="iOS16")
    if not CORE_ML_PREDICTION[0]:
        with pytest.raises(UserError, match="needs macOS"):
            export_coreml(denoiser, solver, tmp_path, activations="int8")
    assert list(tmp_path.iterdir()) == []


def test_inspect_refuses_what_is_not_a_package(tmp_path):
    with pytest.raises(UserError, match="not a Core ML package"):
        inspect_package(tmp_path)
    fake = tmp_path / "broken.mlpackage"
    (fake / "Data" / "com.apple.CoreML").mkdir(parents=True)
    (fake / "Manifest.json").write_text("{}")
    with pytest.raises(UserError, match="not a readable Core ML package"):
        inspect_package(fake)


# ----------------------------------------------------------------------------- prediction (macOS only)


@pytest.mark.slow
@pytest.mark.skipif(not CORE_ML_PREDICTION[0], reason=CORE_ML_PREDICTION[1])
def test_coreml_prediction_matches_torch(unconditional, class_guided):
    for denoiser, solver, out, _ in (unconditional, class_guided):
        graph = SamplerGraph(denoiser, solver)
        inputs = [x.numpy() for x in graph.example_inputs(1 if denoiser.conditioning == "none" else 2)]
        feeds = dict(zip(graph.input_names, inputs))
        with torch.no_grad():
            expected = graph(*map(torch.from_numpy, inputs)).numpy()
        actual = get_runner("coreml-cpu").load(out / "sampler.mlpackage").run(feeds)
        # float16 compute: a few parts in a thousand of the output's scale.
        assert np.abs(actual - expected).max() <= 1e-2 * max(1.0, float(np.abs(expected).max()))
