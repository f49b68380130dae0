"""Spectral slim students of zoo:digits: widths 0.75 / 0.5 / 0.25 and the ablation (wavelet gating on/off x
frequency loss on/off) at width 0.5, plus the headline student trained for the full 30-minute budget.

    python bench/slim.py train NAME [NAME...]   # trains students into bench/results/slim_models/NAME
    python bench/slim.py report [--n 256]       # samples, measures, writes bench/results/slim.{json,md}

Budgets: the headline student trains with both threads of the 2-core machine for HEADLINE_MINUTES x 2 of
process CPU time, what 2 free cores give in HEADLINE_MINUTES (the issue's 30 minutes less loading and data);
counting the process clock, not the wall clock, keeps other jobs on the machine from shortening it. The
cosine schedule runs over that budget. The other widths and the ablation train for SHORT_STEPS steps each
(batch 64) on one thread. FD is the zoo classifier's Fréchet distance
against the held-out digits; PSNR and the high-frequency energy error compare each student with the
teacher sampled from the same noise.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
MODELS = RESULTS / "slim_models"
TEACHER = "zoo:digits"
SHORT_STEPS = 200  # the equal, shorter budget of the ablation and the non-headline widths
LONG_STEPS = 2000  # the ablation again, at ten times the budget
FD_GOAL = 0.30  # the headline student's FD within 30% of the teacher's
# The issue's budget is 30 minutes on 2 CPU cores; the training loop gets 28 of them on both cores,
# data loading and MAC counting fill the rest.
HEADLINE_MINUTES = 28.0
HEADLINE_THREADS = 2

# The 2x2 ablation at width 0.5, gating x frequency loss, in this order; "w0.5" is also the width row.
ABLATION = {
    "w0.5": {},
    "w0.5-nofreq": dict(lambda_freq=0.0),
    "w0.5-nogate": dict(wavelet_gating=False),
    "w0.5-nogate-nofreq": dict(wavelet_gating=False, lambda_freq=0.0),
}
RUNS = {
    "headline-w0.5": dict(width=0.5, steps=100000, max_minutes=HEADLINE_MINUTES * HEADLINE_THREADS, budget_clock="cpu"),
    "w0.75": dict(width=0.75, steps=SHORT_STEPS),
    "w0.25": dict(width=0.25, steps=SHORT_STEPS),
    **{name: dict(width=0.5, steps=SHORT_STEPS, **options) for name, options in ABLATION.items()},
    # The same ablation at LONG_STEPS: whether the 200-step verdict holds once the students have learnt something.
    **{f"long-{name}": dict(width=0.5, steps=LONG_STEPS, **options) for name, options in ABLATION.items()},
}


def train(names: list[str]) -> None:
    from compress.loading import load_model
    from compress.progress import progress
    from compress.slim import SlimConfig, save_student, slim

    teacher = load_model(TEACHER)
    for name in names:
        torch.set_num_threads(HEADLINE_THREADS if name == "headline-w0.5" else 1)
        config = SlimConfig(**RUNS[name])
        student = slim(teacher, config, progress=progress)
        save_student(student, MODELS / name)
        info = student.extra["slim"]
        print(f"{name}: {info['steps']} steps in {info['train_seconds']:.0f} s, MACs {info['macs_student']:,} "
              f"({info['mac_reduction']:.2f}x fewer), final {info['final_losses']}", flush=True)


def report(n: int, steps: int) -> None:
    from compress.loading import load_model
    from compress.metrics import DigitsJudge, psnr
    from compress.sampling import make_noise
    from compress.slim import network_cost
    from compress.solvers import SolverConfig
    from compress.spectral_loss import high_frequency_share
    from compress.zoo.data import load_digits_tensors
    from runtimes.bench import processor_name

    judge = DigitsJudge()
    held_out, _ = load_digits_tensors("heldout")
    solver = SolverConfig("ddim", steps)
    teacher = load_model(TEACHER)
    noise = make_noise(teacher, n, seed=0)
    reference, teacher_seconds = teacher_reference(teacher, solver, noise)
    hf_teacher = high_frequency_share(reference).mean().item()
    cost = network_cost(teacher)
    rows = [{"name": "teacher", "model": TEACHER, "macs": cost["macs"], "parameters": cost["parameters"], "mac_reduction": 1.0,
             "fd": judge.fd(reference, held_out), "psnr_vs_teacher": None, "hf_share": hf_teacher, "hf_error": 0.0,
             "sample_seconds": round(teacher_seconds, 1)}]
    for name in RUNS:
        folder = MODELS / name
        if not folder.is_dir():
            print(f"skipping {name}: not trained")
            continue
        student = load_model(str(folder))
        info = student.extra["slim"]
        start = time.perf_counter()
        out = student_samples(student, folder, solver, noise)
        hf = high_frequency_share(out).mean().item()
        rows.append({
            "name": name, "width": info["width"], "wavelet_gating": info["wavelet_gating"],
            "frequency_loss": info["config"]["lambda_freq"] > 0, "block_out_channels": info["block_out_channels"],
            "macs": info["macs_student"], "parameters": info["params_student"], "mac_reduction": info["mac_reduction"],
            "fd": judge.fd(out, held_out), "psnr_vs_teacher": psnr(out, reference),
            "hf_share": hf, "hf_error": abs(hf - hf_teacher) / hf_teacher,
            "steps": info["steps"], "train_minutes": round(info["train_seconds"] / 60, 1),
            "train_cpu_minutes": round(info["train_cpu_seconds"] / 60, 1), "threads": info["threads"],
            "final_losses": info["final_losses"], "sample_seconds": round(time.perf_counter() - start, 1),
        })
        print(rows[-1], flush=True)
    env = {"processor": processor_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "load_average": os.getloadavg(), "solver": f"ddim-{steps}", "samples": n}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "slim.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    (RESULTS / "slim.md").write_text(markdown(rows, env))
    print((RESULTS / "slim.md").read_text())


def teacher_reference(teacher, solver, noise) -> tuple[torch.Tensor, float]:
    """The teacher's samples from ``noise``, cached in slim_models/ so a report can be rerun cheaply."""
    from safetensors.torch import load_file, save_file

    from compress.sampling import sample

    cache = MODELS / f"teacher-{solver.name}{solver.steps}-n{noise.shape[0]}.safetensors"
    if cache.is_file():
        data = load_file(str(cache))
        if torch.equal(data["noise"], noise):
            return data["samples"], float(data["seconds"])
    start = time.perf_counter()
    samples = sample(teacher, solver, noise, show_progress=False)
    seconds = time.perf_counter() - start
    MODELS.mkdir(parents=True, exist_ok=True)
    save_file({"noise": noise, "samples": samples, "seconds": torch.tensor(seconds)}, str(cache))
    return samples, seconds


