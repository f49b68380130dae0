"""Quantization on architectures the toolkit did not design (tests/architectures.py), and its quality target."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from calibration import CalibrationConfig, calibrate
from compress.precision import psnr_against, psnr_lower_bound, quantized_layers, quantized_steps, revert_layers, structural_float_nodes
from compress.quantize import QuantizeConfig, missed_targets, quantize_
from compress.solvers import SolverConfig
from export.onnx_export import export_onnx
from export.onnx_graph import input_uses, layer_of, step_unit
from tests.architectures import FAMILY, build
from tests.conftest import assert_one_line_error

# The entry layers (those that read the sample itself) and the exit layer of each member, by its own names.
ENDS = {
    "layernorm_ddpm": ({"enc1/conv1", "enc1/skip"}, "head"),
    "batchnorm_unet": ({"stem"}, "head"),
    "fourier_resnet": ({"entry"}, "exit"),
    "plain_cnn": ({"encoder/encoder.0"}, "decoder/decoder.4"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{member: (denoiser, float export folder, calibration set)}, built once for the module."""
    out = {}
    for name in FAMILY:
        denoiser = build(name)
        folder = tmp_path_factory.mktemp(name)
        export_onnx(denoiser, SolverConfig("dpmpp-2m", 6), folder)
        out[name] = (denoiser, folder, calibrate(denoiser, CalibrationConfig(samples=48, trajectory_steps=50), None))
    return out


def _sample(path, noise):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["sample"], {"noise": noise})[0]


@pytest.mark.parametrize("name", list(FAMILY))
def test_structure_keeps_each_members_own_first_and_last_layers_and_conditioning_float(name, exported):
    _, folder, _ = exported[name]
    reasons = structural_float_nodes(onnx.load(str(folder / "sampler.onnx")))
    by_layer = {layer_of(n): r for n, r in reasons.items()}
    first, last = ENDS[name]
    assert all(by_layer[x] == "first layer" for x in first) and by_layer[last] == "last layer"
    # Nothing between the ends is called first or last, in any unrolled step.
    assert {layer_of(n) for n, r in reasons.items() if r in ("first layer", "last layer")} == first | {last}
    conditioning = {layer_of(n) for n, r in reasons.items() if r == "conditioning path"}
    assert conditioning, "the timestep path was not found"
    assert not conditioning & (first | {last})


def test_structure_on_a_diffusers_unet_keeps_attention_projections_quantizable(tmp_path):
    from compress.loading import load_model

    export_onnx(load_model("zoo:digits"), SolverConfig("ddim", 2), tmp_path)
    for graph in ("sampler", "denoiser"):  # the sampler folds the timestep path into constants; the denoiser has it
        by_layer = {layer_of(n): r for n, r in structural_float_nodes(onnx.load(str(tmp_path / f"{graph}.onnx"))).items()}
        assert by_layer["unet/conv_in"] == "first layer" and by_layer["unet/conv_out"] == "last layer"
        assert not any("proj_out" in layer or "to_q" in layer for layer in by_layer)  # the old name list kept UNet attention's proj_out
    assert by_layer["unet/time_embedding/linear_1"] == "conditioning path"


def test_layernorm_maps_and_embedding_tables_are_stored_int8(exported, tmp_path):
    denoiser, folder, calib = exported["layernorm_ddpm"]
    record = quantize_(folder, calib, QuantizeConfig(), out_dir=tmp_path)
    for path in (tmp_path / "sampler.onnx", tmp_path / "denoiser.onnx"):
        model = onnx.load(str(path))
        big_float = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= 1024]
        assert not big_float, f"{path.name} keeps large float32 constants: {big_float}"
    ln = {t.name for t in onnx.load(str(tmp_path / "denoiser.onnx")).graph.initializer}
    assert {"time_table.weight.u8", "dec1.ln.weight.u8"} <= ln
    by_kind = {r["kind"]: r for r in record}
    assert by_kind["denoiser"]["bytes"] < 0.40 * by_kind["denoiser"]["float_bytes"]


