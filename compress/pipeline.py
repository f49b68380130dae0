"""`compress run`: the recipe's stages, top to bottom, into one output folder."""
from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from compress.checks import evaluate_checks, parse_checks
from compress.denoiser import Denoiser
from compress.errors import UserError
from compress.export_chain import export_artifacts, resolve_solver
from compress.images import save_grid
from compress.loading import ScheduleFlags, load_model
from compress.metrics import psnr
from compress.outputs import Manifest, staged_folder, write_json
from compress.recipe import Recipe
from compress.sampling import default_device, make_noise, sample
from compress.solvers import SolverConfig

NOT_YET = ("calibration", "quantize", "prune", "slim", "bench")


def model_from_recipe(recipe: Recipe) -> Denoiser:
    m = recipe.model
    flags = ScheduleFlags(m.num_train_timesteps, m.beta_schedule, m.beta_start, m.beta_end, m.prediction_type, tuple(m.sample_shape) if m.sample_shape else None)
    return load_model(m.ref, flags)


def validation_conditioning(denoiser: Denoiser, recipe: Recipe) -> torch.Tensor | None:
    if denoiser.conditioning != "class":
        return None
    labels = recipe.validate_.labels or list(range(denoiser.num_classes))
    return torch.tensor([labels[i % len(labels)] for i in range(recipe.validate_.samples)])


def timed_sample(denoiser, solver, noise, cond, device) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = sample(denoiser, solver, noise, cond, device=device)
    return out, (time.perf_counter() - start) * 1000


def run(recipe: Recipe, out: Path, force: bool = False, log=print) -> dict:
    for name in NOT_YET:
        if getattr(recipe, name):
            raise UserError(f"recipe section '{name}' is not available in this version of compress")
    checks = parse_checks(recipe.report.checks)
    denoiser = model_from_recipe(recipe)
    v = recipe.validate_
    guidance = recipe.solver.guidance_scale
    cond = validation_conditioning(denoiser, recipe)
    noise = make_noise(denoiser, v.samples, v.seed)
    reference = SolverConfig(v.reference.name, v.reference.steps, v.reference.spacing, guidance)
    reference.plan(denoiser.schedule)
    s = recipe.solver
    solver = resolve_solver(denoiser, s.name, s.steps, s.spacing, guidance, s.schedule, tuple(s.timesteps) if s.timesteps else None, s.options, log)
    device = default_device()

    with staged_folder(out, force) as root:
        manifest = Manifest(root, recipe.name)
        log(f"baseline: {reference.name}-{reference.steps} on {device} ({v.samples} samples)")
        baseline, baseline_ms = timed_sample(denoiser, reference, noise, cond, device)
        (root / "baseline").mkdir()
        save_file({"samples": baseline.contiguous(), "noise": noise.contiguous()}, str(root / "baseline" / "samples.safetensors"))
        manifest.add(root / "baseline" / "samples.safetensors", "safetensors", "baseline", recipe.section("validate"), device=str(device))
        save_grid(baseline, root / "baseline" / "grid.png", denoiser.data_range)

        log(f"solver: {solver.name}-{solver.steps} on {device}")
        few_step, few_ms = timed_sample(denoiser, solver, noise, cond, device)
        save_grid(few_step, root / "samples" / f"{solver.name}-{solver.steps}.png", denoiser.data_range)

        rows = [
            _row("baseline", reference, "torch", device, baseline_ms, baseline, baseline, denoiser, cond),
            _row(f"{solver.name}-{solver.steps}", solver, "torch", device, few_ms, few_step, baseline, denoiser, cond),
        ]
        if recipe.export:
            log(f"export: {', '.join(recipe.export.formats)}")
            records = export_artifacts(denoiser, solver, root / "artifacts", recipe.export.formats, recipe.export.batch_size, recipe.export.opset)
            for record in records:
                manifest.add(Path(record["path"]), record["format"], "export", recipe.section("export"), kind=record["kind"])
                manifest.add(Path(record["sidecar"]), "json", "export", recipe.section("export"), kind=f"{record['kind']}-sidecar")

        report = {"recipe": recipe.name, "environment": environment(device), "rows": rows}
        verdict = evaluate_checks(checks, [r for r in rows if r["artifact"] != "baseline"])
        report["checks"] = verdict
        write_json(root / "report" / "report.json", report)
        (root / "report" / "report.md").write_text(report_markdown(report))
        manifest.add(root / "report" / "report.json", "json", "report", recipe.section("report"))
        manifest.write(model=denoiser.describe(), seed=recipe.seed, solver=_solver_record(solver))
    return report


def _solver_record(solver: SolverConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(solver).items()}


def _row(name, solver, runtime, device, ms, samples, baseline, denoiser, cond) -> dict:
    row = {
        "artifact": name,
        "runtime": runtime,
        "device": str(device),
        "solver": solver.name,
        "steps": solver.steps,
        "latency_ms_per_sample": ms / samples.shape[0],
        "psnr": psnr(samples, baseline, denoiser.data_range[1] - denoiser.data_range[0]),
        "max_abs_error": float((samples - baseline).abs().max()),
    }
    if denoiser.source.startswith("zoo:"):
        from compress.metrics import DigitsJudge
        from compress.zoo.data import load_digits_tensors

        judge = DigitsJudge()
        held_out, _ = load_digits_tensors("heldout")
        row.update(judge.summary(samples, held_out, cond))
    return row


def environment(device) -> dict:
    import diffusers

    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": str(device),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
    }


def report_markdown(report: dict) -> str:
    rows = report["rows"]
    keys = [k for k in ("artifact", "runtime", "device", "solver", "steps", "latency_ms_per_sample", "psnr", "fd", "confident_share", "class_agreement") if any(k in r for r in rows)]
    lines = [f"# Report: {report['recipe']}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    env = report["environment"]
    lines += ["", f"Device: {env['device']} ({env['processor']}), torch {env['torch']}, {env['cpu_threads']} threads."]
    if report.get("checks"):
        lines += ["", "## Checks", ""] + [f"- {'PASS' if c['passed'] else 'FAIL'} `{c['check']}`" + (f" ({c['detail']})" if c.get("detail") else "") for c in report["checks"]]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)
