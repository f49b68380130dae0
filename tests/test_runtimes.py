"""Runners, OpenVINO IR export, export targets and `compress bench`, on real libraries (no mocks).

The models are tiny and random. They predict x0 ('sample' prediction) so that a sampler's output
stays in the data range and an absolute tolerance of 1e-3 means something. Each export is done
once per module because tracing an unrolled graph is the slow part.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from compress.errors import UserError
from compress.solvers import SolverConfig
from export.onnx_export import export_onnx
from export.openvino_export import export_openvino, files_sha256
from export.sampler_graph import DenoiserGraph, SamplerGraph
from export.targets import TARGETS, get_target
from runtimes.artifacts import example_feeds, open_artifact
from runtimes.runners import RUNTIMES, availability, get_runner
from tests.conftest import assert_one_line_error, run_cli
from tests.tiny_models import tiny_denoiser

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-3
FACTORY = "python:tests.test_runtimes:sample_prediction_denoiser"


def sample_prediction_denoiser():
    """A CLI factory target as well: the torch runner rebuilds the sampler from the sidecar's source."""
    return dataclasses.replace(tiny_denoiser(), prediction_type="sample", name="tiny-x0", source=FACTORY)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_step(tmp_path_factory):
    """ONNX and OpenVINO IR of a 2-step DPM-Solver++ sampler (dynamic batch)."""
    denoiser, solver = sample_prediction_denoiser(), SolverConfig("dpmpp-2m", 2)
    out = tmp_path_factory.mktemp("two_step")
    records = export_onnx(denoiser, solver, out)
    records += export_openvino(records, out)
    return denoiser, solver, out, records


def outputs_of(names: list[str], path: Path, feeds: dict, module=None) -> dict[str, np.ndarray]:
    results = {}
    for name in names:
        runner = get_runner(name, threads=1)
        runner.load_module(module) if module is not None and name == "torch" else runner.load(path)
        results[name] = runner.run(feeds)
    return results


def assert_agree(outputs: dict[str, np.ndarray], reference: str = "torch") -> None:
    expected = outputs[reference]
    assert np.isfinite(expected).all()
    for name, actual in outputs.items():
        assert actual.shape == expected.shape, (name, actual.shape)
        diff = float(np.abs(actual - expected).max())
        assert diff <= TOL, f"{name} vs {reference}: max abs diff {diff}"


# ----------------------------------------------------------------------------- torch vs onnxruntime vs OpenVINO


def test_runners_agree_on_a_two_step_sampler(two_step):
    denoiser, solver, out, _ = two_step
    artifact = open_artifact(out / "sampler.onnx")
    graph = SamplerGraph(denoiser, solver)
    for batch in (1, 3):
        feeds = example_feeds(artifact, batch, seed=batch)
        outputs = outputs_of(["torch", "onnxruntime"], out / "sampler.onnx", feeds, graph)
        outputs |= {"openvino": get_runner("openvino", 1).load(out / "sampler.xml").run(feeds)}
        assert outputs["torch"].shape == (batch, 1, 8, 8)
        assert_agree(outputs)


def test_openvino_compiles_a_dynamic_batch_model_once_per_shape(two_step):
    _, _, out, _ = two_step
    artifact = open_artifact(out / "sampler.xml")
    runner = get_runner("openvino", 1).load(artifact.path)
    assert runner.model.is_dynamic() and not runner.compiled
    first = runner.run(example_feeds(artifact, 2, seed=0))
    again = runner.run(example_feeds(artifact, 2, seed=0))
    runner.run(example_feeds(artifact, 3, seed=1))
    assert np.array_equal(first, again)
    assert [dict(key)["noise"] for key in runner.compiled] == [(2, 1, 8, 8), (3, 1, 8, 8)]
    for compiled, _ in runner.compiled.values():
        assert not compiled.inputs[0].get_partial_shape().is_dynamic


def test_runners_agree_on_the_bare_denoiser(two_step):
    denoiser, _, out, _ = two_step
    feeds = example_feeds(open_artifact(out / "denoiser.xml"), batch=2)
    assert set(feeds) == {"sample", "timestep"}
    outputs = outputs_of(["torch", "onnxruntime"], out / "denoiser.onnx", feeds, DenoiserGraph(denoiser))
    outputs["openvino"] = get_runner("openvino", 1).load(out / "denoiser.xml").run(feeds)
    assert_agree(outputs)


