"""The baked sampler graph versus the host loop, same solver, steps and precision (float32).

Two comparisons, timed side by side in one run (calls interleaved):

same runtime (what baking the loop into the graph buys):
  host loop X: denoiser.onnx (denoiser.xml) on runtime X, driven by a numpy loop, one session call per network
               evaluation (the doubled [unconditional; conditional] batch with guidance), the way Optimum's
               onnxruntime pipelines sample: `runtimes/host_loop.py`, on the sampler's own coefficient table;
  baked X:     sampler.onnx (sampler.xml) on the same runtime X, the whole loop in one graph.
  Their difference per network evaluation is the per-step overhead that baking removes. The two outputs
  must agree within 1e-4 of the sample's range on the same noise, else the run fails.
against torch (the runtime and the baking together):
  host loop:   diffusers' DPMSolverMultistepScheduler stepping in Python around the UNet (torch eager),
               the way a diffusers pipeline samples (unconditional built-in models only);
  baked torch: our SamplerGraph in torch eager (the loop unrolled, coefficients constant);
  baked X:     as above.

X: onnxruntime and OpenVINO (CPU, f32 pinned) on the CPU; onnxruntime's CUDA and TensorRT providers with
--device cuda (torch runs on CUDA then). Models (--models): zoo:digits, the DDPM CIFAR-10 architecture
(35.7M parameters, random weights) and zoo:digits-t2i's denoiser (text-conditional, guidance 2.0), or any
model reference `compress` loads (an SD-size diffusers:PATH). On the CPU each is timed with one thread per
library and with every core the process may use. A runtime that is not available is listed with the
reason. Writes bench/results/baked_vs_host.{json,md} (baked_vs_host_cuda.* with --device cuda):
    python bench/baked_vs_host.py [--device cuda] [--runtimes onnxruntime-cuda,onnxruntime-tensorrt] [--models zoo:digits,diffusers:PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from compress.denoiser import NEGATIVE_PREFIX, SHARED_CONDITION_KEYS, Denoiser
from compress.loading import load_model
from compress.solvers import SolverConfig
from compress.zoo.models import ddpm_cifar10_architecture
from export.onnx_export import export_onnx
from export.openvino_export import export_openvino
from export.sampler_graph import SamplerGraph, condition_names, example_condition
from runtimes.bench import paired_timing, processor_name
from runtimes.host_loop import HostLoopRunner
from runtimes.runners import get_runner

RESULTS = Path(__file__).parent / "results"
STEPS = 8
# One thread per library, then all the cores this process may use: the same for every way.
THREADS = sorted({1, len(os.sched_getaffinity(0))})
SOLVER = SolverConfig("dpmpp-2m", STEPS)
GUIDANCE = 2.0  # the scale fed to guided models' samplers; the work per step does not depend on it
AGREEMENT = 1e-4  # host loop vs baked graph on one runtime, as a share of the baked sample's range
GOAL = 2.0  # issue 3: the baked graph at least 2x faster than the host loop at batch 1 on CPU
HOST, BAKED_TORCH = "host loop (diffusers scheduler, torch)", "baked graph, torch eager"
DEFAULT_RUNTIMES = {"cpu": "onnxruntime,openvino", "cuda": "onnxruntime-cuda,onnxruntime-tensorrt"}
# Names for the built-in subjects; anything else is a model reference for `load_model`.
BUILT_IN = {"ddpm-cifar10-arch": ddpm_cifar10_architecture}
DEFAULT_MODELS = "zoo:digits,ddpm-cifar10-arch,zoo:digits-t2i"
# The diffusers host loop below is configured for these (linear betas, unconditional): the torch rows run only on them.
TORCH_HOST_MODELS = ("digits", "ddpm-cifar10-arch")
# Timed calls per way at batch 1 (fewer at larger batches, at least MIN_ROUNDS); the 35.7M-parameter model gets fewer.
RUNS = {"ddpm-cifar10-arch": 12}
MIN_ROUNDS = 5
# A model above this many parameters (Stable-Diffusion size: one 8-step call takes seconds) is timed at batch 1 with
# every core only, one runtime at a time (four sessions of an SD UNet at once would not fit in 24 GiB).
LARGE_PARAMS_M = 300


def host_loop(denoiser: Denoiser):
    """A diffusers-pipeline sampling loop: the scheduler steps in Python between UNet calls."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="trailing")
    unet = denoiser.module.unet

    @torch.no_grad()
    def run(noise: torch.Tensor) -> np.ndarray:
        scheduler.set_timesteps(STEPS)
        x = noise.to(denoiser.device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
        return x.cpu().numpy()  # the sample where the app gets it (on CUDA this also waits for the GPU)

    return run


def load_subject(name: str) -> Denoiser:
    return BUILT_IN[name]() if name in BUILT_IN else load_model(name)


def bench_model(denoiser: Denoiser, device: str, runtimes: list[str], thread_counts: list, batches=(1, 8)) -> tuple[list[dict], list[dict]]:
    """(same-runtime rows, rows against torch) of one model at each thread count and batch; exported once.

    The ways of the models with a torch host loop are all timed together (the table against torch compares
    them); the others pair each runtime's host loop with its baked graph, one runtime after the other."""
    same, vs_torch = [], []
    large = sum(p.numel() for p in denoiser.module.parameters()) / 1e6 > LARGE_PARAMS_M
    if large:
        thread_counts, batches = thread_counts[-1:], (1,)
    groups = [runtimes] if denoiser.name in TORCH_HOST_MODELS else [[name] for name in runtimes]
    with tempfile.TemporaryDirectory() as tmp:
        records = export_onnx(denoiser, SOLVER, tmp)
        if any(name.startswith("openvino") for name in runtimes):
            export_openvino(records, tmp)
        solver = json.loads((Path(tmp) / "sampler.json").read_text())["solver"]
        common = {"model": denoiser.name, "params_m": sum(p.numel() for p in denoiser.module.parameters()) / 1e6,
                  "evaluations": solver["nfe"], "network_batch": solver["network_batch"]}
        denoiser.to(device)
        for threads in thread_counts:
            for group in groups:
                ways, skipped = load_ways(denoiser, device, group, threads, Path(tmp))
                vs_torch += [{**common, "threads": threads, **row} for row in skipped]
                for batch in batches:
                    s, v = time_ways(denoiser, ways, {**common, "threads": threads, "batch": batch}, MIN_ROUNDS if large else None)
                    same, vs_torch = same + s, vs_torch + v
                del ways
    denoiser.to("cpu")
    return same, vs_torch


def load_ways(denoiser: Denoiser, device: str, runtimes: list[str], threads: int | None, folder: Path) -> tuple[dict, list[dict]]:
    """Every way to sample, each a function of the sampler's feeds; the runtimes that are not available, as rows saying why."""
    if threads:
        torch.set_num_threads(threads)
    ways, skipped = {}, []
    if denoiser.name in TORCH_HOST_MODELS:
        host = host_loop(denoiser)
        ways[HOST] = lambda feeds: host(torch.from_numpy(feeds["noise"]))
        ways[BAKED_TORCH] = get_runner("torch" if device == "cpu" else f"torch-{device}", threads).load_module(SamplerGraph(denoiser, SOLVER)).run
    for name in runtimes:
        runner = get_runner(name, threads)
        ok, reason = runner.available()
        if not ok:
            skipped.append({"way": f"baked graph, {name}", "skipped": reason})
            print(skipped[-1], flush=True)
            continue
        sampler = folder / ("sampler.xml" if name.startswith("openvino") else "sampler.onnx")
        ways[f"host loop, {name}"] = HostLoopRunner(name, threads).load(sampler).run  # drives the denoiser file beside it
        ways[f"baked graph, {name}"] = runner.load(sampler).run
    return ways, skipped


def sampler_feeds(denoiser: Denoiser, batch: int) -> dict[str, np.ndarray]:
    """Noise and, for a conditional model, a condition and the guidance scale. The unconditional branch's condition is
    spelled out as the negative inputs: the host loop needs it where the sampler bakes an encoded negative prompt."""
    feeds = {"noise": torch.randn(batch, *denoiser.sample_shape, generator=torch.Generator().manual_seed(batch)).numpy()}
    names = condition_names(denoiser)
    feeds.update({n: c.numpy() for n, c in zip(names, example_condition(denoiser, batch, seed=batch))})
    if denoiser.supports_guidance:
        feeds["guidance_scale"] = np.array([GUIDANCE], np.float32)
        null = denoiser.null_condition(batch)
        null = null if isinstance(null, dict) else {names[0]: null}
        feeds.update({NEGATIVE_PREFIX + n: v.numpy() for n, v in null.items() if n not in SHARED_CONDITION_KEYS})
    return feeds


def time_ways(denoiser: Denoiser, ways: dict, common: dict, runs: int | None = None) -> tuple[list[dict], list[dict]]:
    feeds = sampler_feeds(denoiser, common["batch"])
    outputs = {way: run(feeds) for way, run in ways.items()}
    runs = runs or RUNS.get(denoiser.name, 20)
    # Calls interleaved one by one (rounds of one run) after two untimed calls of each: runtimes/bench.py's timing.
    times = paired_timing({way: (lambda run=run: run(feeds)) for way, run in ways.items()},
                          rounds=max(MIN_ROUNDS, runs // common["batch"]), runs=1, warmup=0, warmup_rounds=2)
    runtimes = [way.removeprefix("baked graph, ") for way in ways if way.startswith("baked graph, ") and way != BAKED_TORCH]
    same = [same_runtime_row(common, runtime, times, outputs) for runtime in runtimes]
    vs_torch = [against_torch_row(common, way, times, outputs) for way in times] if HOST in times else []
    for row in same + vs_torch:
        print(row, flush=True)
    return same, vs_torch


def same_runtime_row(common: dict, runtime: str, times: dict, outputs: dict) -> dict:
    """The host loop and the baked graph on one runtime; fails the run when their samples disagree."""
    host, baked = f"host loop, {runtime}", f"baked graph, {runtime}"
    diff = float(np.abs(outputs[host] - outputs[baked]).max())
    spread = float(np.ptp(outputs[baked]))
    if not diff <= AGREEMENT * spread:
        raise AssertionError(f"{common['model']}, {runtime}, batch {common['batch']}: the host loop lands {diff:.2e} from the baked graph, "
                             f"more than {AGREEMENT:g} of the sample's range {spread:.3g}")
    host_ms, baked_ms = times[host]["median_ms"], times[baked]["median_ms"]
    return {**common, "runtime": runtime, "host_loop_ms": host_ms, "baked_ms": baked_ms, "host_loop_p90_ms": times[host]["p90_ms"],
            "baked_p90_ms": times[baked]["p90_ms"], "calls": times[baked]["rounds"], "speedup": host_ms / baked_ms,
            "overhead_per_evaluation_ms": (host_ms - baked_ms) / common["evaluations"], "max_abs_diff": diff, "sample_range": spread}


def against_torch_row(common: dict, way: str, times: dict, outputs: dict) -> dict:
    t = times[way]
    return {**common, "way": way, "median_ms": t["median_ms"], "p90_ms": t["p90_ms"], "calls": t["rounds"],
            "speedup_vs_host": times[HOST]["median_ms"] / t["median_ms"], "max_abs_diff_vs_host": float(np.abs(outputs[HOST] - outputs[way]).max())}


def main() -> None:
    import onnxruntime
    import openvino

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where torch runs the host loop and the eager graph")
    parser.add_argument("--runtimes", help=f"runtimes of the baked graph and the host loop (default: {DEFAULT_RUNTIMES})")
    parser.add_argument("--models", default=DEFAULT_MODELS,
                        help=f"comma-separated: {', '.join(BUILT_IN)} or model references compress loads (default: {DEFAULT_MODELS})")
    args = parser.parse_args()
    runtimes = (args.runtimes or DEFAULT_RUNTIMES[args.device]).split(",")
    thread_counts = THREADS if args.device == "cpu" else [None]
    load_before = os.getloadavg()[0]  # how busy the machine was when the run began (1-minute load average)
    same, vs_torch, models = [], [], []
    for name in args.models.split(","):
        subject = load_subject(name)
        s, v = bench_model(subject, args.device, runtimes, thread_counts)
        same, vs_torch, models = same + s, vs_torch + v, models + [subject.name]
        del subject
    env = {"device": args.device, "processor": processor_name(), "cores": len(os.sched_getaffinity(0)), "threads": thread_counts,
           "load_average_at_start": load_before, "load_average_at_end": os.getloadavg()[0],
           "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "openvino": openvino.get_version().split("-")[0]}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    name = "baked_vs_host" if args.device == "cpu" else f"baked_vs_host_{args.device}"
    RESULTS.mkdir(exist_ok=True)
    result = merge(RESULTS / f"{name}.json", models, {"environment": env, "solver": "dpmpp-2m", "steps": STEPS, "guidance_scale": GUIDANCE,
                                                    "same_runtime": same, "against_torch": vs_torch})
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = "\n".join(markdown(run["same_runtime"], run["against_torch"], run["environment"], first=i == 0)
                     for i, run in enumerate(result["runs"]))
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


def merge(path: Path, models: list[str], run: dict) -> dict:
    """The results file keeps one run per set of models: this run replaces the earlier rows of its models, the other runs stay."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    runs = old.get("runs") or ([old] if "same_runtime" in old else [])
    kept = []
    for earlier in runs:
        earlier["same_runtime"] = [r for r in earlier["same_runtime"] if r["model"] not in models]
        earlier["against_torch"] = [r for r in earlier["against_torch"] if r["model"] not in models]
        if earlier["same_runtime"] or earlier["against_torch"]:
            kept.append(earlier)
    return {"runs": kept + [run]}


SAME_RUNTIME = (
    "What this measures: baking alone. Both ways run on the same runtime with the same threads, precision (float32; OpenVINO "
    "pinned to f32), solver table (dpmpp-2m, {steps} steps) and network work per evaluation (with guidance, one call on the "
    "doubled batch [unconditional; conditional] both ways, guidance scale {guidance:g}). The host loop (`runtimes/host_loop.py`, "
    "runtime name `<runtime>-host-loop`) drives `denoiser.onnx` (`denoiser.xml`) from numpy, one session call per network "
    "evaluation, as Optimum's onnxruntime pipelines do; the baked graph is `sampler.onnx` (`sampler.xml`), one call. "
    "'removed per evaluation' is (host loop - baked) / evaluations: the session call and host-side array work of each step, "
    "plus what the baked graph folds (the per-step time embedding becomes constants, the solver's arithmetic runs in the "
    "graph). The host loop's sample agrees with the baked graph's within {agreement:g} of the sample's range on the same "
    "noise (asserted by the bench; 'max diff / range').")
AGAINST_TORCH = (
    "What this measures: the runtime and the baking together. The reference is diffusers' DPMSolverMultistepScheduler "
    "stepping around the UNet in torch eager (unconditional built-in models only); a baked graph on onnxruntime or OpenVINO "
    "gains from that runtime's kernels as well as from the baking. 'host loop, X' against the first row is the runtime "
    "alone; the table above is the baking alone.")


def markdown(same: list[dict], vs_torch: list[dict], env: dict, first: bool = True) -> str:
    device = env.get("gpu", "CPU")
    models = ", ".join(dict.fromkeys(r["model"] for r in same + vs_torch))
    title = f"# Baked sampler graph vs host loop (dpmpp-2m, {STEPS} steps, float32, {device})" if first else f"# Another run: {models}"
    lines = [title, "",
             "## Same runtime: `denoiser.onnx` in a numpy host loop vs the baked `sampler.onnx`", "",
             SAME_RUNTIME.format(steps=STEPS, guidance=GUIDANCE, agreement=AGREEMENT), "",
             "| model | params (M) | network batch | threads | batch | runtime | host loop ms | baked ms | speed-up of baked | removed per evaluation (ms) | max diff / range |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in same:
        lines.append(f"| {r['model']} | {r['params_m']:.1f} | {r['network_batch']} | {r['threads'] or '—'} | {r['batch']} | {r['runtime']} "
                     f"| {r['host_loop_ms']:.1f} | {r['baked_ms']:.1f} | {r['speedup']:.2f}x | {r['overhead_per_evaluation_ms']:.2f} "
                     f"| {r['max_abs_diff'] / r['sample_range']:.1e} |")
    timed = [r for r in vs_torch if "skipped" not in r]
    if timed:
        lines += ["", "## Against torch: the diffusers host loop in torch eager", "", AGAINST_TORCH, "",
                  "| model | params (M) | threads | batch | how | median ms | p90 ms | speed-up vs host loop | max abs diff vs host |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in timed:
            lines.append(f"| {r['model']} | {r['params_m']:.1f} | {r['threads'] or '—'} | {r['batch']} | {r['way']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} "
                         f"| {r['speedup_vs_host']:.2f}x | {r['max_abs_diff_vs_host']:.1e} |")
        lines += ["", f"Goal: the baked graph at least {GOAL:g}x faster than the torch host loop at batch 1 (issue 3 sets it on the CPU)."]
        for r in timed:
            if r["batch"] == 1 and r["way"].startswith("baked graph, ") and r["way"] != BAKED_TORCH:
                verdict = "met" if r["speedup_vs_host"] >= GOAL else "not met"
                threads = f", {r['threads']} thread(s)" if r["threads"] else ""
                lines.append(f"- {r['model']}{threads}, {r['way']}: {r['speedup_vs_host']:.2f}x ({verdict})")
    skipped = {(r["way"], r["skipped"]) for r in vs_torch if "skipped" in r}
    if skipped:
        lines += [""] + [f"Not measured: {way}: {reason}" for way, reason in sorted(skipped)]
    if any(r["params_m"] > LARGE_PARAMS_M for r in same):
        lines += ["", f"Models above {LARGE_PARAMS_M} M parameters (one 8-step call takes seconds) are timed at batch 1 with every core only, "
                  f"{MIN_ROUNDS} calls of each way, one runtime at a time: four sessions of such a UNet would not fit in the machine's memory."]
    lines += ["", f"Timed by runtimes/bench.py (`paired_timing`: two untimed calls of each way, then the calls of every way of a model, thread "
              f"count and batch interleaved one by one (for a model without the torch host loop, the host loop and the baked graph of each "
              f"runtime), median and p90 of each way's calls; both tables come from the same calls) in one run, "
              f"on {env['processor']} ({env['cores']} cores){', ' + env['gpu'] if 'gpu' in env else ''}, "
              f"torch {env['torch']}, onnxruntime {env['onnxruntime']}, OpenVINO {env['openvino']}; 'threads' is what each library was given; "
              f"1-minute load average when the run began: {env['load_average_at_start']:.2f}, when it ended: {env['load_average_at_end']:.2f}. The machine's cores are shared with other jobs: "
              "compare ratios within a row group, not absolute times across machines."]
    busiest = max(env["load_average_at_start"], env.get("load_average_at_end", 0))
    if busiest > env["cores"]:
        lines += ["", f"Other jobs took the 1-minute load average to {busiest:.1f} on {env['cores']} cores in this run: rows with as many "
                  "threads as cores competed with them for every core, torch's spinning threads worst of all (its figures there are "
                  "contention, not speed). The one-thread rows are the steadier ones."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
