"""Core ML mobile layouts (Apple's ml-stable-diffusion): the denoiser in chained chunks, split-einsum attention, 6-bit weights.

Core ML predicts only on macOS; here every chunk is read back as a spec and the chain is checked from
the specs alone: each input of chunk k is a model input or an output of an earlier chunk, of equal
shape and dtype, and the last chunk makes the model's output. The fast tests convert a tiny
UNet2DConditionModel (a few seconds per conversion) with a chunk size small enough to force several
chunks; the SD-1.5-size one (random weights, built in place) is marked slow.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.denoiser import Denoiser, DiffusersUNet
from compress.errors import UserError
from compress.recipe import parse_recipe
from compress.schedule import NoiseSchedule
from export.coreml_attention import SplitEinsumAttnProcessor, attention_layout
from export.coreml_export import export_denoiser_coreml, inspect_package
from export.sampler_graph import DenoiserGraph
from runtimes.runners import get_runner
from tests.conftest import assert_one_line_error, run_cli
from tests.tiny_models import text_denoiser, tiny_cond_unet

ROOT = Path(__file__).resolve().parents[1]
CORE_ML_PREDICTION = get_runner("coreml-cpu").available()
CHUNK_BYTES = 50_000  # the tiny UNet holds about 130 kB of float16 weights: three chunks or more
# A weight file stores each tensor 64-byte aligned behind a small header: a little more than the weights' own bytes.
ALIGNMENT_SLACK = 1.1, 8192
SD15_EXPORT_BYTES = 12 * 2**30  # peak RSS of the SD-size conversion and 6-bit k-means: 10.2 GiB in bench/results/coreml_mobile.md

pytestmark = pytest.mark.usefixtures("one_thread")


def spec_chain_errors(folder: Path, chunks: list[dict], model_inputs: list[dict], model_outputs: list[dict]) -> list[str]:
    """The chain checked from the packages' specs alone, apart from export.coreml_chunks' own check."""
    errors = []
    available = {s["name"]: ("input", s["shape"], s["dtype"]) for s in model_inputs}
    for k, chunk in enumerate(chunks):
        structure = inspect_package(folder / chunk["file"])  # the spec loads
        assert structure["model_type"] == "mlProgram"
        for f in structure["inputs"]:
            made = available.get(f["name"])
            if made is None:
                errors.append(f"chunk {k} input {f['name']} is made by no earlier chunk")
            elif (made[1], made[2]) != (f["shape"], f["dtype"]):
                errors.append(f"chunk {k} input {f['name']} {f['shape']} {f['dtype']} != {made}")
        expected = [(s["name"], s["shape"], s["dtype"]) for s in chunk["inputs"]]
        if [(f["name"], f["shape"], f["dtype"]) for f in structure["inputs"]] != expected:
            errors.append(f"chunk {k}'s inputs differ from the sidecar's chunks list")
        for f in structure["outputs"]:
            available[f["name"]] = (k, f["shape"], f["dtype"])
    for s in model_outputs:
        made = available.get(s["name"])
        if made is None or made[0] != len(chunks) - 1 or (made[1], made[2]) != (s["shape"], s["dtype"]):
            errors.append(f"model output {s['name']} not made by the last chunk as {s['shape']} {s['dtype']}: {made}")
    return errors


def attention_of(module: torch.nn.Module) -> tuple[int, int]:
    """(attention modules, heads over all of them) in a diffusers network."""
    from diffusers.models.attention_processor import Attention

    modules = [m for m in module.modules() if isinstance(m, Attention)]
    return len(modules), sum(m.heads for m in modules)


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    """The tiny text-conditioned UNet, 6-bit palettized, split einsum, in chunks of at most CHUNK_BYTES."""
    out = tmp_path_factory.mktemp("coreml_chunked")
    denoiser = text_denoiser()
    records = export_denoiser_coreml(denoiser, out, weights="palettize6", attention="split-einsum", chunk_bytes=CHUNK_BYTES)
    return denoiser, out, records


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The same UNet in one package with diffusers' own attention: the layout split einsum changes."""
    out = tmp_path_factory.mktemp("coreml_whole")
    denoiser = text_denoiser()
    return denoiser, out, export_denoiser_coreml(denoiser, out)


# ----------------------------------------------------------------------------- split einsum in torch


