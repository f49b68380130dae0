"""`compress export`: the sampler (whole loop, one graph) and the bare denoiser, with sidecars."""
from __future__ import annotations

from pathlib import Path

import click

from compress.commands.common import load_pipeline_from_flags, model_options
from compress.errors import UserError

FORMATS = ("onnx", "coreml", "openvino")


def parse_timesteps(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise UserError(f"--timesteps {text!r}: expected comma-separated integers such as 999,749,499,249") from None


def parse_resolution(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--resolution {text!r}: expected HxW such as 512x512") from None
    return height, width


@click.command()
@click.argument("model")
@click.option("--solver", default="dpmpp-2m", show_default=True)
@click.option("--steps", type=int, default=8, show_default=True)
@click.option("--spacing", default=None, help="linspace, leading, trailing, karras or logsnr (default: the pipeline scheduler's own, else trailing).")
@click.option("--schedule", type=click.Choice(["default", "optimized"]), default="default", show_default=True,
              help="'optimized' searches the timesteps that best match a many-step teacher.")
@click.option("--timesteps", default=None, help="Explicit timesteps (e.g. from an earlier search), comma-separated.")
@click.option("--guidance", type=float, default=None, help="Default guidance scale: classifier-free (conditional models), or the value of a guidance embedding (FLUX-dev).")
@click.option("--format", "formats", multiple=True, default=("onnx",), show_default=True, help="onnx, coreml, openvino; repeatable.")
@click.option("--batch-size", type=int, default=None, help="Static batch size (default: dynamic batch).")
@click.option("--target", default="generic", show_default=True,
              help="generic, npu-qnn, npu-qnn-w8a16 or npu-openvino, recorded in the sidecars: NPU targets export static shapes "
                   "(batch 1 unless --batch-size) and 'compress quantize' emits the target's QDQ layout.")
@click.option("--opset", type=int, default=18, show_default=True)
@click.option("--resolution", default=None, help="Text-to-image pipelines: the image size to export, HxW such as 512x512 (default: the UNet's sample size).")
@click.option("--output", "output", type=click.Choice(["image", "latents"]), default="image", show_default=True,
              help="Text-to-image pipelines: the sampler ends in the VAE decoder (image in [0, 1]) or returns the latents.")
@click.option("--coreml-weights", default=None, help="Core ML weights: float (float16, the default), int8 or palettize6 (6-bit k-means).")
@click.option("--coreml-attention", default=None,
              help="Core ML attention layout: original (the default) or split-einsum (per head in (B, C, 1, S), for the Neural Engine).")
@click.option("--coreml-chunk-mb", type=float, default=None,
              help="Write the Core ML denoiser as chained denoiser_chunk<k>.mlpackage files of at most this many MB of weights each "
                   "(Apple's iOS layout uses about 1000); the chain is listed in denoiser.coreml.json.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@model_options
def export(model, solver, steps, spacing, schedule, timesteps, guidance, formats, batch_size, target, opset, resolution, output,
           coreml_weights, coreml_attention, coreml_chunk_mb, out, **kw):
    """Export MODEL's whole sampler as one graph (sampler.*) and its denoiser (denoiser.*)."""
    from compress.export_chain import export_artifacts, pipeline_guidance, resolve_solver
    from compress.outputs import staged_folder
    from compress.recipe import chunk_bytes
    from export.targets import get_target

    for f in formats:
        if f not in FORMATS:
            raise UserError(f"unknown export format {f!r} (available: {', '.join(FORMATS)})")
    coreml = coreml_options(formats, coreml_weights, coreml_attention, chunk_bytes(coreml_chunk_mb, "--coreml-chunk-mb"))
    batch_size = get_target(target).batch_size(batch_size)  # NPU targets fix the batch: static shapes
    pipeline = load_pipeline_from_flags(model, kw)
    if resolution:
        pipeline = pipeline.at_resolution(*parse_resolution(resolution))
    guidance = pipeline_guidance(pipeline, guidance)
    config = resolve_solver(pipeline.denoiser, solver, steps, spacing, guidance, schedule, parse_timesteps(timesteps))
    with staged_folder(Path(out)) as root:
        records = export_artifacts(pipeline, config, root, list(formats), batch_size=batch_size, opset=opset, output=output, target=target,
                                   coreml=coreml)
    for r in records:
        click.echo(f"wrote {Path(out) / Path(r['path']).name} ({r['bytes'] / 1e6:.2f} MB)")


def coreml_options(formats, weights: str | None, attention: str | None, chunk_size: int | None) -> dict:
    """The --coreml-* flags as export_coreml's keyword options, checked before the model is loaded."""
    given = {k: v for k, v in (("weights", weights), ("attention", attention), ("chunk_bytes", chunk_size)) if v is not None}
    if given and "coreml" not in formats:
        flags = ", ".join(f"--coreml-{'chunk-mb' if k == 'chunk_bytes' else k}" for k in given)
        raise UserError(f"{flags} appl{'y' if len(given) > 1 else 'ies'} to --format coreml, which was not asked for")
    if "coreml" in formats:
        from export.coreml_export import check_coreml_options

        check_coreml_options(1, **given)
    return given
