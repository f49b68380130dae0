"""The host loop: the denoiser artifact driven from numpy, one runtime call per network evaluation.

This is how a Python scheduler around an exported UNet samples (Optimum's onnxruntime pipelines, an
app's own loop), and what baking the loop into the sampler graph is measured against. The runner
takes a sampler artifact and runs its interface (noise, condition, guidance_scale -> sample) from
the denoiser file beside it: the sampler's sidecar names the solver, the denoiser's its schedule,
and from them the solver's coefficient table (`compress.solvers.SolverTable`) is rebuilt and
checked against the sidecar's timesteps and sigmas. It is the table the sampler graph bakes,
applied by the same `run_table`, so the loop's place is the only difference from the baked graph.
With classifier-free guidance each evaluation is one call on the doubled batch [unconditional;
conditional], as the sampler graph evaluates it, so the work per step is the same.

    runner = get_runner("onnxruntime-host-loop", threads=1).load("out/sampler.onnx")  # runs out/denoiser.onnx
    sample = runner.run({"noise": noise, "class_labels": labels, "guidance_scale": np.array([2.0], np.float32)})

A sampler that bakes in what the denoiser file lacks is refused rather than approximated: the VAE
decoder of a pipeline's sampler, a quantization scheme the denoiser does not share. Where the
sampler bakes the encoded negative prompt as its null condition, the caller passes it
(``negative_encoder_hidden_states``), as an app with its own loop encodes it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.denoiser import NEGATIVE_PREFIX, SHARED_CONDITION_KEYS
from compress.errors import UserError
from runtimes.artifacts import baked_solver, sidecar_schedule
from runtimes.runners import Runner, get_runner

DENOISER_INPUTS = ("sample", "timestep")


class HostLoopRunner(Runner):
    def __init__(self, backend: str = "onnxruntime", threads: int | None = None):
        super().__init__(threads)
        self.network = get_runner(backend, threads)  # runs the denoiser file, once per evaluation
        self.name = f"{backend}-host-loop"
        self.device = self.network.device
        self.formats = self.network.formats
        self.table = None

    def available(self) -> tuple[bool, str]:
        ok, reason = self.network.available()
        return ok, f"{reason}, the denoiser driven by a numpy host loop" if ok else reason

    def load(self, artifact_path: str | Path) -> "HostLoopRunner":
        sampler = self.open_artifact(artifact_path)
        if sampler.kind != "sampler":
            raise UserError(f"the host loop runs a sampler artifact from the denoiser beside it; {sampler.path.name} is a {sampler.kind}")
        if sampler.output_name != "sample":
            raise UserError(f"{sampler.path.name} has the VAE decoder baked in; the host loop drives the denoiser alone (export with --output latents)")
        denoiser = self.open_artifact(sampler.path.with_name("denoiser" + sampler.path.suffix))
        schemes = [(a.sidecar.get("quantization") or {}).get("scheme") for a in (sampler, denoiser)]
        if schemes[0] != schemes[1]:
            raise UserError(f"{sampler.path.name} is {schemes[0] or 'float'} but {denoiser.path.name} is {schemes[1] or 'float'}: "
                            "the host loop would run another network than the sampler")
        schedule = sidecar_schedule(denoiser.sidecar)
        prediction_type = denoiser.sidecar["prediction_type"]
        self.table = baked_solver(sampler.sidecar, schedule, prediction_type).table(schedule, prediction_type)
        self.network.load(denoiser.path)
        self.condition_names = [n for n in denoiser.input_names if n not in DENOISER_INPUTS and n != "guidance"]
        self.embedded_guidance = "guidance" in denoiser.input_names
        guidance = sampler.sidecar.get("guidance") or {}
        self.classifier_free = bool(guidance.get("enabled")) and not self.embedded_guidance
        self.default_scale = guidance.get("default_scale")
        self.null_values = {spec["name"]: spec.get("null_value") for spec in sampler.sidecar["inputs"]}
        return self

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if self.table is None:
            raise RuntimeError("load an artifact before run")
        missing = [n for n in self.condition_names if n not in inputs]
        if missing:
            raise UserError(f"the sampler needs {', '.join(missing)}")
        condition = {n: np.asarray(inputs[n]) for n in self.condition_names}
        scale = np.asarray(inputs.get("guidance_scale", [self.default_scale]), np.float32)
        if self.classifier_free:
            both = {n: np.concatenate([null, condition[n]]) for n, null in self._null(condition, inputs).items()}

            def network(x: np.ndarray, t: float) -> np.ndarray:
                uncond, conditional = np.split(self._evaluate(np.concatenate([x, x]), t, both), 2)
                return uncond + scale * (conditional - uncond)
        else:
            if self.embedded_guidance:
                condition["guidance"] = np.full(len(inputs["noise"]), scale[0], np.float32)

            def network(x: np.ndarray, t: float) -> np.ndarray:
                return self._evaluate(x, t, condition)

        from compress.solvers import run_table

        return run_table(self.table, network, np.asarray(inputs["noise"], np.float32))

    def _evaluate(self, x: np.ndarray, t: float, condition: dict[str, np.ndarray]) -> np.ndarray:
        return self.network.run({"sample": x, "timestep": np.full(len(x), t, np.float32), **condition})

    def _null(self, condition: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The unconditional branch's condition: the negative inputs where given, else the sampler's null value."""
        null = {}
        for name, value in condition.items():
            given = inputs.get(NEGATIVE_PREFIX + name)
            if name in SHARED_CONDITION_KEYS:
                null[name] = value
            elif given is not None:
                null[name] = np.asarray(given, value.dtype)
            elif self.null_values.get(name) == "zeros":
                null[name] = np.zeros_like(value)
            elif isinstance(self.null_values.get(name), int):  # the null class label
                null[name] = np.full_like(value, self.null_values[name])
            else:
                raise UserError(f"the sampler bakes its own unconditional {name} (the encoded negative prompt); "
                                f"the host loop needs it as {NEGATIVE_PREFIX + name}")
        return null

    def describe(self) -> dict:
        evaluations = self.table.evaluations if self.table is not None else None
        return {**self.network.describe(), "loop": f"numpy host loop, {evaluations} denoiser calls per run"}

    def peak_device_memory_mb(self) -> float | None:
        return self.network.peak_device_memory_mb()
