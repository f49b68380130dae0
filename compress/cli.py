"""The `compress` command line. Exit codes: 0 success, 1 a failed --check, 2 bad input, 3 an internal error."""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import click

from compress.commands.common import ChecksFailed, load_pipeline_from_flags, model_options
from compress.errors import UserError, user_code_error

EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 1, 2, 3


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="diffusion-compress")
@click.pass_context
def cli(ctx, debug):
    """Compress diffusion models and deploy them as single-graph samplers."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output folder (replaced atomically).")
@click.option("--force", is_flag=True, help="Replace --out even when it is not a compress output folder.")
@click.option("--resume", is_flag=True, help="Reuse the stages of the run already in --out whose inputs and files are unchanged.")
def run(recipe, out, force, resume):
    """Run a recipe: baseline, solver, compression, export, validation, report."""
    from compress.pipeline import run as run_recipe
    from compress.recipe import load_recipe

    report = run_recipe(load_recipe(recipe), Path(out), force=force, resume=resume, log=lambda m: click.echo(m, err=True))
    click.echo(Path(out, "report", "report.md").read_text())
    if any(not c["passed"] for c in report.get("checks", [])):
        raise ChecksFailed(", ".join(c["check"] for c in report["checks"] if not c["passed"]))


@cli.command()
@click.argument("model")
@click.option("--solver", default="ddim", show_default=True, help="Any solver of `compress solvers`, or 'model' for the model's own scheduler.")
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--spacing", default=None, help="linspace, leading, trailing, karras or logsnr (default: the pipeline scheduler's own, else trailing).")
@click.option("--timesteps", default=None, help="Explicit timesteps, comma-separated (e.g. from a schedule search).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--n", "n", type=int, default=64, show_default=True, help="Number of samples.")
@click.option("--label", type=int, default=None, help="Class label (class-conditional models).")
@click.option("--guidance", type=float, default=None, help="Guidance scale: classifier-free, or the value of a guidance embedding (FLUX-dev).")
@click.option("--prompt", default=None, help="Text-to-image pipelines: the prompt of every sample (decoded to images).")
@click.option("--negative-prompt", default=None, help="Text-to-image pipelines: the unconditional branch's prompt.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when present).")
@click.option("--out", "out", default="grid.png", show_default=True, type=click.Path(dir_okay=False))
@click.option("--save-tensors", type=click.Path(dir_okay=False), default=None, help="Also write the samples as safetensors.")
@model_options
def sample(model, solver, steps, spacing, timesteps, seed, n, label, guidance, prompt, negative_prompt, device, out, save_tensors, **kw):
    """Sample an image grid from MODEL (zoo:NAME, diffusers:PATH, python:module:factory)."""
    import torch

    from compress.images import save_grid
    from compress.commands.export import parse_timesteps
    from compress.export_chain import pipeline_guidance, resolve_solver
    from compress.sampling import make_noise, sample as run_sampler

    from compress.outputs import writable_file

    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    writable_file(out)
    if save_tensors:
        writable_file(save_tensors, "--save-tensors")
    pipeline = load_pipeline_from_flags(model, kw)
    denoiser = pipeline.denoiser
    if label is not None and denoiser.conditioning != "class":
        raise UserError(f"--label needs a class-conditional model; {model} is conditioned on '{denoiser.conditioning}'")
    if (prompt is not None or negative_prompt is not None) and not pipeline.is_text_to_image:
        raise UserError(f"--prompt needs a text-to-image pipeline; {model} takes no text")
    cond = torch.full((n,), label, dtype=torch.long) if label is not None else None
    if pipeline.is_text_to_image:
        guidance = pipeline_guidance(pipeline, guidance)
        cond = pipeline.encode_prompts([prompt or ""] * n)
        denoiser.null_text = pipeline.negative_condition(1, negative_prompt)
    elif cond is None and denoiser.conditioning == "text":
        cond = torch.zeros((n, *denoiser.cond_shape))
    timesteps = parse_timesteps(timesteps)
    config = resolve_solver(denoiser, solver, len(timesteps) if timesteps else steps, spacing, guidance, timesteps=timesteps)
    samples = run_sampler(denoiser, config, make_noise(denoiser, n, seed), cond, device=device, seed=seed)
    if pipeline.is_text_to_image:
        samples = pipeline.decode(samples)
    save_grid(samples, Path(out), (0.0, 1.0) if pipeline.is_text_to_image else denoiser.data_range)
    if save_tensors:
        from safetensors.torch import save_file

        save_file({"samples": samples.contiguous()}, save_tensors)
    click.echo(f"wrote {out} ({n} samples, {solver}-{steps}, seed {seed})")


@cli.command()
def solvers():
    """List the solvers, their options and network evaluations per K steps."""
    from compress.solvers import SOLVERS

    for name, spec in SOLVERS.items():
        options = ", ".join(spec.option_names()) or "-"
        click.echo(f"{name:<10} order {spec.order}  NFE {spec.evaluations:<14} {spec.summary}  [options: {options}]")


@cli.group()
def zoo():
    """The reference models trained on scikit-learn's digits."""


