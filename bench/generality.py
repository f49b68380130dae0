"""Compression on architectures the toolkit did not design: W8A8 with and without a quality target, and pruning.

Models: the four third-party-style denoisers of `tests/architectures.py` (LayerNorm over (C,H,W) with
an embedding-table timestep, BatchNorm with hand-written attention, a norm-free Fourier-feature
ResNet, a plain CNN) and the zoo's digits and digits-cond. Each: dpmpp-2m 8 steps baked into
sampler.onnx, an NDTC calibration set from its own trajectories, then

- W8A8 per-step with the defaults the graph's structure gives, and with ``target_psnr: 30``;
  PSNR of the final sample against the float32 sampler on 1024 fresh noise draws (not the 512 the
  target search measured on; pooled over the batch, with the median and worst single draw beside it), file bytes against float32, the layers kept in float and why, and
  int8 against float32 batch-1 latency on onnxruntime's CPU provider (the toolkit's own
  `runtimes.bench.paired_benchmark`, float and int8 measured in alternation in this one run);
- `prune` taylor 0.25 with a short distillation fine-tune, written as a model folder, reloaded,
  exported and run on onnxruntime: PSNR against the original's float32 sampler, FD of both on the
  zoo classifier's features against the held-out digits.

Writes bench/results/generality.{json,md}. Run: python bench/generality.py [--models NAME ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.architectures is the family's home

from calibration import CalibrationConfig, calibrate  # noqa: E402
from compress.loading import load_model  # noqa: E402
from compress.metrics import DigitsJudge, psnr  # noqa: E402
from compress.quantize import QuantizeConfig, quantize_  # noqa: E402
from compress.solvers import SolverConfig  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from runtimes.bench import processor_name  # noqa: E402
from sampler_runs import paired_latency_ms, run_sampler, sampler_feeds  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODELS = {
    "layernorm-ddpm": "python:tests.architectures:layernorm_ddpm",
    "batchnorm-unet": "python:tests.architectures:batchnorm_unet",
    "fourier-resnet": "python:tests.architectures:fourier_resnet",
    "plain-cnn": "python:tests.architectures:plain_cnn",
    "zoo:digits": "zoo:digits",
    "zoo:digits-cond": "zoo:digits-cond",
}
GOALS = {"psnr_db": 30.0, "bytes_ratio": 0.40}
GUIDANCE = 3.0  # zoo:digits-cond


def per_draw_psnr(samples: torch.Tensor, reference: torch.Tensor) -> dict:
    each = torch.tensor([psnr(a[None], b[None]) for a, b in zip(samples, reference)])
    return {"median_draw_db": float(each.median()), "worst_draw_db": float(each.min())}


def float_layer_summary(record: dict) -> dict:
    by_reason: dict[str, list[str]] = {}
    for entry in record.get("float_layers", []):
        by_reason.setdefault(entry["reason"], []).append(entry["layer"])
    target = record.get("target") or {}
    searched = [x["layer"] for x in target.get("float_layers", [])]
    return {"structure": by_reason, "sensitivity": searched}


def quantization_rows(name: str, reference: str, work: Path, args, log) -> dict:
    denoiser = load_model(reference)
    guidance = GUIDANCE if denoiser.supports_guidance else None
    solver = SolverConfig("dpmpp-2m", 8, guidance_scale=guidance)
    folder = work / "float"
    export_onnx(denoiser, solver, folder)
    calib = calibrate(denoiser, CalibrationConfig(samples=args.calibration_samples, guidance_scale=guidance), None)
    feeds, _ = sampler_feeds(denoiser, args.samples, seed=2024, guidance=guidance)
    float_samples = run_sampler(folder / "sampler.onnx", feeds, args.threads)
    float_bytes = (folder / "sampler.onnx").stat().st_size
    rows, paths = {}, {"float32": folder / "sampler.onnx"}
    for label, config in (("w8a8", QuantizeConfig(targets=["sampler"])), ("w8a8 target 30", QuantizeConfig(targets=["sampler"], target_psnr=30.0))):
        started = time.perf_counter()
        out = work / label.replace(" ", "-")
        record = quantize_(folder, calib, config, out_dir=out, progress=log)[0]
        seconds = time.perf_counter() - started
        samples = run_sampler(out / "sampler.onnx", feeds, args.threads)
        rows[label] = {
            "psnr_db": psnr(samples, float_samples),
            **per_draw_psnr(samples, float_samples),
            "bytes": record["bytes"],
            "bytes_ratio": record["bytes"] / float_bytes,
            "float_layers": float_layer_summary(record),
            "target": {k: v for k, v in (record.get("target") or {}).items() if k in ("psnr", "met", "message", "evaluations", "limiting_layers", "precision")},
            "quantize_seconds": round(seconds, 1),
        }
        paths[label] = out / "sampler.onnx"
    times = {k: v["median_ms"] for k, v in paired_latency_ms(paths, feeds, args.threads, args.rounds, args.runs).items()}
    for label in rows:
        rows[label]["latency_ms"] = times[label]
        rows[label]["latency_ratio"] = times[label] / times["float32"]
    params = sum(p.numel() for p in denoiser.module.parameters())
    return {"model": name, "reference": reference, "parameters": params, "float_bytes": float_bytes, "float_latency_ms": times["float32"],
            "quantization": rows, "_float_samples": float_samples, "_denoiser": denoiser, "_solver": solver, "_feeds": feeds}


def pruning_row(entry: dict, work: Path, args, log) -> dict:
    from compress.prune import PruneConfig, prune, save_pruned

    denoiser, solver, feeds = entry["_denoiser"], entry["_solver"], entry["_feeds"]
    started = time.perf_counter()
    config = PruneConfig(method="taylor", ratio=0.25, taylor_samples=32, finetune_steps=args.finetune_steps, data_samples=256, seed=0)
    pruned = prune(denoiser, config, progress=log)
    folder = work / "pruned"
    save_pruned(pruned, folder)
    reloaded = load_model(str(folder))
    export_onnx(reloaded, solver, work / "pruned-export")
    samples = run_sampler(work / "pruned-export" / "sampler.onnx", feeds, args.threads)
    from compress.zoo.data import load_digits_tensors

    judge, heldout = DigitsJudge(), load_digits_tensors("heldout")[0]
    info = pruned.extra["pruning"]
    return {"parameters_before": info["parameters_before"], "parameters_after": info["parameters_after"],
            "macs_before": info["macs_before"], "macs_after": info["macs_after"],
            "psnr_db": psnr(samples, entry["_float_samples"]), "fd_original": judge.fd(entry["_float_samples"], heldout),
            "fd_pruned": judge.fd(samples, heldout), "seconds": round(time.perf_counter() - started, 1)}


def quality(row: dict) -> str:
    return f"{row['psnr_db']:.1f} dB ({row['median_draw_db']:.1f} / {row['worst_draw_db']:.1f})"


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        "# Compression on architectures the toolkit did not design",
        "",
        f"Machine: {results['machine']}, onnxruntime CPU provider, {results['threads']} thread(s). dpmpp-2m 8 steps baked into "
        f"sampler.onnx; NDTC calibration from each model's own trajectories ({results['calibration_samples']} states). PSNR against the "
        f"float32 sampler on {results['samples']} fresh noise draws, pooled over the batch (median / worst single draw in brackets); latency at batch 1 (the toolkit's `runtimes.bench.paired_benchmark`, "
        "float32 and int8 alternated in this run). Goal: >= 30 dB with the target set, <= 0.40x the float32 bytes. "
        f"'met (search)' is the quantizer's own verdict on its {results['target_samples']} draws (seed 1234): the pooled PSNR that 90% of "
        f"bootstrap resamplings of those draws stay above; the PSNR columns are these {results['samples']} others.",
        "",
        "## W8A8: defaults from the graph's structure, and `target_psnr: 30`",
        "",
        "| model | params | W8A8 PSNR | bytes | int8/float latency | target 30: PSNR | bytes | latency | met (search) | layers back in higher precision by sensitivity |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in results["models"]:
        d, t = m["quantization"]["w8a8"], m["quantization"]["w8a8 target 30"]
        lines.append(f"| {m['model']} | {m['parameters'] / 1e3:.0f}k | {quality(d)} | {d['bytes_ratio']:.3f}x | {d['latency_ratio']:.2f}x "
                     f"| {quality(t)} | {t['bytes_ratio']:.3f}x | {t['latency_ratio']:.2f}x | {'yes' if t['target'].get('met', True) else 'no'} "
                     f"| {', '.join(t['float_layers']['sensitivity']) or '-'}{' (' + t['target']['precision'] + ')' if t['target'].get('precision') else ''} |")
    lines += ["", "`step:K` in the last column: every layer of unrolled step K at float activations over the int8 weights all steps share.",
              "", "Layers the graph's structure keeps in float (both rows):", ""]
    for m in results["models"]:
        structure = m["quantization"]["w8a8"]["float_layers"]["structure"]
        lines.append(f"- {m['model']}: " + "; ".join(f"{reason}: {', '.join(layers)}" for reason, layers in sorted(structure.items())))
    lines += ["", "Target messages:", ""]
    for m in results["models"]:
        message = m["quantization"]["w8a8 target 30"]["target"].get("message")
        if message:
            lines.append(f"- {m['model']}: {message}")
    lines += ["", "## Pruning: taylor 0.25 + short fine-tune, saved as a model folder, reloaded, exported, run on onnxruntime", "",
              "| model | params | MACs | PSNR vs original | FD original | FD pruned | seconds |", "|---|---|---|---|---|---|---|"]
    for m in results["models"]:
        p = m.get("pruning")
        if p is None:
            continue
        if "error" in p:
            lines.append(f"| {m['model']} | error: {p['error']} | | | | | |")
            continue
        lines.append(f"| {m['model']} | {p['parameters_before'] / 1e3:.0f}k -> {p['parameters_after'] / 1e3:.0f}k | "
                     f"{p['macs_before'] / 1e6:.1f}M -> {p['macs_after'] / 1e6:.1f}M | {p['psnr_db']:.1f} dB | {p['fd_original']:.1f} | {p['fd_pruned']:.1f} | {p['seconds']} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--calibration-samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--no-prune", action="store_true")
    args = parser.parse_args()
    log = lambda message: print(message, flush=True)  # noqa: E731
    results = {"machine": processor_name(), "threads": args.threads, "samples": args.samples, "calibration_samples": args.calibration_samples,
               "target_samples": QuantizeConfig().target_samples,
               "goals": GOALS, "models": []}
    with tempfile.TemporaryDirectory(prefix="generality-") as scratch:
        for name in args.models:
            log(f"== {name}")
            work = Path(scratch) / name.replace(":", "-")
            entry = quantization_rows(name, MODELS[name], work, args, log)
            if not args.no_prune:
                try:
                    entry["pruning"] = pruning_row(entry, work, args, log)
                except Exception as e:  # a model that cannot prune is a finding of this benchmark, not its end
                    entry["pruning"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            results["models"].append({k: v for k, v in entry.items() if not k.startswith("_")})
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / "generality.json").write_text(json.dumps(results, indent=2) + "\n")
            write_markdown(results, RESULTS / "generality.md")
    log((RESULTS / "generality.md").read_text())


if __name__ == "__main__":
    main()
