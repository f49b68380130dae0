"""Export targets end to end: the target recorded in every sidecar, and `compress quantize` writing
the QDQ layout each target's provider takes, checked on the quantized file itself.

The QNN rules come from onnxruntime's own QNN tooling (onnxruntime.quantization.execution_providers.qnn:
get_qnn_qdq_config and the QDQ quantizer it configures): uint8 / uint16 asymmetric activations per
tensor, int8 symmetric weights per output channel (MatMul per tensor), int32 biases scaled by
input scale x weight scale, 16-bit Q/DQ in com.microsoft, 16-bit Sigmoid / Tanh outputs on fixed
scales, and every op of the network quantized (HTP runs no float op). The QNN execution provider is
not installed here; the OpenVINO NPU plugin neither: its layout is run on OpenVINO's CPU plugin.

Every test uses the tiny UNet (`tests.tiny_models:tiny_denoiser`), a 2-step DDIM sampler and an
8-trajectory calibration set.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from calibration import CalibrationConfig, calibrate, save_calibration
from compress.errors import UserError
from export.onnx_graph import inside_network
from compress.quantize import QuantizeConfig, quantize_
from compress.solvers import SolverConfig
from export.onnx_export import export_onnx
from export.targets import get_target, read_qdq_layout
from tests.conftest import run_cli
from tests.tiny_models import tiny_denoiser

pytestmark = pytest.mark.usefixtures("one_thread")

SOLVER = SolverConfig("ddim", 2)
CONTRIB = "com.microsoft"
QNN_MISSING = ("QNNExecutionProvider is not installed here (it ships in the onnxruntime-qnn wheel, for Qualcomm "
               "HTP devices); the QNN files are checked against onnxruntime's QNN quantization rules instead")


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    calib = calibrate(tiny_denoiser(), CalibrationConfig(samples=8, trajectory_steps=10))
    path = save_calibration(calib, tmp_path_factory.mktemp("calib") / "calib.safetensors")
    return calib, path


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One export folder per target, each recording its target."""
    folders = {}
    for name in ("generic", "npu-qnn", "npu-qnn-w8a16", "npu-openvino"):
        folders[name] = tmp_path_factory.mktemp(name)
        export_onnx(tiny_denoiser(), SOLVER, folders[name], target=name)
    return folders


@pytest.fixture(scope="module")
def quantized(exports, calib, tmp_path_factory):
    """Each export quantized with the target it records (none named in the config); npu-qnn through the CLI."""
    calib_set, calib_path = calib
    out = {}
    for name, scheme in (("generic", "w8a8"), ("npu-qnn-w8a16", "w8a16"), ("npu-openvino", "w8a8")):
        out[name] = tmp_path_factory.mktemp(f"q-{name}")
        quantize_(exports[name], calib_set, QuantizeConfig(scheme=scheme, subset_size=8), out_dir=out[name])
    out["npu-qnn"] = tmp_path_factory.mktemp("q-npu-qnn")
    result = run_cli("quantize", exports["npu-qnn"], "--calib", calib_path, "--subset-size", "8", "--out", out["npu-qnn"])
    assert result.returncode == 0, result.stderr
    assert "target npu-qnn" in result.stdout
    return out


# ----------------------------------------------------------------------------- reading a file's Q/DQ nodes


