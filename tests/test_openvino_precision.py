"""OpenVINO's inference precision: f32 unless bf16 is asked for by name, bf16 only where the CPU plugin
has it, the sidecar saying which precision an IR is validated at, and the bf16 row in validation.

On real libraries, with a tiny random x0-predicting sampler (its output stays in the data range,
so absolute differences mean something). Whether this machine's CPU has bf16 is read from
OpenVINO itself; the tests that need bf16 are skipped where it is absent.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from compress.solvers import SolverConfig
from export.onnx_export import export_onnx
from export.openvino_export import export_openvino
from runtimes.artifacts import example_feeds, open_artifact
from runtimes.openvino_runner import cpu_has_bf16
from runtimes.runners import get_runner
from runtimes.validate import Baseline, validate_artifact
from tests.tiny_models import tiny_denoiser

pytestmark = pytest.mark.usefixtures("one_thread")
BF16 = cpu_has_bf16()
needs_bf16 = pytest.mark.skipif(not BF16, reason="OpenVINO's CPU plugin reports no BF16 on this CPU")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """ONNX and IR of a 2-step DPM-Solver++ sampler, and each runtime's output on the same noise."""
    denoiser = dataclasses.replace(tiny_denoiser(), prediction_type="sample")
    out = tmp_path_factory.mktemp("precision")
    export_openvino(export_onnx(denoiser, SolverConfig("dpmpp-2m", 2), out), out)
    feeds = example_feeds(open_artifact(out / "sampler.onnx"), batch=4, seed=0)
    outputs = {"onnxruntime": get_runner("onnxruntime", 1).load(out / "sampler.onnx").run(feeds)}
    runners = {"openvino": get_runner("openvino", 1).load(out / "sampler.xml")}
    if BF16:
        runners["openvino-bf16"] = get_runner("openvino-bf16", 1).load(out / "sampler.xml")
    outputs |= {name: runner.run(feeds) for name, runner in runners.items()}
    return out, denoiser, feeds, outputs, runners


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def test_openvino_runs_at_f32_by_default_and_matches_onnxruntime(exported):
    _, _, _, outputs, runners = exported
    runner = runners["openvino"]
    assert runner.precision == "f32"
    assert runner.describe()["precision"] == "f32" and runner.describe()["precision_hint"] == "f32"
    assert max_diff(outputs["openvino"], outputs["onnxruntime"]) <= 1e-4


def test_bf16_runner_is_available_exactly_where_the_cpu_plugin_reports_bf16():
    import openvino as ov

    ok, reason = get_runner("openvino-bf16").available()
    assert ok == ("BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")), reason
    assert ("bf16" in reason) if ok else ("no BF16" in reason and "AVX512-BF16 or AMX" in reason)


def test_bf16_runner_says_what_a_cpu_without_bf16_lacks(monkeypatch):
    # The only way to see the refusal on a bf16 machine: the plugin's answer as a CPU without bf16 gives it.
    monkeypatch.setattr("runtimes.openvino_runner.cpu_capabilities", lambda core=None: ["FP32", "INT8", "BIN", "EXPORT_IMPORT"])
    ok, reason = get_runner("openvino-bf16").available()
    assert not ok
    assert "FP32, INT8" in reason and "no BF16" in reason and "AVX512-BF16 or AMX" in reason
    assert get_runner("openvino").available()[0]


@needs_bf16
def test_bf16_differs_from_f32_by_more_than_f32_does_from_onnxruntime(exported):
    _, _, _, outputs, runners = exported
    assert runners["openvino-bf16"].describe()["precision"] == "bf16"
    f32_error = max_diff(outputs["openvino"], outputs["onnxruntime"])
    bf16_error = max_diff(outputs["openvino-bf16"], outputs["openvino"])
    assert bf16_error > f32_error, (bf16_error, f32_error)


@needs_bf16
def test_openvino_default_without_a_hint_is_what_the_bf16_runner_computes(exported):
    """Why the hint matters: a plain compile_model on this CPU gives the bf16 numbers, not the f32 ones."""
    import openvino as ov

    out, _, feeds, outputs, _ = exported
    core = ov.Core()
    model = core.read_model(str(out / "sampler.xml"))
    model.reshape({name: list(value.shape) for name, value in feeds.items()})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": 1})
    assert compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "bf16"
    assert max_diff(compiled(feeds)[0], outputs["openvino-bf16"]) < max_diff(outputs["openvino-bf16"], outputs["openvino"])


def test_ir_sidecar_records_the_inference_precision(exported):
    import openvino as ov

    out = exported[0]
    for kind in ("sampler", "denoiser"):
        sidecar = json.loads((out / f"{kind}.openvino.json").read_text())
        assert sidecar["inference_precision"] == "f32"
        note = sidecar["inference_precision_note"]
        assert "INFERENCE_PRECISION_HINT" in note and "bf16" in note
        embedded = json.loads(ov.Core().read_model(str(out / f"{kind}.xml")).get_rt_info(["diffusion_compress", "sidecar"]).astype(str))
        assert embedded["inference_precision"] == "f32"
    assert "inference_precision" not in json.loads((out / "sampler.json").read_text())  # onnxruntime has no such default


@pytest.fixture(scope="module")
def baseline(exported):
    """The onnxruntime samples of 4 noises stand in for a reference solver's: validation compares against them."""
    out, denoiser, _, _, _ = exported
    noise = torch.randn(4, *denoiser.sample_shape, generator=torch.Generator().manual_seed(1))
    samples = get_runner("onnxruntime", 1).load(out / "sampler.onnx").run({"noise": noise.numpy()})
    return Baseline(torch.from_numpy(samples), noise, None, None, denoiser.data_range)


def validate(out, baseline, runtimes):
    rows = validate_artifact(out / "sampler.xml", baseline, "float32/sampler.xml", runtimes, runs=1)
    return {row["runtime"]: row for row in rows}


def test_validation_adds_the_bf16_row_where_openvino_is_asked_for(exported, baseline):
    out = exported[0]
    expected = ["openvino", "openvino-bf16"] if BF16 else ["openvino"]
    for runtimes in (None, ["onnxruntime", "openvino"]):
        rows = validate(out, baseline, runtimes)
        assert list(rows) == expected, runtimes
        assert all(row["status"] == "ok" for row in rows.values())
    f32 = rows["openvino"]
    assert f32["runner"]["precision"] == "f32" and f32["max_abs_error"] <= 1e-4
    if BF16:
        bf16 = rows["openvino-bf16"]
        assert bf16["runner"]["precision"] == "bf16" and bf16["latency_ms"] > 0
        assert bf16["max_abs_diff_vs_openvino"] > 0 and bf16["max_abs_error"] > f32["max_abs_error"]


def test_validation_runs_only_the_bf16_row_when_it_alone_is_named(exported, baseline):
    rows = validate(exported[0], baseline, ["openvino-bf16"])
    assert list(rows) == ["openvino-bf16"]
    # Named but absent, it says why instead of vanishing from the report.
    assert rows["openvino-bf16"]["status"] == ("ok" if BF16 else "skipped")
    assert "max_abs_diff_vs_openvino" not in rows["openvino-bf16"]  # no f32 row ran to compare with
