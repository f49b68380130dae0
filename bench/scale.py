"""Stable-Diffusion scale: an SD-1.5-architecture pipeline (random weights) through every stage of `compress run`.

The folder is built here, not downloaded and not committed: the UNet of SD 1.5's configuration
(859.5 M parameters), the real-size VAE (83.7 M) and a CLIP text encoder of the real size (123.1 M)
with a byte-level tokenizer (the tests' character vocabulary, placed in the 49408-token embedding).
Random weights make the images noise, so quality is judged as PSNR against the float32 pipeline
from the same noise, which is what the chain must preserve.

    python bench/scale.py build [--folder DIR] [--resolution 256]
    python bench/scale.py run [--folder DIR] [--out DIR] [--runs 4:int8-weights,8:int8-weights,4:w8a8]
    python bench/scale.py agreement [--folder DIR] [--out DIR] # the run's float32 sampler.onnx on onnxruntime against torch
    python bench/scale.py report                               # bench/results/scale.md from scale.json

Writes bench/results/scale.{json,md}: every stage's wall time and peak RSS (from the run's report),
the machine, and the artifacts' sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_FOLDER = Path(tempfile.gettempdir()) / "diffusion-compress-sd15"
MAX_TOKENS = 77


def build(folder: Path, resolution: int) -> Path:
    """Writes the SD-1.5-architecture StableDiffusionPipeline folder (fp32 safetensors, about 4.3 GB)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(ROOT))
    from tests.tiny_pipelines import write_char_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=resolution // 8, cross_attention_dim=768, attention_head_dim=8)  # SD 1.5's config otherwise
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=resolution,
                        scaling_factor=0.18215)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_char_tokenizer(folder / "tokenizer")))
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu",
                                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id))
    for module in (unet, vae, text_encoder):
        module.eval()
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    # SD 1.5's own scheduler_config.json carries clip_sample false (PNDM ignores it); without it a DDIM built
    # from_config clips x0, which the peers' pipelines would then do and ours refuses.
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "clip_sample": False}, indent=2))
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    print(json.dumps({"folder": str(folder), "parameters": counts}))
    return folder


def recipe(folder: Path, steps: int, scheme: str) -> dict:
    """One `compress run` over the folder: a few-step export, the denoiser and decoder compressed with ``scheme``."""
    return {
        "name": f"sd15-scale-{steps}-steps-{scheme}",
        "model": f"diffusers:{folder}",
        "solver": {"name": "dpmpp-2m", "steps": steps, "guidance_scale": 7.5},
        **({"calibration": {"sampler": "ndtc", "samples": 16, "trajectory_steps": 8, "guidance_scale": 7.5}} if scheme == "w8a8" else {}),
        "quantize": {"denoiser": scheme, "decoder": scheme, "text_encoder": "int8-weights"},
        "export": {"formats": ["onnx", "openvino"]},
        "validate": {"reference": {"name": "ddim", "steps": 10}, "samples": 2, "seed": 0, "prompts": PROMPTS},
        "bench": {"runs": 3, "runtimes": ["onnxruntime", "openvino"]},
    }


PROMPTS = ["a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse at dusk"]
RUNS = "4:int8-weights,8:int8-weights,4:w8a8"


def run(folder: Path, out: Path, runs: list[tuple[int, str]]) -> None:
    """Each recipe in a fresh `compress run` process; the later ones reuse the first's baseline (--resume)."""
    import subprocess

    import yaml

    data = _load()
    data["memory_gib"] = _machine_memory_gib()
    for i, (steps, scheme) in enumerate(runs):
        path = out.parent / f"{out.name}-{steps}-{scheme}.yaml"
        path.write_text(yaml.safe_dump(recipe(folder, steps, scheme)))
        command = [sys.executable, "-m", "compress", "run", str(path), "--out", str(out), "--force"] + (["--resume"] if i else [])
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
        report = json.loads((out / "report" / "report.json").read_text())
        data.setdefault("runs", {})[f"{steps} steps, {scheme}"] = {
            "stages": report["stages"], "rows": report["rows"], "environment": report["environment"],
            "bytes": {str(p.relative_to(out)): p.stat().st_size for p in sorted((out / "artifacts").rglob("*")) if p.is_file()}}
        _save(data)
    write_markdown(data)


