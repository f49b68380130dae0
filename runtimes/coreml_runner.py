"""The Core ML runner: macOS only, because only macOS has the Core ML framework that predicts.

On other systems coremltools can still read a package's spec (see
`export.coreml_export.inspect_package`), but `available()` is False and nothing runs.
'coreml' lets Core ML pick CPU, GPU and Neural Engine; 'coreml-cpu' pins the CPU (float32
math in practice), which is the one to compare numbers with.
"""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from compress.errors import UserError
from runtimes.runners import Runner, first_line

COMPUTE_UNITS = {"all": "ALL", "cpu": "CPU_ONLY"}


class CoreMLRunner(Runner):
    formats = ("coreml",)

    def __init__(self, compute_units: str = "all", threads: int | None = None):
        super().__init__(threads)  # Core ML has no thread setting; kept for the common interface
        self.compute_units = compute_units
        self.name = "coreml" if compute_units == "all" else f"coreml-{compute_units}"
        self.device = "ane+gpu+cpu" if compute_units == "all" else "cpu"
        self.model = None

    def available(self) -> tuple[bool, str]:
        if platform.system() != "Darwin":
            return False, f"Core ML prediction needs macOS (this machine runs {platform.system()})"
        try:
            from export.coreml_export import import_coremltools

            ct = import_coremltools()
            from coremltools import libcoremlpython  # noqa: F401  the native bridge to the Core ML framework
        except ImportError:
            return False, "coremltools with its native Core ML bridge is missing (pip install coremltools on macOS 13 or later)"
        return True, f"coremltools {ct.__version__} on macOS {platform.mac_ver()[0]} ({COMPUTE_UNITS[self.compute_units]})"

    def load(self, artifact_path: str | Path) -> "CoreMLRunner":
        from export.coreml_export import import_coremltools

        artifact = self.open_artifact(artifact_path)
        ct = import_coremltools()
        try:
            self.model = ct.models.MLModel(str(artifact.path), compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[self.compute_units]))
        except Exception as e:
            raise UserError(f"Core ML cannot load {artifact.path}: {first_line(e)}") from None
        spec = self.model.get_spec()
        self.output = spec.description.output[0].name
        self.input_types = {f.name: _array_dtype(f) for f in spec.description.input}
        return self

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("load an artifact before run")
        feeds = {name: np.ascontiguousarray(inputs[name], dtype=dtype) for name, dtype in self.input_types.items()}
        return np.asarray(self.model.predict(feeds)[self.output], dtype=np.float32)

    def describe(self) -> dict:
        return {"library": "Core ML", "compute_units": COMPUTE_UNITS[self.compute_units]}


def _array_dtype(feature) -> type:
    from coremltools.proto import FeatureTypes_pb2

    kinds = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType
    return {kinds.FLOAT32: np.float32, kinds.FLOAT16: np.float16, kinds.INT32: np.int32, kinds.DOUBLE: np.float64}.get(
        feature.type.multiArrayType.dataType, np.float32)
