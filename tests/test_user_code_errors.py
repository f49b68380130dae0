"""An exception raised inside a user's own `python:` code is reported as theirs (exit 2, one line naming
the reference, the exception and their line); an exception of ours stays an internal error (exit 3)."""
import operator
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compress.denoiser import Denoiser
from compress.schedule import NoiseSchedule
from tests.conftest import assert_one_line_error

ROOT = Path(__file__).resolve().parents[1]
BOOM = "python:tests.test_user_code_errors:boom_denoiser"


class BoomModule(nn.Module):
    """A user's network whose forward fails, as one does with a shape it does not expect."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, sample, timestep, cond=None):
        raise RuntimeError("boom")  # the line the error names


def boom_denoiser() -> Denoiser:
    return Denoiser(BoomModule().eval(), NoiseSchedule.from_betas(), sample_shape=(1, 8, 8), name="boom")


def boom_line() -> str:
    import inspect

    lines, start = inspect.getsourcelines(BoomModule.forward)
    return f"line {start + next(i for i, l in enumerate(lines) if 'raise RuntimeError' in l)}"


@pytest.mark.parametrize("command", [
    ["sample", BOOM, "--steps", "2", "--n", "2", "--out", "{tmp}/g.png"],
    ["calibrate", BOOM, "--samples", "2", "--trajectory-steps", "2", "--out", "{tmp}/c.safetensors"],
    ["export", BOOM, "--steps", "2", "--out", "{tmp}/export"],
], ids=["sample", "calibrate", "export"])
def test_an_exception_in_the_users_forward_is_theirs(command, tmp_path, cli):
    result = cli(*[part.format(tmp=tmp_path) for part in command])
    assert_one_line_error(result, BOOM, "RuntimeError: boom", "test_user_code_errors.py", boom_line())
    assert "internal error" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # and nothing half-written is left


def test_a_run_on_a_failing_model_is_theirs_and_leaves_no_folder(tmp_path, cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {BOOM}\nsolver: {{name: ddim, steps: 2}}\nvalidate: {{reference: {{steps: 4}}, samples: 2}}\n")
    result = cli("run", recipe, "--out", tmp_path / "out")  # the run logs its stages on stderr before the error
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(f in last for f in (BOOM, "RuntimeError: boom", boom_line())), last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_an_exception_at_the_top_of_the_users_module_is_theirs(tmp_path):
    # A module in the working directory, the common case; this checkout's toolkit stays first on the path.
    (tmp_path / "usermodel.py").write_text("import torch\nWEIGHTS = torch.load('missing.pt')\n\ndef make():\n    pass\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "compress", "sample", "python:usermodel:make", "--out", str(tmp_path / "g.png")],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert_one_line_error(result, "python:usermodel:make", "importing 'usermodel' raised FileNotFoundError")


def test_a_bug_of_ours_after_the_users_model_ran_stays_an_internal_error(tmp_path, monkeypatch, capsys):
    import signal

    from compress import images
    from compress.cli import EXIT_INTERNAL, main

    # A builtin (no Python frame of its own) that fails as a bug would: the raising frame is the toolkit's,
    # and the user's package (tests) is loaded and has run.
    monkeypatch.setattr(images, "save_grid", operator.truediv)
    monkeypatch.setattr(sys, "argv", ["compress"])
    handler = signal.getsignal(signal.SIGTERM)
    try:
        code = main(["sample", "python:tests.tiny_models:tiny_denoiser", "--steps", "2", "--n", "2", "--out", str(tmp_path / "g.png")])
    finally:
        signal.signal(signal.SIGTERM, handler)
    err = capsys.readouterr().err
    assert code == EXIT_INTERNAL and "internal error: TypeError" in err, err


def test_the_exception_a_library_raises_from_the_users_is_followed_to_it():
    from compress.errors import register_user_code, user_code_error

    register_user_code(__name__, "python:tests.test_user_code_errors:boom_denoiser")
    try:
        try:
            boom_denoiser().module(torch.zeros(1, 1, 8, 8), 0)
        except RuntimeError as e:
            raise ValueError("export failed") from e  # as an exporter wraps what the traced code raised
    except ValueError as wrapped:
        wrapped.__traceback__ = None  # only the wrapper's own frames: none of them the user's
        error = user_code_error(wrapped)
    assert error is not None and "RuntimeError: boom" in str(error) and boom_line() in str(error)
    try:
        try:
            boom_denoiser().module(torch.zeros(1, 1, 8, 8), 0)
        except RuntimeError:
            {}["ours"]  # a bug of ours while handling theirs
    except KeyError as ours:
        ours.__traceback__ = None
        assert user_code_error(ours) is None
