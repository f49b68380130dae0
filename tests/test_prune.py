"""Structured pruning with real torch-pruning on tiny diffusers models built in place: every method on
UNet2DModel, UNet2DConditionModel and DiT, save/load without pickles, ONNX export and int8 quantization
of a pruned sampler, time-step gradient checkpointing, Diff-Pruning's timestep rule, the CLI, and the
fine-tune under `accelerate launch` with two CPU processes (slow)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from compress.denoiser import Denoiser, DiffusersUNet
from compress.errors import UserError
from compress.model_folder import load_model_folder
from compress.prune import PruneConfig, accumulate_taylor_gradients, diff_pruning_timesteps, prune, save_pruned
from compress.schedule import NoiseSchedule
from compress.solvers import SolverConfig, run_table
from compress.stats import count_macs
from compress.trajectory_mask import HardConcreteGates, gate_sites, make_network, run_trajectory, trajectory_loss_backward
from tests.conftest import assert_one_line_error
from tests.tiny_models import dit_denoiser, text_denoiser, tiny_unet


pytestmark = pytest.mark.usefixtures("one_thread")


def unet_denoiser() -> Denoiser:
    return Denoiser(DiffusersUNet(tiny_unet()).eval(), NoiseSchedule.from_betas(), "epsilon", (1, 8, 8), name="tiny-unet")




MAKERS = {"unet2d": unet_denoiser, "unet2d-condition": text_denoiser, "dit": dit_denoiser}
FAST = dict(taylor_samples=4, taylor_steps=20, data_steps=2, data_samples=8, mask_iterations=3, mask_steps=3, mask_batch=2)


def inputs_for(denoiser: Denoiser, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *denoiser.sample_shape), generator=g)
    t = torch.tensor([10.0, 700.0][:batch])
    if denoiser.conditioning == "class":
        cond = torch.tensor([0, denoiser.num_classes][:batch])  # a label and the null label
    elif denoiser.conditioning == "text":
        cond = torch.randn((batch, *denoiser.cond_shape), generator=g)
    else:
        cond = None
    return x, t, cond


def torch_macs(denoiser: Denoiser) -> int:
    """Multiply-accumulates of one call on one sample, by torch.utils.flop_counter (which counts 2 FLOPs per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t = torch.zeros((1, *denoiser.sample_shape)), torch.tensor([500.0])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        denoiser.module(x, t, denoiser.null_condition(1))
    return counter.get_total_flops() // 2


def heads(module) -> list[int]:
    from diffusers.models.attention_processor import Attention

    return [m.heads for m in module.modules() if isinstance(m, Attention)]


# ----------------------------------------------------------------------------- every method on every architecture


@pytest.mark.parametrize("method", ["magnitude", "taylor", "mask"])
@pytest.mark.parametrize("arch", list(MAKERS))
def test_prune_runs_saves_and_loads_exactly(arch, method, tmp_path):
    denoiser = MAKERS[arch]()
    before = count_macs(denoiser)
    original = [p.clone() for p in denoiser.module.parameters()]
    pruned = prune(denoiser, PruneConfig(method=method, ratio=0.5, **FAST))
    after = count_macs(pruned)
    assert after["macs"] < 0.8 * before["macs"] and after["parameters"] < before["parameters"], (before, after)
    assert all(torch.equal(a, b) for a, b in zip(original, denoiser.module.parameters()))  # the input model is untouched
    info = pruned.extra["pruning"]
    assert (info["method"], info["ratio"]) == (method, 0.5)
    # The recorded MACs against torch's own counter (convolutions and matmuls only), not against count_macs, which
    # wrote them: within 1.8-5.6% on these models, where the record of the wrong model would be 1.6-4x off.
    assert info["macs_before"] == pytest.approx(torch_macs(denoiser), rel=0.1)
    assert info["macs_after"] == pytest.approx(torch_macs(pruned), rel=0.1)
    assert max(heads(pruned.module)) < max(heads(denoiser.module))  # heads go whole (every tiny model has 2+ heads)
    x, t, cond = inputs_for(denoiser)
    with torch.no_grad():
        out = pruned.module(x, t, cond)
    assert out.shape == x.shape and torch.isfinite(out).all()

    save_pruned(pruned, tmp_path / "model")
    loaded = load_model_folder(tmp_path / "model")
    with torch.no_grad():
        assert torch.equal(loaded.module(x, t, cond), out)
    assert loaded.extra["pruning"]["macs_after"] == after["macs"]
    assert count_macs(loaded) == after
    assert not list(tmp_path.glob("model/*.p*")) and not list(tmp_path.glob("model/*.bin"))  # safetensors + JSON only


def test_output_conv_is_kept_and_samplers_are_fixed():
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    denoiser = unet_denoiser()
    pruned = prune(denoiser, PruneConfig(ratio=0.5))
    unet = pruned.module.unet
    assert unet.conv_out.weight.shape[0] == unet.conv_out.out_channels == denoiser.module.unet.conv_out.out_channels  # not a pruning root
    samplers = [m for m in unet.modules() if isinstance(m, (Downsample2D, Upsample2D))]
    assert samplers and all(m.channels == m.conv.in_channels and m.out_channels == m.conv.out_channels for m in samplers)
    assert any(m.conv.in_channels < 16 for m in samplers)


def test_a_frozen_model_prunes_and_stays_frozen():
    denoiser = unet_denoiser()
    for p in denoiser.module.parameters():
        p.requires_grad_(False)
    pruned = prune(denoiser, PruneConfig(ratio=0.5))
    assert pruned.extra["pruning"]["macs_after"] < pruned.extra["pruning"]["macs_before"]
    assert not any(p.requires_grad for p in denoiser.module.parameters())


def test_global_pruning_and_round_to():
    pruned = prune(unet_denoiser(), PruneConfig(ratio=0.5, global_pruning=True, round_to=4, prune_heads=False))
    widths = [m.out_channels for m in pruned.module.unet.modules() if isinstance(m, nn.Conv2d) and m is not pruned.module.unet.conv_out]
    assert all(w % 4 == 0 for w in widths), widths
    assert heads(pruned.module) == heads(unet_denoiser().module)


def test_config_round_trips_and_rejects_bad_sections():
    config = PruneConfig(method="mask", ratio=0.4, mask_steps=5)
    assert PruneConfig.from_dict(config.to_dict()) == config
    with pytest.raises(UserError, match="did you mean 'ratio'"):
        PruneConfig.from_dict({"ration": 0.3})
    for ratio in (0, 1, 1.5, -0.2):
        with pytest.raises(UserError, match="strictly between 0 and 1"):
            PruneConfig(ratio=ratio)
    with pytest.raises(UserError, match="did you mean 'taylor'"):
        PruneConfig(method="tailor")


# ----------------------------------------------------------------------------- export and quantization


def _ort(path, noise):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"noise": noise.numpy()})[0]


