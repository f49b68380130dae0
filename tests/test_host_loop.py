"""The host-loop runner: denoiser.onnx driven by numpy reproduces sampler.onnx on the same noise.

Both run the same coefficient table on the same runtime, so they must agree to float32 rounding;
1e-4 of the output's range is the bench's (bench/baked_vs_host.py) acceptance. zoo:digits is the
unconditional case, zoo:digits-cond the guided one (class labels, classifier-free guidance on a
doubled batch). 4 steps keep the exports short; the table's shape does not depend on the count.
"""
from __future__ import annotations

import numpy as np
import pytest

from compress.errors import UserError
from compress.loading import load_model
from compress.solvers import SolverConfig
from export.onnx_export import export_onnx
from runtimes.runners import get_runner

SOLVER = SolverConfig("dpmpp-2m", 4)
AGREEMENT = 1e-4  # of the baked sample's range

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    export_onnx(load_model("zoo:digits"), SOLVER, out)
    return out


@pytest.fixture(scope="module")
def digits_cond(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_cond")
    export_onnx(load_model("zoo:digits-cond"), SolverConfig("dpmpp-2m", 4, guidance_scale=2.0), out)
    return out


def noise(batch: int, shape=(1, 16, 16)) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)


def assert_host_loop_matches_sampler(folder, feeds: dict, runtime: str) -> None:
    baked = get_runner(runtime, threads=1).load(folder / "sampler.onnx").run(feeds)
    host = get_runner(f"{runtime}-host-loop", threads=1).load(folder / "sampler.onnx").run(feeds)
    assert host.shape == baked.shape and host.dtype == np.float32
    spread = float(baked.max() - baked.min())
    assert spread > 0.5  # a real sample, not a constant that would agree with anything
    assert np.abs(host - baked).max() <= AGREEMENT * spread, (runtime, np.abs(host - baked).max(), spread)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("batch", [1, 3])
def test_host_loop_matches_sampler_unconditional(digits, runtime, batch):
    assert_host_loop_matches_sampler(digits, {"noise": noise(batch)}, runtime)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("scale", [0.0, 2.0, 5.0])
def test_host_loop_matches_sampler_with_guidance(digits_cond, runtime, scale):
    feeds = {"noise": noise(4), "class_labels": np.array([0, 3, 7, 9], np.int64), "guidance_scale": np.array([scale], np.float32)}
    assert_host_loop_matches_sampler(digits_cond, feeds, runtime)


def test_one_denoiser_call_per_evaluation_on_the_doubled_batch(digits_cond):
    runner = get_runner("onnxruntime-host-loop", threads=1).load(digits_cond / "sampler.onnx")
    batches = []
    call = runner.network.run
    runner.network.run = lambda feeds: batches.append(len(feeds["sample"])) or call(feeds)
    runner.run({"noise": noise(2), "class_labels": np.array([1, 2], np.int64)})  # guidance_scale: the sidecar's default
    assert batches == [4] * runner.table.evaluations == [4] * 4


def test_host_loop_refuses_what_it_cannot_run(digits, digits_cond):
    with pytest.raises(UserError, match="is a denoiser"):
        get_runner("onnxruntime-host-loop").load(digits / "denoiser.onnx")
    runner = get_runner("onnxruntime-host-loop").load(digits_cond / "sampler.onnx")
    with pytest.raises(UserError, match="needs class_labels"):
        runner.run({"noise": noise(1)})
