"""Text-to-image pipelines end to end: export fidelity, per-component int8 quality and size, latency.

On zoo:digits-t2i (or any StableDiffusionPipeline folder given with --model), from the same
latent noise and prompts:
- diffusers' own pipeline with DDIM 50 (its default guidance 7.5): prompted-digit share and FD;
- the 8-step DPM-Solver++(2M) sampler with the VAE decoder baked in, exported and run on
  onnxruntime, against diffusers' pipeline with the same scheduler and steps (image PSNR: this
  is the same math, so it checks the export) and against the DDIM-50 baseline;
- W8A8 of the denoiser alone, and W8A8 denoiser + W8A8 decoder + int8-weight text encoder,
  against the float32 export: image PSNR, prompted-digit share, bytes, and each component's own
  PSNR (text encoder: its hidden states; decoder: images from the same float latents;
  denoiser: the W8A8-denoiser-only images);
- latency at batch 1 of each component and of the whole prompt -> image path, on onnxruntime
  and OpenVINO (f32), float32 and int8, timed through the toolkit's own runtimes/bench.py.

Writes bench/results/t2i.{json,md}. Run: python bench/t2i.py [--samples 256] [--runs 20]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from calibration import CalibrationConfig, calibrate
from compress.export_chain import add_openvino, export_artifacts
from compress.loading import load_pipeline
from compress.metrics import DigitsJudge, psnr
from compress.quantize import QuantizeConfig, quantize_
from compress.sampling import make_noise, sample
from compress.scheduler_config import solver_from_scheduler_config
from runtimes.bench import processor_name
from runtimes.runners import get_runner
from runtimes.text_to_image import PipelineRunner, diffusers_images, diffusers_pipeline, digit_view

RESULTS = Path(__file__).parent / "results"
GUIDANCE, STEPS, REFERENCE_STEPS = 7.5, 8, 50
GOALS = {"export_psnr_db": 40.0, "share_points": 3.0, "denoiser_w8a8_psnr_db": 30.0, "all_int8_psnr_db": 28.0, "bytes_ratio": 0.35}
SCHEMES = {
    "w8a8 denoiser": dict(denoiser="w8a8"),
    "w8a8 denoiser + w8a8 decoder + int8-weights text encoder": dict(denoiser="w8a8", decoder="w8a8", text_encoder="int8-weights"),
}
APP_FILES = ("sampler", "text_encoder", "text_encoder_2")  # what the prompt -> image path reads


def digit_share(judge: DigitsJudge, images: torch.Tensor, labels: torch.Tensor) -> float:
    return judge.agreement(digit_view(images), labels)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="zoo:digits-t2i")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    pipeline = load_pipeline(args.model)
    folder = pipeline.extra["folder"]
    zoo = args.model.startswith("zoo:")
    if zoo:
        from compress.zoo.data import load_digits_tensors
        from compress.zoo.t2i import digit_prompts

        prompts, labels = digit_prompts(args.samples)
        judge, held_out = DigitsJudge(), load_digits_tensors("heldout")[0]
    else:
        prompts, labels, judge = ["a photograph of an astronaut riding a horse"] * args.samples, None, None
    noise = make_noise(pipeline.denoiser, args.samples, seed=0)
    results: dict = {"model": args.model, "samples": args.samples, "guidance_scale": GUIDANCE, "steps": STEPS}

    def quality(images, reference=None) -> dict:
        out = {} if reference is None else {"psnr_db": psnr(images, reference, 1.0)}
        if judge is not None:
            out.update(fd=judge.fd(digit_view(images), held_out), prompted_digit_share=digit_share(judge, images, labels))
        return out

    # diffusers itself: the DDIM-50 baseline, and the scheduler our 8-step sampler bakes in.
    start = time.perf_counter()
    ddim = diffusers_images(diffusers_pipeline(folder, "ddim"), prompts, noise, REFERENCE_STEPS, GUIDANCE)
    results["diffusers_ddim50"] = {**quality(ddim), "seconds": time.perf_counter() - start}
    dpm_pipe = diffusers_pipeline(folder, "dpmpp-2m")
    dpm = diffusers_images(dpm_pipe, prompts, noise, STEPS, GUIDANCE)
    results["diffusers_dpmpp2m_8"] = quality(dpm, ddim)
    solver = solver_from_scheduler_config(dict(dpm_pipe.scheduler.config), STEPS, GUIDANCE)

    work = Path(tempfile.mkdtemp(prefix="t2i-bench-"))
    start = time.perf_counter()
    export_artifacts(pipeline, solver, work / "float32", ["onnx", "openvino"])
    results["export_seconds"] = time.perf_counter() - start
    prompt_list = list(dict.fromkeys(prompts))
    calib_config = CalibrationConfig(sampler="ndtc", samples=args.calibration_samples, trajectory_steps=25, guidance_scale=GUIDANCE)
    pipeline.draw_from_prompts(prompt_list)
    calib = calibrate(pipeline.denoiser, calib_config, final_latents=solver)
    folders = {"float32": work / "float32"}
    for label, schemes in SCHEMES.items():
        out = work / label.replace(" ", "_").replace("+", "")
        start = time.perf_counter()
        add_openvino(quantize_(folders["float32"], calib, QuantizeConfig(granularity="per-step", **schemes), out_dir=out), out)
        results.setdefault("quantize_seconds", {})[label] = time.perf_counter() - start
        folders[label] = out

    # Images of every folder on onnxruntime (the app's path: tokenizer.json -> text encoder -> sampler).
    images = {}
    for label, path in folders.items():
        runner = PipelineRunner(path, "onnxruntime")
        images[label] = torch.cat([torch.from_numpy(runner.generate(prompts[i : i + 32], noise[i : i + 32].numpy(), None, GUIDANCE))
                                   for i in range(0, len(prompts), 32)]).float()
    float_images = images["float32"]
    results["float32_onnxruntime"] = {"vs_diffusers_same_scheduler": quality(float_images, dpm), "vs_ddim50": quality(float_images, ddim)}
    float_bytes = app_bytes(folders["float32"])
    for label in SCHEMES:
        results.setdefault("int8", {})[label] = {**quality(images[label], float_images), "vs_ddim50": quality(images[label], ddim),
                                                 "bytes": app_bytes(folders[label]), "bytes_ratio": app_bytes(folders[label]) / float_bytes}
    results["float32_bytes"] = float_bytes
    results["components"] = component_psnr(pipeline, solver, folders, prompt_list, noise[: len(prompt_list)])

    # Latency at batch 1, per component and whole, float32 and int8, onnxruntime and OpenVINO, one thread and all cores.
    rows = []
    for threads in (1, None):
        for runtime in ("onnxruntime", "openvino"):
            ok, reason = get_runner(runtime).available()
            if not ok:
                rows.append({"runtime": runtime, "status": reason})
                continue
            for label in ("float32", list(SCHEMES)[-1]):
                runner = PipelineRunner(folders[label], runtime, threads=threads)
                rows.append({"runtime": runtime, "threads": threads or "all", "scheme": "float32" if label == "float32" else "int8",
                             **runner.latencies(prompts[0], noise[:1].numpy(), None, GUIDANCE, args.runs)})
    results["latency"] = rows
    results["environment"] = {"processor": processor_name(), "cpu_count": __import__("os").cpu_count(), "torch": torch.__version__,
                              "onnxruntime": __import__("onnxruntime").__version__, "openvino": __import__("openvino").get_version().split("-")[0]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "t2i.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (RESULTS / "t2i.md").write_text(markdown(results))
    print(markdown(results))


def app_bytes(folder: Path) -> int:
    """Bytes of the ONNX files the prompt -> image path reads (tokenizer files included)."""
    info = json.loads((folder / "pipeline.json").read_text())
    files = [folder / info["components"][k]["onnx"] for k in APP_FILES if k in info["components"]]
    files += [folder / t["file"] for t in info["tokenizers"].values()]
    return sum(f.stat().st_size for f in files)


def component_psnr(pipeline, solver, folders: dict, prompts: list[str], noise: torch.Tensor) -> dict:
    """Each quantized component against its float32 self, on the inputs it really gets."""
    full = folders[list(SCHEMES)[-1]]
    out = {}
    for encoder in pipeline.text_encoders:
        ids = {"input_ids": encoder.tokenize(prompts).numpy()}
        ref, q = (np.asarray(load(folders["float32"], encoder.name).run(ids)), np.asarray(load(full, encoder.name).run(ids)))
        out[encoder.name] = psnr(torch.from_numpy(q), torch.from_numpy(ref), float(ref.max() - ref.min()))
    latents = sample(pipeline.denoiser, solver, noise, pipeline.encode_prompts(prompts), show_progress=False)
    ref = load(folders["float32"], "vae_decoder").run({"latents": latents.numpy()})
    q = load(full, "vae_decoder").run({"latents": latents.numpy()})
    out["vae_decoder"] = psnr(torch.from_numpy(np.asarray(q)), torch.from_numpy(np.asarray(ref)), 1.0)
    return out


def load(folder: Path, kind: str):
    return get_runner("onnxruntime").load(folder / f"{kind}.onnx")


def markdown(r: dict) -> str:
    env = r["environment"]
    ddim, fl = r["diffusers_ddim50"], r["float32_onnxruntime"]
    share = "prompted_digit_share" in ddim
    lines = [f"# Text-to-image: {r['model']}", "",
             f"{r['samples']} prompts (every digit, every template), one latent noise each (seed 0), guidance {r['guidance_scale']}; "
             f"CPU: {env['processor']} ({env['cpu_count']} cores), torch {env['torch']}, onnxruntime {env['onnxruntime']}, OpenVINO {env['openvino']}.", ""]
    lines += ["## Export fidelity", "", "| images | vs | PSNR dB | FD | prompted digit |", "|---|---|---|---|---|"]

    def q(d, key):
        v = d.get(key)
        return "" if v is None else (f"{v:.1%}" if key == "prompted_digit_share" else f"{v:.2f}")

    lines.append(f"| diffusers DDIM-{REFERENCE_STEPS} | - | | {q(ddim, 'fd')} | {q(ddim, 'prompted_digit_share')} |")
    lines.append(f"| diffusers DPM-Solver++(2M) {r['steps']} | DDIM-{REFERENCE_STEPS} | {q(r['diffusers_dpmpp2m_8'], 'psnr_db')} | "
                 f"{q(r['diffusers_dpmpp2m_8'], 'fd')} | {q(r['diffusers_dpmpp2m_8'], 'prompted_digit_share')} |")
    same = fl["vs_diffusers_same_scheduler"]
    lines.append(f"| our sampler.onnx (decoder baked in), onnxruntime | diffusers, same scheduler and steps | {q(same, 'psnr_db')} | "
                 f"{q(same, 'fd')} | {q(same, 'prompted_digit_share')} |")
    lines.append(f"| our sampler.onnx | DDIM-{REFERENCE_STEPS} | {q(fl['vs_ddim50'], 'psnr_db')} | | |")
    lines += ["", "## Int8 against the float32 export (onnxruntime)", "",
              "| scheme | image PSNR dB | FD | prompted digit | app bytes | x float32 |", "|---|---|---|---|---|---|"]
    lines.append(f"| float32 | | {q(same, 'fd')} | {q(same, 'prompted_digit_share')} | {r['float32_bytes'] / 1e6:.2f} MB | 1 |")
    for label, d in r["int8"].items():
        lines.append(f"| {label} | {q(d, 'psnr_db')} | {q(d, 'fd')} | {q(d, 'prompted_digit_share')} | {d['bytes'] / 1e6:.2f} MB | {d['bytes_ratio']:.3f} |")
    lines += ["", "Each component's own PSNR (int8 against float32, on the inputs it really gets): "
              + ", ".join(f"{k} {v:.1f} dB" for k, v in r["components"].items())
              + f"; denoiser (W8A8, decoder and text encoder float): {r['int8'][list(SCHEMES)[0]]['psnr_db']:.1f} dB (image).", ""]
    lines += ["## Latency at batch 1 (median ms, runtimes/bench.py)", "",
              "| runtime | threads | weights | text encoder | sampler (8 steps + decoder) | prompt -> image |", "|---|---|---|---|---|---|"]
    for row in r["latency"]:
        if "latency_ms" not in row:
            lines.append(f"| {row['runtime']} | | | not measured: {row['status']} | | |")
            continue
        lines.append(f"| {row['runtime']} | {row['threads']} | {row['scheme']} | {row['latency_text_encoder_ms']:.2f} | "
                     f"{row['latency_sampler_ms']:.1f} | {row['latency_ms']:.1f} |")
    goals = GOALS
    verdicts = [("export PSNR vs diffusers, same scheduler", same["psnr_db"], f">= {goals['export_psnr_db']}", same["psnr_db"] >= goals["export_psnr_db"])]
    int8 = list(r["int8"].values())
    verdicts.append(("W8A8 denoiser PSNR", int8[0]["psnr_db"], f">= {goals['denoiser_w8a8_psnr_db']}", int8[0]["psnr_db"] >= goals["denoiser_w8a8_psnr_db"]))
    verdicts.append(("all-int8 PSNR", int8[1]["psnr_db"], f">= {goals['all_int8_psnr_db']}", int8[1]["psnr_db"] >= goals["all_int8_psnr_db"]))
    verdicts.append(("all-int8 bytes ratio", int8[1]["bytes_ratio"], f"<= {goals['bytes_ratio']}", int8[1]["bytes_ratio"] <= goals["bytes_ratio"]))
    if share:
        for label, d in (("8-step sampler", same), ("all-int8", int8[1])):
            gap = abs(d["prompted_digit_share"] - ddim["prompted_digit_share"]) * 100
            verdicts.append((f"{label} prompted-digit share vs DDIM-{REFERENCE_STEPS} (points)", gap, f"<= {goals['share_points']}", gap <= goals["share_points"]))
    lines += ["", "## Goals", "", "| goal | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | {target} | {'yes' if ok else 'no'} |" for name, value, target, ok in verdicts]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
