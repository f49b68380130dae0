"""Spectral slim students: Haar wavelets, wavelet-gated samplers, the spectrum-aware loss, student
building from teacher configs, distillation, model folders, ONNX export and quantization, CLI errors.

Teachers are the tiny random diffusers models of tests/tiny_models.py (8x8) so that the default
tests stay fast; the zoo teacher is only used where the figures are about it (MACs).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.denoiser import ClassTokenUNet, Denoiser, DiffusersTransformer, DiffusersUNet
from compress.errors import UserError
from compress.schedule import FlowSchedule, NoiseSchedule
from compress.slim import SlimConfig, build_student, network_cost, save_student, slim, slim_unet_config
from compress.spectral_loss import (
    SpectralDistillationLoss,
    frequency_loss,
    high_frequency_share,
    noise_level_weights,
    spectral_weights,
)
from compress.wavelets import WaveletGatedDownsample, WaveletGatedUpsample, haar_dwt, haar_idwt
from tests.conftest import assert_one_line_error, run_cli
from tests.tiny_models import tiny_cond_unet, tiny_dit, tiny_unet


pytestmark = pytest.mark.usefixtures("one_thread")


def unet_teacher() -> Denoiser:
    return Denoiser(DiffusersUNet(tiny_unet()).eval(), NoiseSchedule.from_betas(), sample_shape=(1, 8, 8), name="tiny")


def dit_teacher() -> Denoiser:
    """A python: factory target for the CLI test: a DiT cannot be slimmed (imports here stay light for it)."""
    return Denoiser(DiffusersTransformer(tiny_dit(channels=1)).eval(), NoiseSchedule.from_betas(), sample_shape=(1, 8, 8),
                    conditioning="class", num_classes=10, name="dit")


FAST = dict(steps=30, batch_size=16, teacher_samples=32, teacher_sample_steps=5, log_every=5, warmup=5, ema=0.0)


@pytest.fixture(scope="module")
def trained():
    """A tiny teacher and a student distilled from it for a few steps (data drawn from the teacher)."""
    teacher = unet_teacher()
    # The teacher's own (epsilon) parametrization: a random teacher's epsilon converted to v is
    # enormous at high noise and would drown every other loss term.
    return teacher, slim(teacher, SlimConfig(width=0.5, prediction_type="teacher", **FAST))


# ----------------------------------------------------------------------------- wavelets

def test_haar_dwt_idwt_reconstruct_exactly_and_keep_energy():
    x = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bands = haar_dwt(x)
    assert all(b.shape == (2, 3, 4, 3) for b in bands)
    assert torch.allclose(haar_idwt(*bands), x, atol=1e-12)
    # Orthonormal: the bands hold exactly the image's energy.
    assert math.isclose(sum(float(b.pow(2).sum()) for b in bands), float(x.pow(2).sum()), rel_tol=1e-12)


def test_haar_bands_separate_structure():
    constant = torch.full((1, 1, 4, 4), 3.0)
    ll, lh, hl, hh = haar_dwt(constant)
    assert torch.allclose(ll, torch.full_like(ll, 6.0)) and lh.abs().max() == hl.abs().max() == hh.abs().max() == 0
    stripes = torch.tensor([1.0, -1.0]).repeat(4, 2).view(1, 1, 4, 4)  # alternating along the width
    ll, lh, hl, hh = haar_dwt(stripes)
    assert lh.abs().min() == 2.0 and ll.abs().max() == hl.abs().max() == hh.abs().max() == 0
    with pytest.raises(ValueError, match="even"):
        haar_dwt(torch.zeros(1, 1, 5, 4))


def test_gated_samplers_shapes_and_gates():
    x = torch.randn(2, 8, 8, 8)
    down = WaveletGatedDownsample(8, 12)
    up = WaveletGatedUpsample(8, 12)
    assert down(x).shape == (2, 12, 4, 4)
    assert up(x, None).shape == (2, 12, 16, 16)
    gates = down.gate(x)
    assert len(gates) == 4 and all(g.shape == (2, 8, 1, 1) for g in gates)
    assert all(((g > 0) & (g < 1)).all() for g in gates)
    # Gates depend on the input's global context: two different inputs get different gates.
    other = down.gate(torch.randn(2, 8, 8, 8) * 3)
    assert not torch.allclose(gates[0], other[0])


def test_gated_downsample_with_open_gates_is_conv_of_band_sum():
    down = WaveletGatedDownsample(4)
    with torch.no_grad():
        down.gate.ffn[-1].weight.zero_()
        down.gate.ffn[-1].bias.fill_(50.0)  # sigmoid -> 1: every band passes whole
    x = torch.randn(1, 4, 6, 6)
    expected = down.conv(sum(haar_dwt(x)))
    assert torch.allclose(down(x), expected, atol=1e-6)


# ----------------------------------------------------------------------------- students

def test_student_config_from_digits_teacher():
    from compress.zoo.models import DIGITS_COND_UNET, DIGITS_UNET

    assert slim_unet_config(DIGITS_UNET, "UNet2DModel", 0.5)["block_out_channels"] == [16, 32, 32]
    quarter = slim_unet_config(DIGITS_UNET, "UNet2DModel", 0.25)
    assert quarter["block_out_channels"] == [8, 16, 16] and quarter["norm_num_groups"] == 8
    assert slim_unet_config(DIGITS_UNET, "UNet2DModel", 0.5, layers_per_block=2)["layers_per_block"] == 2
    cond = slim_unet_config(DIGITS_COND_UNET, "UNet2DConditionModel", 0.25)
    # Heads (4) and groups must divide every attention block's channels.
    assert all(c % 8 == 0 for c in cond["block_out_channels"]) and cond["block_out_channels"][1] % 4 == 0


def test_half_width_digits_student_has_4x_fewer_macs():
    from compress.loading import load_model

    teacher = load_model("zoo:digits")
    student = build_student(teacher, SlimConfig(width=0.5))
    teacher_cost, student_cost = network_cost(teacher), network_cost(student)
    assert teacher_cost["macs"] / student_cost["macs"] >= 4.0
    plain = build_student(teacher, SlimConfig(width=0.5, wavelet_gating=False))
    assert network_cost(plain)["macs"] > student_cost["macs"]  # WG-Up's 1x1 conv is cheaper than Upsample2D's 3x3


@pytest.mark.parametrize("kind", ["unet", "text", "class-token"])
def test_students_build_from_unet_teachers(kind):
    if kind == "unet":
        teacher = unet_teacher()
    elif kind == "text":
        teacher = Denoiser(DiffusersUNet(tiny_cond_unet()).eval(), NoiseSchedule.from_betas(), sample_shape=(1, 8, 8),
                           conditioning="text", cond_shape=(3, 16), name="text")
    else:
        teacher = Denoiser(ClassTokenUNet(tiny_cond_unet(), 10).eval(), NoiseSchedule.from_betas(), sample_shape=(1, 8, 8),
                           conditioning="class", num_classes=10, name="class")
    student = build_student(teacher, SlimConfig(width=0.5))
    unet = student.module.unet
    assert list(unet.config.block_out_channels) == [4, 8]
    assert isinstance(unet.down_blocks[0].downsamplers[0], WaveletGatedDownsample)
    assert isinstance(unet.up_blocks[0].upsamplers[0], WaveletGatedUpsample)
    assert type(student.module) is type(teacher.module)
    x = torch.randn(2, 1, 8, 8)
    cond = {"unet": None, "text": torch.randn(2, 3, 16), "class-token": torch.tensor([3, 10])}[kind]
    assert student.module(x, torch.tensor([5.0, 700.0]), cond).shape == x.shape
    assert network_cost(student)["macs"] < network_cost(teacher)["macs"] / 2


def test_teachers_that_cannot_be_slimmed():
    with pytest.raises(UserError, match="cannot be slimmed"):
        build_student(dit_teacher(), SlimConfig())
    from tests.tiny_models import tiny_denoiser

    with pytest.raises(UserError, match="cannot be slimmed"):
        build_student(tiny_denoiser(), SlimConfig())  # a python: module wrapping the UNet in its own code


def test_resnet_samplers_need_no_wavelet_gating():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8, downsample_type="resnet", upsample_type="resnet")
    teacher = Denoiser(DiffusersUNet(unet).eval(), NoiseSchedule.from_betas(), sample_shape=(1, 8, 8))
    with pytest.raises(UserError, match="no-wavelet-gating"):
        build_student(teacher, SlimConfig(width=0.5))
    plain = build_student(teacher, SlimConfig(width=0.5, wavelet_gating=False))
    assert plain.module(torch.randn(1, 1, 8, 8), torch.tensor([3.0]), None).shape == (1, 1, 8, 8)


@pytest.mark.parametrize("bad", [dict(width=0), dict(width=1.5), dict(width=-0.5), dict(steps=0), dict(ema=1.0), dict(data="web"),
                                 dict(budget_clock="gpu"), dict(high_noise_weight=0.5),
                                 dict(prediction_type="epsilon")])
def test_invalid_configs_are_user_errors(bad):
    with pytest.raises(UserError):
        SlimConfig(**bad)


def test_config_roundtrips_through_a_recipe_section():
    config = SlimConfig(width=0.25, wavelet_gating=False, steps=10, lambda_freq=0.0)
    assert SlimConfig.from_dict(config.to_dict()) == config
    with pytest.raises(UserError, match="did you mean 'width'"):
        SlimConfig.from_dict({"widht": 0.5})


# ----------------------------------------------------------------------------- the loss

def test_frequency_loss_zero_when_equal_and_mse_with_flat_weights():
    a, b = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    w = spectral_weights(torch.randn(3, 1, 8, 8))
    assert frequency_loss(a, a, w).item() == 0.0
    assert math.isclose(frequency_loss(a, b, torch.ones(3, 1, 8, 8)).item(), torch.mean((a - b) ** 2).item(), rel_tol=1e-5)


def test_inverse_magnitude_weights_emphasise_high_frequencies():
    # A smooth x0: a low-frequency cosine plus a constant, almost no energy at high frequencies.
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    x0 = (0.5 + torch.cos(2 * math.pi * xx / 16) + 0.01 * torch.cos(2 * math.pi * 7 * yy / 16)).view(1, 1, 16, 16)
    w = spectral_weights(x0, alpha=-1.0)
    assert w[0, 0, 0, 1] < w[0, 0, 7, 0]  # the low-frequency bin weighs less than the high one
    # The same error energy costs more at a high frequency than at a low one.
    low_error = torch.cos(2 * math.pi * xx / 16).view(1, 1, 16, 16)
    high_error = torch.cos(2 * math.pi * 7 * yy / 16).view(1, 1, 16, 16)
    zero = torch.zeros(1, 1, 16, 16)
    assert math.isclose(low_error.pow(2).mean().item(), high_error.pow(2).mean().item(), rel_tol=1e-5)
    assert frequency_loss(high_error, zero, w) > 10 * frequency_loss(low_error, zero, w)
    flat = spectral_weights(x0, alpha=0.0)
    assert torch.allclose(flat, torch.ones_like(flat))


def test_high_frequency_share():
    checker = (torch.arange(8).view(1, 8) + torch.arange(8).view(8, 1)) % 2 * 2.0 - 1
    assert high_frequency_share(checker.view(1, 1, 8, 8)).item() > 0.99
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    smooth = torch.cos(2 * math.pi * xx / 16).view(1, 1, 16, 16)
    assert high_frequency_share(smooth).item() < 1e-6


def test_loss_terms_and_feature_projections():
    loss = SpectralDistillationLoss([4, 8], [8, 16], lambda_feature=0.5, lambda_freq=0.2)
    pred, teacher, noise, x0 = (torch.randn(2, 1, 8, 8) for _ in range(4))
    fs, ft = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)], [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    terms = loss(pred, teacher, noise, x0, fs, ft)
    assert set(terms) == {"denoise", "feature", "freq", "total"}
    assert torch.isclose(terms["total"], terms["denoise"] + 0.5 * terms["feature"] + 0.2 * terms["freq"])
    terms["total"].backward()
    assert all(p.grad is not None for p in loss.projections.parameters())
    only_denoise = SpectralDistillationLoss([4, 8], [8, 16], lambda_feature=0.0, lambda_freq=0.0)(pred, teacher, noise, x0, fs, ft)
    assert set(only_denoise) == {"denoise", "total"}


def test_parametrizations_convert_into_each_other():
    from compress.solvers import convert_prediction, prediction_target

    alpha = torch.tensor([0.05, 0.7, 0.99]).view(-1, 1, 1, 1)
    sigma = (1 - alpha**2).sqrt()
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    xt = alpha * x0 + sigma * eps
    outputs = {"epsilon": eps, "v_prediction": prediction_target("v_prediction", x0, eps, alpha, sigma), "sample": x0}
    for source, pred in outputs.items():
        for target, expected in outputs.items():
            assert torch.allclose(convert_prediction(pred, source, target, xt, alpha, sigma), expected, atol=1e-4), (source, target)


def test_noise_level_weights_favour_high_noise():
    for schedule in (NoiseSchedule.from_betas(), FlowSchedule()):
        w = noise_level_weights(schedule, cap=20.0)
        assert math.isclose(w.mean().item(), 1.0, rel_tol=1e-5)
        assert w[999] > 10 * w[0] and torch.all(w[1:] >= w[:-1])
        assert torch.allclose(noise_level_weights(schedule, cap=1.0), torch.ones(1000))
    # Per-sample weights scale the denoising term sample by sample.
    loss = SpectralDistillationLoss([4], [4], lambda_feature=0.0, lambda_freq=0.0)
    pred, noise = torch.zeros(2, 1, 4, 4), torch.stack([torch.ones(1, 4, 4), torch.zeros(1, 4, 4)])
    assert loss(pred, pred, noise, noise, sample_weights=torch.tensor([3.0, 1.0]))["denoise"].item() == pytest.approx(1.5)


# ----------------------------------------------------------------------------- distillation and folders

def test_distillation_reduces_the_loss_and_records_its_figures(trained):
    teacher, student = trained
    info = student.extra["slim"]
    curve = info["loss_curve"]
    assert curve[-1]["total"] < 0.8 * curve[0]["total"]
    assert info["width"] == 0.5 and info["wavelet_gating"] and info["steps"] == FAST["steps"]
    assert info["macs_teacher"] > 2 * info["macs_student"] > 0
    assert info["data"].startswith("teacher")  # no dataset travels with a random model
    assert student.schedule is teacher.schedule and student.sample_shape == teacher.sample_shape
    assert student.prediction_type == teacher.prediction_type == "epsilon"
    assert build_student(teacher, SlimConfig(width=0.5)).prediction_type == "v_prediction"  # the default


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_time_budget_stops_training(clock):
    student = slim(unet_teacher(), SlimConfig(width=0.5, **{**FAST, "steps": 100000, "max_minutes": 0.03, "budget_clock": clock}))
    info = student.extra["slim"]
    assert 0 < info["steps"] < 100000
    assert info["train_cpu_seconds"] > 0


def test_save_load_roundtrip_is_exact(trained, tmp_path):
    from compress.loading import load_model

    _, student = trained
    save_student(student, tmp_path / "student")
    loaded = load_model(str(tmp_path / "student"))
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 400.0, 999.0])
    with torch.no_grad():
        assert torch.equal(loaded.module(x, t, None), student.module(x, t, None))
    assert loaded.extra["slim"]["macs_student"] == student.extra["slim"]["macs_student"]
    for key, value in student.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    from compress.solvers import SolverConfig
    from export.onnx_export import export_onnx

    _, student = trained
    out = tmp_path_factory.mktemp("slim-onnx")
    solver = SolverConfig("ddim", 2)
    records = export_onnx(student, solver, out)
    return student, solver, out, records


def test_student_sampler_exports_with_standard_ops_and_matches_torch(exported):
    import onnx
    import onnxruntime as ort

    from compress.sampling import sample

    student, solver, out, _ = exported
    model = onnx.load(str(out / "sampler.onnx"))
    for node in model.graph.node:
        assert node.domain in ("", "ai.onnx"), (node.op_type, node.domain)
        assert onnx.defs.has(node.op_type), node.op_type
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = sample(student, solver, noise, device="cpu", show_progress=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    got = ort.InferenceSession(str(out / "sampler.onnx"), options, providers=["CPUExecutionProvider"]).run(None, {"noise": noise.numpy()})[0]
    assert np.abs(got - expected.numpy()).max() < 1e-3


@pytest.mark.slow
def test_student_quantizes_w8a8(exported, tmp_path):
    import onnx
    import onnxruntime as ort

    from calibration import CalibrationConfig, calibrate
    from compress.quantize import QuantizeConfig, quantize_

    student, solver, out, _ = exported
    calib = calibrate(student, CalibrationConfig(sampler="solver", samples=8, trajectory_steps=10), solver)
    records = {r["kind"]: r for r in quantize_(out, calib, QuantizeConfig(scheme="w8a8"), out_dir=tmp_path)}
    sampler = onnx.load(records["sampler"]["path"])
    assert any(n.op_type == "QuantizeLinear" for n in sampler.graph.node)
    noise = np.random.default_rng(2).standard_normal((2, 1, 8, 8)).astype(np.float32)
    got = ort.InferenceSession(records["sampler"]["path"], providers=["CPUExecutionProvider"]).run(None, {"noise": noise})[0]
    assert got.shape == noise.shape and np.isfinite(got).all()


@pytest.mark.slow
def test_student_goes_through_torch_export(trained):
    """The Core ML path starts from torch.export; the wavelet samplers must trace there too."""
    _, student = trained
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([10.0])
    program = torch.export.export(student.module.eval(), (x, t, None)).run_decompositions({})
    with torch.no_grad():
        assert torch.allclose(program.module()(x, t, None), student.module(x, t, None), atol=1e-5)


@pytest.mark.slow
def test_student_converts_to_coreml_and_openvino(exported, tmp_path):
    import openvino as ov

    from compress.solvers import SolverConfig
    from export.coreml_export import export_coreml
    from export.openvino_export import export_openvino

    student, solver, _, onnx_records = exported
    packages = export_coreml(student, SolverConfig("ddim", 2), tmp_path / "coreml")
    assert {r["kind"] for r in packages} == {"sampler", "denoiser"}
    assert all(Path(r["path"]).is_dir() for r in packages)
    irs = {r["kind"]: r for r in export_openvino(onnx_records, tmp_path / "openvino")}
    noise = np.random.default_rng(3).standard_normal((2, 1, 8, 8)).astype(np.float32)
    compiled = ov.Core().compile_model(irs["sampler"]["path"], "CPU")
    got = compiled({"noise": noise})[compiled.output(0)]
    from compress.sampling import sample

    expected = sample(student, solver, torch.from_numpy(noise), device="cpu", show_progress=False).numpy()
    assert np.abs(got - expected).max() < 1e-3


# ----------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("width", ["0", "1.5"])
def test_cli_refuses_bad_widths(width, tmp_path):
    result = run_cli("slim", "zoo:digits", "--width", width, "--out", tmp_path / "s")
    assert_one_line_error(result, "width must be in (0, 1]")
    assert not (tmp_path / "s").exists()


def test_cli_refuses_a_dit_teacher(tmp_path):
    result = run_cli("slim", "python:tests.test_slim:dit_teacher", "--steps", "1", "--out", tmp_path / "s")
    assert_one_line_error(result, "cannot be slimmed")
    assert not (tmp_path / "s").exists()


def test_cli_refuses_a_corrupt_checkpoint(trained, tmp_path):
    _, student = trained
    folder = tmp_path / "student"
    save_student(student, folder)
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    result = run_cli("slim", folder, "--steps", "1", "--out", tmp_path / "s")
    assert_one_line_error(result, "cannot read", "model.safetensors")
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_cli_writes_a_model_folder_that_samples(tmp_path):
    out = tmp_path / "student"
    result = run_cli("slim", "python:tests.tiny_models:tiny_denoiser", "--width", "0.5", "--steps", "3", "--batch-size", "4",
                     "--data", "teacher", "--out", out)
    # tiny_denoiser scales its UNet's output in its own module: it is not a bare diffusers UNet.
    assert_one_line_error(result, "cannot be slimmed")
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    tiny_unet().save_pretrained(str(teacher_dir))
    result = run_cli("slim", f"diffusers:{teacher_dir}", "--width", "0.5", "--steps", "3", "--batch-size", "4", "--data", "teacher",
                     "--out", out)
    assert result.returncode == 0, result.stderr
    assert (out / "model.json").is_file() and not list(tmp_path.glob(".student.partial-*"))
    result = run_cli("sample", out, "--steps", "2", "--n", "4", "--out", tmp_path / "grid.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "grid.png").is_file()
