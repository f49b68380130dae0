"""Quality of the zoo models: are DDIM-100 samples digits, and how far are they from real ones?
zoo:digits-t2i is sampled by diffusers' own StableDiffusionPipeline (DDIM-50, as users run it).

Writes bench/results/zoo_quality.{json,md}. Run: python bench/zoo_quality.py [--n 256]
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
from compress.solvers import SolverConfig
from compress.zoo.data import load_digits_tensors
from runtimes.bench import processor_name

RESULTS = Path(__file__).parent / "results"


def t2i_rows(judge: DigitsJudge, held_out: torch.Tensor, n: int, steps: int = 50) -> list[dict]:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from compress.zoo import pipeline_folder
    from compress.zoo.t2i import digit_prompts

    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_folder("digits-t2i")), local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts, labels = digit_prompts(n)
    rows = []
    for guidance in (7.5, 3.0):  # 7.5: diffusers' default
        start = time.perf_counter()
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(0), output_type="np").images
        seconds = time.perf_counter() - start
        digits = torch.from_numpy(images).mean(-1)[:, None] * 2 - 1  # [0, 1] RGB -> the judge's [-1, 1] gray
        rows.append({"samples": f"zoo:digits-t2i (StableDiffusionPipeline) ddim-{steps} guidance {guidance:g}", "n": n,
                     **judge.summary(digits, held_out, labels), "seconds": seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    judge = DigitsJudge()
    train, _ = load_digits_tensors("train")
    held_out, held_labels = load_digits_tensors("heldout")
    rows = [{"samples": "real train digits", "n": len(train), **judge.summary(train, held_out)},
            {"samples": "real held-out digits", "n": len(held_out), **judge.summary(held_out, held_out, held_labels)}]

    ddim = SolverConfig("ddim", args.steps)
    digits = load_model("zoo:digits")
    start = time.perf_counter()
    out = sample(digits, ddim, make_noise(digits, args.n, seed=0))
    rows.append({"samples": f"zoo:digits ddim-{args.steps}", "n": args.n, **judge.summary(out, held_out), "seconds": time.perf_counter() - start})

    cond = load_model("zoo:digits-cond")
    labels = torch.arange(args.n) % 10
    for guidance in (1.0, 3.0):
        start = time.perf_counter()
        out = sample(cond, SolverConfig("ddim", args.steps, guidance_scale=guidance), make_noise(cond, args.n, seed=0), labels)
        rows.append({"samples": f"zoo:digits-cond ddim-{args.steps} guidance {guidance:g}", "n": args.n,
                     **judge.summary(out, held_out, labels), "seconds": time.perf_counter() - start})

    rows += t2i_rows(judge, held_out, args.n)

    RESULTS.mkdir(exist_ok=True)
    env = {"processor": processor_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    (RESULTS / "zoo_quality.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    lines = ["| samples | n | FD vs held-out | confident (>0.9) | class agreement |", "|---|---|---|---|---|"]
    for r in rows:
        agreement = f"{r['class_agreement']:.1%}" if "class_agreement" in r else ""
        lines.append(f"| {r['samples']} | {r['n']} | {r['fd']:.2f} | {r['confident_share']:.1%} | {agreement} |")
    text = "\n".join(lines) + f"\n\nCPU ({env['processor']}, {env['threads']} threads), torch {env['torch']}, seed 0.\n"
    (RESULTS / "zoo_quality.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