def test_reverting_every_layer_restores_the_float_sampler(exported):
    _, folder, calib = exported["batchnorm_unet"]
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        quantize_(folder, calib, QuantizeConfig(targets=["sampler"]), out_dir=out)
        quantized = onnx.load(f"{out}/sampler.onnx")
    float_model = onnx.load(str(folder / "sampler.onnx"))
    noise = np.random.default_rng(0).standard_normal((8, 1, 16, 16)).astype(np.float32)
    reference = _sample(folder / "sampler.onnx", noise)
    layers = quantized_layers(quantized)
    restored = revert_layers(quantized, layers, float_model)
    assert not quantized_layers(restored)
    out = ort.InferenceSession(restored.SerializeToString(), providers=["CPUExecutionProvider"]).run(["sample"], {"noise": noise})[0]
    assert psnr_against(reference, out, 2.0) > 60  # float16 weights: far above any int8 figure
    int8 = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"]).run(["sample"], {"noise": noise})[0]
    assert psnr_against(reference, int8, 2.0) < psnr_against(reference, out, 2.0) - 10


def test_a_step_goes_back_to_float_activations_over_the_int8_weights_every_step_shares(exported, tmp_path):
    _, folder, calib = exported["fourier_resnet"]
    quantize_(folder, calib, QuantizeConfig(targets=["sampler"]), out_dir=tmp_path)
    quantized = onnx.load(str(tmp_path / "sampler.onnx"))
    assert quantized_steps(quantized) == [f"step:{k}" for k in range(6)]
    reverted = revert_layers(quantized, ["step:0"], onnx.load(str(folder / "sampler.onnx")))

    def steps_reading(model, kind):
        inits = {t.name for t in model.graph.initializer}
        producer = {o: n for n in model.graph.node for o in n.output}
        found = set()
        for tensor, uses in input_uses(model.graph).items():
            dq = producer.get(tensor)
            if dq is None or dq.op_type != "DequantizeLinear" or (dq.input[0] in inits) != (kind == "weight"):
                continue
            found |= {step_unit(n.name) for n, _ in uses if n.op_type not in ("QuantizeLinear", "DequantizeLinear")}
        return found - {None}

    assert steps_reading(reverted, "activation") == {f"step:{k}" for k in range(1, 6)}
    assert "step:0" in steps_reading(reverted, "weight")  # the step still reads the shared int8 weights
    assert sum(t.ByteSize() for t in reverted.graph.initializer) <= sum(t.ByteSize() for t in quantized.graph.initializer)


def test_the_verdict_on_a_target_is_a_lower_bound_set_by_the_far_off_draws():
    reference = np.zeros((256, 1, 4, 4))
    even = reference + 0.01  # every draw off by the same amount: nothing to be unlucky about
    assert psnr_lower_bound(reference, even, 2.0) == pytest.approx(psnr_against(reference, even, 2.0))
    one_far = even.copy()
    one_far[7] += 1.0  # one draw in 256 far off, as int8 first steps make them
    assert psnr_lower_bound(reference, one_far, 2.0) < psnr_against(reference, one_far, 2.0) - 1.0


@pytest.mark.parametrize("name", list(FAMILY))
def test_a_quality_target_is_met_and_reported_as_measured(name, exported, tmp_path):
    _, folder, calib = exported[name]
    config = QuantizeConfig(targets=["sampler"], target_psnr=30.0)
    record = quantize_(folder, calib, config, out_dir=tmp_path)[0]
    target = record["target"]
    assert target["met"] and target["psnr"] >= 30.0, target["message"]
    sidecar = json.loads((tmp_path / "sampler.json").read_text())["quantization"]
    assert sidecar["target"]["float_layers"] == target["float_layers"]
    assert {x["reason"] for x in sidecar["float_layers"]} >= {"first layer", "last layer"}
    # The reported figure is what the written file gives on the search's own draws (seeded, fresh noise).
    from compress.quantize import TARGET_NOISE_SEED

    rng = np.random.default_rng(TARGET_NOISE_SEED)
    noise = np.concatenate([rng.standard_normal((1, 1, 16, 16)).astype(np.float32) for _ in range(config.target_samples)])
    reference, written_out = _sample(folder / "sampler.onnx", noise), _sample(tmp_path / "sampler.onnx", noise)
    measured = psnr_against(reference, written_out, 2.0)
    assert abs(measured - target["psnr_pooled"]) < 0.05 or (np.isinf(measured) and target["psnr_pooled"] is None)
    # The verdict is a lower bound over resamplings of those draws: below the pooled figure, and reproducible.
    bound = psnr_lower_bound(reference, written_out, 2.0)
    assert abs(bound - target["psnr"]) < 0.05 or (np.isinf(bound) and target["psnr"] is None)
    assert np.isinf(measured) or bound <= measured
    kept = {x["layer"] for x in target["float_layers"]}
    written = onnx.load(str(tmp_path / "sampler.onnx"))
    assert kept.isdisjoint(quantized_layers(written, "activation"))


