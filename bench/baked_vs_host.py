"""The baked sampler graph versus the host loop, same solver, steps and precision (float32, CPU).

host loop:   diffusers' DPMSolverMultistepScheduler stepping in Python around the UNet (torch eager),
             the way a diffusers pipeline samples;
baked torch: our SamplerGraph in torch eager (the loop unrolled, coefficients constant);
baked ORT:   sampler.onnx (the whole loop in one graph) on onnxruntime's CPU provider.

Models: zoo:digits and the DDPM CIFAR-10 architecture (35.7M parameters, random weights).
Writes bench/results/baked_vs_host.{json,md}. Run: python bench/baked_vs_host.py
"""
from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from compress.denoiser import Denoiser, DiffusersUNet
from compress.loading import load_model
from compress.schedule import NoiseSchedule
from compress.solvers import SolverConfig
from export.onnx_export import export_onnx
from export.sampler_graph import SamplerGraph

RESULTS = Path(__file__).parent / "results"
STEPS = 8
THREADS = 1  # torch and onnxruntime alike: the machine is shared, and one thread each keeps the comparison fair
SOLVER = SolverConfig("dpmpp-2m", STEPS)
WAYS = {"host": "host loop (diffusers scheduler, torch)", "torch": "baked graph, torch eager", "ort": "baked graph, onnxruntime CPU"}


def cifar10_denoiser() -> Denoiser:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    return Denoiser(DiffusersUNet(unet).eval(), NoiseSchedule.from_betas(), "epsilon", (3, 32, 32), name="ddpm-cifar10-arch")


def host_loop(denoiser: Denoiser):
    """A diffusers-pipeline sampling loop: the scheduler steps in Python between UNet calls."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="trailing")
    unet = denoiser.module.unet

    @torch.no_grad()
    def run(noise: torch.Tensor) -> torch.Tensor:
        scheduler.set_timesteps(STEPS)
        x = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
        return x

    return run


def timed_side_by_side(fns: dict, runs: int, warmup: int = 2) -> dict[str, tuple[float, float]]:
    """Median and p90 ms of each function, calls interleaved so that load from other processes hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: (statistics.median(t), float(np.percentile(t, 90))) for name, t in times.items()}


def bench_model(denoiser: Denoiser, batches=(1, 8), runs: int = 20) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(denoiser, SOLVER, tmp)
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        session = ort.InferenceSession(str(Path(tmp) / "sampler.onnx"), options, providers=["CPUExecutionProvider"])
        graph = SamplerGraph(denoiser, SOLVER).eval()
        host = host_loop(denoiser)
        for batch in batches:
            noise = torch.randn(batch, *denoiser.sample_shape, generator=torch.Generator().manual_seed(batch))
            feed = {"noise": noise.numpy()}
            outputs = {"host": host(noise), "torch": graph(noise).detach(), "ort": torch.from_numpy(session.run(None, feed)[0])}
            n = max(3, runs // batch)
            with torch.no_grad():
                times = timed_side_by_side({"host": lambda: host(noise), "torch": lambda: graph(noise), "ort": lambda: session.run(None, feed)}, n)
            for way, (median, p90) in times.items():
                rows.append({"model": denoiser.name, "params_m": sum(p.numel() for p in denoiser.module.parameters()) / 1e6,
                             "batch": batch, "way": WAYS[way], "median_ms": median, "p90_ms": p90, "speedup_vs_host": times["host"][0] / median,
                             "max_abs_diff_vs_host": float((outputs["host"] - outputs[way]).abs().max())})
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    torch.set_num_threads(THREADS)
    rows = bench_model(load_model("zoo:digits")) + bench_model(cifar10_denoiser(), runs=10)
    env = {"processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(), "onnxruntime": ort.__version__, "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "baked_vs_host.json").write_text(json.dumps({"environment": env, "solver": "dpmpp-2m", "steps": STEPS, "rows": rows}, indent=2) + "\n")
    lines = [f"# Baked sampler graph vs host loop (dpmpp-2m, {STEPS} steps, float32, CPU)", "",
             "| model | params (M) | batch | how | median ms | p90 ms | speed-up vs host loop | max abs diff vs host |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params_m']:.1f} | {r['batch']} | {r['way']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['speedup_vs_host']:.2f}x | {r['max_abs_diff_vs_host']:.1e} |")
    lines += ["", f"Measured side by side in one run, calls interleaved, on {env['processor']} ({THREADS} thread for torch and for onnxruntime {env['onnxruntime']}); "
              "the CPU was shared with other jobs, so compare ratios, not absolute times."]
    (RESULTS / "baked_vs_host.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
