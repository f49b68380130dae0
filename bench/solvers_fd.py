"""FD versus NFE for every deterministic solver on zoo:digits, and the gain of searched schedules.

FD is measured against the held-out real digits on the zoo classifier's features; DDIM-100
and DDPM-1000 samples from the same noise are the references. Writes
bench/results/solvers_fd.{json,md}. Run: python bench/solvers_fd.py [--n 512]
(--search-only redoes the searched schedules and keeps the other figures of the last run).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from compress.loading import load_model
from compress.metrics import DigitsJudge
from compress.sampling import make_noise, sample
from compress.schedule_search import search_timesteps
from compress.solvers import SOLVERS, SolverConfig
from compress.zoo.data import load_digits_tensors
from runtimes.bench import processor_name

RESULTS = Path(__file__).parent / "results"
NFES = (4, 6, 8, 10, 20)


def steps_for(name: str, nfe: int) -> int:
    """PNDM spends one extra evaluation on its warm-up; every other solver one per step."""
    return nfe - 1 if name == "pndm" else nfe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--search", default="dpmpp-2m,unipc-bh2,ddim", help="solvers to search schedules for")
    parser.add_argument("--search-only", action="store_true", help="keep the last run's references and NFE rows")
    args = parser.parse_args()
    digits = load_model("zoo:digits")
    judge = DigitsJudge()
    held_out, _ = load_digits_tensors("heldout")
    noise = make_noise(digits, args.n, seed=0)

    def fd_of(config: SolverConfig) -> tuple[float, float]:
        start = time.perf_counter()
        out = sample(digits, config, noise, show_progress=False)
        return judge.fd(out, held_out), time.perf_counter() - start

    env = {"processor": processor_name(), "threads": torch.get_num_threads(), "n": args.n}
    references, rows, searched = {}, [], []

    def save() -> None:
        # Written after every measurement: the references come last and take longest.
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "solvers_fd.json").write_text(json.dumps({"environment": env, "references": references, "rows": rows, "searched": searched}, indent=2) + "\n")
        if rows:
            (RESULTS / "solvers_fd.md").write_text(markdown(references, rows, searched, env))

    if args.search_only:
        last = json.loads((RESULTS / "solvers_fd.json").read_text())
        if last["environment"]["n"] != args.n:
            raise SystemExit(f"the last run used --n {last['environment']['n']}; pass the same to --search-only")
        references, rows = last["references"], last["rows"]
    else:
        references["ddim-100"], _ = fd_of(SolverConfig("ddim", 100))
        print("ddim-100", references["ddim-100"], flush=True)
        for name, spec in SOLVERS.items():
            if spec.stochastic:
                continue
            for nfe in NFES:
                fd, seconds = fd_of(SolverConfig(name, steps_for(name, nfe)))
                rows.append({"solver": name, "nfe": nfe, "fd": fd, "seconds": seconds})
                print(name, nfe, fd, flush=True)
            save()

    for name in args.search.split(","):
        for nfe in (4, 6, 8):
            config = SolverConfig(name, steps_for(name, nfe))
            found = search_timesteps(digits, config)
            fd_default = next(r["fd"] for r in rows if r["solver"] == name and r["nfe"] == nfe)
            fd_found, _ = fd_of(SolverConfig(name, config.steps, timesteps=tuple(found.timesteps)))
            searched.append({"solver": name, "nfe": nfe, "fd_default": fd_default, "fd_searched": fd_found, **found.as_dict()})
            print("searched", name, nfe, fd_default, fd_found, found.timesteps, flush=True)
            save()

    if not args.search_only:
        references["ddpm-1000"], _ = fd_of(SolverConfig("ddpm", 1000))
        print("ddpm-1000", references["ddpm-1000"], flush=True)
    save()

    print(markdown(references, rows, searched, env))


def markdown(references, rows, searched, env) -> str:
    names = list(dict.fromkeys(r["solver"] for r in rows))
    table = {(r["solver"], r["nfe"]): r["fd"] for r in rows}
    lines = [f"# FD versus NFE on zoo:digits ({env['n']} samples, seed 0; FD against held-out real digits)", "",
             "References (same noise): " + ", ".join(f"{k} FD {v:.2f}" for k, v in references.items()), "",
             "| solver | " + " | ".join(f"NFE {n}" for n in NFES) + " |", "|---|" + "---|" * len(NFES)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{table[(name, n)]:.2f}" for n in NFES) + " |")
    best8 = min((table[(n, 8)], n) for n in names)
    ratio = best8[0] / references["ddim-100"]
    lines += ["", f"Best at NFE 8: {best8[1]} with FD {best8[0]:.2f}, {ratio:.2f}x DDIM-100's FD (goal: within 1.10x).", ""]
    if searched:
        lines += ["## Searched schedules (coordinate descent against a DDIM-250 teacher on 16 noises of another seed)", "",
                  "| solver | NFE | FD default (trailing) | FD searched | teacher MSE before -> after | timesteps |", "|---|---|---|---|---|---|"]
        for s in searched:
            lines.append(f"| {s['solver']} | {s['nfe']} | {s['fd_default']:.2f} | {s['fd_searched']:.2f} | "
                         f"{s['error_start']:.4f} -> {s['error_found']:.4f} | {s['timesteps']} |")
    lines += ["", f"CPU ({env['processor']}, {env['threads']} threads)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
