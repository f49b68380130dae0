"""`compress run`: the recipe's stages, top to bottom, into one output folder.

    baseline   the float32 model with the reference solver, from the recipe's seed
    prune/slim compressed variants of the model (model folders under models/)
    export     each variant with the few-step solver baked in: artifacts/<variant>/sampler.*
    quantize   calibration from each variant's own trajectories, then artifacts/<variant>-<scheme>/
    validate   every variant's module on torch and every artifact on every runtime that runs here,
               from the baseline's noise
    report     report/report.json, report.md, report.html, the Pareto plot, sample grids; checks

Every stage has a key (see compress.stage_cache); with ``resume`` a stage whose key and files are
unchanged is copied from the previous folder instead of being run again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch

from compress.checks import evaluate_checks, parse_checks
from compress.denoiser import Denoiser
from compress.errors import UserError
from compress.components import Pipeline
from compress.export_chain import add_openvino, drop_onnx, export_artifacts, pipeline_guidance, resolve_solver
from compress.images import save_grid
from compress.loading import ScheduleFlags, load_pipeline
from compress.outputs import MANIFEST, Manifest, staged_folder, write_json
from compress.recipe import Recipe
from compress.sampling import default_device, make_noise, sample
from compress.solvers import SolverConfig
from compress.stage_cache import StageCache, stage_key

GRID_SAMPLES = 64


class StageMeter:
    """Wall time and peak RSS of every stage a run performs (stages reused by --resume are not listed)."""

    def __init__(self):
        self.stages: dict[str, dict] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        from runtimes.bench import PeakRSS, Stopwatch

        with PeakRSS() as memory, Stopwatch() as clock:
            yield
        peak = memory.result()["peak_rss_mb"]
        self.stages[name] = {"seconds": round(clock.seconds, 1), "peak_rss_mb": None if peak is None else round(peak, 1)}


@dataclasses.dataclass
class StageConfigs:
    """The compression sections of the recipe as the engines' own config objects, validated up front."""

    prune: object | None = None
    slim: object | None = None
    calibration: object | None = None
    quantize: object | None = None


def stage_configs(recipe: Recipe) -> StageConfigs:
    configs = StageConfigs()
    if recipe.prune is not None:
        from compress.prune import PruneConfig

        configs.prune = PruneConfig.from_dict(recipe.prune)
    if recipe.slim is not None:
        from compress.slim import SlimConfig

        configs.slim = SlimConfig.from_dict(recipe.slim)
    if recipe.quantize is not None:
        from calibration import CalibrationConfig
        from compress.quantize import CALIBRATED, QuantizeConfig

        configs.quantize = QuantizeConfig.from_dict({"targets": ["sampler"], **recipe.quantize})
        if configs.quantize.scheme in CALIBRATED:
            configs.calibration = CalibrationConfig.from_dict(recipe.calibration)
        if not recipe.export:
            raise UserError("recipe: 'quantize' works on exported graphs; add an 'export' section")
    elif recipe.calibration is not None:
        raise UserError("recipe: a 'calibration' section needs a 'quantize' section that uses it")
    return configs


def model_from_recipe(recipe: Recipe) -> Denoiser:
    return pipeline_from_recipe(recipe).denoiser


def pipeline_from_recipe(recipe: Recipe) -> Pipeline:
    m = recipe.model
    flags = ScheduleFlags(m.num_train_timesteps, m.beta_schedule, m.beta_start, m.beta_end, m.prediction_type, tuple(m.sample_shape) if m.sample_shape else None)
    return load_pipeline(m.ref, flags)


def validation_prompts(pipeline: Pipeline, recipe: Recipe) -> tuple[list[str], torch.Tensor | None]:
    """The validation prompts cycled over the samples, and the prompted digit of each for zoo models."""
    n = recipe.validate_.samples
    if recipe.validate_.prompts:
        prompts = recipe.validate_.prompts
        return [prompts[i % len(prompts)] for i in range(n)], None
    if pipeline.denoiser.extra.get("data") == "digits":
        from compress.zoo.t2i import digit_prompts

        return digit_prompts(n)
    raise UserError("recipe: a text-to-image pipeline needs validate.prompts (the prompts every artifact is validated on)")


