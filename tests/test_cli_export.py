"""`compress export` from the command line, searched schedules, and invalid solver settings."""
import json

import pytest

from compress.schedule_search import _allowed, search_timesteps
from compress.solvers import SolverConfig
from tests.conftest import assert_one_line_error
from tests.tiny_models import tiny_denoiser

TINY = "python:tests.tiny_models:tiny_denoiser"


def test_export_cli_writes_sampler_and_denoiser(tmp_path, cli):
    out = tmp_path / "art"
    result = cli("export", TINY, "--solver", "dpmpp-2m", "--steps", "3", "--format", "onnx", "--out", out)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} >= {"sampler.onnx", "sampler.json", "denoiser.onnx", "denoiser.json"}
    sidecar = json.loads((out / "sampler.json").read_text())
    assert sidecar["solver"]["name"] == "dpmpp-2m" and sidecar["solver"]["steps"] == 3


def test_searched_schedule_beats_its_start_and_is_reusable(tmp_path, cli):
    denoiser = tiny_denoiser()
    found = search_timesteps(denoiser, SolverConfig("ddim", 3), noises=4, teacher=SolverConfig("ddim", 50))
    assert found.error_found <= found.error_start
    assert len(found.timesteps) == 3
    T = denoiser.schedule.num_train_timesteps
    assert all(a - b >= T // 12 for a, b in zip(found.timesteps, found.timesteps[1:])), found.timesteps
    timesteps = ",".join(map(str, found.timesteps))
    out = tmp_path / "art"
    result = cli("export", TINY, "--solver", "ddim", "--steps", "3", "--timesteps", timesteps, "--out", out)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "sampler.json").read_text())["solver"]["timesteps"] == [float(t) for t in found.timesteps]


def test_schedule_search_moves_keep_timesteps_apart():
    current = [999, 700, 400, 10, 5]
    assert _allowed([999, 650, 400, 10, 5], current, 1000, 50)
    assert not _allowed([999, 430, 400, 10, 5], current, 1000, 50)  # a gap of 30 < 50
    assert _allowed([999, 700, 400, 10, 4], current, 1000, 50)  # a narrow start gap may stay narrow or widen...
    assert not _allowed([999, 700, 400, 10, 6], current, 1000, 50)  # ...but not shrink
    assert not _allowed([1000, 700, 400, 10, 5], current, 1000, 50)
    assert not _allowed([999, 700, 400, 5, 5], current, 1000, 1)


def test_optimized_schedule_from_the_cli(tmp_path, cli):
    out = tmp_path / "art"
    result = cli("export", TINY, "--solver", "ddim", "--steps", "2", "--schedule", "optimized", "--out", out)
    assert result.returncode == 0, result.stderr
    assert len(json.loads((out / "sampler.json").read_text())["solver"]["timesteps"]) == 2


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--steps", "0"], "steps must be at least 1"),
        (["--solver", "dpm++"], "unknown solver"),
        (["--solver", "dpmpp-3m", "--steps", "2"], "order 3 needs at least 3 steps"),
        (["--guidance", "3"], "guidance needs a conditional model"),
        (["--solver", "ddpm"], "stochastic"),
        (["--format", "tflite"], "unknown export format"),
        (["--timesteps", "999,abc"], "comma-separated integers"),
        (["--solver", "model"], "scheduler config"),
    ],
)
def test_invalid_settings_exit_2(args, fragment, tmp_path, cli):
    result = cli("export", TINY, *args, "--out", tmp_path / "art")
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "art").exists()


def test_sample_cli_rejects_guidance_on_unconditional(tmp_path, cli):
    assert_one_line_error(cli("sample", TINY, "--guidance", "3", "--out", tmp_path / "g.png"), "guidance needs a conditional model")
