"""From a Denoiser and solver settings to exported artifacts, for `compress export` and `compress run`."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from compress.components import Pipeline
from compress.denoiser import Denoiser
from compress.errors import UserError
from compress.solvers import SolverConfig

MODEL_SOLVER = "model"  # the solver of the model's own scheduler config


def resolve_solver(
    denoiser: Denoiser,
    name: str,
    steps: int,
    spacing: str | None = None,
    guidance: float | None = None,
    schedule: str = "default",
    timesteps: tuple[int, ...] | None = None,
    options: dict | None = None,
    log=lambda message: None,
) -> SolverConfig:
    """The solver to bake: named, or the model's own scheduler; with searched or given timesteps.

    A named solver without a ``spacing`` keeps the pipeline's settings: its scheduler config's spacing,
    steps offset and final level, as diffusers' ``from_config`` keeps them; else trailing."""
    if name == MODEL_SOLVER:
        if not denoiser.scheduler_config:
            raise UserError(f"--solver {MODEL_SOLVER} needs a model that comes with a scheduler config (a diffusers pipeline folder)")
        from compress.scheduler_config import solver_from_scheduler_config

        config = solver_from_scheduler_config(denoiser.scheduler_config, steps, guidance)
        spacing_of_pipeline = denoiser.extra.get("pipeline_spacing")
        if spacing_of_pipeline:  # the pipeline passes the scheduler its own levels (FluxPipeline's sigmas)
            config = dataclasses.replace(config, spacing=spacing_of_pipeline)
    else:
        inherited = _pipeline_settings(denoiser, name, steps) if spacing is None else {}
        config = SolverConfig(name, steps, spacing or "trailing", guidance, dict(options or {}))
        config = dataclasses.replace(config, **inherited)
    if timesteps is not None:
        if len(timesteps) != steps:
            raise UserError(f"{len(timesteps)} timesteps given for {steps} steps")
        config = dataclasses.replace(config, timesteps=tuple(timesteps))
    config.plan(denoiser.schedule)  # validates every setting before long work starts
    if guidance is not None and not denoiser.supports_guidance:
        if denoiser.conditioning != "none":
            raise UserError(f"guidance needs an unconditional input or a guidance embedding; {denoiser.name!r} has neither "
                            f"(it runs without guidance: leave the guidance scale unset)")
        raise UserError(f"guidance needs a conditional model; {denoiser.name!r} is unconditional")
    if schedule == "optimized":
        from compress.schedule_search import search_timesteps

        found = search_timesteps(denoiser, config)
        log(f"searched timesteps {found.timesteps}: teacher MSE {found.error_start:.4g} -> {found.error_found:.4g}")
        config = dataclasses.replace(config, timesteps=tuple(found.timesteps))
    return config


def _pipeline_settings(denoiser: Denoiser, solver: str, steps: int) -> dict:
    if denoiser.extra.get("pipeline_spacing"):  # the pipeline passes the scheduler its own levels (FluxPipeline's sigmas)
        return {"spacing": denoiser.extra["pipeline_spacing"]}
    if not denoiser.scheduler_config:
        return {}
    from compress.scheduler_config import inherited_settings

    return inherited_settings(denoiser.scheduler_config, solver, steps)


def pipeline_guidance(pipeline: Pipeline, guidance: float | None) -> float | None:
    """The guidance scale to bake: the one asked for, else the pipeline's own default.

    As in diffusers, a scale of 1 or less turns classifier-free guidance off (one branch);
    guidance-distilled pipelines (LCM, Turbo) have no default and run one branch. A network with a
    guidance embedding (FLUX-dev) takes any scale as its input, 1 and below included.
    """
    if not pipeline.is_text_to_image:
        return guidance
    scale = pipeline.default_guidance_scale if guidance is None else guidance
    if pipeline.denoiser.guidance_embedded:
        return scale
    return scale if scale is not None and scale > 1 else None


