"""Options and helpers shared by the CLI commands."""
from __future__ import annotations

import click

from compress.errors import UserError


class ChecksFailed(Exception):
    """A --check gate failed: exit code 1."""


def model_options(fn):
    """Flags for models that cannot describe their own schedule (bare diffusers folders, python factories)."""
    options = [
        click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction", "sample"]), default="epsilon", show_default=True),
        click.option("--beta-schedule", type=click.Choice(["linear", "scaled_linear", "squaredcos_cap_v2"]), default="linear", show_default=True),
        click.option("--num-train-timesteps", type=int, default=1000, show_default=True),
        click.option("--beta-start", type=float, default=0.0001, show_default=True),
        click.option("--beta-end", type=float, default=0.02, show_default=True),
        click.option("--sample-shape", default=None, help="C,H,W for models that do not say (python: factories)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def load_from_flags(reference: str, kw: dict):
    return load_pipeline_from_flags(reference, kw).denoiser


def load_pipeline_from_flags(reference: str, kw: dict):
    from compress.loading import ScheduleFlags, load_pipeline

    shape = kw.pop("sample_shape")
    if shape:
        try:
            shape = tuple(int(s) for s in shape.split(","))
        except ValueError:
            raise UserError(f"--sample-shape {shape!r}: expected C,H,W such as 3,32,32") from None
    flags = ScheduleFlags(kw.pop("num_train_timesteps"), kw.pop("beta_schedule"), kw.pop("beta_start"), kw.pop("beta_end"), kw.pop("prediction_type"), shape)
    return load_pipeline(reference, flags)