@pytest.mark.slow
def test_eight_step_sampler_agrees_on_torch_onnxruntime_and_openvino(tmp_path):
    denoiser, solver = sample_prediction_denoiser(), SolverConfig("dpmpp-2m", 8)
    export_openvino(export_onnx(denoiser, solver, tmp_path), tmp_path)
    feeds = example_feeds(open_artifact(tmp_path / "sampler.onnx"), batch=2, seed=7)
    outputs = outputs_of(["torch", "onnxruntime"], tmp_path / "sampler.onnx", feeds, SamplerGraph(denoiser, solver))
    outputs["openvino"] = get_runner("openvino", 1).load(tmp_path / "sampler.xml").run(feeds)
    assert_agree(outputs)


def test_torch_runner_rebuilds_the_sampler_from_the_sidecar(two_step):
    denoiser, solver, out, _ = two_step
    feeds = example_feeds(open_artifact(out / "sampler.onnx"), batch=2)
    rebuilt = get_runner("torch", 1).load(out / "sampler.onnx")
    assert rebuilt.describe()["rebuilt_from"] == FACTORY
    direct = get_runner("torch", 1).load_module(SamplerGraph(denoiser, solver))
    np.testing.assert_array_equal(rebuilt.run(feeds), direct.run(feeds))


def test_torch_runner_refuses_a_sidecar_it_cannot_reproduce(two_step, tmp_path):
    _, _, out, _ = two_step
    sidecar = json.loads((out / "sampler.json").read_text())
    sidecar["solver"]["timesteps"] = [900.0, 100.0]
    shutil.copy(out / "sampler.onnx", tmp_path / "sampler.onnx")
    (tmp_path / "sampler.json").write_text(json.dumps(sidecar))
    with pytest.raises(UserError, match="cannot rebuild"):
        get_runner("torch").load(tmp_path / "sampler.onnx")
    del sidecar["model"]["source"]
    (tmp_path / "sampler.json").write_text(json.dumps(sidecar))
    with pytest.raises(UserError, match="names no source model"):
        get_runner("torch").load(tmp_path / "sampler.onnx")


# ----------------------------------------------------------------------------- availability, never faked