def validation_conditioning(denoiser: Denoiser, recipe: Recipe) -> torch.Tensor | None:
    n = recipe.validate_.samples
    if denoiser.conditioning == "class":
        labels = recipe.validate_.labels or list(range(denoiser.num_classes))
        return torch.tensor([labels[i % len(labels)] for i in range(n)])
    if denoiser.conditioning == "text":
        return torch.zeros((n, *denoiser.cond_shape))
    return None


def run(recipe: Recipe, out: Path, force: bool = False, resume: bool = False, log=print) -> dict:
    from calibration import model_hash

    configs = stage_configs(recipe)
    checks = parse_checks(recipe.report.checks)
    pipeline = pipeline_from_recipe(recipe)
    if recipe.export and recipe.export.resolution:
        if len(recipe.export.resolution) != 2:
            raise UserError(f"recipe: export.resolution is [height, width], got {recipe.export.resolution}")
        pipeline = pipeline.at_resolution(*recipe.export.resolution)
    denoiser = pipeline.denoiser
    text_to_image = pipeline.is_text_to_image
    if text_to_image and (configs.calibration is not None or configs.prune is not None or configs.slim is not None):
        pipeline.draw_from_prompts((configs.calibration and configs.calibration.prompts) or validation_prompts(pipeline, recipe)[0])
    v, s = recipe.validate_, recipe.solver
    guidance = s.guidance_scale if s.guidance_scale is not None else v.guidance_scale
    if text_to_image:
        guidance = pipeline_guidance(pipeline, guidance)
    reference = SolverConfig(v.reference.name, v.reference.steps, v.reference.spacing, guidance)
    reference.plan(denoiser.schedule)
    solver = resolve_solver(denoiser, s.name, s.steps, s.spacing, guidance, s.schedule, tuple(s.timesteps) if s.timesteps else None, s.options, log)
    solver_record = _solver_record(solver)
    device = default_device()
    out = Path(out)
    previous = out if resume and (out / MANIFEST).is_file() else None
    if resume and previous is None:
        log(f"resume: {out} holds no earlier run; running every stage")

    with staged_folder(out, force) as root:
        cache = StageCache(root, previous, log)
        manifest = Manifest(root, recipe.name)
        meter = StageMeter()
        model_key = model_hash(denoiser.module)

        key = stage_key(model=model_key, validate=recipe.section("validate"), guidance=guidance)
        baseline_dir = root / "baseline"
        if not cache.reuse("baseline", key):
            with meter("baseline"):
                if text_to_image:
                    log(f"baseline: diffusers' {pipeline.class_name} in float32, {reference.name}-{reference.steps} ({v.samples} samples, seed {v.seed})")
                    baseline = _image_baseline(pipeline, reference, recipe, guidance, log)
                else:
                    log(f"baseline: float32 {reference.name}-{reference.steps} on {device} ({v.samples} samples, seed {v.seed})")
                    baseline = _baseline(denoiser, reference, recipe, guidance, device)
                files = baseline.save(baseline_dir)
                save_grid(_load_baseline(baseline_dir, denoiser, text_to_image).samples[:GRID_SAMPLES], baseline_dir / "grid.png", _grid_range(pipeline))
                cache.done("baseline", key, [*files, baseline_dir / "grid.png"])
        baseline = _load_baseline(baseline_dir, denoiser, text_to_image)
        for path in sorted(baseline_dir.iterdir()):
            manifest.add(path, path.suffix.lstrip("."), "baseline", recipe.section("validate"), device=baseline.info["device"])

        variants = {"float32": (denoiser, model_key)}
        for stage in ("prune", "slim"):
            config = getattr(configs, stage)
            if config is not None:
                variants[_variant_name(stage)] = _transform(stage, config, denoiser, model_key, root, cache, manifest, recipe, meter, log)

        grids = {"baseline": "../baseline/grid.png"}
        artifacts: list[tuple[str, Path, Denoiser]] = []
        if text_to_image:
            rows = [_image_baseline_row(baseline, pipeline, reference)]
        else:
            rows = [_baseline_row(baseline, denoiser, reference, device)]
        for name, (model, weights_key) in variants.items():
            with meter(f"validate {name} on torch"):
                if text_to_image:  # a pruned or slim denoiser inside the same text encoder and VAE
                    variant = pipeline.with_denoiser(model)
                    row, samples = _torch_image_row(name, variant, solver, baseline, recipe.bench, log)
                else:
                    row, samples = _torch_row(name, model, solver, baseline, recipe.bench, log)
            rows.append(row)
            grids[_label(row)] = _grid(root, row, samples, pipeline)
            if recipe.export:
                artifacts += _export(name, variant if text_to_image else model, weights_key, solver, solver_record, recipe, configs, root, cache,
                                     manifest, meter, log)

        from runtimes.text_to_image import validate_pipeline_folder
        from runtimes.validate import validate_artifact

        for name, path, model in artifacts:
            def keep_grid(row, samples):
                grids[_label(row)] = _grid(root, row, samples, pipeline)

            with meter(f"validate {name}/{'pipeline' if text_to_image else path.name}"):
                if text_to_image:
                    found = validate_pipeline_folder(path, baseline, f"{name}/pipeline", recipe.bench.runtimes, recipe.bench.runs, log, keep_grid)
                else:
                    found = validate_artifact(path, baseline, f"{name}/{path.name}", recipe.bench.runtimes, recipe.bench.runs, log, keep_grid)
            for row in found:
                row["macs"] = _macs(model, row.get("nfe"), guidance)
                rows.append(row)

        base_latency = rows[0]["latency_ms"]
        for row in rows:
            if row.get("latency_ms"):
                row["speedup"] = base_latency / row["latency_ms"]
        report = {
            "recipe": recipe.name,
            "environment": environment(device),
            "baseline": {**baseline.info, "samples": v.samples, "seed": v.seed},
            "rows": rows,
            "stages": meter.stages,
        }
        measured = [r for r in rows if r["artifact"] != "baseline" and r.get("status", "ok") == "ok"]
        report["checks"] = evaluate_checks(checks, measured) if checks else []
        if configs.quantize is not None and configs.quantize.target_psnr is not None:
            report["quantization_targets"] = _quantization_targets(root)
            if configs.quantize.require_target:
                report["checks"] += [{"check": f"quantize target_psnr>={t['target_psnr']:g} ({t['artifact']})", "passed": t["met"],
                                      "detail": "" if t["met"] else t["message"]} for t in report["quantization_targets"]]
        from runtimes.report import write_report

        write_json(root / "report" / "report.json", report)
        for path in [root / "report" / "report.json", *write_report(report, root / "report", grids)]:
            manifest.add(path, path.suffix.lstrip("."), "report", recipe.section("report"))
        manifest.write(model=denoiser.describe(), seed=recipe.seed, solver=solver_record, stages=cache.stages)
    return report