def test_split_einsum_attention_equals_the_default_attention():
    unet = tiny_cond_unet(cross_dim=8).eval()
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    sample, timestep, context = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        expected = unet(sample, timestep, context).sample
        expected_masked = unet(sample, timestep, context, encoder_attention_mask=mask).sample
        with attention_layout(unet, "split-einsum") as replaced:
            assert replaced == len(before) and all(isinstance(p, SplitEinsumAttnProcessor) for p in unet.attn_processors.values())
            actual = unet(sample, timestep, context).sample
            actual_masked = unet(sample, timestep, context, encoder_attention_mask=mask).sample
    assert (actual - expected).abs().max() <= 1e-5
    assert (actual_masked - expected_masked).abs().max() <= 1e-5
    assert (expected_masked - expected).abs().max() > 1e-3  # the mask does change the output
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before  # restored after the export


def test_split_einsum_refuses_a_custom_attention_processor():
    unet = tiny_cond_unet(cross_dim=8).eval()

    class MyProcessor(SplitEinsumAttnProcessor):
        pass

    unet.set_attn_processor(MyProcessor())
    with pytest.raises(UserError, match="MyProcessor"):
        with attention_layout(unet, "split-einsum"):
            pass
    assert all(type(p) is MyProcessor for p in unet.attn_processors.values())


# ----------------------------------------------------------------------------- chunks (structure, any OS)


def test_chunked_denoiser_files_and_records(chunked):
    denoiser, out, records = chunked
    count = len(records)
    assert count >= 3
    names = sorted(p.name for p in out.iterdir())
    expected = ["denoiser.coreml.json"] + [f"denoiser_chunk{k}.{suffix}" for k in range(1, count + 1) for suffix in ("coreml.json", "mlpackage")]
    assert names == sorted(expected)  # no whole denoiser.mlpackage, nothing half-written or staged left behind
    for k, record in enumerate(records):
        assert record["kind"] == f"denoiser_chunk{k + 1}" and record["chunk"] == {"index": k, "count": count}
        assert record["path"] == str(out / f"denoiser_chunk{k + 1}.mlpackage") and record["format"] == "coreml"
        assert record["weights"] == "palettize6" and record["attention"] == "split-einsum" and record["chunk_bytes"] == CHUNK_BYTES
        sidecar = json.loads(Path(record["sidecar"]).read_text())
        assert sidecar["kind"] == "denoiser_chunk" and sidecar["chunk"] == {"index": k, "count": count, "chain": "denoiser.coreml.json"}
        structure = inspect_package(record["path"])
        assert [(f["name"], f["shape"], f["dtype"]) for f in structure["inputs"]] == [(s["name"], s["shape"], s["dtype"]) for s in sidecar["inputs"]]
        assert json.loads(structure["metadata"]["diffusion_compress.chunk"]) == {"index": k, "chain": "denoiser.coreml.json"}


