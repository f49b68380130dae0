"""The same 8-step sampler artifact on torch CPU, onnxruntime CPU and OpenVINO CPU, side by side.

For zoo:digits and for the DDPM CIFAR-10 architecture (google/ddpm-cifar10-32's UNet2DModel
config, 35.7M parameters, random weights from seed 0), the DPM-Solver++(2M) 8-step sampler is
exported once (ONNX, dynamic batch, and its OpenVINO IR) and every runtime runs it from the same
noise at batch 1 and 8, in one process, one runtime after another, with the same thread count.
torch runs the eager SamplerGraph the artifacts were traced from, so it is the reference the
others must match: within 1e-3 absolute for zoo:digits (its samples lie in [-1, 1]); the random
CIFAR network's samples reach hundreds, so there the bound is 1e-3 relative to the largest value.

An int8 row (compress.quantize, W8A8 per step, on onnxruntime and OpenVINO) is added when that
module imports and quantizes (in a child process); otherwise the results say why it is missing.

Writes bench/results/runtime_speed.{json,md}. Run (needs compress/zoo/checkpoints/digits.safetensors):
    python bench/runtime_speed.py [--runs 20] [--warmup 3] [--threads 2] [--models digits,cifar10]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from compress.denoiser import Denoiser
from compress.solvers import SolverConfig
from compress.zoo.models import ddpm_cifar10_architecture
from export.onnx_export import export_onnx
from export.openvino_export import export_openvino
from export.sampler_graph import SamplerGraph
from runtimes.artifacts import example_feeds, open_artifact
from runtimes.bench import benchmark, processor_name
from runtimes.runners import get_runner

RESULTS = Path(__file__).parent / "results"
SOLVER = SolverConfig("dpmpp-2m", 8)
BATCHES = (1, 8)
TOL = 1e-3


def digits() -> Denoiser:
    from compress.loading import load_model

    return load_model("zoo:digits")


# name -> (builder, how agreement is judged, whether it is large: fewer runs, seconds per call)
MODELS = {"digits": (digits, "absolute", False), "cifar10": (ddpm_cifar10_architecture, "relative", True)}
LABELS = {"digits": "zoo:digits", "cifar10": "DDPM CIFAR-10 arch., random"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20, help="timed runs per row (zoo:digits)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--large-runs", type=int, default=5, help="timed runs per row for the CIFAR-10 architecture (1 warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for every runtime")
    parser.add_argument("--models", default="digits,cifar10")
    parser.add_argument("--quantize-into", nargs=2, metavar=("MODEL", "FOLDER"), help=argparse.SUPPRESS)  # the int8 child process
    args = parser.parse_args()
    if args.quantize_into:
        name, folder = args.quantize_into
        quantize_sampler(MODELS[name][0](), Path(folder))
        return
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as work:
        for name in args.models.split(","):
            build, tolerance, large = MODELS[name]
            runs, warmup = (args.large_runs, 1) if large else (args.runs, args.warmup)
            rows += bench_model(name, build(), tolerance, Path(work) / name, runs, warmup, args.threads, notes)
            write_results(rows, notes, args.threads)  # after each model: a later crash keeps what was measured
    print(write_results(rows, notes, args.threads))


def write_results(rows: list[dict], notes: list[str], threads: int) -> str:
    environment = {
        "processor": processor_name(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "threads": threads,
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "openvino": __import__("openvino").get_version(),
    }
    RESULTS.mkdir(exist_ok=True)
    previous = RESULTS / "runtime_speed.json"
    if previous.is_file():  # keep the rows of models this run did not measure (e.g. --models cifar10 alone)
        measured = {r["model"] for r in rows}
        rows = [r for r in json.loads(previous.read_text())["rows"] if r["model"] not in measured] + rows
    (RESULTS / "runtime_speed.json").write_text(json.dumps({"environment": environment, "solver": "dpmpp-2m, 8 steps, trailing",
                                                       "rows": rows, "notes": notes}, indent=2) + "\n")
    text = markdown(rows, notes, environment)
    (RESULTS / "runtime_speed.md").write_text(text)
    return text


def bench_model(name: str, denoiser: Denoiser, tolerance: str, work: Path, runs: int, warmup: int, threads: int, notes: list[str]) -> list[dict]:
    params = sum(p.numel() for p in denoiser.module.parameters())
    start = time.perf_counter()
    export_openvino(export_onnx(denoiser, SOLVER, work), work)
    export_s = time.perf_counter() - start
    print(f"{name}: {params / 1e6:.2f}M parameters, exported in {export_s:.0f} s", flush=True)
    artifact = open_artifact(work / "sampler.onnx")
    graph = SamplerGraph(denoiser, SOLVER)
    int8 = quantized_sampler(name, work, notes)
    rows = []
    for batch in BATCHES:
        feeds = example_feeds(artifact, batch, seed=0)
        loaders = [("torch", "float32", lambda r: r.load_module(graph)),
                   ("onnxruntime", "float32", lambda r: r.load(work / "sampler.onnx")),
                   ("openvino", "float32", lambda r: r.load(work / "sampler.xml"))]
        if int8:
            loaders += [("onnxruntime", "int8", lambda r: r.load(int8 / "sampler.onnx")),
                        ("openvino", "int8", lambda r: r.load(int8 / "sampler.xml"))]
        reference = None
        for runtime, precision, load in loaders:
            runner = get_runner(runtime, threads)
            result = benchmark(runner, feeds, runs, warmup, load=lambda: load(runner))
            output = runner.run(feeds)
            reference = output if reference is None else reference
            diff = float(np.abs(output - reference).max())
            scale = max(1.0, float(np.abs(reference).max())) if tolerance == "relative" else 1.0
            rows.append({
                "model": name, "parameters": params, "runtime": runtime, "precision": precision, "batch": batch,
                "median_ms": result["latency_ms"]["median"], "p90_ms": result["latency_ms"]["p90"],
                "ms_per_sample": result["ms_per_sample"], "peak_rss_delta_mb": result["memory"]["peak_rss_delta_mb"],
                "max_abs_diff_vs_torch": diff, "max_abs_torch": float(np.abs(reference).max()),
                # int8 is compared with float torch for information; the 1e-3 bound is for float artifacts.
                "agrees": diff <= TOL * scale if precision == "float32" else None,
                "runs": runs, "warmup": warmup, "export_s": export_s, "memory_method": result["memory"]["method"], "runner": result["runner"],
            })
            print(f"  batch {batch} {runtime:<12} {precision:<8} median {result['latency_ms']['median']:9.2f} ms  "
                  f"p90 {result['latency_ms']['p90']:9.2f} ms  max|diff| {diff:.2e}", flush=True)
            runner = None  # frees this runtime's copy of the model before the next one loads
    return rows


def quantized_sampler(name: str, work: Path, notes: list[str]) -> Path | None:
    """W8A8 sampler.onnx (+ IR) in work/int8, made by a child process; None with a note saying why not.

    Calibrating and quantizing the unrolled CIFAR-10 sampler takes gigabytes: in a child process an
    out-of-memory kill costs the int8 rows, not the float ones.
    """
    out = work / "int8"
    child = subprocess.run([sys.executable, __file__, "--quantize-into", name, str(work)], capture_output=True, text=True)
    if child.returncode == 0 and (out / "sampler.onnx").is_file() and (out / "sampler.xml").is_file():
        return out
    if child.returncode < 0:
        reason = f"killed by signal {-child.returncode}" + (" (likely out of memory)" if child.returncode == -9 else "")
    else:
        lines = [line for line in child.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {child.returncode}"
    notes.append(f"{name}: no int8 row; quantizing with compress.quantize failed: {reason}")
    print(notes[-1], flush=True)
    return None


def quantize_sampler(denoiser: Denoiser, work: Path) -> None:
    """The child's work: calibrate on the baked solver's levels, quantize work/sampler.onnx (W8A8 per step), convert to IR."""
    from calibration import CalibrationConfig, calibrate
    from compress.quantize import QuantizeConfig, quantize_

    # 4 trajectories recorded from a 50-step chain at the solver's 8 levels: enough for a latency row.
    calib = calibrate(denoiser, CalibrationConfig(sampler="solver", samples=32, trajectory_steps=50), SOLVER)
    out = work / "int8"
    export_openvino(quantize_(work, calib, QuantizeConfig(scheme="w8a8", targets=["sampler"]), out_dir=out), out)


def markdown(rows: list[dict], notes: list[str], env: dict) -> str:
    lines = ["# Runtimes: one 8-step DPM-Solver++(2M) sampler artifact on three CPU runtimes", ""]
    lines += ["| model | runtime | precision | batch | median ms | p90 ms | ms/sample | peak RSS +MB | max abs diff vs torch | agrees |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        agrees = "" if r["agrees"] is None else ("yes" if r["agrees"] else "NO")
        lines.append(f"| {LABELS.get(r['model'], r['model'])} ({r['parameters'] / 1e6:.1f}M) | {r['runtime']} | {r['precision']} | {r['batch']} | {r['median_ms']:.2f} | "
                     f"{r['p90_ms']:.2f} | {r['ms_per_sample']:.2f} | {r['peak_rss_delta_mb']:.1f} | {r['max_abs_diff_vs_torch']:.2e} | {agrees} |")
    lines += ["", f"CPU: {env['processor']}, {env['cpu_count']} cores, {env['threads']} threads per runtime; "
              f"load average at the end {', '.join(f'{v:.1f}' for v in env['load_average_at_end'])} (the machine is shared).",
              f"torch {env['torch']} (eager SamplerGraph), onnxruntime {env['onnxruntime']} (CPUExecutionProvider), "
              f"OpenVINO {env['openvino']} (CPU, f32 inference precision).",
              "Timed runs per row: " + ", ".join(sorted({f"{r['model']} {r['runs']} after {r['warmup']} warm-up" for r in rows}))
              + "; latency is one call of the whole sampler (8 network evaluations) at that batch.",
              "Memory: peak RSS during load + runs minus RSS before load "
              f"({rows[0]['memory_method'] if rows else ''}); torch runs the module already in memory, so its figure "
              "holds activations only, while onnxruntime and OpenVINO also load their own copy of the weights.",
              "Agreement: zoo:digits within 1e-3 absolute; the random-weight CIFAR-10 network within 1e-3 of its largest output.",
              "Artifacts: one ONNX export with a dynamic batch per model (and its OpenVINO IR) serves both batch sizes; export took "
              + ", ".join(dict.fromkeys(f"{r['export_s']:.0f} s for {r['model']}" for r in rows)) + "."]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
