"""A model too large for the machine fails before the long work, with one line saying how much memory it needs."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import compress.memory as memory
from compress.errors import UserError
from compress.export_chain import export_artifacts
from compress.loading import load_model
from compress.solvers import SolverConfig
from tests.tiny_pipelines import build_sd_folder


def test_weights_are_counted_as_loaded_in_float32(tmp_path):
    save_file({"w": torch.zeros(1000, dtype=torch.float16)}, tmp_path / "model.safetensors")
    save_file({"w": torch.zeros(500, dtype=torch.float32)}, tmp_path / "other.safetensors")
    save_file({"w": torch.zeros(10**6, dtype=torch.float16)}, tmp_path / "model.fp16.safetensors")  # a variant the loader skips
    assert memory.folder_weight_bytes(tmp_path) == 1000 * 4 + 500 * 4


def test_loading_a_folder_larger_than_the_memory_fails_at_once(tmp_path, monkeypatch):
    folder = build_sd_folder(tmp_path / "sd")
    monkeypatch.setattr(memory, "available_bytes", lambda: 100 * 2**20)
    with pytest.raises(UserError, match=r"loading .*sd in float32 needs about 0\.5 GiB of memory and this machine has 0\.1 GiB available"):
        load_model(f"diffusers:{folder}")


def test_export_checks_the_trace_fits_before_writing(tmp_path, monkeypatch):
    from compress.loading import load_pipeline

    pipeline = load_pipeline(f"diffusers:{build_sd_folder(tmp_path / 'sd')}")
    monkeypatch.setattr(memory, "available_bytes", lambda: 200 * 2**20)
    with pytest.raises(UserError, match=r"exporting .* GiB of sampler weights\) needs about 0\.5 GiB"):
        export_artifacts(pipeline, SolverConfig("ddim", 2), tmp_path / "out", ["onnx"])
    assert not (tmp_path / "out").exists()
