"""The torch runner: the reference every exported artifact is compared with.

It runs the eager module that the exporters trace (`SamplerGraph` / `DenoiserGraph`), so it is
the float baseline by construction. From a file it rebuilds that module: the artifact's sidecar
names the model it came from (zoo:, diffusers:, python:) and the solver baked into it, and the
rebuilt solver must reproduce the sidecar's timesteps and sigmas exactly, else loading fails.
An ExportedProgram or TorchScript file would be one more artifact to write and keep in step,
and would no longer be the module that the other formats are checked against. In-process
callers (benchmarks, the pipeline) hand the module over directly with `load_module`.

A compressed artifact's sidecar still names its float source model: the torch runner then runs
that float model, and `describe()` says so.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from compress.errors import UserError
from runtimes.runners import Runner


class TorchRunner(Runner):
    formats = ("onnx", "openvino", "coreml")  # any artifact whose sidecar names its source model

    def __init__(self, device: str = "cpu", threads: int | None = None):
        super().__init__(threads)
        self.device = device
        self.name = "torch" if device == "cpu" else f"torch-{device}"
        self.graph = None
        self.input_names: list[str] = []
        self.rebuilt_from: str | None = None
        self.runs_float_of: str | None = None  # the artifact's quantization scheme, when it has one

    def available(self) -> tuple[bool, str]:
        import torch

        if self.device == "cpu":
            return True, f"torch {torch.__version__} eager on the CPU"
        if torch.version.cuda is None:
            return False, (f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch "
                           "(pip install torch --index-url https://download.pytorch.org/whl/cu128) on a machine with an NVIDIA GPU")
        if not torch.cuda.is_available():
            return False, "torch was built with CUDA but sees no GPU (check the NVIDIA driver and CUDA_VISIBLE_DEVICES)"
        return True, f"torch {torch.__version__} on {torch.cuda.get_device_name()}"

    def load(self, artifact_path: str | Path) -> "TorchRunner":
        artifact = self.open_artifact(artifact_path)
        graph = rebuild_graph(artifact.sidecar)
        self.rebuilt_from = artifact.sidecar["model"]["source"]
        self.runs_float_of = (artifact.sidecar.get("quantization") or {}).get("scheme")
        return self.load_module(graph, artifact.input_names)

    def load_module(self, module, input_names: list[str] | None = None) -> "TorchRunner":
        """Runs an in-memory graph called with its inputs in ``input_names`` order (default: its own `input_names`)."""
        import torch

        self.graph = module.to(self.device).eval()
        self.input_names = list(input_names or module.input_names)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return self

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        if self.graph is None:
            raise RuntimeError("load an artifact or a module before run")
        args = []
        for name in self.input_names:
            value = np.ascontiguousarray(inputs[name])
            if value.dtype.kind in "iu":
                value = value.astype(np.int64)  # labels index embeddings, which take int64
            args.append(torch.from_numpy(value).to(self.device))
        with torch.inference_mode(), _threads(self.threads):
            out = self.graph(*args)
        return out.float().cpu().numpy()

    def describe(self) -> dict:
        import torch

        info = {"library": f"torch {torch.__version__}", "mode": "eager", "precision": "float32"}
        if self.rebuilt_from:
            info["rebuilt_from"] = self.rebuilt_from
        if self.runs_float_of:
            info["note"] = f"runs the float source model of a {self.runs_float_of} artifact"
        if self.device == "cuda":
            info["gpu"] = torch.cuda.get_device_name()
        return info

    def peak_device_memory_mb(self) -> float | None:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else None


@contextlib.contextmanager
def _threads(threads: int | None):
    import torch

    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rebuild_graph(sidecar: dict):
    """The SamplerGraph / DenoiserGraph an artifact was exported from, checked against its sidecar."""
    from compress.loading import ScheduleFlags, load_model
    from runtimes.artifacts import baked_solver
    from export.sampler_graph import DenoiserGraph, SamplerGraph

    model = sidecar.get("model") or {}
    source = model.get("source")
    if not source:
        raise UserError("the artifact's sidecar names no source model; the torch runtime rebuilds the graph from it")
    flags = ScheduleFlags(num_train_timesteps=model.get("num_train_timesteps", 1000), prediction_type=model.get("prediction_type", "epsilon"),
                          sample_shape=tuple(model["sample_shape"]) if model.get("sample_shape") else None)
    denoiser = load_model(source, flags)
    if model.get("schedule_fingerprint") and denoiser.schedule.fingerprint() != model["schedule_fingerprint"]:
        raise UserError(f"{source} loads with another noise schedule than the artifact was exported with; the torch runtime cannot rebuild it")
    if sidecar.get("kind") == "denoiser":
        return DenoiserGraph(denoiser)
    guidance = sidecar.get("guidance") or {}
    return SamplerGraph(denoiser, baked_solver(sidecar, denoiser.schedule, denoiser.prediction_type), guidance=bool(guidance.get("enabled")))
