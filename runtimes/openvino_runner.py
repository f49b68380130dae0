"""The OpenVINO runner: CPU, GPU or NPU, each only where `openvino.Core().available_devices` lists it.

It reads OpenVINO IR (.xml) and ONNX files alike. Every compile names its inference precision:
on the CPU OpenVINO otherwise runs f32 IR in bf16 on CPUs that have it (AVX512-BF16 or AMX), and
a float artifact would no longer agree with onnxruntime and torch to 1e-3. `openvino` pins f32, so
validation compares like with like; `openvino-bf16` asks for bf16, the speed OpenVINO's own default
gives such CPUs, and exists only where the CPU plugin reports BF16 among its optimization
capabilities. GPU and NPU keep their default (f16). `describe` reports the precision the compiled
model says it runs at, and a compile that does not get the asked precision is refused.

A dynamic-batch model is reshaped to the shapes of each call and compiled once per shape (the
last few are kept). The NPU compiles static shapes only; on the CPU a static compile of the
8-step digits sampler ran 1.9x faster than the dynamic one at batch 1 (45 vs 24 ms, OpenVINO
2026.4, 1 thread), which is worth the few seconds each new shape costs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.errors import UserError
from runtimes.runners import Runner, first_line

INSTALL = {
    "CPU": "pip install openvino",
    "GPU": "an Intel GPU with its compute runtime (intel-opencl-icd or the Level Zero driver) next to pip install openvino",
    "NPU": "an Intel Core Ultra NPU with the intel-npu driver next to pip install openvino",
}
# Compiled shapes kept per runner; a new shape past this evicts the oldest.
KEPT_SHAPES = 4
# The inference precision a runner asks for when none is named: f32 on the CPU, the precision artifacts are
# validated at; None keeps the GPU and NPU plugins' own default (f16), the precision they are deployed at.
DEFAULT_PRECISION = {"CPU": "f32", "GPU": None, "NPU": None}
PRECISIONS = ("f32", "bf16", "f16")
BF16_HARDWARE = "a CPU with AVX512-BF16 or AMX (such as Intel Xeon Sapphire Rapids or newer, AMD Zen 4 or newer)"


def cpu_capabilities(core=None) -> list[str]:
    """What OpenVINO's CPU plugin says this CPU can do ('FP32', 'BF16', 'INT8', ...): the plugin's own view,
    which is what decides its default precision, rather than a reading of /proc/cpuinfo."""
    import openvino as ov

    return [str(c) for c in (core or ov.Core()).get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def cpu_has_bf16(core=None) -> bool:
    return "BF16" in cpu_capabilities(core)


class OpenVINORunner(Runner):
    formats = ("openvino", "onnx")

    def __init__(self, device: str = "CPU", threads: int | None = None, precision: str | None = None):
        super().__init__(threads)
        if precision is not None and precision not in PRECISIONS:
            raise UserError(f"unknown OpenVINO inference precision {precision!r} (one of {', '.join(PRECISIONS)})")
        self.device = device
        self.precision = precision or DEFAULT_PRECISION[device]
        self.name = "openvino" if device == "CPU" else f"openvino-{device.lower()}"
        if precision is not None and precision != DEFAULT_PRECISION[device]:
            self.name += f"-{precision}"
        self.model = None
        self.compiled: dict[tuple, object] = {}  # input shapes -> (compiled model, infer request)

    def available(self) -> tuple[bool, str]:
        try:
            import openvino as ov
        except ImportError:
            return False, f"OpenVINO is not installed ({INSTALL['CPU']})"
        devices = ov.Core().available_devices
        if not any(d.split(".")[0] == self.device for d in devices):
            return False, f"OpenVINO {ov.get_version().split('-')[0]} here lists devices {', '.join(devices) or 'none'}; {self.device} needs {INSTALL[self.device]}"
        if self.device == "CPU" and self.precision == "bf16":
            capabilities = cpu_capabilities()
            if "BF16" not in capabilities:
                return False, (f"OpenVINO {ov.get_version().split('-')[0]}'s CPU plugin reports {', '.join(capabilities)} here and no BF16: "
                               f"bf16 inference needs {BF16_HARDWARE}")
        where = f"{self.device}, {self.precision}" if self.precision else f"{self.device}, its default precision"
        return True, f"OpenVINO {ov.get_version().split('-')[0]} on {where}"

    def load(self, artifact_path: str | Path) -> "OpenVINORunner":
        import openvino as ov

        artifact = self.open_artifact(artifact_path)
        self.core = ov.Core()
        try:
            self.model = self.core.read_model(str(artifact.path))
        except Exception as e:  # a corrupt IR or ONNX file
            raise UserError(f"OpenVINO cannot read {artifact.path}: {first_line(e)}") from None
        self.compiled = {}
        if not self.model.is_dynamic():
            self._compile(None)
        return self

    def _config(self) -> dict:
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if self.precision:
            config["INFERENCE_PRECISION_HINT"] = self.precision
        if self.device == "CPU" and self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        return config

    def _compile(self, shapes: dict | None):
        model = self.model
        if shapes is not None:
            model = self.model.clone()
            model.reshape({name: list(shape) for name, shape in shapes.items()})
        try:
            compiled = self.core.compile_model(model, self.device, self._config())
        except Exception as e:
            raise UserError(f"OpenVINO cannot compile the model for {self.device}: {first_line(e)}") from None
        got = compiled_precision(compiled)
        if self.precision and got != self.precision:  # a figure labelled bf16 (or f32) must have been computed so
            raise UserError(f"OpenVINO compiled the model for {self.device} at {got}, not the {self.precision} that {self.name!r} asks for")
        key = None if shapes is None else tuple(sorted(shapes.items()))
        if len(self.compiled) >= KEPT_SHAPES:
            del self.compiled[next(iter(self.compiled))]
        self.compiled[key] = (compiled, compiled.create_infer_request())
        return self.compiled[key]

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._infer(inputs).get_output_tensor(0).data.copy()

    def run_outputs(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = self._infer(inputs)
        return [request.get_output_tensor(i).data.copy() for i in range(len(self.model.outputs))]

    def _infer(self, inputs: dict[str, np.ndarray]):
        if self.model is None:
            raise RuntimeError("load an artifact before run")
        if None in self.compiled:
            compiled, request = self.compiled[None]
        else:
            shapes = {name: tuple(np.shape(inputs[name])) for name in self._input_names()}
            compiled, request = self.compiled.get(tuple(sorted(shapes.items()))) or self._compile(shapes)
        feeds = {}
        for port in compiled.inputs:
            # A compiled port may report another of its tensor names first; match on any of them.
            name = next(n for n in port.get_names() if n in inputs)
            feeds[name] = np.ascontiguousarray(inputs[name], dtype=port.get_element_type().to_dtype())
        request.infer(feeds)
        return request

    def _input_names(self) -> list[str]:
        return [port.get_any_name() for port in self.model.inputs]

    def describe(self) -> dict:
        import openvino as ov

        info = {"library": f"OpenVINO {ov.get_version().split('-')[0]}", "device": self.device,
                "precision_hint": self.precision or "device default"}
        if self.compiled:
            info["precision"] = compiled_precision(next(iter(self.compiled.values()))[0])
        return info


def compiled_precision(compiled) -> str:
    """The inference precision a compiled model runs at, as OpenVINO names it ('f32', 'bf16', 'f16')."""
    value = compiled.get_property("INFERENCE_PRECISION_HINT")
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)