# ----------------------------------------------------------------------------- stages


def _baseline(denoiser, reference, recipe, guidance, device):
    from runtimes.validate import Baseline

    v = recipe.validate_
    noise = make_noise(denoiser, v.samples, v.seed)
    cond = validation_conditioning(denoiser, recipe)
    samples = sample(denoiser, reference, noise, cond, device=device)
    info = {"solver": f"{reference.name}-{reference.steps}", "device": str(device), "nfe": reference.steps,
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    return Baseline(samples.float().cpu(), noise, cond, guidance, denoiser.data_range, info)


def _image_baseline(pipeline: Pipeline, reference: SolverConfig, recipe: Recipe, guidance, log):
    """diffusers' own pipeline from the recipe's latent noise and prompts: the images every artifact is held to."""
    from runtimes.text_to_image import ImageBaseline, diffusers_images, diffusers_pipeline

    v = recipe.validate_
    prompts, labels = validation_prompts(pipeline, recipe)
    pipeline.check_prompts(prompts + [v.negative_prompt or ""], log=log)
    noise = make_noise(pipeline.denoiser, v.samples, v.seed)
    pipe = diffusers_pipeline(pipeline.extra["folder"], reference.name)
    start = time.perf_counter()
    images = diffusers_images(pipe, prompts, noise, reference.steps, guidance, v.negative_prompt)
    info = {"solver": f"{reference.name}-{reference.steps}", "scheduler": type(pipe.scheduler).__name__, "device": "cpu", "nfe": reference.steps,
            "pipeline": pipeline.class_name, "seconds": time.perf_counter() - start}
    return ImageBaseline(images, noise, prompts, v.negative_prompt, guidance, labels, info)


def _load_baseline(folder: Path, denoiser: Denoiser, text_to_image: bool = False):
    from runtimes.text_to_image import ImageBaseline
    from runtimes.validate import Baseline

    judge = held_out = None
    if denoiser.extra.get("data") == "digits":
        from compress.metrics import DigitsJudge
        from compress.zoo.data import load_digits_tensors

        judge, (held_out, _) = DigitsJudge(), load_digits_tensors("heldout")
    return (ImageBaseline if text_to_image else Baseline).load(folder, judge=judge, held_out=held_out)


def _grid_range(pipeline: Pipeline) -> tuple[float, float]:
    return (0.0, 1.0) if pipeline.is_text_to_image else pipeline.denoiser.data_range


def _conditions_key(denoiser: Denoiser) -> dict:
    """A stage that draws from the encoded prompts depends on them (the recipe may leave them to the validation prompts)."""
    pool = denoiser.condition_pool
    if pool is None:
        return {}
    parts = [pool[k] for k in sorted(pool)] if isinstance(pool, dict) else [pool]
    return {"conditions": hashlib.sha256(b"".join(p.contiguous().numpy().tobytes() for p in parts)).hexdigest()[:16]}


def _variant_name(stage: str) -> str:
    return {"prune": "pruned", "slim": "slim"}[stage]


def _transform(stage, config, denoiser, model_key, root, cache, manifest, recipe, meter, log):
    """Runs prune or slim (or reuses its model folder) and returns (model, weights hash)."""
    from calibration import model_hash
    from compress.model_folder import load_model_folder

    name = _variant_name(stage)
    folder = root / "models" / name
    key = stage_key(model=model_key, section=config.to_dict(), seed=recipe.seed, **_conditions_key(denoiser))
    if not cache.reuse(stage, key):
        log(f"{stage}: " + ", ".join(f"{k}={v}" for k, v in (recipe.section(stage) or {}).items()))
        with meter(stage):
            if stage == "prune":
                from compress.prune import prune, save_pruned

                save_pruned(prune(denoiser, config), folder)
            else:
                from compress.slim import save_student, slim

                save_student(slim(denoiser, config), folder)
        cache.done(stage, key, [folder])
    model = load_model_folder(folder)
    model.source = f"models/{name}"  # relative to the output folder, which may be moved
    if "data" in denoiser.extra:  # a slim student starts from an empty extra
        model.extra.setdefault("data", denoiser.extra["data"])
    for path in sorted(folder.iterdir()):
        manifest.add(path, path.suffix.lstrip("."), stage, recipe.section(stage))
    return model, model_hash(model.module)


def _export(name, model, weights_key, solver, solver_record, recipe, configs, root, cache, manifest, meter, log) -> list:
    """Exports one variant (and its quantized copy); returns (variant, sampler file, model) per artifact to validate."""
    folder = root / "artifacts" / name
    export_section = recipe.section("export")
    key = stage_key(model=weights_key, solver=solver_record, export=export_section)
    pipeline = model if isinstance(model, Pipeline) else None
    if pipeline is not None:
        model = pipeline.denoiser
    if not cache.reuse(f"export/{name}", key):
        log(f"export {name}: {', '.join(recipe.export.formats)}")
        with meter(f"export {name}"):
            export_artifacts(pipeline or model, solver, folder, recipe.export.formats, recipe.export.batch_size, recipe.export.opset,
                             **({"output": recipe.export.output} if pipeline is not None else {}), coreml=recipe.export.coreml.export_options())
        cache.done(f"export/{name}", key, [folder])
    _add_folder(manifest, root, folder, "export", export_section)
    out = [(name, folder, model)] if pipeline is not None else [(name, p, model) for p in _samplers(folder)]

    if configs.quantize is not None:
        qname = f"{name}-{configs.quantize.scheme}"
        qfolder = root / "artifacts" / qname
        calib_key = None
        calib_path = root / "calibration" / f"{name}.safetensors"
        if configs.calibration is not None:
            calib_key = stage_key(model=weights_key, calibration=configs.calibration.to_dict(), solver=solver_record, **_conditions_key(model))
            if not cache.reuse(f"calibration/{name}", calib_key):
                from calibration import calibrate, save_calibration

                log(f"calibration {name}: {configs.calibration.sampler}, {configs.calibration.samples} states")
                solver_config = solver if configs.calibration.sampler == "solver" else None
                final_latents = solver if pipeline is not None else None  # what the pipeline's decoder is calibrated on
                with meter(f"calibration {name}"):
                    save_calibration(calibrate(model, configs.calibration, solver_config, device="cpu", final_latents=final_latents), calib_path)
                cache.done(f"calibration/{name}", calib_key, [calib_path])
            manifest.add(calib_path, "safetensors", "calibration", recipe.calibration)
        qkey = stage_key(export=key, calibration=calib_key, quantize=configs.quantize.to_dict(), formats=recipe.export.formats)
        if not cache.reuse(f"quantize/{name}", qkey):
            from compress.quantize import missed_targets, quantize_
            from calibration import load_calibration

            log(f"quantize {name}: {configs.quantize.scheme}")
            calib = load_calibration(calib_path) if configs.calibration is not None else None
            with meter(f"quantize {name}"):
                records = quantize_(folder, calib, configs.quantize, out_dir=qfolder, progress=log)
                for message in missed_targets(records):
                    log(f"warning: {message}")
                if "openvino" in recipe.export.formats:
                    add_openvino(records, qfolder)
                if "onnx" not in recipe.export.formats:
                    drop_onnx(records, qfolder)
            cache.done(f"quantize/{name}", qkey, [qfolder])
        _add_folder(manifest, root, qfolder, "quantize", recipe.quantize)
        out += [(qname, qfolder, model)] if pipeline is not None else [(qname, p, model) for p in _samplers(qfolder)]
    return out


def _quantization_targets(root: Path) -> list[dict]:
    """The quality target each quantized sampler reached (from its sidecar: cached stages have no records)."""
    found = []
    for sidecar in sorted((root / "artifacts").glob("*/sampler.json")):
        target = json.loads(sidecar.read_text()).get("quantization", {}).get("target")
        if target:
            found.append({"artifact": f"{sidecar.parent.name}/sampler", **{k: target.get(k) for k in ("target_psnr", "psnr", "met", "message")},
                          "float_layers": [x["layer"] for x in target.get("float_layers", [])]})
    return found


def _samplers(folder: Path) -> list[Path]:
    return [p for suffix in (".onnx", ".xml", ".mlpackage") for p in sorted(folder.glob(f"sampler{suffix}"))]


def _add_folder(manifest: Manifest, root: Path, folder: Path, stage: str, section) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        manifest.add(path, path.suffix.lstrip("."), stage, section)


# ----------------------------------------------------------------------------- rows


def _baseline_row(baseline, denoiser, reference, device) -> dict:
    """The reference sampler's row; its latency is measured now, on this machine, like every other row's."""
    times = []
    cond = None if baseline.cond is None else baseline.cond[:1]
    for _ in range(3):
        start = time.perf_counter()
        sample(denoiser, reference, baseline.noise[:1], cond, device=device, show_progress=False)
        times.append((time.perf_counter() - start) * 1000)
    info = baseline.info
    return {"artifact": "baseline", "runtime": "torch" if device.type == "cpu" else f"torch-{device.type}", "device": str(device),
            "status": "ok", "scheme": "float32", "solver": info["solver"], "nfe": info["nfe"], "latency_ms": sorted(times)[1],
            "params": sum(p.numel() for p in denoiser.module.parameters()),
            "macs": _macs(denoiser, info["nfe"], baseline.guidance_scale), **baseline.quality(baseline.samples)}


def _image_baseline_row(baseline, pipeline: Pipeline, reference) -> dict:
    """diffusers' pipeline with the reference scheduler; its latency (prompt -> image, batch 1) measured now."""
    from runtimes.text_to_image import diffusers_images, diffusers_pipeline

    pipe = diffusers_pipeline(pipeline.extra["folder"], reference.name)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        diffusers_images(pipe, baseline.prompts[:1], baseline.noise[:1], reference.steps, baseline.guidance_scale, baseline.negative_prompt, show_progress=False)
        times.append((time.perf_counter() - start) * 1000)
    info = baseline.info
    return {"artifact": "baseline", "runtime": "diffusers", "device": "cpu", "status": "ok", "scheme": "float32", "solver": info["solver"],
            "nfe": info["nfe"], "latency_ms": sorted(times)[1], "params": pipeline.parameters(),
            "macs": _macs(pipeline.denoiser, info["nfe"], baseline.guidance_scale), **baseline.quality(baseline.images)}


def _torch_image_row(name, pipeline: Pipeline, solver, baseline, bench, log) -> tuple[dict, torch.Tensor]:
    """The pipeline's own modules with the few-step solver and the decoder baked in, on torch."""
    from compress.components import LatentDecoder
    from compress.denoiser import SHARED_CONDITION_KEYS
    from export.sampler_graph import NEGATIVE, SamplerGraph

    log(f"validate: {name} modules ({solver.name}-{solver.steps}, decoder baked in) on torch")
    guidance = solver.guidance_scale is not None
    graph = SamplerGraph(pipeline.denoiser, solver, guidance=guidance, decoder=LatentDecoder(pipeline.vae), negative_inputs=guidance)

    def named(cond, prefix=""):
        parts = cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}
        return {prefix + k: v for k, v in parts.items() if not (prefix and k in SHARED_CONDITION_KEYS)}

    def generate(rows: slice, prompts: list[str]) -> torch.Tensor:
        feeds = named(pipeline.encode_prompts(prompts))
        if guidance:
            feeds.update(named(pipeline.negative_condition(len(prompts), baseline.negative_prompt), NEGATIVE))
            feeds["guidance_scale"] = torch.tensor([float(solver.guidance_scale)])
        return graph(baseline.noise[rows], *[feeds[n] for n in graph.input_names[1:]])

    with torch.no_grad():
        images = torch.cat([generate(slice(i, i + 32), baseline.prompts[i : i + 32]) for i in range(0, len(baseline.prompts), 32)])
        times = []
        for _ in range(max(3, min(bench.runs, 5))):
            start = time.perf_counter()
            generate(slice(0, 1), baseline.prompts[:1])
            times.append((time.perf_counter() - start) * 1000)
    nfe = graph.table.evaluations
    row = {"artifact": f"{name}/modules", "runtime": "torch", "device": "cpu", "status": "ok", "scheme": "float32", "solver": solver.name,
           "steps": solver.steps, "nfe": nfe, "batch": 1, "latency_ms": float(np.median(times)),
           "params": pipeline.parameters(),
           "macs": _macs(pipeline.denoiser, nfe, baseline.guidance_scale), **baseline.quality(images)}
    return row, images


