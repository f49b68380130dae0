"""ONNX export: sampler.onnx and denoiser.onnx against torch and the host loop, size, sidecars, errors.

Models are tiny and randomly initialised, built here. Each export is done once per module
(fixtures) because tracing and simplifying an unrolled graph is the slow part.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from compress.denoiser import ClassTokenUNet, Denoiser, DiffusersUNet
from compress.errors import UserError
from compress.sampling import sample
from compress.schedule import NoiseSchedule
from compress.solvers import SolverConfig
from export.onnx_export import export_onnx
from export.sampler_graph import DenoiserGraph, SamplerGraph

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- tiny models


def unconditional_denoiser() -> Denoiser:
    """Wider than the other tiny models so that weights, not graph structure, dominate the file size."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8)
    return Denoiser(DiffusersUNet(unet).eval(), NoiseSchedule.from_betas(), "epsilon", (1, 8, 8), name="tiny-uncond")


def tiny_cond_unet(cross_dim: int = 8):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                cross_attention_dim=cross_dim, attention_head_dim=2)


def class_denoiser() -> Denoiser:
    module = ClassTokenUNet(tiny_cond_unet(), num_classes=3).eval()
    return Denoiser(module, NoiseSchedule.from_betas(), "epsilon", (1, 8, 8), conditioning="class", num_classes=3, name="tiny-class")


def text_denoiser() -> Denoiser:
    return Denoiser(DiffusersUNet(tiny_cond_unet()).eval(), NoiseSchedule.from_betas(), "v_prediction", (1, 8, 8),
                    conditioning="text", cond_shape=(4, 8), name="tiny-text")