def test_chunks_chain_and_fit_the_chunk_size(chunked):
    denoiser, out, records = chunked
    sidecar = json.loads((out / "denoiser.coreml.json").read_text())
    chunks = sidecar["chunks"]
    assert sidecar["file"] is None and sidecar["chunking"]["max_chunk_bytes"] == CHUNK_BYTES and sidecar["chunking"]["count"] == len(chunks)
    assert [c["file"] for c in chunks] == [Path(r["path"]).name for r in records]
    assert [s["name"] for s in sidecar["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert spec_chain_errors(out, chunks, sidecar["inputs"], sidecar["outputs"]) == []
    assert chunks[0]["inputs"] == [{**{k: s[k] for k in ("name", "shape", "dtype")}, "from": "input"} for s in sidecar["inputs"]]
    for k, chunk in enumerate(chunks):
        assert chunk["index"] == k
        for spec in chunk["inputs"]:  # 'from' names the model or the chunk that makes the tensor
            assert spec["from"] == "input" or (isinstance(spec["from"], int) and spec["from"] < k
                                                and spec["name"] in [o["name"] for o in chunks[spec["from"]]["outputs"]])
            assert spec["dtype"] in ("float32", "int32")
        assert chunk["planned_weight_bytes"] <= CHUNK_BYTES
        factor, slack = ALIGNMENT_SLACK
        assert chunk["weight_bytes"] == inspect_package(out / chunk["file"])["weight_file_bytes"] <= factor * CHUNK_BYTES + slack
    # The text condition is read by every chunk that has cross attention, straight from the model's input.
    assert all(any(s["name"] == "encoder_hidden_states" and s["from"] == "input" for s in c["inputs"]) for c in chunks[1:])
    assert chunks[-1]["outputs"] == [{k: s[k] for k in ("name", "shape", "dtype")} for s in sidecar["outputs"]]


def test_chunks_are_palettized_and_split_einsum(chunked, whole):
    denoiser, out, records = chunked
    layers, heads = attention_of(denoiser.module)
    assert heads > layers  # several heads per attention
    split = {}
    for record in records:
        for op, n in inspect_package(record["path"])["ops"].items():
            split[op] = split.get(op, 0) + n
    original = inspect_package(whole[2][0]["path"])["ops"]
    assert split.get("constexpr_lut_to_dense", 0) > 0 and original.get("constexpr_lut_to_dense", 0) == 0
    # Per head: one einsum for the scores and one for the values; diffusers' layout batches all heads in one matmul each.
    assert split.get("einsum", 0) == 2 * heads and split.get("matmul", 0) == 0
    assert original.get("einsum", 0) == 0 and original.get("matmul", 0) == 2 * layers
    whole_weights = inspect_package(whole[2][0]["path"])["weight_file_bytes"]
    assert sum(r["weight_file_bytes"] for r in records) < whole_weights  # 6-bit, despite the weights the chunks share


def test_a_weight_larger_than_the_chunk_size_is_refused(tmp_path):
    with pytest.raises(UserError, match="choose a larger chunk size"):
        export_denoiser_coreml(text_denoiser(), tmp_path, chunk_bytes=1000)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- options


def test_bad_options_are_refused_before_any_work(tmp_path):
    denoiser = text_denoiser()
    with pytest.raises(UserError, match="attention option 'flash'"):
        export_denoiser_coreml(denoiser, tmp_path, attention="flash")
    for size in (0, -5, 1.5, "1GB", True):
        with pytest.raises(UserError, match="chunk size must be a positive number of bytes"):
            export_denoiser_coreml(denoiser, tmp_path, chunk_bytes=size)
    assert list(tmp_path.iterdir()) == []


def test_bad_cli_values_exit_with_one_line(tmp_path):
    model = "python:tests.tiny_models:text_denoiser"
    out = tmp_path / "out"
    assert_one_line_error(run_cli("export", model, "--format", "coreml", "--coreml-attention", "flash", "--out", out, cwd=ROOT),
                          "attention option 'flash'", "split-einsum")
    assert_one_line_error(run_cli("export", model, "--format", "coreml", "--coreml-chunk-mb", "0", "--out", out, cwd=ROOT),
                          "--coreml-chunk-mb", "positive")
    assert_one_line_error(run_cli("export", model, "--format", "coreml", "--coreml-weights", "int4", "--out", out, cwd=ROOT),
                          "weights option 'int4'")
    assert_one_line_error(run_cli("export", model, "--coreml-chunk-mb", "1000", "--out", out, cwd=ROOT), "--format coreml")
    assert not out.exists()


def test_recipe_coreml_options():
    recipe = parse_recipe({"model": "zoo:digits", "export": {"formats": ["coreml"], "coreml": {"weights": "palettize6", "attention": "split-einsum",
                                                                                             "chunk_mb": 1000}}})
    assert recipe.export.coreml.export_options() == {"weights": "palettize6", "attention": "split-einsum", "chunk_bytes": 1_000_000_000}
    assert parse_recipe({"model": "zoo:digits", "export": {}}).export.coreml.export_options() == {"weights": "float", "attention": "original", "chunk_bytes": None}
    with pytest.raises(UserError, match="export.coreml.attention"):
        parse_recipe({"model": "zoo:digits", "export": {"coreml": {"attention": "flash"}}})
    with pytest.raises(UserError, match="chunk_mb"):
        parse_recipe({"model": "zoo:digits", "export": {"coreml": {"chunk_mb": -1}}})
    with pytest.raises(UserError, match="chunk_mb"):
        parse_recipe({"model": "zoo:digits", "export": {"coreml": {"chunk_md": 1000}}})


# ----------------------------------------------------------------------------- prediction (macOS only)


@pytest.mark.skipif(not CORE_ML_PREDICTION[0], reason=f"chained Core ML prediction needs macOS: {CORE_ML_PREDICTION[1]}")
def test_chained_chunks_predict_as_the_torch_denoiser(chunked):
    import coremltools as ct

    denoiser, out, records = chunked
    sidecar = json.loads((out / "denoiser.coreml.json").read_text())
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((1, 1, 8, 8)).astype(np.float32), "timestep": np.array([500.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((1, 4, 8)).astype(np.float32)}
    values = dict(feeds)
    for chunk in sidecar["chunks"]:
        model = ct.models.MLModel(str(out / chunk["file"]), compute_units=ct.ComputeUnit.CPU_ONLY)
        values.update(model.predict({s["name"]: values[s["name"]] for s in chunk["inputs"]}))
    graph = DenoiserGraph(denoiser)
    with torch.no_grad():
        expected = graph(*(torch.from_numpy(feeds[name]) for name in graph.input_names)).numpy()
    # float16 compute and 6-bit weights: a few percent of the output's scale.
    assert np.abs(values["prediction"] - expected).max() <= 5e-2 * max(1.0, float(np.abs(expected).max()))


# ----------------------------------------------------------------------------- SD 1.5 size (slow)


def sd15_denoiser() -> Denoiser:
    """SD 1.5's UNet architecture (≈860 M parameters), random weights, at 32x32 latents (256x256 images)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=32, cross_attention_dim=768, attention_head_dim=8).eval()
    return Denoiser(DiffusersUNet(unet).eval(), NoiseSchedule.from_betas(), "epsilon", (4, 32, 32), conditioning="text",
                    cond_shape=(77, 768), name="sd15-random")


@pytest.mark.slow
def test_sd15_size_unet_in_6bit_split_einsum_chunks(tmp_path):
    from compress.memory import require_memory

    try:
        require_memory(SD15_EXPORT_BYTES, "converting an SD-1.5-size UNet to Core ML")
    except UserError as e:
        pytest.skip(str(e))
    denoiser = sd15_denoiser()
    chunk_bytes = 400_000_000  # the 6-bit UNet (about 650 MB) in two chunks; float16 needs two under Apple's 1 GB
    records = export_denoiser_coreml(denoiser, tmp_path, weights="palettize6", attention="split-einsum", chunk_bytes=chunk_bytes)
    sidecar = json.loads((tmp_path / "denoiser.coreml.json").read_text())
    assert len(records) == len(sidecar["chunks"]) >= 2
    assert spec_chain_errors(tmp_path, sidecar["chunks"], sidecar["inputs"], sidecar["outputs"]) == []
    factor, slack = ALIGNMENT_SLACK
    assert all(c["weight_bytes"] <= factor * chunk_bytes + slack for c in sidecar["chunks"])
    params = sum(p.numel() for p in denoiser.module.parameters())
    assert sum(c["weight_bytes"] for c in sidecar["chunks"]) < 0.45 * 2 * params  # 6-bit: well under the float16 size
    ops = {}
    for r in records:
        for op, n in r["op_types"].items():
            ops[op] = ops.get(op, 0) + n
    assert ops.get("einsum", 0) == 2 * attention_of(denoiser.module)[1] and ops.get("matmul", 0) == 0


# ----------------------------------------------------------------------------- a text-to-image pipeline (slow: the sampler converts too)


@pytest.mark.slow
def test_pipeline_export_with_chunked_split_einsum_denoiser(tmp_path):
    from compress.export_chain import export_artifacts, pipeline_guidance, resolve_solver
    from compress.loading import load_pipeline
    from export.sidecar import PIPELINE_FILE
    from tests.tiny_pipelines import build_sd_folder

    pipeline = load_pipeline(f"diffusers:{build_sd_folder(tmp_path / 'sd', vae='kl')}")
    solver = resolve_solver(pipeline.denoiser, "model", 1, guidance=pipeline_guidance(pipeline, None))
    float16_bytes = 2 * sum(p.numel() for p in pipeline.denoiser.module.parameters())
    out = tmp_path / "out"
    records = export_artifacts(pipeline, solver, out, ["coreml"], coreml={"attention": "split-einsum", "chunk_bytes": float16_bytes // 2})
    chunk_records = [r for r in records if r["kind"].startswith("denoiser_chunk")]
    assert len(chunk_records) >= 2 and not (out / "denoiser.mlpackage").exists()
    components = json.loads((out / PIPELINE_FILE).read_text())["components"]
    assert [components[r["kind"]]["coreml"] for r in chunk_records] == [Path(r["path"]).name for r in chunk_records]
    sidecar = json.loads((out / "denoiser.coreml.json").read_text())
    assert spec_chain_errors(out, sidecar["chunks"], sidecar["inputs"], sidecar["outputs"]) == []
    # split einsum everywhere diffusers' Attention is: the sampler's UNet steps and the VAE decoder's mid-block
    assert inspect_package(out / "sampler.mlpackage")["ops"].get("einsum", 0) > 0
    assert inspect_package(out / "vae_decoder.mlpackage")["ops"].get("einsum", 0) > 0