class Graph:
    def __init__(self, path):
        self.model = onnx.load(str(path))
        g = self.model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for j, i in enumerate(n.input):
                self.consumers.setdefault(i, []).append((n, j))
        self.inputs = {i.name for i in g.input}
        self.nodes = list(g.node)

    def const(self, name) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def params(self, node):
        return self.const(node.input[1]), self.const(node.input[2])

    def axis(self, node) -> int:
        return next((a.i for a in node.attribute if a.name == "axis"), 1)

    def dq_of(self, tensor):
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def activation_quantizers(self):
        return [n for n in self.nodes if n.op_type == "QuantizeLinear" and n.input[0] not in self.inits]

    def weighted(self):
        """(node, weight DQ, bias DQ or None) for every conv / gemm / matmul whose weight is dequantized from a constant."""
        for n in self.nodes:
            if n.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                continue
            w = self.dq_of(n.input[1])
            if w is None or w.input[0] not in self.inits:
                continue
            b = self.dq_of(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            yield n, w, b


def output_axis(node) -> int:
    """The output-channel axis of a weighted op's weight."""
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return 0 if node.op_type == "Conv" else 1


def assert_qnn_layout(graph: Graph, activation: str):
    """The rules of onnxruntime's QNN tooling, on every Q/DQ of the file."""
    midpoint = {"uint8": 128, "uint16": 32768}[activation]
    quantizers = graph.activation_quantizers()
    assert quantizers
    zero_points = []
    for q in quantizers:
        scale, zp = graph.params(q)
        assert str(zp.dtype) == activation, (q.name, zp.dtype)
        assert scale.ndim == 0 and zp.ndim == 0, f"{q.name}: activations are per tensor"
        zero_points.append(int(zp))
        for dq, _ in graph.consumers[q.output[0]]:
            assert dq.op_type == "DequantizeLinear" and dq.input[1:3] == q.input[1:3]
    assert set(zero_points) != {midpoint}, "activations are asymmetric (min-max zero points)"
    weighted = list(graph.weighted())
    assert weighted
    for node, w, b in weighted:
        scale, zp = graph.params(w)
        assert zp.dtype == np.int8 and not zp.any(), f"{node.name}: weights int8 symmetric"
        weight = graph.const(w.input[0])
        if node.op_type == "MatMul":  # QNN has no per-channel MatMul
            assert scale.ndim == 0, node.name
        else:
            assert scale.shape == (weight.shape[output_axis(node)],) and graph.axis(w) == output_axis(node), f"{node.name}: per output channel"
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2 and node.input[2]:
            assert b is not None, f"{node.name}: the bias is quantized"
            b_scale, b_zp = graph.params(b)
            a = graph.dq_of(node.input[0])
            assert b_zp.dtype == np.int32 and not b_zp.any(), node.name
            np.testing.assert_allclose(b_scale, graph.params(a)[0] * scale, rtol=1e-6, err_msg=f"{node.name}: bias scale = input scale x weight scale")
    qdq = quantizers + [dq for q in quantizers for dq, _ in graph.consumers[q.output[0]]]
    qdq += [w for _, w, _ in weighted] + [b for *_, b in weighted if b is not None]
    wanted = CONTRIB if activation == "uint16" else ""
    assert {n.domain for n in qdq} == {wanted}, "16-bit Q/DQ are com.microsoft ops; 8-bit ones the default domain"
    for n in graph.nodes:
        if n.op_type in ("Sigmoid", "Tanh") and activation == "uint16":
            (q, _), = [(u, j) for u, j in graph.consumers[n.output[0]] if u.op_type == "QuantizeLinear"]
            scale, zp = graph.params(q)
            expected = (1 / 65536, 0) if n.op_type == "Sigmoid" else (1 / 32768, 32768)
            assert (float(scale), int(zp)) == pytest.approx(expected), f"{n.name}: QNN's fixed 16-bit {n.op_type} output scale"


def assert_every_network_op_quantized(graph: Graph, exempt=("Cast",)):
    """HTP runs no float op: inside the network every op reads dequantized tensors and writes quantized ones."""
    for n in graph.nodes:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", *exempt) or not inside_network(n.name):
            continue
        for i in n.input:
            if i and i not in graph.inits and i not in graph.inputs:
                assert graph.dq_of(i) is not None, f"{n.op_type} {n.name} reads {i} in float"
        for o in n.output:
            users = graph.consumers.get(o, [])
            assert not users or any(u.op_type == "QuantizeLinear" for u, _ in users), f"{n.op_type} {n.name} writes {o} in float"


def run(path, feeds) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def relative_error(actual, expected) -> float:
    return float(np.sqrt(np.mean((actual - expected) ** 2)) / np.sqrt(np.mean(expected ** 2)))


NOISE = {"noise": np.random.default_rng(3).standard_normal((1, 1, 8, 8)).astype(np.float32)}


# ----------------------------------------------------------------------------- export: the target in every sidecar


def test_export_records_the_target_in_every_sidecar(tmp_path):
    from compress.components import Pipeline
    from compress.export_chain import export_artifacts

    records = export_artifacts(Pipeline(tiny_denoiser()), SOLVER, tmp_path, ["onnx", "openvino"], target="npu-openvino")
    expected = get_target("npu-openvino").describe()
    assert len(records) == 4  # sampler and denoiser, ONNX and OpenVINO IR
    for kind in ("sampler", "denoiser"):
        for name in (f"{kind}.json", f"{kind}.openvino.json"):
            sidecar = json.loads((tmp_path / name).read_text())
            assert sidecar["target"] == expected and sidecar["batch"] == {"dynamic": False, "size": 1}, name
        embedded = onnx.load(str(tmp_path / f"{kind}.onnx")).metadata_props
        assert json.loads(next(p.value for p in embedded if p.key == "diffusion_compress.sidecar"))["target"] == expected
        dims = [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(str(tmp_path / f"{kind}.onnx")).graph.input]
        assert all(d and all(d) for d in dims), dims  # static shapes


def test_generic_export_records_its_dynamic_target(exports):
    sidecar = json.loads((exports["generic"] / "sampler.json").read_text())
    assert sidecar["target"]["name"] == "generic" and not sidecar["target"]["static_batch"] and sidecar["batch"]["dynamic"]


# ----------------------------------------------------------------------------- quantize: one test per NPU target


@pytest.mark.parametrize("name, activation", [("npu-qnn", "uint8"), ("npu-qnn-w8a16", "uint16")])
def test_qnn_targets_write_onnxruntimes_qnn_layout(quantized, exports, name, activation):
    for kind in ("sampler", "denoiser"):
        path = quantized[name] / f"{kind}.onnx"
        graph = Graph(path)
        assert_qnn_layout(graph, activation)
        assert_every_network_op_quantized(graph)
        sidecar = json.loads(path.with_suffix(".json").read_text())
        assert sidecar["target"] == get_target(name).describe()
        layout = sidecar["quantization"]["qdq_layout"]
        assert layout == {**read_qdq_layout(graph.model), "target": name, "departures_from_target": []}
        assert layout["activation_dtype"] == activation and layout["bias_dtype"] == "int32"
        assert sidecar["quantization"]["engine"].startswith(f"onnxruntime {ort.__version__}")


def test_qnn_keeps_matmul_weights_per_tensor(tmp_path):
    """The text UNet's cross-attention key/value projections are MatMuls on constant weights (the others fold into Gemm)."""
    from tests.tiny_models import text_denoiser

    denoiser = text_denoiser()
    export_onnx(denoiser, SOLVER, tmp_path / "float", target="npu-qnn")
    calib = calibrate(denoiser, CalibrationConfig(samples=8, trajectory_steps=10))
    (record,) = quantize_(tmp_path / "float", calib, QuantizeConfig(subset_size=8, targets=["sampler"]), out_dir=tmp_path / "q")
    graph = Graph(record["path"])
    assert any(n.op_type == "MatMul" for n, _, _ in graph.weighted())
    assert_qnn_layout(graph, "uint8")
    assert_every_network_op_quantized(graph)
    assert json.loads(Path(record["sidecar"]).read_text())["quantization"]["qdq_layout"]["weight_per_channel"]["MatMul"] is False


def test_qnn_layouts_run_on_onnxruntime_cpu_and_w8a16_is_closer(quantized, exports):
    reference = run(exports["npu-qnn"] / "sampler.onnx", NOISE)
    errors = {name: relative_error(run(quantized[name] / "sampler.onnx", NOISE), reference) for name in ("npu-qnn", "npu-qnn-w8a16")}
    assert errors["npu-qnn-w8a16"] < errors["npu-qnn"] < 0.05, errors


@pytest.mark.skipif("QNNExecutionProvider" not in ort.get_available_providers(), reason=QNN_MISSING)
def test_qnn_layouts_run_on_the_qnn_execution_provider(quantized, exports):
    reference = run(exports["npu-qnn"] / "sampler.onnx", NOISE)
    for name in ("npu-qnn", "npu-qnn-w8a16"):
        session = ort.InferenceSession(str(quantized[name] / "sampler.onnx"), providers=[("QNNExecutionProvider", {"backend_path": "libQnnHtp.so"}), "CPUExecutionProvider"])
        assert relative_error(session.run(None, NOISE)[0], reference) < 0.05


def test_npu_openvino_writes_the_generic_layout_and_openvino_cpu_runs_it(quantized, tmp_path):
    from export.openvino_export import export_openvino
    from runtimes.runners import get_runner

    for kind in ("sampler", "denoiser"):
        path = quantized["npu-openvino"] / f"{kind}.onnx"
        graph = Graph(path)
        for q in graph.activation_quantizers():
            scale, zp = graph.params(q)
            assert zp.dtype == np.uint8 and scale.ndim == 0
        weighted = list(graph.weighted())
        assert weighted
        for node, w, b in weighted:
            scale, zp = graph.params(w)
            assert zp.dtype == np.int8 and not zp.any() and scale.ndim == 1, node.name
            assert b is None, f"{node.name}: NNCF leaves biases float"
        sidecar = json.loads(path.with_suffix(".json").read_text())
        layout = sidecar["quantization"]["qdq_layout"]
        assert sidecar["target"]["name"] == "npu-openvino" and layout["departures_from_target"] == []
        assert layout == {**read_qdq_layout(graph.model), "target": "npu-openvino", "departures_from_target": []}
    record = {"path": str(quantized["npu-openvino"] / "sampler.onnx"), "format": "onnx", "kind": "sampler",
              "sidecar": str(quantized["npu-openvino"] / "sampler.json")}
    (ir,) = export_openvino([record], tmp_path)
    import openvino as ov

    ops = {op.get_type_name() for op in ov.Core().read_model(ir["path"]).get_ops()}
    assert "FakeQuantize" in ops  # the Q/DQ pairs survive as int8 in the IR
    ours = get_runner("openvino", threads=1).load(ir["path"]).run(NOISE)
    onnxruntime_run = run(record["path"], NOISE)
    assert relative_error(ours, onnxruntime_run) < 0.05


# ----------------------------------------------------------------------------- the generic target is unchanged


def test_generic_target_is_the_layout_quantize_always_wrote(quantized, exports, calib, tmp_path):
    """uint8 asymmetric activations, int8 symmetric per-channel weights, float biases, default-domain Q/DQ; an
    export without a recorded target, and an explicit target generic, give the same graph."""
    for kind in ("sampler", "denoiser"):
        graph = Graph(quantized["generic"] / f"{kind}.onnx")
        zps = [graph.params(q)[1] for q in graph.activation_quantizers()]
        assert zps and all(z.dtype == np.uint8 and z.ndim == 0 for z in zps) and {int(z) for z in zps} != {128}
        for node, w, b in graph.weighted():
            scale, zp = graph.params(w)
            assert zp.dtype == np.int8 and not zp.any() and scale.ndim == 1 and b is None, node.name
        assert {n.domain for n in graph.nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear")} == {""}
        layout = json.loads((quantized["generic"] / f"{kind}.json").read_text())["quantization"]["qdq_layout"]
        assert layout["departures_from_target"] == [] and layout["target"] == "generic"
    # an export written before targets were recorded
    old = tmp_path / "old"
    old.mkdir()
    for kind in ("sampler", "denoiser"):
        (old / f"{kind}.onnx").write_bytes((exports["generic"] / f"{kind}.onnx").read_bytes())
        sidecar = json.loads((exports["generic"] / f"{kind}.json").read_text())
        del sidecar["target"]
        (old / f"{kind}.json").write_text(json.dumps(sidecar))
    records = quantize_(old, calib[0], QuantizeConfig(subset_size=8, targets=["denoiser"], target="generic"), out_dir=tmp_path / "explicit")
    again = quantize_(old, calib[0], QuantizeConfig(subset_size=8, targets=["denoiser"]), out_dir=tmp_path / "recorded-none")
    assert records[0]["export_target"] == again[0]["export_target"] == "generic"
    reference = onnx.load(str(quantized["generic"] / "denoiser.onnx")).graph.SerializeToString()
    for r in records + again:
        assert onnx.load(r["path"]).graph.SerializeToString() == reference


# ----------------------------------------------------------------------------- shared scales keep the QNN bias rule


def test_qnn_shared_scales_requantize_the_int32_biases(exports, calib, tmp_path):
    records = quantize_(exports["npu-qnn"], calib[0], QuantizeConfig(granularity="shared", subset_size=8, targets=["sampler"]), out_dir=tmp_path)
    graph = Graph(records[0]["path"])
    assert records[0]["quantizers_from_denoiser"] > 0 and records[0]["layers_with_per_step_scales"] == 0
    assert_qnn_layout(graph, "uint8")


# ----------------------------------------------------------------------------- what a target refuses


def test_targets_refuse_what_their_provider_does_not_take(exports, calib, tmp_path):
    calib_set, calib_path = calib
    with pytest.raises(UserError, match="dynamic batch, and target npu-qnn compiles one static graph"):
        quantize_(exports["generic"], calib_set, QuantizeConfig(target="npu-qnn"), out_dir=tmp_path / "a")
    with pytest.raises(UserError, match="takes uint16 activations.*--scheme w8a16, or target npu-qnn"):
        quantize_(exports["npu-qnn-w8a16"], calib_set, QuantizeConfig(), out_dir=tmp_path / "b")
    with pytest.raises(UserError, match="scheme 'int8-weights' is not that"):
        quantize_(exports["npu-openvino"], None, QuantizeConfig(scheme="int8-weights"), out_dir=tmp_path / "c")
    with pytest.raises(UserError, match="preset 'performance' makes them symmetric"):
        quantize_(exports["npu-openvino"], calib_set, QuantizeConfig(preset="performance"), out_dir=tmp_path / "d")
    with pytest.raises(UserError, match="did you mean 'npu-qnn'"):
        QuantizeConfig(target="npu-qn")
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "abcd")