@zoo.command("list")
def zoo_list():
    """List the zoo models and their checkpoints."""
    from compress.zoo import ZOO, stored_path, training_info

    for entry in ZOO.values():
        path = stored_path(entry.name)  # a file, or a pipeline's folder
        files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path] if path.is_file() else []
        state = f"{sum(f.stat().st_size for f in files) / 1e6:.1f} MB" if files else "not trained"
        click.echo(f"zoo:{entry.name:<18} {entry.kind:<10} {state:<12} {entry.summary}")
        if files:
            info = training_info(entry.name)
            click.echo(f"    trained: {json.dumps(info)}")


@zoo.command("train")
@click.argument("name")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None, help="Folder for the checkpoint (default: the package's zoo).")
@click.option("--iterations", type=int, default=None, help="Training iterations (diffusion models).")
@click.option("--resume", is_flag=True, help="Continue the checkpoint in --out for another phase (lower learning rate).")
@click.option("--lr", type=float, default=None, help="Peak learning rate (default 2e-3, or 5e-4 with --resume).")
def zoo_train(name, out, iterations, resume, lr):
    """Retrain a zoo model from scratch (minutes on 2 CPU cores)."""
    from compress.zoo import CHECKPOINTS, ZOO
    from compress.zoo.train import train_zoo_model

    if name not in ZOO:
        raise UserError(f"unknown zoo model {name!r} (available: {', '.join(ZOO)})")
    path = train_zoo_model(name, Path(out) if out else CHECKPOINTS, iterations, resume, lr)
    click.echo(f"wrote {path}")


@cli.command()
@click.argument("folder", type=click.Path())
@click.option("--check", "checks", multiple=True, help="A gate such as 'psnr>=30'; repeatable. Exit 1 when one fails.")
def report(folder, checks):
    """Show a run's report and apply --check gates to it."""
    from compress.checks import evaluate_checks, parse_checks

    from compress.outputs import verify_manifest

    parsed = parse_checks(list(checks))
    path = Path(folder) / "report" / "report.json"
    if not path.is_file():
        raise UserError(f"{folder} has no report/report.json; is it a 'compress run' output folder?")
    verify_manifest(Path(folder))
    try:
        data = json.loads(path.read_text())
        rows = [r for r in data["rows"] if r["artifact"] != "baseline"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path} is corrupt: {e}") from None
    click.echo((Path(folder) / "report" / "report.md").read_text() if (Path(folder) / "report" / "report.md").is_file() else json.dumps(data, indent=2))
    results = evaluate_checks(parsed, rows)
    for r in results:
        click.echo(f"{'PASS' if r['passed'] else 'FAIL'} {r['check']}" + (f"  ({r['detail']})" if r["detail"] else ""))
    if any(not r["passed"] for r in results):
        raise ChecksFailed(", ".join(r["check"] for r in results if not r["passed"]))


def _register_stage_commands() -> None:
    """Stage commands live in compress/commands/, one module each."""
    from compress.commands import STAGE_COMMANDS

    for command in STAGE_COMMANDS():
        cli.add_command(command)


_register_stage_commands()


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that every staged write unwinds and removes its partial folder."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    import signal

    argv = sys.argv[1:] if argv is None else argv
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    debug = "--debug" in argv
    try:
        cli.main(args=argv, prog_name="compress", standalone_mode=False)
    except ChecksFailed as e:
        click.echo(f"checks failed: {e}", err=True)
        return EXIT_CHECK_FAILED
    except UserError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        return EXIT_BAD_INPUT
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.exceptions.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        click.echo("interrupted; no partial output was left", err=True)
        return 130
    except Terminated:
        click.echo("terminated (SIGTERM); no partial output was left", err=True)
        return 143
    except Exception as e:  # an internal error: one line unless --debug asks for the traceback
        if debug:
            raise
        theirs = user_code_error(e)  # raised inside a python: model's own code: bad input, not our bug
        if theirs is not None:
            click.echo(f"error: {theirs}", err=True)
            return EXIT_BAD_INPUT
        click.echo(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True)
        return EXIT_INTERNAL
    return 0


if __name__ == "__main__":
    sys.exit(main())
