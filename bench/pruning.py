"""Structured pruning of zoo:digits: quality and cost over ratios x methods, and the memory of the
trajectory-mask search with and without time-step gradient checkpointing.

Writes bench/results/pruning.{json,md}. Run (each phase can run on its own; results merge):

    nice -n 10 python bench/pruning.py --phase memory [--memory-models zoo:digits,zoo:digits-flow]
    nice -n 10 python bench/pruning.py --phase table [--headline-minutes 15 --short-minutes 2] [--fresh]
    nice -n 10 python bench/pruning.py --phase quantized
    nice -n 10 python bench/pruning.py --phase report
    nice -n 10 python bench/pruning.py --phase flow [--flow-ratio 0.4 --headline-minutes 15]

Quality: 256 samples with DPM-Solver++(2M), 20 steps, from the same noise for every model; FD of
zoo-classifier features against the held-out digits; PSNR of each model's samples against the
original's. Latency: onnxruntime CPU, one thread, batch 1, the exported 8-step dpmpp-2m sampler, timed by
runtimes/bench.py (the toolkit's one timing path).
Memory: peak RSS of a fresh process per point, above its own baseline after loading the model.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from runtimes.bench import Stopwatch, benchmark, paired_benchmark, processor_name
from runtimes.onnxruntime_runner import OnnxRuntimeRunner

RESULTS = Path(__file__).parent / "results"
JSON_PATH, MD_PATH = RESULTS / "pruning.json", RESULTS / "pruning.md"
N_SAMPLES, QUALITY_SOLVER, QUALITY_STEPS = 256, "dpmpp-2m", 20
LATENCY_SOLVER, LATENCY_STEPS, LATENCY_RUNS = "dpmpp-2m", 8, 30
MEMORY_STEPS = (5, 10, 25, 50)
MEMORY_MODELS = {"zoo:digits": "ddim", "zoo:digits-flow": "euler"}  # model: the solver its search runs
MEMORY_BATCH = 16
QUANTIZED_ROUNDS, QUANTIZED_RUNS = 5, 4  # float and int8 in alternation: 5 rounds of 4 timed runs each
HEADLINE_FOLDER = Path(tempfile.gettempdir()) / "diffusion-compress-pruning-headline"


def _load() -> dict:
    return json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else {}


def _save(data: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    JSON_PATH.write_text(json.dumps(data, indent=2) + "\n")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------- memory


def memory_point(model: str, steps: int, checkpointing: bool) -> dict:
    """One mask-search iteration (forward + backward over the whole trajectory) in this fresh process."""
    from compress.loading import load_pipeline
    from compress.solvers import SolverConfig, run_table
    from compress.zoo.t2i import digit_prompts
    from compress.trajectory_mask import HardConcreteGates, gate_sites, make_network, trajectory_loss_backward

    torch.set_num_threads(1)
    pipeline = load_pipeline(model)
    denoiser = pipeline.denoiser
    for p in denoiser.module.parameters():
        p.requires_grad_(False)
    gates = HardConcreteGates(gate_sites(denoiser.module))
    table = SolverConfig(MEMORY_MODELS[model], steps).table(denoiser.schedule, denoiser.prediction_type)
    noise = torch.randn((MEMORY_BATCH, *denoiser.sample_shape), generator=torch.Generator().manual_seed(0))
    cond = pipeline.encode_prompts(digit_prompts(MEMORY_BATCH)[0]) if pipeline.text_encoders else None
    network = make_network(denoiser, cond, None)
    with torch.no_grad():
        network(noise, 500.0)  # allocator and library warm-up count towards the baseline
        gates.enabled = False
        reference = run_table(table, network, noise)
        gates.enabled = True
    baseline = _rss_mib()
    gates.resample(torch.Generator().manual_seed(1))
    with Stopwatch() as clock:
        loss = trajectory_loss_backward(table, network, noise, reference, checkpointing)
    peak = _rss_mib()
    return {"model": model, "solver": MEMORY_MODELS[model], "steps": steps, "checkpointing": checkpointing, "batch": MEMORY_BATCH,
            "baseline_mib": round(baseline, 1), "peak_mib": round(peak, 1), "search_mib": round(peak - baseline, 1),
            "seconds": round(clock.seconds, 2), "loss": loss}


def run_memory(models: list[str], rows: list[dict]) -> list[dict]:
    """Measures every point of ``models``; the rows of other models stay as they were."""
    rows = [r for r in rows if r.get("model", "zoo:digits") not in models]
    for model in models:
        for checkpointing in (True, False):
            for steps in MEMORY_STEPS:
                out = subprocess.run([sys.executable, __file__, "--memory-point", str(steps), "--checkpointing", str(int(checkpointing)),
                                      "--memory-models", model], capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                print(row, flush=True)
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------- quality table


def ort_latency(denoiser, repeats: int = LATENCY_RUNS) -> tuple[float, float]:
    """Median and p90 ms of the exported 8-step sampler on onnxruntime CPU, one thread, batch 1 (runtimes.bench.benchmark)."""
    from compress.solvers import SolverConfig
    from export.onnx_export import export_onnx

    with tempfile.TemporaryDirectory() as folder:
        export_onnx(denoiser, SolverConfig(LATENCY_SOLVER, LATENCY_STEPS), folder)
        runner = OnnxRuntimeRunner(threads=1).load(Path(folder) / "sampler.onnx")
        feeds = {"noise": np.random.default_rng(0).standard_normal((1, *denoiser.sample_shape)).astype(np.float32)}
        latency = benchmark(runner, feeds, runs=repeats, warmup=3)["latency_ms"]
    return latency["median"], latency["p90"]


def evaluate(denoiser, judge, held_out, noise, reference) -> dict:
    from compress.metrics import psnr
    from compress.sampling import sample
    from compress.solvers import SolverConfig
    from compress.stats import count_macs

    samples = sample(denoiser, SolverConfig(QUALITY_SOLVER, QUALITY_STEPS), noise, device="cpu", show_progress=False)
    cost = count_macs(denoiser)
    median, p90 = ort_latency(denoiser)
    return {"parameters": cost["parameters"], "macs": cost["macs"], "fd": judge.fd(samples, held_out),
            "confident_share": judge.confident_share(samples),
            "psnr_vs_original": None if reference is None else psnr(samples, reference), "latency_ms": median, "latency_p90_ms": p90,
            "samples": samples}


def run_table(ratios, methods, headline, headline_minutes: float, short_minutes: float, data: dict) -> None:
    from compress.loading import load_model
    from compress.metrics import DigitsJudge
    from compress.prune import PruneConfig, prune, save_pruned
    from compress.sampling import make_noise
    from compress.zoo.data import load_digits_tensors

    torch.set_num_threads(1)
    judge = DigitsJudge()
    held_out, _ = load_digits_tensors("heldout")
    original = load_model("zoo:digits")
    noise = make_noise(original, N_SAMPLES, seed=0)
    base = evaluate(original, judge, held_out, noise, None)
    reference = base.pop("samples")
    data["original"] = base
    rows = data.setdefault("rows", [])
    _save(data)
    print("original", base, flush=True)

    def record(method, ratio, minutes, label):
        done = {(r["method"], r["ratio"], r["finetune"]) for r in rows}
        if (method, ratio, label) in done:
            return
        # Steps far beyond the budget: the wall-clock cap ends the fine-tune (the cosine schedule is then cut short).
        config = PruneConfig(method=method, ratio=ratio, finetune_steps=100_000 if minutes > 0 else 0,
                             finetune_seconds=minutes * 60 if minutes > 0 else None, batch_size=64, lr=1e-3, ema=0.999,
                             data_samples=1024, mask_iterations=60, mask_steps=10, mask_batch=8)
        with Stopwatch() as clock:
            pruned = prune(original, config, progress=print)
            if label != "none" and (method, ratio) == tuple(headline):
                save_pruned(pruned, HEADLINE_FOLDER)
        row = evaluate(pruned, judge, held_out, noise, reference)
        row.pop("samples")
        info = pruned.extra["pruning"]
        row.update(method=method, ratio=ratio, finetune=label, seconds=round(clock.seconds, 1),
                   finetune_steps=(info["finetune"] or {}).get("steps", 0), macs_reduction=1 - row["macs"] / base["macs"],
                   fd_vs_original=row["fd"] / base["fd"] - 1)
        rows.append(row)
        _save(data)
        print(json.dumps(row), flush=True)

    # Headline first: the configuration that has to meet the bar.
    record(headline[0], headline[1], headline_minutes, f"{headline_minutes:g} min")
    for method in methods:
        for ratio in ratios:
            record(method, ratio, 0, "none")
    for method in methods if short_minutes > 0 else []:
        if (method, headline[1]) != tuple(headline):
            record(method, headline[1], short_minutes, f"{short_minutes:g} min")


FLOW_GUIDANCE = 1.5  # as bench/flow_solvers.py


def run_flow(data: dict, ratio: float, minutes: float) -> None:
    """zoo:digits-flow's SD3 transformer: Taylor pruning of heads and feed-forward neurons, a fine-tune capped at
    ``minutes``; FD and prompted-digit share of 256 guided prompts (DPM-Solver++(2M), 20 steps) before and after."""
    from compress.loading import load_pipeline
    from compress.metrics import DigitsJudge
    from compress.prune import PruneConfig, prune
    from compress.sampling import make_noise, sample
    from compress.solvers import SolverConfig
    from compress.stats import count_macs
    from compress.zoo.data import load_digits_tensors
    from compress.zoo.t2i import all_prompts, digit_prompts
    from runtimes.text_to_image import digit_view

    pipeline = load_pipeline("zoo:digits-flow")
    pipeline.draw_from_prompts(all_prompts()[1:])
    prompts, labels = digit_prompts(N_SAMPLES)
    cond = pipeline.encode_prompts(prompts)
    noise = make_noise(pipeline.denoiser, N_SAMPLES, seed=0)
    judge, held_out = DigitsJudge(), load_digits_tensors("heldout")[0]

    def quality(denoiser) -> dict:
        solver = SolverConfig(QUALITY_SOLVER, QUALITY_STEPS, guidance_scale=FLOW_GUIDANCE)
        view = digit_view(pipeline.decode(sample(denoiser, solver, noise, cond=cond, batch_size=64, show_progress=False)))
        return {**count_macs(denoiser), "fd": judge.fd(view, held_out), "prompted_digit_share": judge.agreement(view, labels)}

    base = quality(pipeline.denoiser)
    print("original", base, flush=True)
    config = PruneConfig(method="taylor", ratio=ratio, finetune_steps=100_000, finetune_seconds=minutes * 60, batch_size=64, lr=1e-3,
                         ema=0.999, data_samples=1024)
    with Stopwatch() as clock:
        pruned = prune(pipeline.denoiser, config, progress=print)
    row = quality(pruned)
    info = pruned.extra["pruning"]
    row.update(method="taylor", ratio=ratio, finetune=f"{minutes:g} min", seconds=round(clock.seconds, 1),
               finetune_steps=(info["finetune"] or {}).get("steps", 0), macs_reduction=1 - row["macs"] / base["macs"],
               fd_vs_original=row["fd"] / base["fd"] - 1)
    data["flow"] = {"model": "zoo:digits-flow", "guidance_scale": FLOW_GUIDANCE, "threads": torch.get_num_threads(), "original": base, "pruned": row}
    _save(data)
    print(json.dumps(row), flush=True)


def run_quantized(data: dict, headline) -> None:
    """The headline pruned model through export, W8A8 quantization and onnxruntime."""
    from calibration import CalibrationConfig, calibrate
    from compress.loading import load_model
    from compress.metrics import psnr
    from compress.quantize import QuantizeConfig, quantize_
    from compress.solvers import SolverConfig
    from export.onnx_export import export_onnx

    folder = HEADLINE_FOLDER
    if not folder.is_dir():
        print("no saved headline model; run --phase table first")
        return
    pruned = load_model(str(folder))
    solver = SolverConfig(LATENCY_SOLVER, LATENCY_STEPS)
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(pruned, solver, Path(tmp) / "float")
        calib = calibrate(pruned, CalibrationConfig(sampler="solver", samples=64, trajectory_steps=20), solver)
        (record,) = quantize_(Path(tmp) / "float", calib, QuantizeConfig(scheme="w8a8", targets=["sampler"], subset_size=64), out_dir=Path(tmp) / "int8")
        noise = np.random.default_rng(0).standard_normal((64, *pruned.sample_shape)).astype(np.float32)
        paths = {"float": Path(tmp) / "float" / "sampler.onnx", "int8": Path(record["path"])}
        runners = {kind: OnnxRuntimeRunner(threads=1).load(path) for kind, path in paths.items()}
        out = {kind: runner.run({"noise": noise}) for kind, runner in runners.items()}
        latency = paired_benchmark(runners, {"noise": noise[:1]}, rounds=QUANTIZED_ROUNDS, runs=QUANTIZED_RUNS)
        for kind, path in paths.items():
            out[f"{kind}_ms"] = latency[kind]["median_ms"]
            out[f"{kind}_bytes"] = path.stat().st_size
    data["quantized"] = {"model": f"{headline[0]} ratio {headline[1]}", "scheme": "w8a8 per-step", "solver": f"{LATENCY_SOLVER}-{LATENCY_STEPS}",
                         "psnr_int8_vs_float": psnr(torch.from_numpy(out["int8"]), torch.from_numpy(out["float"])),
                         "float_ms": out["float_ms"], "int8_ms": out["int8_ms"], "float_bytes": out["float_bytes"], "int8_bytes": out["int8_bytes"]}
    _save(data)
    print(data["quantized"], flush=True)


# ----------------------------------------------------------------------------- report


def write_markdown(data: dict) -> None:
    lines = ["# Structured pruning of zoo:digits", ""]
    env = data.get("environment", {})
    loads = ", ".join(f"{phase} {load:.2f}" for phase, load in data.get("load_average", {}).items())
    lines += [f"Machine: {env.get('processor', '?')}, torch {env.get('torch', '?')}, one thread per process"
              + (f" (1-minute load average when each phase began: {loads})." if loads else "."),
              "Quality: 256 samples, DPM-Solver++(2M) 20 steps, the same noise for every model; FD of",
              "zoo-classifier features against the held-out digits (lower is better); PSNR of each model's samples against the",
              "original's from the same noise. Latency: the exported 8-step dpmpp-2m `sampler.onnx` on onnxruntime CPU, batch 1,",
              f"one thread, median of {LATENCY_RUNS} runs after 3 warm-up runs (`runtimes.bench.benchmark`). Fine-tune: distillation from the original",
              "(output matching, EMA 0.999, batch 64, lr 1e-3, x0 from 1024 of the original's own samples), stopped at the wall-clock",
              "budget in the `fine-tune` column.", ""]
    base = data.get("original")
    if base:
        lines += ["| method | ratio | fine-tune | params | MACs | MACs saved | FD | FD vs original | PSNR vs original | ORT latency ms |",
                  "|---|---|---|---|---|---|---|---|---|---|",
                  f"| original | - | - | {base['parameters'] / 1e6:.3f}M | {base['macs'] / 1e6:.1f}M | - | {base['fd']:.2f} | - | - | {base['latency_ms']:.2f} |"]
        for r in data.get("rows", []):
            lines.append(f"| {r['method']} | {r['ratio']} | {r['finetune']} ({r['finetune_steps']} steps) | {r['parameters'] / 1e6:.3f}M | "
                         f"{r['macs'] / 1e6:.1f}M | {r['macs_reduction']:.0%} | {r['fd']:.2f} | {r['fd_vs_original']:+.0%} | "
                         f"{r['psnr_vs_original']:.1f} dB | {r['latency_ms']:.2f} |")
        lines.append("")
        tuned = [r for r in data.get("rows", []) if r["finetune"] != "none"]
        for r in tuned[:1]:
            ok_macs, ok_fd = r["macs_reduction"] >= 0.4, r["fd_vs_original"] <= 0.15
            lines += [f"**Headline** ({r['method']}, ratio {r['ratio']}, {r['finetune']} of fine-tune = {r['finetune_steps']} steps): "
                      f"{r['macs_reduction']:.0%} fewer MACs ({'meets' if ok_macs else 'misses'} the 40% bar), FD {r['fd']:.1f} vs "
                      f"{base['fd']:.1f} ({r['fd_vs_original']:+.0%}; {'meets' if ok_fd else 'misses'} the 15% bar).", ""]
    if data.get("quantized"):
        q = data["quantized"]
        lines += ["## Pruned, then quantized", "",
                  f"The headline model ({q['model']}) exported as `sampler.onnx` ({q['solver']}), quantized {q['scheme']} with NNCF, run on onnxruntime:",
                  f"int8 vs float samples PSNR {q['psnr_int8_vs_float']:.1f} dB; file {q['float_bytes'] / 1e6:.2f} MB -> {q['int8_bytes'] / 1e6:.2f} MB; "
                  f"batch-1 latency {q['float_ms']:.2f} -> {q['int8_ms']:.2f} ms (`runtimes.bench.paired_benchmark`: float and int8 in alternation, "
                  f"the median of {QUANTIZED_ROUNDS} rounds' medians of {QUANTIZED_RUNS} runs, one thread).", ""]
    if data.get("memory"):
        lines += ["## Memory of the mask search", "",
                  f"One search iteration (gated trajectory forward + backward to every gate), batch {MEMORY_BATCH}; peak RSS of a fresh",
                  "process above its baseline after loading the model and one warm-up pass. zoo:digits is the UNet with DDIM;",
                  "zoo:digits-flow is the SD3-style flow transformer with Euler, prompted (gates on its joint attention heads,",
                  "both streams, and on its feed-forward neurons).", ""]
        for model, solver in MEMORY_MODELS.items():
            by = {(r["steps"], r["checkpointing"]): r for r in data["memory"] if r.get("model", "zoo:digits") == model}
            if not by:
                continue
            lines += [f"**{model}** ({solver})", "", "| steps | with time-step checkpointing MiB | seconds | without MiB | seconds |", "|---|---|---|---|---|"]
            for steps in MEMORY_STEPS:
                a, b = by.get((steps, True)), by.get((steps, False))
                if a and b:
                    lines.append(f"| {steps} | {a['search_mib']:.1f} | {a['seconds']:.2f} | {b['search_mib']:.1f} | {b['seconds']:.2f} |")
            (a5, a50), (b5, b50) = ((by.get((5, c)), by.get((50, c))) for c in (True, False))
            if a5 and a50 and b5 and b50:
                lines += ["", f"With checkpointing, 50 steps take {a50['search_mib'] / max(a5['search_mib'], 1e-9):.2f}x the memory of 5 steps "
                          f"above the baseline (the process's whole peak RSS: {a50['peak_mib']:.0f} vs {a5['peak_mib']:.0f} MiB, "
                          f"{a50['peak_mib'] / a5['peak_mib']:.2f}x); without it, {b50['search_mib'] / max(b5['search_mib'], 1e-9):.1f}x."]
            lines.append("")
    lines += ["## Notes", "",
              "- `ratio` is torch-pruning's per-layer channel ratio. GroupNorm(8) layers force widths to multiples of 8, so the",
              "  effective cut is larger than the ratio (ratio 0.25 takes 64-channel layers to 48 and 32 to 24); MACs are measured.",
              "- `mask` learns hard-concrete gates over the 10-step DDIM trajectory (60 iterations, batch 8, L1 weight 0.01);",
              "  the gates rank attention heads and resnet hidden channels, torch-pruning's magnitude ranks the rest.",
              "- `taylor` accumulates |w dL/dw| over t = 0, 10, 20, ... until the loss falls below 0.05 x its maximum (Diff-Pruning),",
              "  on 64 of the model's own samples.",
              "- Latency depends on the pruned shapes only, so rows with the same ratio should agree; how far they differ is the",
              "  measurement's noise on this machine. Compare latencies within this table, not across machines.",
              "- The 2-minute rows spend most of their budget drawing the 1024 training samples from the original, so they",
              "  show the start of recovery, not where each method ends up.",
              "- Only the headline row got the long fine-tune; the other fine-tuned rows got the short budget, and the",
              "  `none` rows show each method's raw choice of channels before any recovery.", ""]
    lines += flow_markdown(data.get("flow"))
    lines += README_SECTION
    MD_PATH.write_text("\n".join(lines))


def flow_markdown(flow: dict | None) -> list[str]:
    if not flow:
        return []
    o, r = flow["original"], flow["pruned"]
    return [f"## {flow['model']}: the SD3 transformer (attention heads and feed-forward neurons)", "",
            f"Taylor importance, ratio {r['ratio']:g}, fine-tune by distillation capped at {r['finetune']} ({r['finetune_steps']} steps, "
            f"{flow.get('threads', 2)} threads); 256 prompts over every digit and template, guidance {flow['guidance_scale']:g}, "
            f"{QUALITY_SOLVER} {QUALITY_STEPS} steps from the same noise; FD against held-out digits.", "",
            "| model | MACs | parameters | FD | FD vs original | prompted digit |", "|---|---|---|---|---|---|",
            f"| original | {o['macs'] / 1e6:.1f} M | {o['parameters'] / 1e6:.3f} M | {o['fd']:.1f} | — | {100 * o['prompted_digit_share']:.1f}% |",
            f"| pruned | {r['macs'] / 1e6:.1f} M ({100 * r['macs_reduction']:.0f}% fewer) | {r['parameters'] / 1e6:.3f} M | {r['fd']:.1f} "
            f"| {r['fd'] / o['fd']:.2f}x | {100 * r['prompted_digit_share']:.1f}% |",
            "", "Goal: at least 30% fewer MACs with FD within 1.15x: "
            + ("met." if r["macs_reduction"] >= 0.3 and r["fd"] / o["fd"] <= 1.15 else "not met."), ""]


README_SECTION = [
    "## Text for the README (structured pruning)", "",
    "```markdown",
    "### Structured pruning",
    "",
    "`compress prune MODEL --method magnitude|taylor|mask --ratio R [--finetune-steps N] --out DIR` removes channels",
    "and whole attention heads with torch-pruning (the output conv is kept), fixes every stale attribute (sampler",
    "channels, attention heads, norm widths) and writes a model folder (JSON config + safetensors, no pickles) that",
    "`compress sample`, `compress export` and recipes accept as MODEL. Methods: `magnitude`; `taylor`, Diff-Pruning's",
    "|w dL/dw| accumulated from t = 0 upward until the loss drops below 5% of its maximum; `mask`, EcoDiff's learned",
    "hard-concrete gates on heads and hidden channels, trained end to end on the final sample of the whole few-step",
    "trajectory with time-step gradient checkpointing (memory flat in the number of steps). `--finetune-steps`",
    "recovers quality by distillation from the original (output matching, optional feature matching, EMA); the loop",
    "uses `accelerate` and runs unchanged on several processes (`torchrun --nproc_per_node 2 -m compress.distill ...`).",
    "In Python: `prune(denoiser, PruneConfig(method=\"taylor\", ratio=0.25, finetune_steps=2000))`; the recipe's `prune`",
    "section is `PruneConfig`'s fields. Figures: bench/results/pruning.md.",
    "```", ""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["memory", "table", "quantized", "flow", "report"], default=None)
    parser.add_argument("--flow-ratio", type=float, default=0.4)
    parser.add_argument("--memory-point", type=int, default=None)
    parser.add_argument("--checkpointing", type=int, default=1)
    parser.add_argument("--memory-models", default=",".join(MEMORY_MODELS), help="memory phase: the models to measure (comma-separated)")
    parser.add_argument("--ratios", default="0.2,0.3,0.4")
    parser.add_argument("--methods", default="magnitude,taylor,mask")
    parser.add_argument("--headline", default="taylor:0.25")
    parser.add_argument("--headline-minutes", type=float, default=15.0)
    parser.add_argument("--short-minutes", type=float, default=2.0)
    parser.add_argument("--fresh", action="store_true", help="table phase: drop the stored table (and the quantized section) and measure every row again")
    args = parser.parse_args()
    if args.memory_point is not None:
        print(json.dumps(memory_point(args.memory_models, args.memory_point, bool(args.checkpointing))))
        return
    data = _load()
    data["environment"] = {"processor": processor_name(), "torch": torch.__version__, "threads": 1}
    headline = (args.headline.split(":")[0], float(args.headline.split(":")[1]))
    if args.phase in ("memory", "table", "quantized", "flow"):
        data.setdefault("load_average", {})[args.phase] = os.getloadavg()[0]
    if args.phase == "table" and args.fresh:
        for key in ("original", "rows", "quantized"):
            data.pop(key, None)
        data["load_average"].pop("quantized", None)
    if args.phase == "memory":
        data["memory"] = run_memory(args.memory_models.split(","), data.get("memory", []))
        _save(data)
    elif args.phase == "table":
        run_table([float(r) for r in args.ratios.split(",")], args.methods.split(","), headline, args.headline_minutes, args.short_minutes, data)
    elif args.phase == "quantized":
        run_quantized(data, headline)
    elif args.phase == "flow":
        run_flow(data, args.flow_ratio, args.headline_minutes)
    write_markdown(data)


if __name__ == "__main__":
    main()