def export_artifacts(model: Denoiser | Pipeline, solver: SolverConfig, out_dir: Path, formats: list[str], batch_size: int | None = None,
                     opset: int = 18, output: str = "image", target: str = "generic", coreml: dict | None = None) -> list[dict]:
    """Writes sampler.* and denoiser.* (+ sidecars) for each format; returns one record per model file.

    A text-to-image pipeline also gets its text encoder(s), VAE decoder and encoder, tokenizers
    and pipeline.json; its sampler ends in the decoder (``output`` 'image') unless ``output`` is 'latents'.
    ``target`` (`export.targets`) is recorded in the ONNX sidecars and in the OpenVINO ones made from them.
    ``coreml``: keyword options of the Core ML writers (weights, attention, chunk_bytes), checked before any file is written.
    """
    from export.onnx_export import export_onnx, export_pipeline_onnx
    from export.sidecar import PIPELINE_FILE, record_component_files

    pipeline = model if isinstance(model, Pipeline) else Pipeline(model)
    denoiser = pipeline.denoiser
    _check_export_memory(pipeline)
    coreml = dict(coreml or {})
    if "coreml" in formats:
        from export.coreml_export import check_coreml_options

        check_coreml_options(batch_size or 1, **coreml)  # before any file is written
    if "coreml" in formats and pipeline.is_text_to_image:
        from export.coreml_export import check_coreml_pipeline

        check_coreml_pipeline(pipeline)
    if pipeline.is_text_to_image:
        records = export_pipeline_onnx(pipeline, solver, out_dir, batch_size=batch_size, opset=opset, output=output, target=target)
    else:
        if output != "image":
            raise UserError(f"--output {output} applies to latent text-to-image pipelines; {denoiser.name!r} samples pixels directly")
        records = export_onnx(denoiser, solver, out_dir, batch_size=batch_size, opset=opset, target=target)
    if "openvino" in formats:
        records += add_openvino(records, out_dir)
    if "coreml" in formats:
        from export.coreml_export import export_coreml, export_pipeline_coreml

        if pipeline.is_text_to_image:  # Core ML shapes are static: the batch is fixed, 1 unless one is given
            packages = export_pipeline_coreml(pipeline, solver, out_dir, batch_size=batch_size or 1, output=output, **coreml)
            record_component_files(Path(out_dir) / PIPELINE_FILE, packages)
            records += packages
        else:
            records += export_coreml(denoiser, solver, out_dir, batch_size=batch_size or 1, **coreml)
    if "onnx" not in formats:
        drop_onnx(records, out_dir)
    return records


def _check_export_memory(pipeline: Pipeline) -> None:
    """The trace holds the sampler's graph (the denoiser and the decoder baked in) beside the loaded modules."""
    from compress.memory import EXPORT_WEIGHT_FACTOR, require_memory

    modules = [pipeline.denoiser.module] + ([pipeline.vae.module] if pipeline.vae is not None else [])
    graph_bytes = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    require_memory(int(EXPORT_WEIGHT_FACTOR * graph_bytes), f"exporting {pipeline.denoiser.name!r} ({graph_bytes / 2**30:.1f} GiB of sampler weights)")


def add_openvino(records: list[dict], out_dir: Path) -> list[dict]:
    """OpenVINO IR of every ONNX record in ``out_dir`` (listed in its pipeline.json, if it has one)."""
    from export.openvino_export import export_openvino
    from export.sidecar import PIPELINE_FILE, record_component_files

    converted = export_openvino(records, out_dir)
    if (Path(out_dir) / PIPELINE_FILE).is_file():
        record_component_files(Path(out_dir) / PIPELINE_FILE, converted)
    return converted


def drop_onnx(records: list[dict], out_dir: Path) -> None:
    """Removes the ONNX files a format conversion started from, when ONNX itself was not asked for."""
    from export.sidecar import PIPELINE_FILE, drop_component_format

    for r in [r for r in records if r["format"] == "onnx"]:
        for key in ("path", "sidecar", "external_data"):
            if r.get(key):
                (Path(out_dir) / Path(r[key]).name).unlink(missing_ok=True)
        records.remove(r)
    if (Path(out_dir) / PIPELINE_FILE).is_file():
        drop_component_format(Path(out_dir) / PIPELINE_FILE, "onnx")
