"""Exports past the protobuf limit, at test size: the threshold is lowered so that a tiny SD pipeline takes the
path an SD-size one takes (every graph's weights in one weights.data, each distinct tensor once, no onnxslim),
and the per-tensor files the tracer writes for a model over 2 GiB are stood in for by onnx's own writer."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from compress.export_chain import export_artifacts
from compress.loading import load_pipeline
from compress.quantize import QuantizeConfig, quantize_
from compress.solvers import SolverConfig
from export.onnx_graph import share_identical_constants
from export.onnx_weights import WEIGHTS_FILE, WeightStore, external_files, onnx_bytes
from tests.tiny_pipelines import build_sd_folder

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
SOLVER = SolverConfig("dpmpp-2m", 2, guidance_scale=3.0)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("large")
    pipeline = load_pipeline(f"diffusers:{build_sd_folder(root / 'sd')}")
    export_artifacts(pipeline, SOLVER, root / "plain", ["onnx"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("export.onnx_export.EXTERNAL_DATA_BYTES", 0)
        export_artifacts(pipeline, SOLVER, root / "shared", ["onnx", "openvino"])
    return root


def _feeds(session) -> dict:
    rng = np.random.default_rng(0)
    return {i.name: np.array([3.0], np.float32) if i.name == "guidance_scale"
            else rng.standard_normal([1 if isinstance(d, str) else d for d in i.shape]).astype(np.float32) for i in session.get_inputs()}


def _locations(path) -> dict[str, tuple[int, int]]:
    model = onnx.load(str(path), load_external_data=False)
    return {t.name: (ExternalDataInfo(t).offset, ExternalDataInfo(t).length) for t in model.graph.initializer if uses_external_data(t)}


def test_every_graph_reads_one_weights_file_where_each_tensor_is_stored_once(exports):
    shared = exports / "shared"
    graphs = sorted(shared.glob("*.onnx"))
    assert {f.name for g in graphs for f in external_files(g)} == {WEIGHTS_FILE}
    sampler, denoiser, decoder = (set(_locations(shared / f"{k}.onnx").values()) for k in ("sampler", "denoiser", "vae_decoder"))
    assert denoiser <= sampler and decoder <= sampler  # the UNet and the decoder inside the sampler are the same bytes
    stored = sum(length for _, length in set().union(*(_locations(g).values() for g in graphs)))
    assert (shared / WEIGHTS_FILE).stat().st_size < stored + 4096 * len(set().union(*(_locations(g).values() for g in graphs)))
    plain = sum(onnx_bytes(g) for g in (exports / "plain").glob("*.onnx"))
    assert stored < 0.75 * plain
    assert onnx_bytes(shared / "sampler.onnx") > (shared / "sampler.onnx").stat().st_size  # sizes count the weights read


@pytest.mark.parametrize("kind", ["sampler", "denoiser", "text_encoder", "vae_decoder"])
def test_shared_weight_graphs_compute_what_the_one_file_graphs_do(exports, kind):
    plain = ort.InferenceSession(str(exports / "plain" / f"{kind}.onnx"), providers=["CPUExecutionProvider"])
    shared = ort.InferenceSession(str(exports / "shared" / f"{kind}.onnx"), providers=["CPUExecutionProvider"])
    feeds = _feeds(plain)
    if kind == "text_encoder":
        feeds = {"input_ids": np.arange(77, dtype=np.int64)[None] % 300}
    if kind == "denoiser":
        feeds["timestep"] = np.array([500.0], np.float32)
    np.testing.assert_allclose(shared.run(None, feeds)[0], plain.run(None, feeds)[0], rtol=1e-5, atol=1e-5)


def test_openvino_reads_the_shared_weights(exports):
    import openvino as ov

    compiled = ov.Core().compile_model(str(exports / "shared" / "sampler.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    session = ort.InferenceSession(str(exports / "shared" / "sampler.onnx"), providers=["CPUExecutionProvider"])
    feeds = _feeds(session)
    np.testing.assert_allclose(compiled(feeds)[0], session.run(None, feeds)[0], rtol=1e-4, atol=1e-4)


def test_quantizing_a_shared_weight_export_keeps_each_graph_whole(exports, tmp_path):
    out = tmp_path / "int8"
    quantize_(exports / "shared", None, QuantizeConfig(scheme="int8-weights"), out_dir=out)
    # Float components copied into the new folder bring their own tensors, not the whole source file.
    assert (out / WEIGHTS_FILE).stat().st_size < 0.5 * (exports / "shared" / WEIGHTS_FILE).stat().st_size
    for kind in ("text_encoder", "vae_decoder"):
        source = ort.InferenceSession(str(exports / "shared" / f"{kind}.onnx"), providers=["CPUExecutionProvider"])
        copied = ort.InferenceSession(str(out / f"{kind}.onnx"), providers=["CPUExecutionProvider"])
        feeds = {"input_ids": np.zeros((1, 77), np.int64)} if kind == "text_encoder" else _feeds(source)
        np.testing.assert_array_equal(copied.run(None, feeds)[0], source.run(None, feeds)[0])
    sampler = ort.InferenceSession(str(out / "sampler.onnx"), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(exports / "plain" / "sampler.onnx"), providers=["CPUExecutionProvider"])
    feeds = _feeds(reference)
    a, b = sampler.run(None, feeds)[0], reference.run(None, feeds)[0]
    assert 10 * np.log10(1.0 / np.mean((a - b) ** 2)) > 30  # int8 weights of a random tiny UNet: close, not equal


def test_per_tensor_files_are_read_one_at_a_time_and_deduplicated(exports, tmp_path):
    """What the tracer leaves for a model over 2 GiB: one file per tensor, the graph loaded without them."""
    model = onnx.load(str(exports / "plain" / "denoiser.onnx"))
    duplicate = onnx.TensorProto()
    duplicate.CopyFrom(model.graph.initializer[0])
    duplicate.name = "copy_of_" + duplicate.name
    model.graph.initializer.append(duplicate)
    node = next(n for n in model.graph.node if model.graph.initializer[0].name in n.input)
    node.input[list(node.input).index(model.graph.initializer[0].name)] = duplicate.name
    traced = tmp_path / "trace"
    traced.mkdir()
    onnx.save_model(model, str(traced / "denoiser.onnx"), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=1024)
    loaded = onnx.load(str(traced / "denoiser.onnx"), load_external_data=False)
    assert len(list(traced.iterdir())) > 10
    assert share_identical_constants(loaded, traced) >= 1
    with WeightStore(tmp_path) as store:
        store.move_weights(loaded, traced)
    onnx.save_model(loaded, str(tmp_path / "denoiser.onnx"))
    assert external_files(tmp_path / "denoiser.onnx") == [tmp_path / WEIGHTS_FILE]
    original = ort.InferenceSession(str(exports / "plain" / "denoiser.onnx"), providers=["CPUExecutionProvider"])
    rewritten = ort.InferenceSession(str(tmp_path / "denoiser.onnx"), providers=["CPUExecutionProvider"])
    feeds = {**_feeds(original), "timestep": np.array([500.0], np.float32)}
    np.testing.assert_array_equal(rewritten.run(None, feeds)[0], original.run(None, feeds)[0])


def test_w8a8_of_a_shared_weight_export(exports, tmp_path):
    """NNCF reads the external weights where they lie; the int8 sampler stays close to the float one."""
    from calibration import CalibrationConfig, calibrate

    pipeline = load_pipeline(f"diffusers:{exports / 'sd'}")
    pipeline.draw_from_prompts(["a cat", "a red dog", "two birds", "the sea"])
    calib = calibrate(pipeline.denoiser, CalibrationConfig(sampler="ndtc", samples=8, trajectory_steps=4, guidance_scale=3.0), final_latents=SOLVER)
    quantize_(exports / "shared", calib, QuantizeConfig(denoiser="w8a8", decoder="int8-weights", text_encoder="int8-weights"), out_dir=tmp_path)
    reference = ort.InferenceSession(str(exports / "plain" / "sampler.onnx"), providers=["CPUExecutionProvider"])
    quantized = ort.InferenceSession(str(tmp_path / "sampler.onnx"), providers=["CPUExecutionProvider"])
    feeds = _feeds(reference)
    assert 10 * np.log10(1.0 / np.mean((quantized.run(None, feeds)[0] - reference.run(None, feeds)[0]) ** 2)) > 30
    ops = {n.op_type for n in onnx.load(str(tmp_path / "sampler.onnx")).graph.node}
    assert "QuantizeLinear" in ops  # activations too, not weights alone
    assert not external_files(tmp_path / "sampler.onnx")  # an int8 graph below the limit is one file again