def student_samples(student, folder: Path, solver, noise) -> torch.Tensor:
    """Samples of a trained student, cached next to its weights (and redone when the weights change)."""
    from safetensors.torch import load_file, save_file

    from compress.sampling import sample

    cache = MODELS / "samples" / f"{folder.name}-{solver.name}{solver.steps}-n{noise.shape[0]}.safetensors"
    stamp = torch.tensor((folder / "model.safetensors").stat().st_mtime_ns)
    if cache.is_file():
        data = load_file(str(cache))
        if torch.equal(data["noise"], noise) and torch.equal(data["stamp"], stamp):
            return data["samples"]
    samples = sample(student, solver, noise, show_progress=False)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({"noise": noise, "samples": samples, "stamp": stamp}, str(cache))
    return samples


def markdown(rows: list[dict], env: dict) -> str:
    by = {r["name"]: r for r in rows}
    teacher = by["teacher"]

    def line(r, label):
        psnr = f"{r['psnr_vs_teacher']:.2f}" if r.get("psnr_vs_teacher") is not None else "—"
        train = f"{r['train_cpu_minutes']} CPU min ({r['train_minutes']} wall) / {r['steps']} steps" if "steps" in r else "—"
        return (f"| {label} | {r['macs'] / 1e6:.1f}M | {r['mac_reduction']:.2f}x | {r['parameters'] / 1e6:.3f}M | {r['fd']:.1f} "
                f"| {r['fd'] / teacher['fd']:.2f} | {psnr} | {r['hf_share']:.4f} | {r['hf_error']:.1%} | {train} |")

    head = ("| model | MACs | fewer MACs | params | FD | FD / teacher | PSNR vs teacher (dB) | HF share | HF error | training |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    out = ["# Spectral slim students of zoo:digits", "",
           f"Samples: {env['samples']} per model, {env['solver']} from the same seed-0 noise; FD against the 359 held-out digits "
           "(zoo classifier features); PSNR and HF against the teacher's samples from the same noise. HF share: the share of "
           "spectral energy (mean removed) above half the Nyquist frequency; HF error: |student - teacher| / teacher.", ""]
    if "headline-w0.5" in by:
        h = by["headline-w0.5"]
        met = h["fd"] <= (1 + FD_GOAL) * teacher["fd"]
        out += [f"## Headline: width 0.5, wavelet gating, spectrum-aware distillation, {HEADLINE_MINUTES:g} minutes on {HEADLINE_THREADS} cores", "",
                head, line(teacher, "teacher zoo:digits"), line(h, "student width 0.5"), "",
                f"{h['mac_reduction']:.2f}x fewer MACs, FD {h['fd']:.1f} vs the teacher's {teacher['fd']:.1f} "
                f"({h['fd'] / teacher['fd'] - 1:+.1%}; goal within +{FD_GOAL:.0%}: {'met' if met else 'not met'}), after {h['steps']} steps "
                f"(batch 64): {h['train_cpu_minutes']} CPU minutes on {h['threads']} threads ({h['train_minutes']} wall minutes; "
                "the budget counts the process's CPU time, so other jobs on the machine stretch the wall time, not the training).", ""]
    out += [f"## Widths (equal short budget: {SHORT_STEPS} steps each)", "", head, line(teacher, "teacher")]
    out += [line(by[k], f"width {by[k]['width']}") for k in ("w0.75", "w0.5", "w0.25") if k in by]
    out += ablation(by, "", SHORT_STEPS)
    out += ablation(by, "long-", LONG_STEPS)
    out += ["", "All students predict v (epsilon = sigma*x_t + alpha*v), whatever the teacher predicts (epsilon here); the "
            "teacher's outputs are converted to v for the frequency loss. A first round of epsilon students (the teacher's "
            "own parametrization, uniform timestep weights) looked fine by their loss but diverged under DDIM-100: their "
            "0.04 RMS epsilon error at t ~ 900 (the teacher's: 0.012) is integrated against d(sigma/alpha) ~ 150, and "
            "some pixels grew to |x| ~ 20-50 (FD 350-1700, PSNR below 2 dB). Weighting high-noise timesteps up "
            "(clamp(sigma/alpha, 1, 20)) did not rescue a 200-step run; with v the identity epsilon ~ x_t at high noise "
            "is built in and v errors there are damped by alpha."]
    out += ["", "WG-Up here is a 1x1 conv to four bands, gates and an inverse Haar transform (a learned 2x2 sub-pixel "
            "upsampler); diffusers' Upsample2D is nearest-neighbour plus a 3x3 conv at the high resolution, so turning "
            "gating off also changes the MACs (the 'MACs' column)."]
    out += ["", f"CPU: {env['processor']}, {env['cores']} cores (load average at the end of the report "
            f"{', '.join(f'{v:.1f}' for v in env['load_average'])}); torch {env['torch']}; the short runs used 1 thread each.", ""]
    out += ["## For the README", "", readme_paragraph(by, env), ""]
    return "\n".join(out) + "\n"


