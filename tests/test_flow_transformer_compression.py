"""Compression of a flow-matching transformer pipeline (a tiny random SD3 folder): calibration with its dict
condition (joint text states + pooled projections), W8A8 of the exported sampler, pruning of attention
heads and feed-forward neurons with a fine-tune, and the pruned model folder round trip."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from calibration import CalibrationConfig, calibrate, load_calibration, save_calibration
from compress.export_chain import export_artifacts
from compress.loading import load_model, load_pipeline
from compress.model_folder import save_model_folder
from compress.prune import PruneConfig, builder_args, prune
from compress.quantize import QuantizeConfig, quantize_
from compress.sampling import make_noise
from compress.stats import count_macs
from compress.solvers import SolverConfig
from tests.tiny_pipelines import build_sd3_folder, build_sdxl_folder

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
PROMPTS = ["a cat", "a red dog", "two birds", "the sea"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    folder = build_sd3_folder(tmp_path_factory.mktemp("sd3") / "sd3", with_t5=False)
    pipeline = load_pipeline(f"diffusers:{folder}")
    pipeline.draw_from_prompts(PROMPTS)
    return pipeline


@pytest.mark.parametrize("kind", ["sd3", "sdxl"])
def test_calibration_records_dict_conditions_and_round_trips(kind, pipeline, tmp_path):
    if kind == "sdxl":
        pipeline = load_pipeline(f"diffusers:{build_sdxl_folder(tmp_path / 'sdxl')}")
        pipeline.draw_from_prompts(PROMPTS)
    calib = calibrate(pipeline.denoiser, CalibrationConfig(sampler="ndtc", samples=12, trajectory_steps=4, guidance_scale=3.0))
    parts = {"sd3": {"pooled_projections"}, "sdxl": {"text_embeds", "time_ids"}}[kind]
    assert set(calib.condition) == {"encoder_hidden_states"} | parts
    assert len(calib.sample) == 24 and all(len(v) == 24 for v in calib.condition.values())  # both guidance halves
    loaded = load_calibration(save_calibration(calib, tmp_path / "calib.safetensors"))
    for key, value in calib.condition.items():
        assert torch.equal(loaded.condition[key], value)
    feed = loaded.sampler_inputs("encoder_hidden_states", 3.0, limit=1, negative_name="negative_encoder_hidden_states")[0]
    negatives = {"negative_" + p for p in parts if p != "time_ids"}
    assert {"noise", "encoder_hidden_states", "negative_encoder_hidden_states", "guidance_scale"} | parts | negatives == set(feed)


def test_w8a8_of_the_sd3_sampler(pipeline, tmp_path):
    solver = SolverConfig("euler", 3, guidance_scale=3.0)
    export_artifacts(pipeline, solver, tmp_path / "float32", ["onnx"], output="latents")
    calib = calibrate(pipeline.denoiser, CalibrationConfig(sampler="ndtc", samples=16, trajectory_steps=4, guidance_scale=3.0), final_latents=solver)
    out = tmp_path / "w8a8"
    quantize_(tmp_path / "float32", calib, QuantizeConfig(granularity="per-step", targets=["sampler"]), out_dir=out)
    feed = calib.sampler_inputs("encoder_hidden_states", 3.0, limit=2, negative_name="negative_encoder_hidden_states")
    float_session = ort.InferenceSession(str(tmp_path / "float32" / "sampler.onnx"), providers=["CPUExecutionProvider"])
    int8_session = ort.InferenceSession(str(out / "sampler.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in float_session.get_inputs()}
    for item in feed:
        item = {k: v for k, v in item.items() if k in names}
        reference, quantized = float_session.run(None, item)[0], int8_session.run(None, item)[0]
        assert np.isfinite(quantized).all()
        # A random tiny transformer: int8 must still track its float output, not reproduce it.
        assert np.corrcoef(reference.ravel(), quantized.ravel())[0, 1] > 0.9
    ops = {n.op_type for n in __import__("onnx").load(str(out / "sampler.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_pruning_heads_and_feed_forward_neurons_of_an_sd3_transformer(pipeline, tmp_path):
    denoiser = pipeline.denoiser
    before = count_macs(denoiser)["macs"]
    pruned = prune(denoiser, PruneConfig(method="taylor", ratio=0.5, taylor_samples=4, data_samples=8, finetune_steps=3, batch_size=4))
    blocks = pruned.module.transformer.transformer_blocks
    original = denoiser.module.transformer.transformer_blocks
    for new, old in zip(blocks, original):
        assert new.attn.heads == old.attn.heads // 2
        assert new.attn.to_q.out_features == new.attn.add_q_proj.out_features == old.attn.to_q.out_features // 2
        assert new.ff.net[0].proj.out_features == old.ff.net[0].proj.out_features // 2
        assert new.attn.to_out[0].out_features == old.attn.to_out[0].out_features  # the residual stream stays whole
    assert count_macs(pruned)["macs"] < 0.8 * before
    cond = pipeline.encode_prompts(PROMPTS[:2])
    noise = make_noise(denoiser, 2, 0)
    with torch.no_grad():
        out = pruned.module(noise, torch.tensor([500.0, 500.0]), cond)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    folder = save_model_folder(pruned, tmp_path / "pruned", "pruned", builder_args(pruned.module))
    reloaded = load_model(str(folder))
    assert reloaded.schedule == denoiser.schedule and reloaded.prediction_type == "flow"
    with torch.no_grad():
        assert torch.allclose(reloaded.module(noise, torch.tensor([500.0, 500.0]), cond), out, atol=1e-6)


def test_trajectory_mask_on_a_joint_attention_transformer(pipeline):
    """The heads' gates close the image and the text stream's head together (pruning removes both), and
    the checkpointed gradients over a flow trajectory equal plain backpropagation's."""
    from compress.trajectory_mask import HardConcreteGates, gate_sites, make_network, trajectory_loss_backward

    denoiser = pipeline.denoiser
    module = denoiser.module
    sites = gate_sites(module)
    for block in module.transformer.transformer_blocks:
        layers = sites[f"transformer.transformer_blocks.{list(module.transformer.transformer_blocks).index(block)}.attn.heads"][0]
        assert layers[0] is block.attn.to_out[0]
        assert (block.attn.to_add_out is None) == (len(layers) == 1) and block.attn.to_add_out in layers + (None,)
    requires = {p: p.requires_grad for p in module.parameters()}
    for p in module.parameters():
        p.requires_grad_(False)
    gates = HardConcreteGates(sites)
    state = {k: v.clone() for k, v in module.state_dict().items()}  # the module-scoped pipeline is shared
    try:
        with torch.no_grad():
            for p in gates.log_alpha.values():
                p.copy_(torch.linspace(-1.0, 2.0, p.numel()))
        table = SolverConfig("euler", 3).table(denoiser.schedule, denoiser.prediction_type)
        network = make_network(denoiser, pipeline.encode_prompts(PROMPTS[:2]), None)
        noise = make_noise(denoiser, 2, 0)
        reference = torch.randn_like(noise) * 0.5
        grads = []
        for checkpointing in (False, True):
            gates.resample(torch.Generator().manual_seed(1))
            gates.zero_grad(set_to_none=True)
            trajectory_loss_backward(table, network, noise, reference, checkpointing)
            grads.append({name: p.grad.clone() for name, p in gates.log_alpha.items()})
        for name, grad in grads[0].items():
            torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6)
        assert max(g.abs().max() for g in grads[0].values()) > 0
        # A closed head gate is that head gone from both streams: zero its columns of to_out and to_add_out.
        block = module.transformer.transformer_blocks[0]
        width = block.attn.to_out[0].in_features // block.attn.heads
        gates.resample(None)
        with torch.no_grad():
            for p in gates.log_alpha.values():
                p.fill_(10.0)
            gates.log_alpha["transformer__transformer_blocks__0__attn__heads"][1] = -10.0
            t = torch.tensor([500.0, 500.0])
            gated = network(noise, t)
            gates.enabled = False
            for layer in (block.attn.to_out[0], block.attn.to_add_out):
                layer.weight[:, width:2 * width] = 0.0
            torch.testing.assert_close(gated, network(noise, t))
    finally:
        gates.remove()
        module.load_state_dict(state)
        for p, r in requires.items():
            p.requires_grad_(r)


def test_mask_pruning_of_an_sd3_transformer(pipeline):
    denoiser = pipeline.denoiser
    pruned = prune(denoiser, PruneConfig(method="mask", ratio=0.5, mask_iterations=3, mask_steps=3, mask_batch=2, data_samples=8))
    for new, old in zip(pruned.module.transformer.transformer_blocks, denoiser.module.transformer.transformer_blocks):
        assert new.attn.heads == old.attn.heads // 2
        if old.attn.to_add_out is not None:
            assert new.attn.to_add_out.in_features == new.attn.to_out[0].in_features
