"""Post-training quantization with real NNCF and onnxruntime: per-step scales, real int8 weights,
shared scales, w8a16, weight-only, fp16, sidecars and errors.

One small UNet is exported once (2 DDIM steps) and quantized a few times (module fixtures);
the conditional UNet and DiT runs are marked slow.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from calibration import CalibrationConfig, calibrate, save_calibration
from compress.denoiser import Denoiser, DiffusersUNet
from compress.errors import UserError
from compress.quantize import QuantizeConfig, activation_quantizers, distinct_step_scales, per_step_scales, quantize_
from export.onnx_graph import module_path
from compress.schedule import NoiseSchedule
from compress.solvers import SolverConfig
from export.onnx_export import export_onnx
from tests.conftest import assert_one_line_error
from tests.tiny_models import dit_denoiser, text_denoiser, tiny_denoiser


pytestmark = pytest.mark.usefixtures("one_thread")


def wide_denoiser() -> Denoiser:
    """Wide enough that weights, not graph structure, dominate the file size."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(64, 128),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=16)
    return Denoiser(DiffusersUNet(unet).eval(), NoiseSchedule.from_betas(), "epsilon", (1, 8, 8), name="wide")


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(path, feeds) -> np.ndarray:
    return session(path).run(None, feeds)[0]


def relative_error(actual, expected) -> float:
    return float(np.sqrt(np.mean((actual - expected) ** 2)) / np.sqrt(np.mean(expected**2)))


