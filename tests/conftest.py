import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("COMPRESS_NO_PROGRESS", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def run_cli(*args, cwd=None, timeout=600):
    """Runs `python -m compress ARGS`; returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "compress", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: far too small to gain from threads, and on a machine whose cores
    are shared, OpenMP threads spinning against other jobs make tracing many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli():
    return run_cli


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
