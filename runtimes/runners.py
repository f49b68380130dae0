"""One interface over every runtime an artifact can run on, and the registry of runtime names.

    runner = get_runner("openvino")          # unknown names: UserError with a did-you-mean
    ok, reason = runner.available()          # probed here; an unavailable runner says why
    runner.load("out/sampler.xml")
    sample = runner.run({"noise": noise})    # dict of numpy inputs -> the one numpy output

A runner that is not available is never replaced by another one: onnxruntime sessions that fall
back to the CPU, for instance, are refused at `load`. Each backend lives in its own module and is
imported only when its runner is built, so probing a missing library costs nothing.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from compress.errors import UserError, unknown_choice


class Runner(ABC):
    name: str  # the runtime name users type, e.g. 'onnxruntime-cuda'
    device: str  # where it computes, e.g. 'cpu', 'cuda', 'GPU'
    formats: tuple[str, ...]  # artifact formats `load` accepts ('onnx', 'openvino', 'coreml')

    def __init__(self, threads: int | None = None):
        self.threads = threads  # intra-op threads; None leaves the library's default

    @abstractmethod
    def available(self) -> tuple[bool, str]:
        """(True, what will run) or (False, why not and what to install)."""

    @abstractmethod
    def load(self, artifact_path: str | Path) -> "Runner":
        """Prepares the artifact for `run`; returns self."""

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One call of the artifact: its single output (the sample, or the raw prediction of a denoiser)."""

    def run_outputs(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output of one call, in the artifact's order (a text encoder's hidden states and pooled embedding)."""
        return [self.run(inputs)]

    def describe(self) -> dict:
        """Library version, execution provider or device precision: whatever decides the numbers."""
        return {}

    def peak_device_memory_mb(self) -> float | None:
        """Peak accelerator memory since load, where the library reports it."""
        return None

    def require_available(self) -> None:
        ok, reason = self.available()
        if not ok:
            raise UserError(f"runtime {self.name!r} is not available here: {reason}")

    def open_artifact(self, artifact_path: str | Path):
        """The artifact with its sidecar, refused when this runtime cannot read its format."""
        from runtimes.artifacts import open_artifact

        artifact = open_artifact(artifact_path)
        if artifact.format not in self.formats:
            raise UserError(f"runtime {self.name!r} cannot run a {artifact.format} artifact ({artifact.path.name}); it runs {', '.join(self.formats)}")
        return artifact


# name -> (module in runtimes/, runner class, its backend argument[, keyword arguments]). Modules are imported
# when a runner is built.
RUNTIMES = {
    "torch": ("torch_runner", "TorchRunner", "cpu"),
    "torch-cuda": ("torch_runner", "TorchRunner", "cuda"),
    "onnxruntime": ("onnxruntime_runner", "OnnxRuntimeRunner", "cpu"),
    "onnxruntime-cuda": ("onnxruntime_runner", "OnnxRuntimeRunner", "cuda"),
    "onnxruntime-tensorrt": ("onnxruntime_runner", "OnnxRuntimeRunner", "tensorrt"),
    "onnxruntime-qnn": ("onnxruntime_runner", "OnnxRuntimeRunner", "qnn"),
    "onnxruntime-coreml": ("onnxruntime_runner", "OnnxRuntimeRunner", "coreml"),
    "openvino": ("openvino_runner", "OpenVINORunner", "CPU"),
    "openvino-bf16": ("openvino_runner", "OpenVINORunner", "CPU", {"precision": "bf16"}),
    "openvino-gpu": ("openvino_runner", "OpenVINORunner", "GPU"),
    "openvino-npu": ("openvino_runner", "OpenVINORunner", "NPU"),
    "coreml": ("coreml_runner", "CoreMLRunner", "all"),
    "coreml-cpu": ("coreml_runner", "CoreMLRunner", "cpu"),
    # A sampler artifact's interface run from the denoiser file beside it, one call per evaluation (runtimes/host_loop.py).
    "onnxruntime-host-loop": ("host_loop", "HostLoopRunner", "onnxruntime"),
    "openvino-host-loop": ("host_loop", "HostLoopRunner", "openvino"),
}

# The runtime `compress bench` uses when none is named.
DEFAULT_RUNTIME = {"onnx": "onnxruntime", "openvino": "openvino", "coreml": "coreml"}


def get_runner(name: str, threads: int | None = None) -> Runner:
    if name not in RUNTIMES:
        raise unknown_choice("runtime", name, RUNTIMES)
    module, cls, argument, *options = RUNTIMES[name]
    runner_class = getattr(importlib.import_module(f"runtimes.{module}"), cls)
    return runner_class(argument, threads, **(options[0] if options else {}))


def availability(threads: int | None = None) -> list[dict]:
    """Every runtime name with whether it can run here and why (not)."""
    rows = []
    for name in RUNTIMES:
        runner = get_runner(name, threads)
        ok, reason = runner.available()
        rows.append({"runtime": name, "device": runner.device, "formats": list(runner.formats), "available": ok, "reason": reason})
    return rows


def first_line(error: Exception) -> str:
    """A library's error message reduced to its first line, for the one-line CLI errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
