"""`compress calibrate` (record a calibration set) and `compress quantize` (quantize exported graphs)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import click

from compress.commands.common import ChecksFailed, load_from_flags, load_pipeline_from_flags, model_options
from compress.errors import UserError
from export.targets import TARGETS as EXPORT_TARGETS


@click.command()
@click.argument("model")
@click.option("--sampler", type=click.Choice(["ndtc", "uniform", "solver"]), default="ndtc", show_default=True,
              help="ndtc: t ~ Normal(mean, std)·T (PTQ4DM); uniform: every --interval timesteps (Q-Diffusion); solver: the baked solver's timesteps.")
@click.option("--samples", type=int, default=256, show_default=True, help="Recorded states (guidance records each twice).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--mean", type=float, default=0.4, show_default=True, help="ndtc: mean timestep as a fraction of T.")
@click.option("--std", type=float, default=0.4, show_default=True, help="ndtc: standard deviation as a fraction of T.")
@click.option("--interval", type=int, default=None, help="uniform: timesteps between recorded states (default T/20).")
@click.option("--trajectory-steps", type=int, default=100, show_default=True, help="Steps of the full-precision DDIM chain.")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance along the chain (conditional models).")
@click.option("--solver", default="dpmpp-2m", show_default=True, help="The solver to bake (--sampler solver).")
@click.option("--steps", type=int, default=8, show_default=True)
@click.option("--spacing", default=None, help="linspace, leading, trailing, karras or logsnr (default: the pipeline scheduler's own, else trailing).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--prompt", "prompts", multiple=True, help="Text-to-image pipelines: a calibration prompt; repeatable.")
@click.option("--prompts-file", type=click.Path(dir_okay=False, exists=True), default=None, help="Text-to-image pipelines: one prompt per line.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Output .safetensors file.")
@model_options
def calibrate(model, sampler, samples, seed, mean, std, interval, trajectory_steps, guidance, solver, steps, spacing, device, prompts, prompts_file, out, **kw):
    """Record a timestep-aware calibration set from MODEL's own full-precision trajectories.

    For a text-to-image pipeline the trajectories follow the given prompts (encoded by its own text
    encoder, with the empty negative prompt for the unconditional half), and the set also holds the
    latents the --solver/--steps sampler ends at, on which the VAE decoder is calibrated.
    """
    from calibration import CalibrationConfig, calibrate as record, save_calibration
    from compress.export_chain import resolve_solver

    from compress.outputs import writable_file

    writable_file(out)
    prompts = list(prompts) + (Path(prompts_file).read_text().splitlines() if prompts_file else [])
    prompts = [p for p in prompts if p.strip()]
    config = CalibrationConfig(sampler=sampler, samples=samples, seed=seed, mean=mean, std=std, interval=interval,
                               trajectory_steps=trajectory_steps, guidance_scale=guidance, prompts=prompts or None)
    pipeline = load_pipeline_from_flags(model, kw)
    denoiser = pipeline.denoiser
    baked = resolve_solver(denoiser, solver, steps, spacing, guidance)
    extra = {}
    if pipeline.is_text_to_image:
        if not prompts:
            raise UserError(f"{model} is a text-to-image pipeline: give its calibration prompts with --prompt or --prompts-file")
        pipeline.draw_from_prompts(prompts)
        extra = {"final_latents": baked}
    elif prompts:
        raise UserError(f"--prompt needs a text-to-image pipeline; {model} takes no text")
    calib = record(denoiser, config, baked if sampler == "solver" else None, device=device, **extra)
    path = save_calibration(calib, out)
    counts = calib.header["counts"]
    click.echo(f"wrote {path} ({counts['inputs']} inputs from {counts['trajectories']} trajectories, "
               f"{len(calib.header['timesteps']['values'])} timesteps, sampler {sampler})")


@click.command()
@click.argument("model_or_onnx")
@click.option("--calib", "calib", type=click.Path(dir_okay=False), default=None, help="Calibration set from 'compress calibrate' (w8a8, w8a16).")
@click.option("--scheme", type=click.Choice(["w8a8", "w8a16", "int8-weights", "int4-weights", "fp16"]), default="w8a8", show_default=True)
@click.option("--granularity", type=click.Choice(["per-step", "shared"]), default="per-step", show_default=True,
              help="Activation scales of the unrolled sampler: per step, or one per layer for all steps.")
@click.option("--shared-from", type=click.Choice(["denoiser", "union"]), default="denoiser", show_default=True,
              help="shared: the denoiser's scales calibrated on the set, or the union of the per-step ranges.")
@click.option("--target", "targets", multiple=True, type=click.Choice(["sampler", "denoiser", *EXPORT_TARGETS]),
              help="Graphs to quantize (sampler, denoiser; default both), and/or the export target whose QDQ layout to emit "
                   f"({', '.join(EXPORT_TARGETS)}; default: the one the export recorded, else generic).")
@click.option("--decoder", type=click.Choice(["w8a8", "w8a16", "int8-weights", "int4-weights", "fp16"]), default=None,
              help="Text-to-image exports: the VAE decoder's scheme (default float; w8a8 also quantizes it inside the sampler).")
@click.option("--text-encoder", type=click.Choice(["int8-weights", "int4-weights", "fp16"]), default=None,
              help="Text-to-image exports: the text encoders' scheme (default float).")
@click.option("--subset-size", type=int, default=256, show_default=True)
@click.option("--ignore", "ignored", multiple=True, help="Extra node-name regex kept in float; repeatable.")
@click.option("--target-psnr", type=float, default=None,
              help="Quality target in dB of the final sample against the float32 sampler: the most sensitive layers go back to float until it is met.")
@click.option("--max-float-layers", type=int, default=None, help="With --target-psnr: at most this many layers back in float (default: a quarter).")
@click.option("--require-target", is_flag=True, help="With --target-psnr: exit 1 when the target is not met (the best file is written either way).")
@click.option("--solver", default="dpmpp-2m", show_default=True, help="For a model reference: the solver to export first.")
@click.option("--steps", type=int, default=8, show_default=True)
@click.option("--spacing", default=None, help="linspace, leading, trailing, karras or logsnr (default: the pipeline scheduler's own, else trailing).")
@click.option("--guidance", type=float, default=None, help="For a model reference: default guidance scale of the export.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@model_options
def quantize(model_or_onnx, calib, scheme, granularity, shared_from, targets, decoder, text_encoder, subset_size, ignored, target_psnr,
             max_float_layers, require_target, solver, steps, spacing, guidance, out, **kw):
    """Quantize MODEL_OR_ONNX: an export folder or .onnx file, or a model reference (exported first).

    A text-to-image export folder comes out whole: each graph with its component's scheme
    (--scheme for the denoiser's steps, --decoder, --text-encoder), the rest copied.
    """
    from calibration import check_calibration_matches, load_calibration, model_identity
    from compress.outputs import Manifest, staged_folder
    from compress.quantize import QuantizeConfig, missed_targets, quantize_

    # Graph names and export-target names do not overlap, so one flag takes both, as `compress export --target` takes the latter.
    graphs, layout = [t for t in targets if t not in EXPORT_TARGETS], sorted({t for t in targets if t in EXPORT_TARGETS})
    if len(layout) > 1:
        raise UserError(f"--target names one export target, got {', '.join(layout)}")
    config = QuantizeConfig(scheme=scheme, granularity=granularity, shared_from=shared_from, subset_size=subset_size, decoder=decoder,
                            text_encoder=text_encoder, ignored=list(ignored), target_psnr=target_psnr, max_float_layers=max_float_layers,
                            require_target=require_target, target=layout[0] if layout else None, **({"targets": graphs} if graphs else {}))
    calib_set = load_calibration(calib) if calib else None
    if scheme in ("w8a8", "w8a16") and calib_set is None:
        raise UserError(f"--scheme {scheme} needs --calib (record a set with 'compress calibrate')")
    source = Path(model_or_onnx)
    with staged_folder(Path(out)) as root, tempfile.TemporaryDirectory(prefix="compress-quantize-") as scratch:
        if not source.exists():
            if ":" not in model_or_onnx:
                raise UserError(f"{model_or_onnx} does not exist (expected an export folder, an .onnx file or a model reference)")
            from compress.export_chain import resolve_solver
            from export.onnx_export import export_onnx

            denoiser = load_from_flags(model_or_onnx, kw)
            if calib_set is not None:
                check_calibration_matches(calib_set, model_identity(denoiser), where=f"model {model_or_onnx!r}")
            if guidance is None and calib_set is not None and denoiser.supports_guidance:
                guidance = calib_set.guidance_scale
            export_onnx(denoiser, resolve_solver(denoiser, solver, steps, spacing, guidance), scratch, target=config.target or "generic")
            source = Path(scratch)
        records = quantize_(source, calib_set, config, out_dir=root, progress=lambda m: click.echo(m, err=True))
        manifest = Manifest(root, "quantize")
        for r in records:
            manifest.add(Path(r["path"]), "onnx", "quantize", config.to_dict(), kind=r["kind"], scheme=r["scheme"] or "float32")
        for path in sorted(p for p in root.rglob("*") if p.is_file() and (p.name == "pipeline.json" or p.parent.name.startswith("tokenizer"))):
            manifest.add(path, path.suffix.lstrip("."), "quantize", config.to_dict())
        manifest.write()
    for r in records:
        click.echo(f"wrote {Path(out) / Path(r['path']).name} ({r['bytes'] / 1e6:.2f} MB, float {r['float_bytes'] / 1e6:.2f} MB, {r['scheme'] or 'float32'}"
                   + (f", {r['granularity']}" if r.get("granularity") else "")
                   + (f", target {r['export_target']}" if r.get("export_target") not in (None, "generic") else "") + ")")
    for r in records:
        if r.get("target") and r["target"].get("met"):
            click.echo(r["target"]["message"])
    missed = missed_targets(records)
    for message in missed:
        click.echo(f"warning: {message}", err=True)
    if missed and require_target:
        raise ChecksFailed("quantization target not met")