def ablation(by: dict, prefix: str, steps: int) -> list[str]:
    """Gating x frequency-loss table of the runs named prefix + ABLATION, with the mean FD of each ingredient on and off."""
    teacher = by["teacher"]
    runs = {k: by[prefix + k] for k in ABLATION if prefix + k in by}
    if not runs:
        return []
    out = ["", f"## Ablation at width 0.5 (equal budget: {steps} steps each)", "",
           "| wavelet gating | frequency loss | MACs | FD | FD / teacher | PSNR vs teacher (dB) | HF share | HF error |", "|---|---|---|---|---|---|---|---|"]
    for r in runs.values():
        out.append(f"| {'on' if r['wavelet_gating'] else 'off'} | {'on' if r['frequency_loss'] else 'off'} | {r['macs'] / 1e6:.1f}M "
                   f"| {r['fd']:.1f} | {r['fd'] / teacher['fd']:.2f} | {r['psnr_vs_teacher']:.2f} | {r['hf_share']:.4f} | {r['hf_error']:.1%} |")
    if len(runs) == len(ABLATION):
        def mean_fd(*keys):
            return sum(runs[k]["fd"] for k in keys) / len(keys)

        names = list(ABLATION)
        on_gate, off_gate, on_freq, off_freq = names[:2], names[2:], names[::2], names[1::2]
        out += ["", f"Averaged over the other ingredient: wavelet gating on {mean_fd(*on_gate):.1f} vs off {mean_fd(*off_gate):.1f} FD; "
                f"frequency loss on {mean_fd(*on_freq):.1f} vs off {mean_fd(*off_freq):.1f}. FD over 256 samples moves by several "
                f"points with the noise seed alone, and {steps} steps are a share of the headline's training: this table can show "
                "a large effect, not rank small ones."]
    return out


