"""`compress slim`: distil a slim, wavelet-gated student from a UNet teacher into a model folder."""
from __future__ import annotations

from pathlib import Path

import click

from compress.commands.common import load_from_flags, model_options
from compress.errors import UserError


@click.command()
@click.argument("teacher")
@click.option("--width", type=float, default=0.5, show_default=True, help="Channel multiplier in (0, 1]; MACs fall about with its square.")
@click.option("--wavelet-gating/--no-wavelet-gating", default=True, show_default=True,
              help="Replace the down/up-samplers with Haar wavelet-gated ones (Spectral Diffusion).")
@click.option("--layers-per-block", type=int, default=None, help="ResNet layers per block (default: the teacher's).")
@click.option("--steps", type=int, default=2000, show_default=True, help="Distillation steps.")
@click.option("--max-minutes", type=float, default=None, help="Wall-time budget; the learning-rate schedule ends with it.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--lambda-feature", type=float, default=0.1, show_default=True, help="Weight of multi-scale feature matching.")
@click.option("--lambda-freq", type=float, default=0.1, show_default=True, help="Weight of the spectrum-weighted frequency loss.")
@click.option("--alpha", type=float, default=-1.0, show_default=True, help="Frequency weights |DFT(x0)|^alpha.")
@click.option("--prediction-target", type=click.Choice(["v_prediction", "teacher"]), default="v_prediction", show_default=True,
              help="What the student predicts: v (stable for short training), or the teacher's own parametrization.")
@click.option("--high-noise-weight", type=float, default=1.0, show_default=True,
              help="Loss weight clamp(sigma_t/alpha_t, 1, this): errors at high noise grow most under a sampler; 1 = uniform.")
@click.option("--data", type=click.Choice(["auto", "digits", "teacher"]), default="auto", show_default=True,
              help="x0 for distillation: the digits (zoo models), or samples drawn from the teacher.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Model folder to write (replaced atomically).")
@model_options
def slim(teacher, width, wavelet_gating, layers_per_block, steps, max_minutes, batch_size, lr, lambda_feature, lambda_freq,
         alpha, prediction_target, high_noise_weight, data, seed, out, **kw):
    """Distil a slim student of TEACHER (a UNet model reference) into the model folder --out.

    The folder is a MODEL for every other command (sample, export, quantize, calibrate).
    """
    from compress.outputs import staged_folder
    from compress.progress import progress
    from compress.slim import SlimConfig, save_student, slim as distil

    config = SlimConfig(width=width, wavelet_gating=wavelet_gating, layers_per_block=layers_per_block, steps=steps,
                        max_minutes=max_minutes, batch_size=batch_size, lr=lr, lambda_feature=lambda_feature,
                        lambda_freq=lambda_freq, alpha=alpha, high_noise_weight=high_noise_weight, prediction_type=prediction_target,
                        data=data, seed=seed)
    out_path = Path(out)
    if out_path.is_dir() and any(out_path.iterdir()) and not (out_path / "model.json").is_file():
        raise UserError(f"--out {out} is a non-empty folder that is not a model folder; pick another")
    model = load_from_flags(teacher, kw)
    student = distil(model, config, progress=progress)
    # force: an existing model folder (model.json, no manifest) is ours to replace.
    with staged_folder(out_path, force=True) as stage:
        save_student(student, stage)
    info = student.extra["slim"]
    click.echo(f"wrote {out} (width {info['width']:g}, {'wavelet-gated' if info['wavelet_gating'] else 'plain'} samplers, "
               f"MACs {info['macs_student'] / 1e6:.1f}M vs teacher {info['macs_teacher'] / 1e6:.1f}M = {info['mac_reduction']:.2f}x fewer, "
               f"{info['steps']} steps in {info['train_seconds'] / 60:.1f} min, final loss {info['final_losses'].get('total', float('nan')):.4f})")
