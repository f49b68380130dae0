"""Pruning users' own denoisers (tests/architectures.py: LayerNorm over (C, H, W) with an embedding-table
timestep, BatchNorm with a hand-written q/k/v attention, FiLM without norms, a plain CNN): every method runs,
channels line up across the layers torch-pruning couples, a short fine-tune recovers the original's
predictions, and the pruned model is saved as its python: factory plus shapes, reloads exactly and exports
to ONNX; failures are one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compress.errors import UserError
from compress.loading import load_model
from compress.prune import PruneConfig, prune, save_pruned
from compress.stats import count_macs
from tests.architectures import FAMILY, build
from tests.conftest import assert_one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")

MEMBERS = list(FAMILY)
RATIO = 0.25
# Small Taylor and fine-tune budgets: each member prunes, recovers and exports in seconds.
FAST = dict(taylor_samples=4, taylor_steps=10, data_samples=32, data_steps=4, batch_size=8, lr=2e-3, ema=0.0)


def factory(name: str) -> str:
    return f"python:tests.architectures:{name}"


def noisy_digits(denoiser, count: int = 64):
    from compress.zoo.data import load_digits_tensors

    x0, _ = load_digits_tensors("heldout")
    g = torch.Generator().manual_seed(0)
    x0 = x0[:count]
    t = torch.randint(0, denoiser.schedule.num_train_timesteps, (len(x0),), generator=g)
    return denoiser.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t), t.float()


def relative_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean() / (b**2).mean())


def kept(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """The original index of each entry (along dim 0) that pruning kept, matched by value."""
    o, p = original.detach().flatten(1) if original.dim() > 1 else original.detach()[:, None], pruned.detach()
    p = p.flatten(1) if p.dim() > 1 else p[:, None]
    return [int((o - row).abs().sum(1).argmin()) for row in p]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """name -> (original, pruned and fine-tuned, its model folder), made once per member."""
    made = {}

    def get(name):
        if name not in made:
            original = load_model(factory(name))
            pruned = prune(original, PruneConfig(method="taylor", ratio=RATIO, finetune_steps=100, **FAST))
            folder = tmp_path_factory.mktemp(name) / "model"
            save_pruned(pruned, folder)
            made[name] = original, pruned, folder
        return made[name]

    return get


# ----------------------------------------------------------------------------- prune, recover, save, reload, export


@pytest.mark.parametrize("name", MEMBERS)
def test_member_prunes_recovers_and_reloads_exactly(tuned, name):
    original, pruned, folder = tuned(name)
    before, after = count_macs(original), count_macs(pruned)
    assert after["parameters"] < 0.9 * before["parameters"] and after["macs"] < 0.75 * before["macs"], (before, after)
    xt, t = noisy_digits(original)
    with torch.no_grad():
        reference = original.module(xt, t, None)
        error = relative_mse(pruned.module(xt, t, None), reference)
        chance = relative_mse(build(name, weights=False).module(xt, t, None), reference)
    assert error < 0.1 and error < 0.1 * chance, (error, chance)

    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]
    args = json.loads((folder / "model.json").read_text())["builder_args"]
    assert args["wrapper"] == "python" and args["factory"] == original.source == factory(name)
    assert args["shapes"] and all(key in original.module.state_dict() for key in args["shapes"])
    loaded = load_model(str(folder))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(xt, t, None), pruned.module(xt, t, None), rtol=1e-6, atol=1e-6)
    assert count_macs(loaded) == after
    assert loaded.extra["pruning"]["parameters_after"] == after["parameters"]


@pytest.mark.parametrize("name", MEMBERS)
def test_reloaded_member_exports_a_sampler_that_onnxruntime_runs_like_torch(tuned, name, tmp_path):
    import onnxruntime as ort

    from compress.sampling import sample
    from compress.solvers import SolverConfig
    from export.onnx_export import export_onnx

    _, _, folder = tuned(name)
    loaded = load_model(str(folder))
    solver = SolverConfig("dpmpp-2m", 2)
    export_onnx(loaded, solver, tmp_path)
    noise = torch.randn((3, *loaded.sample_shape), generator=torch.Generator().manual_seed(3))
    expected = sample(loaded, solver, noise, device="cpu", show_progress=False).numpy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(tmp_path / "sampler.onnx"), options, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"noise": noise.numpy()})[0], expected, atol=2e-3, rtol=1e-3)


# ----------------------------------------------------------------------------- what torch-pruning is told


@pytest.mark.parametrize("method", ["magnitude", "mask"])
@pytest.mark.parametrize("name", MEMBERS)
def test_every_method_runs_on_every_member(name, method):
    original = load_model(factory(name))
    lines = []
    pruned = prune(original, PruneConfig(method=method, ratio=RATIO, **FAST), progress=lines.append)
    assert count_macs(pruned)["macs"] < count_macs(original)["macs"]
    if method == "mask":  # no diffusers blocks to gate in any member: the ranking falls back to magnitude
        assert any("ranked by magnitude" in line for line in lines), lines
    x, t = noisy_digits(original, 2)
    with torch.no_grad():
        assert torch.isfinite(pruned.module(x, t, None)).all()


def test_layernorm_over_the_map_is_cut_along_its_channels_in_step_with_its_producers():
    original = load_model(factory("layernorm_ddpm"))
    lines = []
    pruned = prune(original, PruneConfig(ratio=RATIO), progress=lines.append)
    o, p = original.module, pruned.module
    assert any("LayerNorm cut along its channel dim" in line and "dec2.ln" in line for line in lines), lines
    assert p.enc2.ln.weight.shape[1:] == o.enc2.ln.weight.shape[1:]  # H and W stay
    assert p.enc2.ln.normalized_shape == tuple(p.enc2.ln.weight.shape) == (p.down1.out_channels, *o.enc2.ln.weight.shape[1:])
    assert kept(o.enc2.ln.weight, p.enc2.ln.weight) == kept(o.down1.bias, p.down1.bias)
    # dec2's LayerNorm sees cat([up2(m), h2]): its channels are up2's kept ones, then enc2's behind them.
    skip_offset = o.up2.out_channels
    expected = kept(o.up2.bias, p.up2.bias) + [skip_offset + i for i in kept(o.enc2.conv2.bias, p.enc2.conv2.bias)]
    assert kept(o.dec2.ln.weight, p.dec2.ln.weight) == expected
    assert len(kept(o.up2.bias, p.up2.bias)) == int(o.up2.out_channels * (1 - RATIO))


def test_hand_written_attention_is_kept_out_and_batchnorm_follows_its_conv():
    original = load_model(factory("batchnorm_unet"))
    lines = []
    pruned = prune(original, PruneConfig(ratio=RATIO), progress=lines.append)
    o, p = original.module, pruned.module
    message = next(line for line in lines if line.startswith("kept out of pruning"))
    assert all(f"attn.{x} (Conv2d)" in message for x in "qkv"), message
    assert [getattr(p.attn, x).out_channels for x in "qkv"] == [getattr(o.attn, x).out_channels for x in "qkv"]
    conv_kept = kept(o.enc1.conv_a.bias, p.enc1.conv_a.bias)
    assert len(conv_kept) < o.enc1.conv_a.out_channels
    assert kept(o.enc1.bn_a.running_mean, p.enc1.bn_a.running_mean) == kept(o.enc1.bn_a.weight, p.enc1.bn_a.weight) == conv_kept
    assert p.enc1.bn_a.num_features == len(conv_kept)


def test_film_chunks_keep_scale_and_shift_of_the_same_channels_at_the_given_ratio():
    original = load_model(factory("fourier_resnet"))
    pruned = prune(original, PruneConfig(ratio=RATIO))
    o, p = original.module.blocks[0], pruned.module.blocks[0]
    channels = kept(o.conv1.bias, p.conv1.bias)
    assert len(channels) == int(o.conv1.out_channels * (1 - RATIO))  # not twice the share: each half loses it once
    assert kept(o.film.bias, p.film.bias) == channels + [o.conv1.out_channels + i for i in channels]


# ----------------------------------------------------------------------------- the CLI and its error lines


def test_cli_prunes_a_python_factory_into_a_folder_that_export_and_sample_take(cli, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "pruned"
    result = cli("prune", factory("layernorm_ddpm"), "--ratio", str(RATIO), "--out", out)
    assert result.returncode == 0, result.stderr
    assert "LayerNorm cut along its channel dim" in result.stderr
    assert json.loads((out / "model.json").read_text())["builder_args"]["factory"] == factory("layernorm_ddpm")
    result = cli("export", out, "--steps", "2", "--out", tmp_path / "onnx")
    assert result.returncode == 0, result.stderr
    session = ort.InferenceSession(str(tmp_path / "onnx" / "sampler.onnx"), providers=["CPUExecutionProvider"])
    sample = session.run(None, {"noise": np.random.default_rng(0).standard_normal((2, 1, 16, 16), dtype=np.float32)})[0]
    assert sample.shape == (2, 1, 16, 16) and np.isfinite(sample).all()
    result = cli("sample", out, "--steps", "2", "--n", "2", "--out", tmp_path / "grid.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "grid.png").is_file()


VANISHING = '''
import torch
from torch import nn

from compress.denoiser import Denoiser
from compress.schedule import NoiseSchedule


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, t, cond=None):
        return self.b(torch.relu(self.a(x)))


def make():
    torch.manual_seed(0)
    return Denoiser(Net().eval(), NoiseSchedule.from_betas(), sample_shape=(1, 8, 8), name="vanishing")
'''


WEIGHTLESS_NORMS = '''
import torch
import torch.nn.functional as F
from torch import nn

from compress.denoiser import Denoiser
from compress.schedule import NoiseSchedule


class Net(nn.Module):
    """Norms without affine weights or statistics: nothing but an attribute records their widths."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.ln = nn.LayerNorm((8, 8, 8), elementwise_affine=False)
        self.gn = nn.GroupNorm(2, 8, affine=False)
        self.bn = nn.BatchNorm2d(8, affine=False, track_running_stats=False)
        self.out = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, t, cond=None):
        h = F.silu(self.ln(self.a(x)))
        h = F.silu(self.gn(self.b(h)))
        return self.out(F.silu(self.bn(self.c(h))))


