"""From a Denoiser and solver settings to exported artifacts, for `compress export` and `compress run`."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from compress.denoiser import Denoiser
from compress.errors import UserError
from compress.solvers import SolverConfig

MODEL_SOLVER = "model"  # the solver of the model's own scheduler config


def resolve_solver(
    denoiser: Denoiser,
    name: str,
    steps: int,
    spacing: str = "trailing",
    guidance: float | None = None,
    schedule: str = "default",
    timesteps: tuple[int, ...] | None = None,
    options: dict | None = None,
    log=lambda message: None,
) -> SolverConfig:
    """The solver to bake: named, or the model's own scheduler; with searched or given timesteps."""
    if name == MODEL_SOLVER:
        if not denoiser.scheduler_config:
            raise UserError(f"--solver {MODEL_SOLVER} needs a model that comes with a scheduler config (a diffusers pipeline folder)")
        from compress.scheduler_config import solver_from_scheduler_config

        config = solver_from_scheduler_config(denoiser.scheduler_config, steps, guidance)
    else:
        config = SolverConfig(name, steps, spacing, guidance, dict(options or {}))
    if timesteps is not None:
        if len(timesteps) != steps:
            raise UserError(f"{len(timesteps)} timesteps given for {steps} steps")
        config = dataclasses.replace(config, timesteps=tuple(timesteps))
    config.plan(denoiser.schedule)  # validates every setting before long work starts
    if guidance is not None and not denoiser.supports_guidance:
        raise UserError(f"guidance needs a conditional model; {denoiser.name!r} is unconditional")
    if schedule == "optimized":
        from compress.schedule_search import search_timesteps

        found = search_timesteps(denoiser, config)
        log(f"searched timesteps {found.timesteps}: teacher MSE {found.error_start:.4g} -> {found.error_found:.4g}")
        config = dataclasses.replace(config, timesteps=tuple(found.timesteps))
    return config


def export_artifacts(denoiser: Denoiser, solver: SolverConfig, out_dir: Path, formats: list[str], batch_size: int | None = None, opset: int = 18) -> list[dict]:
    """Writes sampler.* and denoiser.* (+ sidecars) for each format; returns one record per model file."""
    from export.onnx_export import export_onnx

    records = export_onnx(denoiser, solver, out_dir, batch_size=batch_size, opset=opset)
    if "openvino" in formats:
        from export.openvino_export import export_openvino

        records += export_openvino(records, out_dir)
    if "coreml" in formats:
        from export.coreml_export import export_coreml

        records += export_coreml(denoiser, solver, out_dir, batch_size=batch_size or 1)
    if "onnx" not in formats:
        for r in [r for r in records if r["format"] == "onnx"]:
            for key in ("path", "sidecar"):
                if r.get(key):
                    Path(r[key]).unlink(missing_ok=True)
            records.remove(r)
    return records