def agreement(folder: Path, export: Path) -> dict:
    """An exported float32 sampler.onnx on onnxruntime against the same graph in torch: one prompt, the same
    noise and embeddings, guidance 7.5."""
    import numpy as np

    from compress.components import LatentDecoder
    from compress.export_chain import resolve_solver
    from compress.loading import load_pipeline
    from compress.sampling import make_noise
    from export.sampler_graph import NEGATIVE, SamplerGraph

    steps = json.loads((export / "sampler.json").read_text())["solver"]["steps"]
    pipeline = load_pipeline(f"diffusers:{folder}")
    solver = resolve_solver(pipeline.denoiser, "dpmpp-2m", steps, guidance=7.5)  # as `compress run` resolved it: the pipeline's spacing
    graph = SamplerGraph(pipeline.denoiser, solver, guidance=True, decoder=LatentDecoder(pipeline.vae), negative_inputs=True)
    with torch.no_grad():
        feeds = {"noise": make_noise(pipeline.denoiser, 1, 0), "encoder_hidden_states": pipeline.encode_prompts(PROMPTS[:1]),
                 NEGATIVE + "encoder_hidden_states": pipeline.negative_condition(1, None), "guidance_scale": torch.tensor([7.5])}
        expected = graph(*[feeds[n] for n in graph.input_names]).numpy()
    del pipeline, graph  # the sessions below need the memory
    feeds = {k: v.numpy() for k, v in feeds.items()}
    got = _run_sampler(export / "sampler.onnx", feeds)
    result = {"steps": steps, "max_abs_diff": float(np.abs(got - expected).max()), "range": float(expected.max() - expected.min()),
              "psnr_vs_float32": {}}
    for quantized in sorted(export.parent.glob(f"{export.name}-*")):
        image = _run_sampler(quantized / "sampler.onnx", feeds)
        result["psnr_vs_float32"][quantized.name] = float(10 * np.log10(1.0 / np.mean((image - got) ** 2)))
    return result


def _run_sampler(path: Path, feeds: dict):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def _machine_memory_gib() -> float:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)


def _load() -> dict:
    path = RESULTS / "scale.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    if "agreement" in data:  # the first run's, from before agreements were keyed by their steps
        data.setdefault("agreements", {}).setdefault(f"{data['agreement']['steps']} steps", data.pop("agreement"))
    return data


def _save(data: dict) -> None:
    (RESULTS / "scale.json").write_text(json.dumps(data, indent=2) + "\n")


def write_markdown(data: dict) -> None:
    lines = ["# Stable-Diffusion scale: an SD-1.5-architecture pipeline through `compress run`", "",
             "Random weights (`bench/scale.py build`): UNet 859.5 M parameters, VAE 83.7 M, CLIP text encoder 123.1 M; "
             "images 256x256 (32x32 latents), DPM-Solver++(2M), guidance 7.5, batch 1.", ""]
    for name, run in data.get("runs", {}).items():
        env = run["environment"]
        memory = f"{data['memory_gib']} GiB of memory; " if data.get("memory_gib") else ""
        libraries = ", ".join(f"{k} {v}" for k, v in (env.get("libraries") or {}).items())
        lines += [f"## {name}", "", f"Machine: {env.get('processor')}, {env.get('cpu_count')} cores, {memory}{libraries}.", "",
                  "| stage | seconds | peak RSS GiB |", "|---|---|---|"]
        lines += [f"| {stage} | {s['seconds']:.0f} | {s['peak_rss_mb'] / 1024:.1f} |" for stage, s in run["stages"].items()]
        peak = max(s["peak_rss_mb"] for s in run["stages"].values()) / 1024
        lines += ["", f"Largest peak: {peak:.1f} GiB.", "", "| artifact | runtime | scheme | latency ms | MB | PSNR dB vs baseline |", "|---|---|---|---|---|---|"]
        for r in run["rows"]:
            if r.get("status", "ok") == "ok":
                lines.append(f"| {r['artifact']} | {r['runtime']} | {r.get('scheme', '-')} | {r.get('latency_ms', 0):.0f} | "
                             f"{(r.get('bytes') or 0) / 1e6:.0f} | {r.get('psnr', float('nan')):.2f} |")
        lines.append("")
    lines += ["PSNR against the baseline compares with diffusers' DDIM-10 images: a 4- or 8-step DPM-Solver++ ends elsewhere on a",
              "random model's noise-like images, so the figure is the same for every row; what the chain must preserve is each",
              "artifact against the float32 sampler (below). Latencies were measured while other jobs shared the 2 cores.", ""]
    for a in data.get("agreements", {}).values():
        lines += [f"## float32 sampler, {a['steps']} steps: onnxruntime against torch", "",
                  f"Same prompt embeddings and noise, {a['steps']} steps: max |onnxruntime - torch| = {a['max_abs_diff']:.2e} over an output "
                  f"range of {a['range']:.3f} ({a['max_abs_diff'] / a['range']:.1e} of the range).", ""]
        lines += [f"- {name} sampler against the float32 sampler on onnxruntime, same feeds: PSNR {value:.1f} dB (images in [0, 1])."
                  for name, value in a.get("psnr_vs_float32", {}).items()] + [""]
    (RESULTS / "scale.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["build", "run", "agreement", "report"])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "diffusion-compress-sd15-run")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--runs", default=RUNS, help="steps:scheme pairs, comma-separated")
    args = parser.parse_args()
    if args.phase == "build":
        build(args.folder, args.resolution)
    elif args.phase == "run":
        run(args.folder, args.out, [(int(steps), scheme) for steps, scheme in (pair.split(":") for pair in args.runs.split(","))])
    elif args.phase == "agreement":
        data = _load()
        result = agreement(args.folder, args.out / "artifacts" / "float32")
        data.setdefault("agreements", {})[f"{result['steps']} steps"] = result
        data["memory_gib"] = _machine_memory_gib()
        _save(data)
        write_markdown(data)
    else:
        write_markdown(_load())


if __name__ == "__main__":
    main()