def _torch_row(name, model, solver, baseline, bench, log) -> tuple[dict, torch.Tensor]:
    """The variant's own module with the few-step solver, on torch: the float reference of its artifacts."""
    from export.sampler_graph import SamplerGraph
    from export.sidecar import sampler_sidecar
    from runtimes.artifacts import Artifact
    from runtimes.torch_runner import TorchRunner
    from runtimes.validate import latency, run_all

    log(f"validate: {name} module ({solver.name}-{solver.steps}) on torch")
    graph = SamplerGraph(model, solver)
    artifact = Artifact(Path(f"{name}/module"), "torch", sampler_sidecar(graph, "torch", "", None))
    runner = TorchRunner("cpu").load_module(graph)
    samples = run_all(runner, artifact, baseline)
    nfe = graph.table.evaluations
    row = {"artifact": f"{name}/module", "runtime": "torch", "device": "cpu", "status": "ok", "scheme": "float32",
            "solver": solver.name, "steps": solver.steps, "nfe": nfe, "params": sum(p.numel() for p in model.module.parameters()),
            "macs": _macs(model, nfe, baseline.guidance_scale), **latency(runner, artifact, baseline, bench.runs),
            **baseline.quality(samples)}
    return row, samples


def _macs(model: Denoiser, nfe: int | None, guidance) -> int | None:
    """MACs of one whole sample: network MACs x evaluations (x2 with guidance: both halves run)."""
    if nfe is None:
        return None
    if "macs_per_call" not in model.extra:
        from compress.stats import count_macs

        model.extra["macs_per_call"] = count_macs(model)["macs"]
    classifier_free = guidance is not None and model.supports_guidance and not model.guidance_embedded
    return model.extra["macs_per_call"] * nfe * (2 if classifier_free else 1)


def _label(row: dict) -> str:
    return row["artifact"] if row["runtime"] == "torch" else f"{row['artifact']} @ {row['runtime']}"


def _grid(root: Path, row: dict, samples: torch.Tensor, model: Denoiser | Pipeline) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", _label(row)).strip("-")
    path = root / "report" / "grids" / f"{slug}.png"
    save_grid(samples[:GRID_SAMPLES], path, _grid_range(model) if isinstance(model, Pipeline) else model.data_range)
    return f"grids/{path.name}"


def _solver_record(solver: SolverConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(solver).items()}


def environment(device) -> dict:
    import importlib.metadata as md

    from runtimes.bench import processor_name

    libraries = {}
    for name in ("torch", "diffusers", "onnxruntime", "openvino", "nncf", "coremltools", "torch-pruning"):
        try:
            libraries[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return {
        "machine": platform.machine(),
        "processor": processor_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "device": str(device),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "libraries": libraries,
    }