def test_every_runtime_reports_whether_it_runs_here_and_why():
    rows = {row["runtime"]: row for row in availability()}
    assert set(rows) == set(RUNTIMES)
    assert rows["torch"]["available"] and rows["onnxruntime"]["available"] and rows["openvino"]["available"]
    for row in rows.values():
        assert row["reason"], row
    if sys.platform != "darwin":
        assert not rows["coreml"]["available"] and "needs macOS" in rows["coreml"]["reason"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert not rows["onnxruntime-cuda"]["available"] and "onnxruntime-gpu" in rows["onnxruntime-cuda"]["reason"]
    if not torch.cuda.is_available():
        assert not rows["torch-cuda"]["available"]


def test_unavailable_runner_refuses_to_run():
    unavailable = [row["runtime"] for row in availability() if not row["available"]]
    if not unavailable:
        pytest.skip("every runtime is available on this machine")
    with pytest.raises(UserError, match="not available here"):
        get_runner(unavailable[0]).require_available()


def test_unknown_runtime_suggests_the_closest_name():
    with pytest.raises(UserError, match="did you mean 'openvino-gpu'"):
        get_runner("openvino-gp")


def test_runner_refuses_a_format_it_cannot_read(two_step):
    _, _, out, _ = two_step
    with pytest.raises(UserError, match="cannot run a openvino artifact"):
        get_runner("onnxruntime").load(out / "sampler.xml")


# ----------------------------------------------------------------------------- OpenVINO IR


def test_openvino_records_sidecars_and_interface(two_step):
    _, _, out, records = two_step
    ir = {r["kind"]: r for r in records if r["format"] == "openvino"}
    assert set(ir) == {"sampler", "denoiser"}
    for kind, record in ir.items():
        xml, weights = out / f"{kind}.xml", out / f"{kind}.bin"
        assert record["path"] == str(xml) and record["weights"] == str(weights)
        assert record["bytes"] == xml.stat().st_size + weights.stat().st_size
        assert record["sha256"] == files_sha256([xml, weights])
        sidecar = json.loads(Path(record["sidecar"]).read_text())
        assert Path(record["sidecar"]).name == f"{kind}.openvino.json"
        assert sidecar["format"] == "openvino" and sidecar["file"] == f"{kind}.xml" and sidecar["weights_file"] == f"{kind}.bin"
        onnx_sidecar = json.loads((out / f"{kind}.json").read_text())
        assert sidecar["inputs"] == onnx_sidecar["inputs"] and sidecar["outputs"] == onnx_sidecar["outputs"]
    import openvino as ov

    model = ov.Core().read_model(str(out / "sampler.xml"))
    assert [p.get_any_name() for p in model.inputs] == ["noise"] and model.outputs[0].get_any_name() == "sample"
    assert json.loads(model.get_rt_info(["diffusion_compress", "sidecar"]).astype(str))["kind"] == "sampler"
    # Float weights stay float32 (compress_to_fp16=False): the .bin holds every parameter once.
    weight_bytes = sum(p.numel() * 4 for p in sample_prediction_denoiser().module.parameters())
    assert 0.9 * weight_bytes <= (out / "denoiser.bin").stat().st_size <= 1.25 * weight_bytes


def test_openvino_converts_an_int8_qdq_model(two_step, tmp_path):
    """A QDQ model (here from onnxruntime's quantizer, in the generic target's layout) stays int8 in the IR and runs."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    _, _, out, _ = two_step
    artifact = open_artifact(out / "denoiser.onnx")

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.items = iter([example_feeds(artifact, batch=2, seed=s) for s in range(4)])

        def get_next(self):
            return next(self.items, None)

    quantized = tmp_path / "denoiser.onnx"
    quantize_static(str(out / "denoiser.onnx"), str(quantized), Calibration(), **get_target("generic").qdq.ort_quantize_kwargs())
    shutil.copy(out / "denoiser.json", tmp_path / "denoiser.json")
    record = {"path": str(quantized), "format": "onnx", "kind": "denoiser", "sidecar": str(tmp_path / "denoiser.json")}
    (ir,) = export_openvino([record], tmp_path / "ir")
    import openvino as ov

    model = ov.Core().read_model(ir["path"])
    fake_quantize = [op for op in model.get_ops() if op.get_type_name() == "FakeQuantize"]
    assert fake_quantize and any(op.get_type_name() == "Convert" for op in model.get_ops())  # int8 activations and weights
    # Range constants are scalars, and the output bounds reuse the input bounds' nodes.
    ranges = [[op.input(i).get_source_output().get_node() for i in range(1, 5)] for op in fake_quantize]
    assert all(len(r[0].get_output_shape(0)) == 0 for r in ranges)
    assert all(r[0].get_friendly_name() == r[2].get_friendly_name() and r[1].get_friendly_name() == r[3].get_friendly_name() for r in ranges)
    feeds = example_feeds(artifact, batch=2, seed=9)
    int8 = get_runner("openvino", 1).load(ir["path"]).run(feeds)
    reference = get_runner("onnxruntime", 1).load(quantized).run(feeds)
    assert int8.shape == reference.shape
    assert np.abs(int8 - reference).max() < 0.05 * (reference.max() - reference.min())


def test_openvino_export_needs_onnx_records(tmp_path):
    with pytest.raises(UserError, match="ONNX"):
        export_openvino([{"path": "x.mlpackage", "format": "coreml", "kind": "sampler"}], tmp_path)


# ----------------------------------------------------------------------------- export targets


def test_targets_fix_the_batch_and_describe_their_qdq_layout():
    assert get_target("generic").batch_size(None) is None and get_target("generic").batch_size(4) == 4
    assert get_target("npu-qnn").batch_size(None) == 1 and get_target("npu-qnn").batch_size(2) == 2
    qnn = get_target("npu-qnn").qdq
    assert qnn.activation_dtype == "uint8" and not qnn.activation_symmetric and qnn.activation_per_tensor
    # QNN layouts are written by onnxruntime's QNN tooling, not NNCF; generic is what compress quantize always wrote.
    assert qnn.engine == "onnxruntime-qnn" and qnn.nncf_preset is None and qnn.bias_dtype == "int32" and qnn.per_tensor_weight_ops == ("MatMul",)
    generic = get_target("generic").qdq
    assert generic.activation_dtype == "uint8" and not generic.activation_symmetric and generic.nncf_preset == "mixed"
    assert get_target("npu-openvino").qdq == dataclasses.replace(generic, nncf_target_device="NPU")
    a16 = get_target("npu-qnn-w8a16").qdq
    assert a16.nncf_preset is None and a16.contrib_qdq_ops
    from onnxruntime.quantization import QuantType

    kwargs = a16.ort_quantize_kwargs()
    assert kwargs["activation_type"] == QuantType.QUInt16 and kwargs["extra_options"]["UseQDQContribOps"]
    for target in TARGETS.values():
        assert json.dumps(target.describe())
    with pytest.raises(UserError, match="did you mean 'npu-qnn'"):
        get_target("npu-qn")


@pytest.mark.slow
def test_export_cli_writes_static_shapes_for_an_npu_target(tmp_path):
    out = tmp_path / "npu"
    result = run_cli("export", FACTORY, "--steps", "1", "--solver", "ddim", "--target", "npu-qnn",
                     "--format", "onnx", "--format", "openvino", "--out", out, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    model = onnx.load(str(out / "sampler.onnx"))
    dims = [[d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert dims == [[1, 1, 8, 8]]
    assert json.loads((out / "sampler.openvino.json").read_text())["batch"] == {"dynamic": False, "size": 1}
    import openvino as ov

    assert not ov.Core().read_model(str(out / "sampler.xml")).is_dynamic()
    bad = run_cli("export", FACTORY, "--target", "npu-qn", "--out", tmp_path / "bad", cwd=ROOT)
    assert_one_line_error(bad, "did you mean 'npu-qnn'")


# ----------------------------------------------------------------------------- compress bench


def test_bench_cli_json(two_step):
    _, _, out, _ = two_step
    result = run_cli("bench", out / "sampler.onnx", "--runtime", "onnxruntime", "--runtime", "openvino", "--runtime", "torch",
                     "--batch", "2", "--runs", "3", "--warmup", "1", "--threads", "1", "--json", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["artifact"]["format"] == "onnx" and report["artifact"]["inputs"] == {"noise": [2, 1, 8, 8]}
    assert [r["runtime"] for r in report["results"]] == ["onnxruntime", "openvino", "torch"]
    for r in report["results"]:
        assert r["batch"] == 2 and r["runs"] == 3 and r["warmup"] == 1 and r["threads"] == 1
        latency = r["latency_ms"]
        assert 0 < latency["min"] <= latency["median"] <= latency["p90"] <= latency["max"]
        assert r["ms_per_sample"] == pytest.approx(latency["median"] / 2)
        memory = r["memory"]
        assert memory["method"] and memory["peak_rss_mb"] >= memory["rss_before_mb"] > 0 and memory["peak_rss_delta_mb"] >= 0
        assert r["max_abs_diff_vs_first"] <= TOL
        assert r["runner"]["library"]
    table = run_cli("bench", out / "sampler.xml", "--runs", "2", "--warmup", "0", cwd=ROOT)
    assert table.returncode == 0, table.stderr
    assert "openvino" in table.stdout and "median ms" in table.stdout


def test_bench_cli_lists_runtimes():
    result = run_cli("bench", "--list-runtimes", "--json", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert {row["runtime"] for row in json.loads(result.stdout)} == set(RUNTIMES)


def test_bench_cli_errors_are_one_line(two_step, tmp_path):
    _, _, out, _ = two_step
    corrupt = tmp_path / "sampler.onnx"
    corrupt.write_bytes(b"this is not a protobuf" * 10)
    shutil.copy(out / "sampler.json", tmp_path / "sampler.json")
    assert_one_line_error(run_cli("bench", corrupt, "--runtime", "onnxruntime", cwd=ROOT), "onnxruntime cannot load")
    assert_one_line_error(run_cli("bench", out / "sampler.onnx", "--runtime", "onnxrutime", cwd=ROOT), "did you mean 'onnxruntime'")
    unavailable = next((row for row in availability() if not row["available"] and "onnx" in row["formats"]), None)
    if unavailable:  # whatever this machine lacks, the message says what to install
        result = run_cli("bench", out / "sampler.onnx", "--runtime", unavailable["runtime"], cwd=ROOT)
        assert_one_line_error(result, f"runtime {unavailable['runtime']!r} is not available here", unavailable["reason"].split(";")[-1].strip())
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    shutil.copy(out / "sampler.onnx", fixed / "sampler.onnx")
    (fixed / "sampler.json").write_text(json.dumps(json.loads((out / "sampler.json").read_text()) | {"batch": {"dynamic": False, "size": 1}}))
    assert_one_line_error(run_cli("bench", fixed / "sampler.onnx", "--batch", "4", cwd=ROOT), "fixed batch of 1")
    (tmp_path / "lonely.onnx").write_bytes((out / "sampler.onnx").read_bytes())
    assert_one_line_error(run_cli("bench", tmp_path / "lonely.onnx", cwd=ROOT), "has no sidecar")
    assert_one_line_error(run_cli("bench", tmp_path / "missing.onnx", cwd=ROOT), "does not exist")
    assert_one_line_error(run_cli("bench", out / "sampler.onnx", "--runs", "0", cwd=ROOT), "--runs must be at least 1")


def test_openvino_example_script_generates_a_grid(two_step, tmp_path):
    _, _, out, _ = two_step
    grid = tmp_path / "grid.png"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "generate_openvino.py"), str(out / "sampler.xml"),
                             "--count", "4", "--out", str(grid)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    written = grid if grid.exists() else grid.with_suffix(".npy")
    assert written.stat().st_size > 0