NOISE = np.random.default_rng(11).standard_normal((3, 1, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    denoiser, solver = wide_denoiser(), SolverConfig("ddim", 2)
    out = tmp_path_factory.mktemp("float")
    export_onnx(denoiser, solver, out)
    calib = calibrate(denoiser, CalibrationConfig(sampler="solver", samples=16, trajectory_steps=10), solver)
    return denoiser, out, calib


@pytest.fixture(scope="module")
def per_step(exported, tmp_path_factory):
    _, folder, calib = exported
    out = tmp_path_factory.mktemp("w8a8")
    records = {r["kind"]: r for r in quantize_(folder, calib, QuantizeConfig(scheme="w8a8"), out_dir=out)}
    return records


# ----------------------------------------------------------------------------- per-step W8A8


def test_per_step_sampler_has_its_own_scales_in_every_step(per_step):
    model = onnx.load(per_step["sampler"]["path"])
    scales = per_step_scales(model)
    assert scales and all(set(steps) == {0, 1} for steps in scales.values())
    assert distinct_step_scales(model) >= 0.9 * len(scales)
    assert per_step["sampler"]["granularity"] == "per-step"
    assert per_step["sampler"]["layers_with_per_step_scales"] == distinct_step_scales(model)


def test_a_tensor_is_quantized_once_per_scale(per_step):
    """NNCF quantizes a tensor once per consumer; copies with the same scale and zero point are merged."""
    model = onnx.load(per_step["sampler"]["path"])
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    seen = set()
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits):
        key = (q.input[0], inits[q.input[1]].tobytes(), inits[q.input[2]].tobytes())
        assert key not in seen, f"{q.input[0]} is quantized twice with the same scale"
        seen.add(key)
    assert len(seen) == per_step["sampler"]["activation_quantizers"]


def test_only_the_network_is_quantized(per_step):
    """The solver state, guidance mixing, first/last convs and softmax outputs stay float."""
    model = onnx.load(per_step["sampler"]["path"])
    consumers = [name for q in activation_quantizers(model) for name, _ in q.key]
    assert consumers and all("/" in name for name in consumers)
    assert not any("conv_in" in n or "conv_out" in n for n in consumers)
    producer = {o: n for n in model.graph.node for o in n.output}
    quantized_inputs = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert not any(producer.get(t) is not None and producer[t].op_type == "Softmax" for t in quantized_inputs)
    assert "noise" not in quantized_inputs


def test_skip_concatenations_are_split_only_on_request(per_step, exported, tmp_path):
    def split_convs(model):
        return [n for n in model.graph.node if n.name.endswith("conv_shortcut/Conv/a")]

    assert not split_convs(onnx.load(per_step["sampler"]["path"]))
    _, folder, calib = exported
    record = quantize_(folder, calib, QuantizeConfig(targets=["sampler"], split_concat=True), out_dir=tmp_path)[0]
    model = onnx.load(str(tmp_path / record["path"]))
    assert split_convs(model), "the up blocks' concat-fed shortcut convs were not split"
    assert not any(n.op_type == "Concat" and any(c.op_type == "QuantizeLinear" for c in model.graph.node if n.output[0] in c.input)
                   for n in model.graph.node)
    feeds = {"noise": NOISE}
    assert relative_error(run(tmp_path / record["path"], feeds), run(folder / "sampler.onnx", feeds)) < 0.2


def test_every_int8_conv_can_run_as_qlinearconv_on_onnxruntime(per_step, tmp_path):
    """onnxruntime fuses DQ -> Conv -> Q into QLinearConv only when the conv's one consumer is a QuantizeLinear
    and its input and output quantizers have one type; convs feeding float ops (GroupNorm, a bias-folded conv1) or
    several quantizers are given one, and every activation is uint8, so that no int8 conv falls back to a float
    conv on dequantized weights."""
    model = onnx.load(per_step["sampler"]["path"])
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    int8_convs = [n for n in model.graph.node if n.op_type == "Conv" and producer.get(n.input[1]) is not None
                  and producer[n.input[1]].op_type == "DequantizeLinear"]
    assert int8_convs and all(consumers[n.output[0]] == ["QuantizeLinear"] for n in int8_convs)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(per_step["sampler"]["path"], options, providers=["CPUExecutionProvider"])
    fused = [n for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node if n.op_type == "QLinearConv"]
    assert len(fused) == len(int8_convs)
    inits = {t.name: t for t in model.graph.initializer}
    assert {inits[q.node.input[2]].data_type for q in activation_quantizers(model)} == {onnx.TensorProto.UINT8}


def test_int8_weights_are_real_and_a_quarter_of_float(per_step, exported):
    """The sampler folds the time MLP into constants; the denoiser keeps it (float, ignored) and so is larger."""
    for kind, share in (("sampler", 0.3), ("denoiser", 0.45)):
        record = per_step[kind]
        model = onnx.load(record["path"])
        int8 = sum(t.ByteSize() for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8)
        float32 = sum(np.prod(t.dims) * 4 for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
        assert int8 > (4 if kind == "sampler" else 1) * float32, (kind, int8, float32)
        assert record["bytes"] < share * record["float_bytes"], (kind, record["bytes"], record["float_bytes"])
    sampler = onnx.load(per_step["sampler"]["path"])
    weights = [t for t in sampler.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    assert len({numpy_helper.to_array(t).tobytes() for t in weights}) == len(weights)  # each weight stored once for all steps


def test_quantized_graphs_run_on_onnxruntime_close_to_float(per_step, exported):
    _, folder, calib = exported
    expected = run(folder / "sampler.onnx", {"noise": NOISE})
    assert relative_error(run(per_step["sampler"]["path"], {"noise": NOISE}), expected) < 0.15
    # One set of scales for states whose range grows from 1 (t = 999) to ~50 (t = 499) in this random
    # network's chain: the shared-scale denoiser is much less precise than the per-step sampler.
    feeds = {"sample": calib.sample[:4].numpy(), "timestep": calib.timestep[:4].numpy()}
    assert relative_error(run(per_step["denoiser"]["path"], feeds), run(folder / "denoiser.onnx", feeds)) < 0.4


def test_sidecar_keeps_the_interface_and_adds_quantization(per_step, exported):
    _, folder, calib = exported
    sidecar = json.loads(open(per_step["sampler"]["sidecar"]).read())
    original = json.loads((folder / "sampler.json").read_text())
    assert sidecar["inputs"] == original["inputs"] and sidecar["outputs"] == original["outputs"]
    q = sidecar["quantization"]
    assert q["scheme"] == "w8a8" and q["granularity"] == "per-step" and q["weights"]["int8"] > 0
    assert q["calibration"]["model_hash"] == calib.header["model"]["hash"] and q["engine"].startswith("nncf")
    embedded = onnx.load(per_step["sampler"]["path"]).metadata_props
    assert any(p.key == "diffusion_compress.sidecar" and json.loads(p.value)["quantization"]["scheme"] == "w8a8" for p in embedded)


# ----------------------------------------------------------------------------- shared scales, w8a16


@pytest.mark.parametrize("shared_from", ["union", "denoiser"])
def test_shared_granularity_gives_one_scale_per_layer(exported, tmp_path, shared_from):
    _, folder, calib = exported
    config = QuantizeConfig(granularity="shared", shared_from=shared_from, targets=["sampler"])
    (record,) = quantize_(folder, calib, config, out_dir=tmp_path)
    model = onnx.load(record["path"])
    scales = per_step_scales(model)
    assert scales and distinct_step_scales(model) == 0
    assert record["shared_from"] == shared_from
    if shared_from == "denoiser":
        assert record["quantizers_from_denoiser"] >= 0.8 * record["activation_quantizers"]
    expected = run(folder / "sampler.onnx", {"noise": NOISE})
    # One scale for both DDIM steps of a random model: looser than per-step's 0.15 (0.21 measured).
    assert relative_error(run(record["path"], {"noise": NOISE}), expected) < 0.25


@pytest.mark.parametrize("granularity", ["per-step", "shared"])
def test_w8a16_has_int16_activations_that_onnxruntime_runs(granularity, exported, tmp_path):
    _, folder, calib = exported
    (record,) = quantize_(folder, calib, QuantizeConfig(scheme="w8a16", granularity=granularity, targets=["sampler"]), out_dir=tmp_path)
    model = onnx.load(record["path"])
    inits = {t.name: t for t in model.graph.initializer}
    zero_points = [numpy_helper.to_array(inits[q.node.input[2]]).dtype for q in activation_quantizers(model)]
    assert zero_points and set(zero_points) == {np.dtype(np.int16)}
    expected = run(folder / "sampler.onnx", {"noise": NOISE})
    assert relative_error(run(record["path"], {"noise": NOISE}), expected) < 0.05


# ----------------------------------------------------------------------------- data-free schemes


@pytest.mark.parametrize("scheme, smaller", [("int8-weights", 0.3), ("int4-weights", 0.3), ("fp16", 0.55)])
def test_weight_only_and_fp16(exported, tmp_path, scheme, smaller):
    _, folder, _ = exported
    records = {r["kind"]: r for r in quantize_(folder, None, QuantizeConfig(scheme=scheme), out_dir=tmp_path)}
    assert records["denoiser"]["bytes"] < smaller * records["denoiser"]["float_bytes"]
    expected = run(folder / "sampler.onnx", {"noise": NOISE})
    assert relative_error(run(records["sampler"]["path"], {"noise": NOISE}), expected) < (0.2 if scheme == "int4-weights" else 0.05)


# ----------------------------------------------------------------------------- errors


def test_errors(exported, tmp_path):
    denoiser, folder, calib = exported
    with pytest.raises(UserError, match="export the model first"):
        quantize_(denoiser, calib, QuantizeConfig(), out_dir=tmp_path / "t")
    other = calibrate(tiny_denoiser(), CalibrationConfig(samples=2, trajectory_steps=4))
    with pytest.raises(UserError, match="recorded from"):
        quantize_(folder, other, QuantizeConfig(), out_dir=tmp_path / "a")
    with pytest.raises(UserError, match="needs a calibration set"):
        quantize_(folder, None, QuantizeConfig(scheme="w8a8"), out_dir=tmp_path / "b")
    with pytest.raises(UserError, match="did you mean 'w8a8'"):
        QuantizeConfig(scheme="w8a9")
    with pytest.raises(UserError, match="unknown key"):
        QuantizeConfig.from_dict({"schema": "w8a8"})
    assert QuantizeConfig(**QuantizeConfig(scheme="fp16", granularity="shared").to_dict()).scheme == "fp16"
    with pytest.raises(UserError, match="neither an export folder"):
        quantize_(tmp_path / "missing", calib, QuantizeConfig(), out_dir=tmp_path / "c")
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in ("a", "b", "c"))


def test_cli_quantize(exported, tmp_path, cli):
    _, folder, calib = exported
    calib_path = save_calibration(calib, tmp_path / "calib.safetensors")
    other_path = save_calibration(calibrate(tiny_denoiser(), CalibrationConfig(samples=2, trajectory_steps=4)), tmp_path / "other.safetensors")
    result = cli("quantize", folder, "--calib", other_path, "--out", tmp_path / "bad")
    assert_one_line_error(result, "recorded from")
    assert not (tmp_path / "bad").exists()
    result = cli("quantize", folder, "--scheme", "w8a8", "--out", tmp_path / "nocalib")
    assert_one_line_error(result, "--calib")
    result = cli("quantize", folder, "--scheme", "int8-weights", "--target", "denoiser", "--out", tmp_path / "ok")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    assert [a["path"] for a in manifest["artifacts"]] == ["denoiser.onnx"]
    assert calib_path.is_file()


# ----------------------------------------------------------------------------- other architectures (slow)




@pytest.mark.slow
@pytest.mark.parametrize("make", [text_denoiser, dit_denoiser], ids=["unet2d-condition", "dit"])
def test_conditional_unet_and_dit_quantize_export_and_run(make, tmp_path):
    denoiser = make()
    solver = SolverConfig("dpmpp-2m", 2, guidance_scale=2.0)
    export_onnx(denoiser, solver, tmp_path / "float")
    calib = calibrate(denoiser, CalibrationConfig(sampler="uniform", samples=8, trajectory_steps=10, interval=250, guidance_scale=2.0))
    records = {r["kind"]: r for r in quantize_(tmp_path / "float", calib, QuantizeConfig(), out_dir=tmp_path / "q")}
    sidecar = json.loads((tmp_path / "float" / "sampler.json").read_text())
    feeds = {"noise": np.random.default_rng(0).standard_normal((2, *denoiser.sample_shape)).astype(np.float32)}
    condition = sidecar["conditioning"]["input"]
    feeds[condition] = (np.array([0, 2]) if denoiser.conditioning == "class" else np.random.default_rng(1).standard_normal((2, 4, 8))).astype(
        np.int64 if denoiser.conditioning == "class" else np.float32)
    feeds["guidance_scale"] = np.array([2.0], dtype=np.float32)
    out = run(records["sampler"]["path"], feeds)
    assert out.shape == feeds["noise"].shape and np.isfinite(out).all()
    assert records["sampler"]["layers_with_per_step_scales"] > 0
    assert relative_error(out, run(tmp_path / "float" / "sampler.onnx", feeds)) < 0.3
    model = onnx.load(records["denoiser"]["path"])
    assert all("/" in module_path(name) for q in activation_quantizers(model) for name, _ in q.key)