def readme_paragraph(by: dict, env: dict) -> str:
    teacher = by["teacher"]
    text = ("**Slim students** (`compress slim TEACHER --width 0.5 --out DIR`, or the recipe's `slim` section) follow "
            "Spectral Diffusion (\"Diffusion Probabilistic Model Made Slim\"): the teacher UNet's config with every width "
            "times `--width`, its down/up-samplers replaced by Haar wavelet-gated ones (DWT into LL/LH/HL/HH, each band "
            "gated by sigmoid(FFN(avgpool(x))); plain slicing and DepthToSpace, so ONNX, Core ML and OpenVINO see only "
            "standard operators), trained under `accelerate` by spectrum-aware distillation: the denoising loss + 0.1 x "
            "multi-scale feature matching through 1x1 projections + 0.1 x a frequency loss that weights each DFT bin of "
            "the teacher-student difference by |DFT(x0)|^-1. The student predicts v (the teacher's output is converted), "
            "which keeps minutes-trained students stable under DDIM where epsilon students diverged. The student is a model folder that every other command "
            "takes as MODEL (sample, export, calibrate, quantize).")
    h = by.get("headline-w0.5")
    if h:
        text += (f" On `zoo:digits` ({teacher['macs'] / 1e6:.1f}M MACs, FD {teacher['fd']:.1f} with {env['solver']}) the width-0.5 "
                 f"student has {h['macs'] / 1e6:.1f}M MACs ({h['mac_reduction']:.2f}x fewer) and {h['parameters'] / 1e6:.2f}M parameters, "
                 f"and reaches FD {h['fd']:.1f} ({h['fd'] / teacher['fd'] - 1:+.0%} against the teacher) after "
                 f"{h['train_cpu_minutes']} CPU minutes of training on {h['threads']} threads; `bench/results/slim.md` has the widths and the ablation.")
    return text


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("names", nargs="+", choices=list(RUNS))
    r = sub.add_parser("report")
    r.add_argument("--n", type=int, default=256)
    r.add_argument("--steps", type=int, default=100)
    c = sub.add_parser("teacher", help="only sample (and cache) the teacher's reference")
    c.add_argument("--n", type=int, default=256)
    c.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    if args.command == "train":
        train(args.names)
    elif args.command == "teacher":
        from compress.loading import load_model
        from compress.sampling import make_noise
        from compress.solvers import SolverConfig

        teacher = load_model(TEACHER)
        print(teacher_reference(teacher, SolverConfig("ddim", args.steps), make_noise(teacher, args.n, seed=0))[1])
    else:
        report(args.n, args.steps)


if __name__ == "__main__":
    main()