def make():
    torch.manual_seed(0)
    return Denoiser(Net().eval(), NoiseSchedule.from_betas(), sample_shape=(1, 8, 8), name="weightless")
'''


def write_factory(tmp_path, monkeypatch, module: str, source: str) -> str:
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"python:{module}:make"


def test_norms_without_tensors_keep_their_pruned_widths_in_the_folder(tmp_path, monkeypatch):
    original = load_model(write_factory(tmp_path, monkeypatch, "weightless_norms", WEIGHTLESS_NORMS))
    pruned = prune(original, PruneConfig(ratio=RATIO))
    save_pruned(pruned, tmp_path / "model")
    widths = json.loads((tmp_path / "model" / "model.json").read_text())["builder_args"]["attributes"]
    assert widths == {"ln": {"normalized_shape": list(pruned.module.ln.normalized_shape)}, "gn": {"num_channels": pruned.module.gn.num_channels},
                      "bn": {"num_features": pruned.module.bn.num_features}}
    assert pruned.module.ln.normalized_shape[0] < original.module.ln.normalized_shape[0]
    loaded = load_model(str(tmp_path / "model"))
    x, t = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0)), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x, t, None), pruned.module(x, t, None), rtol=1e-6, atol=1e-6)


def test_a_pruned_folder_prunes_again_and_still_names_its_factory(tmp_path):
    first = prune(load_model(factory("plain_cnn")), PruneConfig(ratio=RATIO))
    save_pruned(first, tmp_path / "once")
    again = prune(load_model(str(tmp_path / "once")), PruneConfig(ratio=RATIO))
    save_pruned(again, tmp_path / "twice")
    assert json.loads((tmp_path / "twice" / "model.json").read_text())["builder_args"]["factory"] == factory("plain_cnn")
    loaded = load_model(str(tmp_path / "twice"))
    assert count_macs(loaded) == count_macs(again) and count_macs(again)["macs"] < count_macs(first)["macs"]


def test_a_folder_whose_factory_no_longer_imports_is_one_line(cli, tmp_path, monkeypatch):
    import sys

    write_factory(tmp_path, monkeypatch, "vanishing_denoiser", VANISHING)
    save_pruned(prune(load_model("python:vanishing_denoiser:make"), PruneConfig(ratio=0.5)), tmp_path / "model")
    (tmp_path / "vanishing_denoiser.py").unlink()
    monkeypatch.delitem(sys.modules, "vanishing_denoiser")
    with pytest.raises(UserError, match="cannot rebuild the pruned model from python:vanishing_denoiser:make: cannot import"):
        load_model(str(tmp_path / "model"))
    result = cli("export", tmp_path / "model", "--steps", "2", "--out", tmp_path / "onnx")
    assert_one_line_error(result, "python:vanishing_denoiser:make", "cannot import 'vanishing_denoiser'")
    assert not (tmp_path / "onnx").exists()


def test_a_model_without_a_python_factory_cannot_be_saved(tmp_path):
    from compress.denoiser import Denoiser

    made = build("plain_cnn", weights=False)
    orphan = Denoiser(made.module, made.schedule, "epsilon", made.sample_shape, name="orphan", source=None)
    pruned = prune(orphan, PruneConfig(ratio=RATIO))
    with pytest.raises(UserError, match="cannot be saved as a model folder: it did not come from a python:module:factory"):
        save_pruned(pruned, tmp_path / "model")
    assert not (tmp_path / "model" / "model.json").exists()


def test_torch_pruning_failures_are_one_line_naming_the_layer():
    from compress.prune import _make_pruner, _step

    def failing(group):
        raise RuntimeError("Index tensor must have the same number of dimensions as src tensor\nmore detail")

    denoiser = build("plain_cnn", weights=False)
    with torch.enable_grad(), pytest.raises(UserError) as caught:
        pruner, names = _make_pruner(denoiser, PruneConfig(ratio=RATIO), failing, lambda m: None)
        _step(pruner, names, denoiser.name)
    message = str(caught.value)
    assert "\n" not in message and "(Conv" in message and "RuntimeError: Index tensor" in message, message
