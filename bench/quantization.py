"""Timestep-aware post-training quantization: quality, ablation and speed on onnxruntime CPU.

Quality (zoo:digits, and zoo:digits-cond with guidance 3), dpmpp-2m 8 steps, baked sampler.onnx:
PSNR of the quantized sampler's samples against the float32 sampler's from the same noise, FD on
the zoo classifier's features against the held-out digits, class agreement (conditional model).
Ablation: calibration sampler (ndtc, uniform, solver) x granularity (per-step, shared) x scheme.
Speed: float32 vs W8A8 per-step sampler at batch 1, on zoo:digits and on the DDPM CIFAR-10
architecture (random weights), both on onnxruntime's CPU provider in this same run.
Flow transformer (zoo:digits-flow, guidance 1.5, the VAE decoder baked in and kept float): image PSNR of
the W8A8 denoiser against the float32 sampler, prompted-digit share, and the ablation per-step vs
shared scales and SmoothQuant (alpha 0.8) on vs off, and the weight-only schemes (fp16, int8-weights, int4-weights).

Writes bench/results/quantization.{json,md}. Run:
    python bench/quantization.py                       # everything that can run here
    python bench/quantization.py --models cifar        # speed on the CIFAR-10 architecture only
    python bench/quantization.py --models digits-flow --samples 256   # the flow transformer's section only
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from calibration import CalibrationConfig, calibrate
from compress.denoiser import Denoiser
from compress.metrics import DigitsJudge, psnr
from compress.quantize import QuantizeConfig, quantize_
from compress.solvers import SolverConfig
from compress.zoo.models import ddpm_cifar10_architecture
from export.onnx_export import export_onnx
from export.openvino_export import export_openvino
from runtimes.bench import processor_name
from sampler_runs import paired_latency_ms, run_sampler, sampler_feeds

RESULTS = Path(__file__).parent / "results"
SOLVER = dict(name="dpmpp-2m", steps=8)
GOALS = {"psnr_db": 30.0, "fd_relative": 0.05, "agreement_points": 1.0, "speedup": 1.8}


def latency_ms(path, feeds: dict, threads: int, repeats: int) -> dict:
    return paired_latency_ms({"x": path}, feeds, threads, runs=max(1, repeats // 5))["x"]


# ----------------------------------------------------------------------------- zoo quality and ablation


def zoo_quality(name: str, guidance: float | None, args, work: Path, log) -> dict:
    from compress.loading import load_model
    from compress.zoo.data import load_digits_tensors

    denoiser = load_model(f"zoo:{name}")
    solver = SolverConfig(SOLVER["name"], SOLVER["steps"], guidance_scale=guidance)
    folder = work / name / "float"
    export_onnx(denoiser, solver, folder)
    feeds, labels = sampler_feeds(denoiser, args.samples, seed=1234, guidance=guidance)
    judge = DigitsJudge()
    heldout, _ = load_digits_tensors("heldout")
    reference = run_sampler(folder / "sampler.onnx", feeds, args.threads)

    def metrics(samples: torch.Tensor) -> dict:
        out = {"psnr_db": psnr(samples, reference), "fd": judge.fd(samples, heldout)}
        if labels is not None:
            out["class_agreement"] = judge.agreement(samples, labels)
        return out

    float_row = {"artifact": "float32", "calibration": "-", "granularity": "-", "scheme": "float32", **metrics(reference),
                 "bytes": (folder / "sampler.onnx").stat().st_size, **latency_ms(folder / "sampler.onnx", feeds, args.threads, args.repeats)}
    rows = [float_row]
    log(f"{name}: float32 FD {float_row['fd']:.3f}")
    for scheme in ("fp16", "int8-weights"):
        (record,) = quantize_(folder, None, QuantizeConfig(scheme=scheme, targets=["sampler"]), out_dir=work / name / scheme)
        rows.append({"artifact": scheme, "calibration": "-", "granularity": "-", "scheme": scheme,
                     **metrics(run_sampler(record["path"], feeds, args.threads)), "bytes": record["bytes"],
                     **latency_ms(record["path"], feeds, args.threads, args.repeats)})
    for sampler in ("ndtc", "uniform", "solver"):
        start = time.perf_counter()
        calib = calibrate(denoiser, CalibrationConfig(sampler=sampler, samples=args.calib_samples, guidance_scale=guidance,
                                                      trajectory_steps=args.trajectory_steps), solver)
        log(f"{name}: calibration {sampler}: {len(calib)} inputs, {len(calib.noise)} trajectories ({time.perf_counter() - start:.0f} s)")
        for granularity in ("per-step", "shared"):
            for scheme in args.schemes:
                config = QuantizeConfig(scheme=scheme, granularity=granularity, subset_size=args.calib_samples, targets=["sampler"])
                out = work / name / f"{sampler}-{granularity}-{scheme}"
                start = time.perf_counter()
                (record,) = quantize_(folder, calib, config, out_dir=out)
                seconds = time.perf_counter() - start
                row = {"artifact": f"{scheme} {granularity}", "calibration": sampler, "granularity": granularity, "scheme": scheme,
                       **metrics(run_sampler(record["path"], feeds, args.threads)), "bytes": record["bytes"],
                       **latency_ms(record["path"], feeds, args.threads, args.repeats), "quantize_s": seconds,
                       "calibration_inputs": record.get("calibration_inputs"), "layers_with_per_step_scales": record.get("layers_with_per_step_scales")}
                rows.append(row)
                log(f"{name}: {sampler:8s} {granularity:9s} {scheme}: PSNR {row['psnr_db']:.2f} dB, FD {row['fd']:.3f}"
                    + (f", agreement {row['class_agreement']:.3f}" if "class_agreement" in row else "") + f", {row['median_ms']:.1f} ms")
    for row in rows:
        row["fd_relative"] = row["fd"] / float_row["fd"] - 1
        if "class_agreement" in row:
            row["agreement_points"] = 100 * (row["class_agreement"] - float_row["class_agreement"])
        row["speedup"] = float_row["median_ms"] / row["median_ms"]
    headline = next(r for r in rows if r["calibration"] == args.headline_calibration and r["granularity"] == "per-step" and r["scheme"] == "w8a8")
    goals = {"psnr": headline["psnr_db"] >= GOALS["psnr_db"], "fd_within_5_percent": abs(headline["fd_relative"]) <= GOALS["fd_relative"]}
    if "agreement_points" in headline:
        goals["agreement_within_1_point"] = abs(headline["agreement_points"]) <= GOALS["agreement_points"]
    return {"model": f"zoo:{name}", "guidance_scale": guidance, "solver": SOLVER, "samples": args.samples,
            "calibration_samples": args.calib_samples, "headline": headline, "goals_met": goals, "rows": rows}


# ----------------------------------------------------------------------------- the flow transformer


FLOW_GUIDANCE = 1.5  # at 3 the digits collapse onto a few shapes (FD 300 against 109), as zoo:digits-t2i does at 7.5


def flow_quality(args, work: Path, log) -> dict:
    from compress.denoiser import NEGATIVE_PREFIX, SHARED_CONDITION_KEYS
    from compress.export_chain import export_artifacts
    from compress.loading import load_pipeline
    from compress.zoo.data import load_digits_tensors
    from compress.zoo.t2i import all_prompts, digit_prompts
    from runtimes.text_to_image import digit_view

    pipeline = load_pipeline("zoo:digits-flow")
    solver = SolverConfig(SOLVER["name"], SOLVER["steps"], guidance_scale=FLOW_GUIDANCE)
    folder = work / "digits-flow" / "float"
    export_artifacts(pipeline, solver, folder, ["onnx"])
    prompts, labels = digit_prompts(args.samples)
    noise = torch.randn((args.samples, *pipeline.denoiser.sample_shape), generator=torch.Generator().manual_seed(1234))
    negative = pipeline.negative_condition(args.samples)
    feeds = {"noise": noise.numpy(), **{k: v.numpy() for k, v in pipeline.encode_prompts(prompts).items()},
             **{NEGATIVE_PREFIX + k: v.numpy() for k, v in negative.items() if k not in SHARED_CONDITION_KEYS},
             "guidance_scale": __import__("numpy").array([FLOW_GUIDANCE], dtype="float32")}
    judge, heldout = DigitsJudge(), load_digits_tensors("heldout")[0]
    reference = run_sampler(folder / "sampler.onnx", feeds, args.threads)

    def metrics(images: torch.Tensor) -> dict:
        view = digit_view(images)
        return {"psnr_db": psnr(images, reference, 1.0), "fd": judge.fd(view, heldout), "prompted_digit_share": judge.agreement(view, labels)}

    pipeline.draw_from_prompts(all_prompts()[1:])
    start = time.perf_counter()
    calib = calibrate(pipeline.denoiser, CalibrationConfig(sampler="ndtc", samples=args.calib_samples, guidance_scale=FLOW_GUIDANCE,
                                                           trajectory_steps=args.trajectory_steps), solver)
    log(f"digits-flow: calibration {len(calib)} inputs ({time.perf_counter() - start:.0f} s)")
    rows = [{"artifact": "float32", "granularity": "-", "smooth_quant": "-", **metrics(reference), "bytes": (folder / "sampler.onnx").stat().st_size}]
    for scheme in ("fp16", "int8-weights", "int4-weights"):
        record = next(r for r in quantize_(folder, None, QuantizeConfig(scheme=scheme, targets=["sampler"]), out_dir=work / "digits-flow" / scheme)
                      if r["kind"] == "sampler")
        rows.append({"artifact": scheme, "granularity": "-", "smooth_quant": "-", **metrics(run_sampler(record["path"], feeds, args.threads)),
                     "bytes": record["bytes"]})
        log(f"digits-flow: {scheme}: PSNR {rows[-1]['psnr_db']:.2f} dB, share {rows[-1]['prompted_digit_share']:.3f}")
    for granularity, alpha in (("per-step", None), ("shared", None), ("per-step", 0.0)):
        config = QuantizeConfig(granularity=granularity, smooth_quant=alpha, subset_size=args.calib_samples, targets=["sampler"])
        out = work / "digits-flow" / f"{granularity}-{alpha}"
        record = next(r for r in quantize_(folder, calib, config, out_dir=out) if r["kind"] == "sampler")  # the pipeline's other files are copied
        row = {"artifact": f"w8a8 {granularity}", "granularity": granularity, "smooth_quant": "off" if alpha == 0 else 0.8,
               **metrics(run_sampler(out / "sampler.onnx", feeds, args.threads)), "bytes": record["bytes"]}
        rows.append(row)
        log(f"digits-flow: w8a8 {granularity} smooth_quant {row['smooth_quant']}: PSNR {row['psnr_db']:.2f} dB, share {row['prompted_digit_share']:.3f}")
    for row in rows:
        row["share_points"] = 100 * (row["prompted_digit_share"] - rows[0]["prompted_digit_share"])
    headline = next(r for r in rows if r["artifact"] == "w8a8 per-step" and r["smooth_quant"] == 0.8)
    goals = {"psnr": headline["psnr_db"] >= GOALS["psnr_db"], "share_within_3_points": abs(headline["share_points"]) <= 3.0}
    return {"model": "zoo:digits-flow", "guidance_scale": FLOW_GUIDANCE, "solver": SOLVER, "samples": args.samples,
            "calibration_samples": args.calib_samples, "headline": headline, "goals_met": goals, "rows": rows, "kind": "flow"}


# ----------------------------------------------------------------------------- speed


def speed(name: str, denoiser: Denoiser, guidance: float | None, args, work: Path, log) -> dict:
    solver = SolverConfig(SOLVER["name"], SOLVER["steps"], guidance_scale=guidance)
    folder = work / f"speed-{name}" / "float"
    paths = {"float32": folder / "sampler.onnx", "w8a8": work / f"speed-{name}" / "w8a8" / "sampler.onnx"}
    if not (args.reuse and paths["float32"].is_file()):
        start = time.perf_counter()
        export_onnx(denoiser, solver, folder)
        log(f"{name}: exported in {time.perf_counter() - start:.0f} s")
    if not (args.reuse and paths["w8a8"].is_file()):
        calib = calibrate(denoiser, CalibrationConfig(sampler="solver", samples=8 * args.speed_calib_trajectories, trajectory_steps=20,
                                                      guidance_scale=guidance), solver)
        start = time.perf_counter()
        quantize_(folder, calib, QuantizeConfig(subset_size=args.speed_calib_trajectories * 8, targets=["sampler"]), out_dir=paths["w8a8"].parent)
        log(f"{name}: quantized in {time.perf_counter() - start:.0f} s")
    ir = {}
    for kind, path in list(paths.items()):
        (record,) = export_openvino([{"format": "onnx", "kind": "sampler", "path": str(path), "sidecar": str(path.with_suffix(".json"))}],
                                    path.parent / "openvino")
        ir[kind] = Path(record["path"])
    feeds, _ = sampler_feeds(denoiser, 1, seed=0, guidance=guidance)
    out = {"model": name, "parameters": sum(p.numel() for p in denoiser.module.parameters()), "batch": 1, "threads": args.threads}
    latency = paired_latency_ms({**paths, **{f"openvino {k}": v for k, v in ir.items()}}, feeds, args.threads, runs=max(1, args.speed_repeats // 5))
    for kind, path in paths.items():
        out[kind] = {"bytes": path.stat().st_size, **latency[kind]}
        xml = ir[kind]
        out[f"openvino {kind}"] = {"bytes": xml.stat().st_size + xml.with_suffix(".bin").stat().st_size, "xml_bytes": xml.stat().st_size,
                                   "bin_bytes": xml.with_suffix(".bin").stat().st_size, **latency[f"openvino {kind}"]}
    out["speedup"] = out["float32"]["median_ms"] / out["w8a8"]["median_ms"]
    out["size_ratio"] = out["w8a8"]["bytes"] / out["float32"]["bytes"]
    f, q = out["openvino float32"], out["openvino w8a8"]
    out["openvino"] = {"speedup": f["median_ms"] / q["median_ms"], "size_ratio": q["bytes"] / f["bytes"], "bin_ratio": q["bin_bytes"] / f["bin_bytes"],
                       "float_xml_share": f["xml_bytes"] / f["bytes"]}
    out["goal_met"] = out["speedup"] >= GOALS["speedup"]
    log(f"{name}: float32 {out['float32']['median_ms']:.0f} ms, w8a8 {out['w8a8']['median_ms']:.0f} ms -> {out['speedup']:.2f}x, size x{out['size_ratio']:.3f}")
    return out


# ----------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    lines = ["# Timestep-aware post-training quantization", "",
             f"dpmpp-2m, {SOLVER['steps']} steps baked into sampler.onnx; onnxruntime {ort.__version__} CPUExecutionProvider, "
             f"{results['environment']['threads']} threads, {results['environment']['processor']}. "
             "PSNR against the float32 sampler from the same noise; FD against held-out digits (zoo classifier features).", ""]
    for q in results["quality"]:
        if "skipped" in q:
            lines += [f"## {q['model']}: skipped ({q['skipped']})", ""]
            continue
        if q.get("kind") == "flow":
            lines += flow_markdown(q)
            continue
        h = q["headline"]
        lines += [f"## {q['model']}" + (f", guidance {q['guidance_scale']:g}" if q["guidance_scale"] else ""), "",
                  f"Headline W8A8 per-step ({h['calibration']} calibration): PSNR {h['psnr_db']:.2f} dB, FD {h['fd']:.3f} "
                  f"({100 * h['fd_relative']:+.1f}% vs float32)" + (f", agreement {100 * h['class_agreement']:.1f}% ({h['agreement_points']:+.1f} points)" if "class_agreement" in h else "")
                  + f". Goals met: {json.dumps({k: bool(v) for k, v in q['goals_met'].items()})}.", "",
                  "| calibration | granularity | scheme | PSNR dB | FD | FD vs fp32 | agreement | size MB | median ms | speed-up |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in q["rows"]:
            agree = f"{100 * r['class_agreement']:.1f}%" if "class_agreement" in r else "-"
            lines.append(f"| {r['calibration']} | {r['granularity']} | {r['scheme']} | {r['psnr_db']:.2f} | {r['fd']:.3f} | {100 * r['fd_relative']:+.1f}% | {agree} "
                         f"| {r['bytes'] / 1e6:.2f} | {r['median_ms']:.1f} | {r['speedup']:.2f}x |")
        lines.append("")
    lines += ["## Speed: float32 vs W8A8 per-step sampler, batch 1", "",
              "onnxruntime and OpenVINO (the IR converted from each ONNX file, compiled at f32 for a static batch as the toolkit's "
              "runner does) timed in alternation in one run. An IR's bytes are its graph text (.xml) and its weights (.bin).", "",
              "| model | runtime | params | float32 ms | w8a8 ms | speed-up | size ratio | IR parts |", "|---|---|---|---|---|---|---|---|"]
    for s in results["speed"]:
        if "skipped" in s:
            lines.append(f"| {s['model']} | skipped: {s['skipped']} | | | | | | |")
            continue
        lines.append(f"| {s['model']} | onnxruntime | {s['parameters'] / 1e6:.1f}M | {s['float32']['median_ms']:.0f} | {s['w8a8']['median_ms']:.0f} "
                     f"| {s['speedup']:.2f}x | {s['size_ratio']:.3f} | - |")
        if "openvino" in s:
            o, f, q = s["openvino"], s["openvino float32"], s["openvino w8a8"]
            lines.append(f"| {s['model']} | OpenVINO IR (f32 hint) | {s['parameters'] / 1e6:.1f}M | {f['median_ms']:.0f} | {q['median_ms']:.0f} "
                         f"| {o['speedup']:.2f}x | {o['size_ratio']:.3f} | .bin {o['bin_ratio']:.3f}; .xml {f['xml_bytes'] / 1e6:.2f} -> {q['xml_bytes'] / 1e6:.2f} MB |")
    lines += ["", "Per-step: NNCF calibrates the unrolled graph from the set's trajectory starts, so each step's scales come from "
              "that step's own states whatever the timestep sampler. Shared: the denoiser is calibrated once on the set's recorded "
              "(x_t, t, cond) and its scales are written into every step, so there the timestep sampler decides the ranges.", ""]
    return "\n".join(lines)


def flow_markdown(q: dict) -> list[str]:
    h = q["headline"]
    lines = [f"## {q['model']} (SD3-style rectified-flow transformer), guidance {q['guidance_scale']:g}", "",
             f"Images from the whole sampler (VAE decoder baked in, kept float); PSNR over [0, 1] against the float32 sampler's images. "
             f"Headline W8A8 per-step with SmoothQuant: PSNR {h['psnr_db']:.2f} dB, prompted digit {100 * h['prompted_digit_share']:.1f}% "
             f"({h['share_points']:+.1f} points). Goals met: {json.dumps({k: bool(v) for k, v in q['goals_met'].items()})}.", "",
             "| artifact | granularity | SmoothQuant | PSNR dB | FD | prompted digit | size MB |", "|---|---|---|---|---|---|---|"]
    for r in q["rows"]:
        lines.append(f"| {r['artifact']} | {r['granularity']} | {r['smooth_quant']} | {r['psnr_db']:.2f} | {r['fd']:.2f} "
                     f"| {100 * r['prompted_digit_share']:.1f}% | {r['bytes'] / 1e6:.2f} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="digits,digits-cond,cifar")
    parser.add_argument("--samples", type=int, default=512, help="samples for PSNR/FD")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--trajectory-steps", type=int, default=100)
    parser.add_argument("--schemes", default="w8a8,w8a16")
    parser.add_argument("--headline-calibration", default="ndtc")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--speed-repeats", type=int, default=10)
    parser.add_argument("--speed-calib-trajectories", type=int, default=4)
    parser.add_argument("--work", default=None, help="keep the artifacts here (default: a temporary folder)")
    parser.add_argument("--skip-zoo-speed", action="store_true", help="no separate float32 vs w8a8 speed run on zoo:digits")
    parser.add_argument("--speed-only", action="store_true", help="only the speed runs (zoo:digits when 'digits' is listed, and cifar)")
    parser.add_argument("--reuse", action="store_true", help="speed: reuse the float (and w8a8) samplers already in --work")
    args = parser.parse_args()
    args.schemes = args.schemes.split(",")
    models = args.models.split(",")
    torch.set_num_threads(args.threads)
    from compress.zoo import CHECKPOINTS

    def log(message: str) -> None:
        print(message, flush=True)

    results = {"environment": {"processor": processor_name(), "threads": args.threads,
                               "onnxruntime": ort.__version__, "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S")},
               "goals": GOALS, "quality": [], "speed": []}
    previous = RESULTS / "quantization.json"

    def save() -> None:
        """After every model: a run that is cut short keeps what it measured (and the other models' last results)."""
        old = json.loads(previous.read_text()) if previous.is_file() else {}
        merged = dict(results)
        for part in ("quality", "speed"):
            done = {r["model"] for r in results[part]}
            merged[part] = [r for r in old.get(part, []) if r["model"] not in done] + results[part]
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "quantization.json").write_text(json.dumps(merged, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)) + "\n")
        (RESULTS / "quantization.md").write_text(markdown(merged))

    with tempfile.TemporaryDirectory(prefix="bench-quantization-") as scratch:
        work = Path(args.work or scratch)
        for name, guidance in (("digits", None), ("digits-cond", 3.0)):
            if name not in models:
                continue
            if not (CHECKPOINTS / f"{name}.safetensors").is_file():
                results["quality"].append({"model": f"zoo:{name}", "skipped": "checkpoint not trained yet"})
                results["speed"].append({"model": f"zoo:{name}", "skipped": "checkpoint not trained yet"})
                continue
            if not args.speed_only:
                results["quality"].append(zoo_quality(name, guidance, args, work, log))
                save()
            if name == "digits" and not args.skip_zoo_speed:
                from compress.loading import load_model

                results["speed"].append(speed("zoo:digits", load_model("zoo:digits"), None, args, work, log))
                save()
        if "digits-flow" in models and not args.speed_only:
            results["quality"].append(flow_quality(args, work, log))
            save()
        if "cifar" in models:
            results["speed"].append(speed("ddpm-cifar10-arch", ddpm_cifar10_architecture(), None, args, work, log))
        save()
    print((RESULTS / "quantization.md").read_text())


if __name__ == "__main__":
    main()