# ----------------------------------------------------------------------------- helpers


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def assert_close(actual, expected, what: str) -> float:
    """Random networks sample values in the hundreds (epsilon at t=999): the tolerance scales with them."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    diff = float(np.abs(actual - expected).max())
    assert diff <= TOL * max(1.0, float(np.abs(expected).max())), f"{what}: max abs diff {diff}"
    return diff


def run_sampler(path, feeds: dict) -> np.ndarray:
    return session(path).run(["sample"], {k: np.asarray(v) for k, v in feeds.items()})[0]


def by_kind(records) -> dict:
    return {r["kind"]: r for r in records}


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory):
    denoiser, solver = unconditional_denoiser(), SolverConfig("ddim", steps=8)
    out = tmp_path_factory.mktemp("unconditional")
    return denoiser, solver, out, by_kind(export_onnx(denoiser, solver, out))


@pytest.fixture(scope="module")
def class_guided(tmp_path_factory):
    denoiser, solver = class_denoiser(), SolverConfig("euler", steps=2, guidance_scale=3.0)
    out = tmp_path_factory.mktemp("class")
    return denoiser, solver, out, by_kind(export_onnx(denoiser, solver, out))


# ----------------------------------------------------------------------------- unconditional, 8 steps


def test_unconditional_sampler_matches_torch_and_host_loop_at_any_batch(unconditional):
    denoiser, solver, out, _ = unconditional
    graph = SamplerGraph(denoiser, solver)
    for batch in (1, 3):
        x = noise(batch, seed=batch)
        onnx_sample = run_sampler(out / "sampler.onnx", {"noise": x})
        with torch.no_grad():
            torch_sample = graph(x)
        host_sample = sample(denoiser, solver, x, show_progress=False, device="cpu")
        assert onnx_sample.shape == (batch, 1, 8, 8)
        assert_close(onnx_sample, torch_sample, f"onnx vs SamplerGraph, batch {batch}")
        assert_close(onnx_sample, host_sample, f"onnx vs host loop, batch {batch}")


def test_sampler_stores_the_weights_once(unconditional):
    denoiser, _, out, records = unconditional
    weight_bytes = sum(p.numel() * 4 for p in denoiser.module.parameters())
    size = (out / "sampler.onnx").stat().st_size
    assert size < 1.5 * weight_bytes, (size, weight_bytes)  # eight copies would be 8x
    assert records["sampler"]["weight_bytes"] == weight_bytes
    assert records["sampler"]["constant_bytes"] <= 1.1 * weight_bytes


def test_no_node_restates_an_operator_default(unconditional):
    """The tracer writes strides 1, pads 0, ... on every conv of every step; the export drops them
    (and its outputs still match torch: the test above)."""
    from export.onnx_graph import DEFAULT_ATTRIBUTES

    _, _, out, _ = unconditional
    model = onnx.load(str(out / "sampler.onnx"))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs
    for node in model.graph.node:
        for attribute in node.attribute:
            value = onnx.helper.get_attribute_value(attribute)
            default = DEFAULT_ATTRIBUTES.get(node.op_type, {}).get(attribute.name, object())
            assert not all(v == default for v in (value if isinstance(value, list) else [value])), (node.name, attribute.name)


def test_drop_default_attributes_keeps_what_differs():
    from export.onnx_graph import drop_default_attributes

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 8, 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, 2, 3, 3)).astype(np.float32), "w")
    conv = onnx.helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], dilations=[1, 1], group=1)
    model = onnx.helper.make_model(onnx.helper.make_graph([conv], "g", [x], [y], [w]), opset_imports=[onnx.helper.make_opsetid("", 17)])
    feed = {"x": np.random.default_rng(1).standard_normal((1, 2, 8, 8)).astype(np.float32)}
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert drop_default_attributes(model) > 0
    assert sorted(a.name for a in model.graph.node[0].attribute) == ["kernel_shape", "pads", "strides"]
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert before.shape == (1, 3, 4, 4) and np.array_equal(before, after)


def test_artifacts_are_valid_and_recorded(unconditional):
    _, _, out, records = unconditional
    assert sorted(p.name for p in out.iterdir()) == ["denoiser.json", "denoiser.onnx", "sampler.json", "sampler.onnx"]
    for kind, record in records.items():
        path = Path(record["path"])
        assert path == out / f"{kind}.onnx" and record["format"] == "onnx"
        assert record["bytes"] == path.stat().st_size
        assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path))
        # NNCF cannot quantize a graph whose output comes from a no-op Cast: the simplifier removed it.
        producer = next(n for n in model.graph.node if model.graph.output[0].name in n.output)
        assert producer.op_type != "Cast"
        assert max(len(n.name) for n in model.graph.node) < 80


def test_sidecars_describe_the_interface(unconditional):
    denoiser, solver, out, _ = unconditional
    sampler = json.loads((out / "sampler.json").read_text())
    assert [i["name"] for i in sampler["inputs"]] == ["noise"]
    assert sampler["inputs"][0] | {"description": None} == {
        "name": "noise", "shape": ["batch", 1, 8, 8], "dtype": "float32", "distribution": "standard_normal", "description": None}
    assert sampler["outputs"][0]["name"] == "sample" and sampler["outputs"][0]["shape"] == ["batch", 1, 8, 8]
    assert sampler["batch"] == {"dynamic": True, "size": None}
    assert sampler["data_range"] == [-1.0, 1.0] and sampler["prediction_type"] == "epsilon"
    assert sampler["solver"]["name"] == "ddim" and sampler["solver"]["steps"] == 8 and sampler["solver"]["nfe"] == 8
    # The timesteps diffusers' own DDIM runs on this schedule at the solver's spacing (trailing by default).
    ddim = DDIMScheduler.from_config(DDPMScheduler().config, timestep_spacing=solver.spacing)
    ddim.set_timesteps(8)
    assert sampler["solver"]["timesteps"] == [float(t) for t in ddim.timesteps]
    assert sampler["guidance"] == {"enabled": False, "kind": None, "default_scale": None}
    assert sampler["conditioning"]["kind"] == "none"
    # NoiseSchedule.from_betas() stands for diffusers' default linear betas (1e-4 to 0.02, 1000 steps). The
    # fingerprint is computed from its definition (sha256 of alphas_cumprod in float64): calibration sets and
    # artifacts of earlier versions store it, so a different digest of the same schedule would refuse them.
    alphas_cumprod = DDPMScheduler().alphas_cumprod.double().numpy()
    assert sampler["model"] == {
        "name": "tiny-uncond", "source": "", "prediction_type": "epsilon", "sample_shape": [1, 8, 8], "conditioning": "none",
        "num_classes": None, "cond_shape": None, "data_range": [-1.0, 1.0], "space": "pixels", "num_train_timesteps": 1000,
        "schedule_fingerprint": hashlib.sha256(alphas_cumprod.tobytes()).hexdigest()[:16],
        "parameters": denoiser.module.unet.num_parameters(),
    }
    bare = json.loads((out / "denoiser.json").read_text())
    assert [i["name"] for i in bare["inputs"]] == ["sample", "timestep"]
    assert bare["outputs"][0]["name"] == "prediction"
    np.testing.assert_allclose(bare["schedule"]["alphas_cumprod"], alphas_cumprod, rtol=1e-6)


def test_denoiser_onnx_matches_the_module(unconditional):
    denoiser, _, out, _ = unconditional
    x, t = noise(3), torch.tensor([999.0, 500.0, 3.5])
    prediction = session(out / "denoiser.onnx").run(["prediction"], {"sample": x.numpy(), "timestep": t.numpy()})[0]
    with torch.no_grad():
        expected = denoiser.module(x, t)
    assert_close(prediction, expected, "denoiser.onnx vs module")


# ----------------------------------------------------------------------------- conditional models


def test_class_conditional_guided_sampler(class_guided):
    denoiser, solver, out, records = class_guided
    graph = SamplerGraph(denoiser, solver)
    assert graph.input_names == ["noise", "class_labels", "guidance_scale"]
    for batch, scale in ((1, 3.0), (3, 0.0)):
        x, labels = noise(batch), torch.arange(batch) % 3
        onnx_sample = run_sampler(out / "sampler.onnx", {"noise": x, "class_labels": labels, "guidance_scale": np.array([scale], np.float32)})
        with torch.no_grad():
            torch_sample = graph(x, labels, torch.tensor([scale]))
        host_sample = sample(denoiser, SolverConfig("euler", 2, guidance_scale=scale), x, labels, show_progress=False, device="cpu")
        assert_close(onnx_sample, torch_sample, f"onnx vs SamplerGraph, guidance {scale}")
        assert_close(onnx_sample, host_sample, f"onnx vs host loop, guidance {scale}")
    sidecar = json.loads((out / "sampler.json").read_text())
    assert [i["name"] for i in sidecar["inputs"]] == ["noise", "class_labels", "guidance_scale"]
    labels_spec = sidecar["inputs"][1]
    assert labels_spec["dtype"] == "int64" and labels_spec["shape"] == ["batch"] and labels_spec["null_value"] == 3
    assert sidecar["guidance"] == {"enabled": True, "kind": "classifier-free", "default_scale": 3.0}
    assert sidecar["conditioning"]["null_label"] == 3 and "class_labels = 3" in sidecar["conditioning"]["unconditional"]
    assert sidecar["solver"]["network_batch"] == "2 x batch"
    bare = onnx.load(records["denoiser"]["path"])
    assert [i.name for i in bare.graph.input] == ["sample", "timestep", "class_labels"]


def test_text_conditional_sampler_with_a_fixed_batch(tmp_path):
    denoiser, solver = text_denoiser(), SolverConfig("ddim", steps=1, guidance_scale=2.0)
    export_onnx(denoiser, solver, tmp_path, batch_size=2)
    sidecar = json.loads((tmp_path / "sampler.json").read_text())
    assert sidecar["inputs"][1] | {"description": None} == {
        "name": "encoder_hidden_states", "shape": [2, 4, 8], "dtype": "float32", "null_value": "zeros", "description": None}
    assert sidecar["batch"] == {"dynamic": False, "size": 2} and sidecar["prediction_type"] == "v_prediction"
    x, text = noise(2), torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(5))
    onnx_sample = run_sampler(tmp_path / "sampler.onnx", {"noise": x, "encoder_hidden_states": text, "guidance_scale": np.array([2.0], np.float32)})
    host_sample = sample(denoiser, solver, x, text, show_progress=False, device="cpu")
    assert_close(onnx_sample, host_sample, "onnx vs host loop (text)")


def test_example_script_generates_a_grid(class_guided, tmp_path):
    _, _, out, _ = class_guided
    grid = tmp_path / "grid.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "generate_onnx.py"), str(out / "sampler.onnx"),
         "--count", "4", "--label", "1", "--guidance", "2", "--out", str(grid)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    written = grid if grid.exists() else grid.with_suffix(".npy")
    assert written.stat().st_size > 0


# ----------------------------------------------------------------------------- refusals and failures


def test_guidance_on_an_unconditional_model_is_refused(tmp_path):
    denoiser = unconditional_denoiser()
    with pytest.raises(UserError, match="unconditional"):
        SamplerGraph(denoiser, SolverConfig("ddim", 4, guidance_scale=2.0))
    with pytest.raises(UserError, match="unconditional"):
        SamplerGraph(denoiser, SolverConfig("ddim", 4), guidance=True)
    with pytest.raises(UserError, match="unconditional"):
        export_onnx(denoiser, SolverConfig("ddim", 4, guidance_scale=2.0), tmp_path)
    with pytest.raises(UserError, match="stochastic"):
        SamplerGraph(denoiser, SolverConfig("ddpm", 4))
    with pytest.raises(UserError, match="batch_size"):
        export_onnx(denoiser, SolverConfig("ddim", 4), tmp_path, batch_size=0)
    with pytest.raises(UserError, match="opset"):
        export_onnx(denoiser, SolverConfig("ddim", 4), tmp_path, opset=11)
    with pytest.raises(UserError, match="guidance"):
        SamplerGraph(class_denoiser(), SolverConfig("ddim", 4, guidance_scale=2.0), guidance=False)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    import export.onnx_export as onnx_export

    def broken(model):
        raise RuntimeError("simplifier crashed")

    monkeypatch.setattr(onnx_export, "_simplify", broken)
    with pytest.raises(RuntimeError, match="simplifier crashed"):
        export_onnx(text_denoiser(), SolverConfig("ddim", 1), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_conditional_model_without_guidance_takes_no_scale():
    graph = SamplerGraph(class_denoiser(), SolverConfig("ddim", 2), guidance=False)
    assert graph.input_names == ["noise", "class_labels"]
    bare = DenoiserGraph(text_denoiser())
    assert bare.input_names == ["sample", "timestep", "encoder_hidden_states"]