@pytest.fixture(scope="module")
def exported_pruned(tmp_path_factory):
    from export.onnx_export import export_onnx

    pruned = prune(unet_denoiser(), PruneConfig(ratio=0.5))
    solver = SolverConfig("dpmpp-2m", 2)
    folder = tmp_path_factory.mktemp("pruned-onnx")
    export_onnx(pruned, solver, folder)
    return pruned, solver, folder


NOISE = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(3))


def test_pruned_model_exports_a_sampler_that_onnxruntime_runs_like_torch(exported_pruned):
    from compress.sampling import sample

    pruned, solver, folder = exported_pruned
    expected = sample(pruned, solver, NOISE, device="cpu", show_progress=False).numpy()
    np.testing.assert_allclose(_ort(folder / "sampler.onnx", NOISE), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_pruned_sampler_quantizes_w8a8_and_runs_on_onnxruntime(exported_pruned, tmp_path):
    from calibration import CalibrationConfig, calibrate
    from compress.quantize import QuantizeConfig, quantize_

    pruned, solver, folder = exported_pruned
    calib = calibrate(pruned, CalibrationConfig(sampler="solver", samples=4, trajectory_steps=4), solver)
    config = QuantizeConfig(scheme="w8a8", targets=["sampler"], subset_size=4)
    (record,) = quantize_(folder, calib, config, out_dir=tmp_path / "int8")
    float_out, out = _ort(folder / "sampler.onnx", NOISE), _ort(record["path"], NOISE)
    assert out.shape == float_out.shape and np.isfinite(out).all()
    assert record["scheme"] == "w8a8"
    error = np.sqrt(np.mean((out - float_out) ** 2)) / np.sqrt(np.mean(float_out**2))
    assert error < 0.3, error


# ----------------------------------------------------------------------------- trajectory mask


@pytest.mark.parametrize("solver", ["ddim", "dpmpp-2m"])
def test_checkpointed_trajectory_gradients_equal_plain_backprop(solver):
    denoiser = unet_denoiser()
    module = denoiser.module
    for p in module.parameters():
        p.requires_grad_(False)
    gates = HardConcreteGates(gate_sites(module))
    with torch.no_grad():  # spread the gates so that every one matters differently
        for p in gates.log_alpha.values():
            p.copy_(torch.linspace(-1.0, 2.0, p.numel()))
    table = SolverConfig(solver, 4).table(denoiser.schedule, "epsilon")
    noise = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    network = make_network(denoiser, None, None)
    reference = torch.randn_like(noise) * 0.5
    grads, losses = [], []
    for checkpointing in (False, True):
        gates.resample(torch.Generator().manual_seed(1))
        gates.zero_grad(set_to_none=True)
        losses.append(trajectory_loss_backward(table, network, noise, reference, checkpointing))
        grads.append(torch.cat([p.grad.flatten() for p in gates.log_alpha.values()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5 * float(grads[0].abs().max()))
    # The stored values replay the solver exactly: the program's final sample is run_table's.
    with torch.no_grad():
        final, values = run_trajectory(table, network, noise)
        torch.testing.assert_close(final, run_table(table, network, noise), rtol=1e-5, atol=1e-6)
    assert len(values) == 1 + sum(2 if c else 1 for c in table.calls[:-1])
    gates.remove()


def test_gates_cover_heads_resnets_and_feed_forwards_and_start_open():
    sites = gate_sites(text_denoiser().module)
    kinds = {name.rsplit(".", 1)[-1] for name in sites}
    assert kinds == {"heads", "hidden"} and any("ff" in name for name in sites)
    gates = HardConcreteGates(sites)
    for name in sites:
        assert torch.all(gates.value(name) == 1.0)
    x, t, cond = inputs_for(text_denoiser())
    denoiser = text_denoiser()
    gates = HardConcreteGates(gate_sites(denoiser.module))
    with torch.no_grad():
        gated = denoiser.module(x, t, cond)
        gates.enabled = False
        plain = denoiser.module(x, t, cond)
    torch.testing.assert_close(gated, plain)  # open gates change nothing
    gates.remove()


# ----------------------------------------------------------------------------- Taylor / Diff-Pruning


def test_diff_pruning_rule_stops_below_threshold_of_the_max():
    losses = {0: 2.0, 10: 5.0, 20: 3.0, 30: 0.3, 40: 0.2, 50: 0.1}
    visited = []

    def loss_at(t):
        visited.append(t)
        return losses[t]

    used = diff_pruning_timesteps(loss_at, sorted(losses), threshold=0.1)
    assert used == [0, 10, 20, 30] == visited  # 0.3 < 0.1 * 5.0 is the first below; nothing after it runs
    assert diff_pruning_timesteps(lambda t: 1.0, range(0, 50, 10), 0.05) == [0, 10, 20, 30, 40]  # never below: all


def test_taylor_gradients_accumulate_from_t0_upward():
    denoiser = unet_denoiser()
    used = accumulate_taylor_gradients(denoiser, PruneConfig(method="taylor", **FAST))
    assert used[0] == 0 and used == sorted(used) and len(used) >= 2
    grads = [p.grad for p in denoiser.module.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


# ----------------------------------------------------------------------------- CLI


def untraceable_denoiser() -> Denoiser:
    """A denoiser whose forward runs without autograd: torch-pruning cannot build its dependency graph."""

    class NoGrad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 1, 3, padding=1)

        def forward(self, x, t, cond=None):
            with torch.no_grad():
                return self.b(torch.relu(self.a(x)))

    return Denoiser(NoGrad(), NoiseSchedule.from_betas(), sample_shape=(1, 8, 8), name="nograd")


@pytest.mark.parametrize("args, fragment", [
    (["zoo:digits", "--ratio", "0"], "strictly between 0 and 1"),
    (["zoo:digits", "--ratio", "1.5"], "strictly between 0 and 1"),
    (["missing-folder", "--ratio", "0.3"], "missing-folder does not exist"),
    (["python:tests.test_prune:untraceable_denoiser", "--ratio", "0.3"], "cannot trace"),
], ids=["ratio-0", "ratio-1.5", "missing-folder", "untraceable"])
def test_cli_errors_are_one_line(cli, tmp_path, args, fragment):
    result = cli("prune", *args, "--out", tmp_path / "out")
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_cli_missing_checkpoint(cli, tmp_path):
    pruned = prune(unet_denoiser(), PruneConfig(ratio=0.5))
    save_pruned(pruned, tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").unlink()
    result = cli("prune", tmp_path / "model", "--ratio", "0.3", "--out", tmp_path / "out")
    assert_one_line_error(result, "has no model.safetensors")


def test_cli_prunes_into_a_model_folder_that_sample_accepts(cli, tmp_path):
    out = tmp_path / "pruned"
    result = cli("prune", "zoo:digits", "--ratio", "0.25", "--out", out)
    assert result.returncode == 0, result.stderr
    fewer = int(re.search(r"\((\d+)% fewer\)", result.stdout).group(1))
    assert fewer >= 40, result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert {a["path"] for a in manifest["artifacts"]} == {"model.safetensors", "model.json"}
    loaded = load_model_folder(out)
    assert loaded.extra["pruning"]["method"] == "magnitude"
    result = cli("sample", out, "--solver", "dpmpp-2m", "--steps", "4", "--n", "2", "--out", tmp_path / "grid.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "grid.png").is_file()


# ----------------------------------------------------------------------------- fine-tune


def test_finetune_distills_towards_the_original_with_ema():
    from compress.training import training_target

    denoiser = unet_denoiser()
    g = torch.Generator().manual_seed(5)
    x0, eps = torch.randn((64, 1, 8, 8), generator=g).clamp(-1, 1), torch.randn((64, 1, 8, 8), generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    xt, _ = training_target(denoiser, x0, eps, t)
    with torch.no_grad():
        target = denoiser.module(xt, t.float(), None)
    config = dict(ratio=0.5, data_samples=16, data_steps=2, batch_size=16, lr=3e-3)
    raw = prune(denoiser, PruneConfig(**config))
    tuned = prune(denoiser, PruneConfig(**config, finetune_steps=60, ema=0.9, feature_weight=0.1))
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(raw.module(xt, t.float(), None), target).item()
        after = torch.nn.functional.mse_loss(tuned.module(xt, t.float(), None), target).item()
    assert after < 0.8 * before, (before, after)
    summary = tuned.extra["pruning"]["finetune"]
    assert summary["steps"] == 60 and summary["processes"] == 1 and summary["ema"] == 0.9


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distill_on_two_processes(tmp_path, *options: str) -> tuple[subprocess.CompletedProcess, list[tuple[str, str, str]]]:
    """`python -m compress.distill` on two CPU processes; returns the run and each rank's (rank, steps, checksum)."""
    teacher = unet_denoiser()
    save_pruned(teacher, tmp_path / "teacher")  # an unpruned UNet is a valid (trivially pruned) model folder
    save_pruned(prune(teacher, PruneConfig(ratio=0.5)), tmp_path / "student")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        # `accelerate launch --cpu` starts one process (several CPU processes need an MPI config); torchrun starts two
        # and Accelerator picks them up from its environment (MULTI_CPU, gloo), exactly as under a multi-GPU launch.
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "compress.distill", str(tmp_path / "student"), str(tmp_path / "teacher"),
         "--batch-size", "4", "--data-samples", "8", "--data-steps", "2", "--out", str(tmp_path / "tuned"), *options],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # Two processes share stdout and their lines can run into each other: match the 16 hex digits exactly.
    return result, re.findall(r"rank (\d) of 2: (\d+) steps, checksum ([0-9a-f]{16})", result.stdout)


@pytest.mark.slow
def test_finetune_under_accelerate_with_two_cpu_processes(tmp_path):
    result, ranks = _distill_on_two_processes(tmp_path, "--steps", "6")
    assert sorted(r for r, _, _ in ranks) == ["0", "1"], result.stdout
    assert len({c for _, _, c in ranks}) == 1  # gradients were averaged: both processes hold the same weights
    tuned = load_model_folder(tmp_path / "tuned")
    student = load_model_folder(tmp_path / "student")
    assert tuned.extra["finetune"]["processes"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(tuned.module.parameters(), student.module.parameters()))


@pytest.mark.slow
def test_two_processes_stop_together_on_a_time_budget(tmp_path):
    """Each process on its own clock could stop at another step and leave the other in an all-reduce for good."""
    result, ranks = _distill_on_two_processes(tmp_path, "--steps", "100000", "--max-seconds", "4", "--ema", "0")
    assert len(ranks) == 2, result.stdout
    assert len({(steps, checksum) for _, steps, checksum in ranks}) == 1, ranks
    assert 1 < int(ranks[0][1]) < 100000


def test_finetune_schedule_follows_a_time_budget_when_it_runs_out_first():
    """A benchmark gives many steps and a time budget: warm-up and cosine decay must then run on the clock."""
    from compress.distill import DistillConfig, lr_schedule

    schedule, steps = lr_schedule(DistillConfig(lr=1.0)), 100_000
    assert schedule.lr(0, steps, 0.0 / 60) < 0.2
    assert schedule.lr(199, steps, 30.0 / 60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.45 / 0.95)))
    assert schedule.lr(399, steps, 59.9 / 60) < 0.11
    assert schedule.lr(50_000, steps) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.45 / 0.95)))  # no time budget: steps