def test_an_unreachable_target_writes_the_best_file_and_names_what_limits_it(exported, tmp_path):
    _, folder, calib = exported["plain_cnn"]
    record = quantize_(folder, calib, QuantizeConfig(targets=["sampler"], target_psnr=90.0, max_float_layers=2), out_dir=tmp_path)[0]
    target = record["target"]
    assert not target["met"] and len(target["float_layers"]) <= 2
    assert target["psnr"] >= target["psnr_all_quantized"]
    assert target["limiting_layers"] and "not met" in target["message"] and target["limiting_layers"][0]["layer"] in target["message"]
    assert (tmp_path / "sampler.onnx").is_file()
    assert missed_targets([record]) == [f"sampler.onnx: {target['message']}"]


def test_cli_warns_on_a_missed_target_and_fails_when_it_is_required(exported, cli, tmp_path):
    _, folder, calib = exported["plain_cnn"]
    from calibration import save_calibration

    calib_path = save_calibration(calib, tmp_path / "calib.safetensors")
    base = ["quantize", str(folder), "--calib", str(calib_path), "--target", "sampler", "--target-psnr", "90", "--max-float-layers", "1"]
    warned = cli(*base, "--out", str(tmp_path / "warn"))
    assert warned.returncode == 0 and "warning: sampler.onnx: quality target 90 dB not met" in warned.stderr
    gated = cli(*base, "--require-target", "--out", str(tmp_path / "gate"))
    assert gated.returncode == 1 and (tmp_path / "gate" / "sampler.onnx").is_file()
    bad = cli("quantize", str(folder), "--scheme", "int8-weights", "--target-psnr", "30", "--out", str(tmp_path / "bad"))
    assert_one_line_error(bad, "target_psnr needs a calibrated scheme")


def test_run_gates_on_a_required_quality_target(cli, tmp_path):
    import yaml

    recipe = {
        "name": "target",
        "model": "python:tests.architectures:plain_cnn",
        "solver": {"name": "ddim", "steps": 3},
        "export": {"formats": ["onnx"]},
        "calibration": {"samples": 16, "trajectory_steps": 20},
        "quantize": {"scheme": "w8a8", "target_psnr": 90, "max_float_layers": 1, "require_target": True, "subset_size": 16},
        "validate": {"reference": {"name": "ddim", "steps": 3}, "samples": 4},
        "bench": {"runs": 1},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = cli("run", path, "--out", tmp_path / "out")
    assert result.returncode == 1 and "quantize target_psnr>=90" in result.stderr, result.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    (target,) = report["quantization_targets"]
    assert not target["met"] and target["artifact"].endswith("-w8a8/sampler") and len(target["float_layers"]) <= 1


def test_the_denoiser_beside_the_sampler_gets_the_layers_the_sampler_search_chose(exported, tmp_path):
    _, folder, calib = exported["layernorm_ddpm"]
    records = {r["kind"]: r for r in quantize_(folder, calib, QuantizeConfig(target_psnr=30.0), out_dir=tmp_path)}
    sampler, denoiser = records["sampler"]["target"], records["denoiser"]["target"]
    chosen = [x["layer"] for x in sampler["float_layers"]]
    assert chosen, "the test needs a model whose target returns layers"
    assert denoiser["from"] == "sampler" and denoiser["float_layers"] == chosen and denoiser["precision"] == sampler["precision"]
    assert set(chosen).isdisjoint(quantized_layers(onnx.load(str(tmp_path / "denoiser.onnx")), "activation"))
