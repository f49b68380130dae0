"""The onnxruntime runner, one execution provider per runtime name.

A provider is used only when the installed onnxruntime build lists it. onnxruntime silently
falls back to the CPU when a listed provider cannot start (no GPU, missing libraries): `load`
checks which provider the session really got and refuses the fallback, so a figure labelled
'onnxruntime-cuda' was measured on CUDA. The CPU provider stays registered behind an accelerator
only for the ops that provider leaves to it, which is how onnxruntime is meant to be deployed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from compress.errors import UserError
from runtimes.runners import Runner, first_line

CPU = "CPUExecutionProvider"
# backend -> (provider, the providers behind it, what to install where the build lacks it)
PROVIDERS = {
    "cpu": ("CPUExecutionProvider", (), "pip install onnxruntime"),
    "cuda": ("CUDAExecutionProvider", (CPU,), "pip install onnxruntime-gpu (instead of onnxruntime), with an NVIDIA GPU and CUDA 12 libraries"),
    "tensorrt": ("TensorrtExecutionProvider", ("CUDAExecutionProvider", CPU),
                 "pip install onnxruntime-gpu tensorrt (instead of onnxruntime), with an NVIDIA GPU"),
    "qnn": ("QNNExecutionProvider", (CPU,), "pip install onnxruntime-qnn (instead of onnxruntime) on a Snapdragon machine with the Qualcomm AI Engine Direct (QNN) libraries"),
    "coreml": ("CoreMLExecutionProvider", (CPU,), "the onnxruntime wheel for macOS (pip install onnxruntime on a Mac)"),
}
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class OnnxRuntimeRunner(Runner):
    formats = ("onnx",)

    def __init__(self, backend: str = "cpu", threads: int | None = None):
        super().__init__(threads)
        self.backend = backend
        self.provider, self.fallbacks, self.install = PROVIDERS[backend]
        self.name = "onnxruntime" if backend == "cpu" else f"onnxruntime-{backend}"
        self.device = backend
        self.session = None

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError:
            return False, f"onnxruntime is not installed ({PROVIDERS['cpu'][2]})"
        listed = ort.get_available_providers()
        if self.provider not in listed:
            return False, f"onnxruntime {ort.__version__} here offers {', '.join(listed)}; for {self.provider}: {self.install}"
        return True, f"onnxruntime {ort.__version__} with {self.provider}"

    def load(self, artifact_path: str | Path) -> "OnnxRuntimeRunner":
        import onnxruntime as ort

        artifact = self.open_artifact(artifact_path)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: warnings about fallback nodes would drown the table
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(artifact.path), options, providers=[self._provider_entry(), *self.fallbacks])
        except Exception as e:  # a corrupt or foreign file: onnxruntime's own message, first line
            raise UserError(f"onnxruntime cannot load {artifact.path}: {first_line(e)}") from None
        got = self.session.get_providers()[0]
        if got != self.provider:
            raise UserError(f"onnxruntime could not start {self.provider} for {artifact.path.name} (it fell back to {got}); {self.install}")
        self.output = self.session.get_outputs()[0].name
        self.input_types = {i.name: ORT_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        return self

    def _provider_entry(self):
        if self.backend == "qnn":  # the HTP (NPU) backend; the QNN CPU backend would be no NPU figure
            return (self.provider, {"backend_path": "QnnHtp.dll" if sys.platform == "win32" else "libQnnHtp.so"})
        return self.provider

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output], self._feeds(inputs))[0]

    def run_outputs(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, self._feeds(inputs))

    def _feeds(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.session is None:
            raise RuntimeError("load an artifact before run")
        return {name: np.asarray(inputs[name], dtype=dtype) for name, dtype in self.input_types.items()}

    def describe(self) -> dict:
        import onnxruntime as ort

        info = {"library": f"onnxruntime {ort.__version__}", "provider": self.provider}
        if self.session is not None:
            info["providers"] = self.session.get_providers()
        return info
