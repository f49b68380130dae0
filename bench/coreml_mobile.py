"""Core ML mobile layouts at SD-1.5 size: the UNet as chained chunk packages (Apple's `--chunk-unet`), split-einsum
attention, float16 and 6-bit palettized weights.

The UNet is the one of the SD-1.5-architecture folder that `python bench/scale.py build` writes (random weights,
859.5 M parameters, 32x32 latents); it is read from that folder, not rebuilt. Each variant is one
`export_denoiser_coreml` call (torch.export, coremltools conversion, weight compression, chunking, the structural
checks), timed and metered (peak RSS of this process). Prediction needs macOS: nothing here runs the packages.

    python bench/coreml_mobile.py run [--folder DIR] [--out DIR] [--variants float:1000,palettize6:500]
    python bench/coreml_mobile.py report          # bench/results/coreml_mobile.md from coreml_mobile.json

Writes bench/results/coreml_mobile.{json,md}: per variant the chunks (file, weight bytes, package bytes, inputs and
outputs that cross), the total, wall time and peak RSS, and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
DEFAULT_FOLDER = Path(tempfile.gettempdir()) / "diffusion-compress-sd15"
DEFAULT_VARIANTS = "float:1000,palettize6:500"  # Apple's two float16 chunks under 1 GB; the 6-bit UNet in two, as --chunk-unet makes it
TEXT_TOKENS = 77


def sd_denoiser(folder: Path):
    import torch
    from diffusers import UNet2DConditionModel

    from compress.denoiser import Denoiser, DiffusersUNet
    from compress.schedule import NoiseSchedule

    unet_dir = folder / "unet"
    if not (unet_dir / "config.json").is_file():
        raise SystemExit(f"{unet_dir} has no UNet: run `python bench/scale.py build --folder {folder}` first")
    unet = UNet2DConditionModel.from_pretrained(str(unet_dir), torch_dtype=torch.float32).eval()
    size = unet.config.sample_size
    schedule = NoiseSchedule.from_betas("scaled_linear", 1000, 0.00085, 0.012)
    return Denoiser(DiffusersUNet(unet).eval(), schedule, "epsilon", (unet.config.in_channels, size, size), conditioning="text",
                    cond_shape=(TEXT_TOKENS, unet.config.cross_attention_dim), name="sd15-architecture")


def run(folder: Path, out: Path, variants: list[tuple[str, float]], attention: str) -> dict:
    import torch

    from export.coreml_export import export_denoiser_coreml
    from runtimes.bench import PeakRSS, processor_name

    torch.set_num_threads(os.cpu_count() or 1)
    denoiser = sd_denoiser(folder)
    params = sum(p.numel() for p in denoiser.module.parameters())
    data = {
        "model": {"folder": str(folder), "unet_parameters": params, "float32_bytes": params * 4, "float16_bytes": params * 2,
                  "sample_shape": list(denoiser.sample_shape), "encoder_hidden_states": [TEXT_TOKENS, denoiser.cond_shape[-1]]},
        "machine": {"cpu": processor_name(), "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    "os": platform.platform(), **_versions()},
        "note": "structural only: Core ML prediction needs macOS; every chunk's spec loads and the chunks chain (checked at export)",
        "variants": [],
    }
    for weights, megabytes in variants:
        target = out / f"{weights}-{attention}-{megabytes:g}MB"
        shutil.rmtree(target, ignore_errors=True)
        print(f"{weights}, {attention}, chunks of at most {megabytes:g} MB ...", flush=True)
        start = time.perf_counter()
        with PeakRSS() as meter:
            records = export_denoiser_coreml(denoiser, target, weights=weights, attention=attention, chunk_bytes=int(megabytes * 1e6))
        seconds = time.perf_counter() - start
        sidecar = json.loads((target / "denoiser.coreml.json").read_text())
        chunks = [{"file": c["file"], "weight_bytes": c["weight_bytes"], "package_bytes": r["bytes"],
                   "inputs": len(c["inputs"]), "crossing_inputs": sum(1 for s in c["inputs"] if s["from"] != "input"),
                   "outputs": len(c["outputs"]), "ops": r["ops"]} for c, r in zip(sidecar["chunks"], records)]
        row = {"weights": weights, "attention": attention, "max_chunk_bytes": int(megabytes * 1e6), "chunks": chunks,
               "total_weight_bytes": sum(c["weight_bytes"] for c in chunks), "total_package_bytes": sum(c["package_bytes"] for c in chunks),
               "seconds": round(seconds, 1), "peak_rss_bytes": meter.peak, "peak_rss_method": meter.method,
               "einsum_ops": sum(r["op_types"].get("einsum", 0) for r in records),
               "palettized_weights": sum(r["op_types"].get("constexpr_lut_to_dense", 0) for r in records), "folder": str(target)}
        data["variants"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "chunks"}), flush=True)
        _write(data)
    return data


def _versions() -> dict:
    from importlib.metadata import version

    found = {}
    for name in ("torch", "diffusers", "coremltools", "kmeans1d", "scikit-learn"):
        try:
            found[name] = version(name)
        except Exception:
            found[name] = None
    return found


def _write(data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "coreml_mobile.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "coreml_mobile.md").write_text(report(data))


def report(data: dict) -> str:
    model, machine = data["model"], data["machine"]
    gb = 1e9
    lines = [
        "# Core ML mobile layouts at SD-1.5 size: chunked UNet, split einsum, 6-bit",
        "",
        f"UNet of SD 1.5's architecture (`bench/scale.py build`, random weights): {model['unet_parameters'] / 1e6:.1f} M parameters, "
        f"{model['float16_bytes'] / gb:.2f} GB in float16; sample {model['sample_shape']}, encoder_hidden_states {model['encoder_hidden_states']}, batch 1.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; torch {machine.get('torch')}, "
        f"diffusers {machine.get('diffusers')}, coremltools {machine.get('coremltools')}, kmeans1d {machine.get('kmeans1d')}.",
        "",
        f"{data['note']}. Times are whole `export_denoiser_coreml` calls (torch.export, conversion, compression, chunking, checks); "
        "peak RSS is this process's.",
        "",
        "| weights | attention | max chunk MB | chunks | chunk weight MB | total weight MB | total package MB | seconds | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["variants"]:
        sizes = " + ".join(f"{c['weight_bytes'] / 1e6:.1f}" for c in row["chunks"])
        lines.append(f"| {row['weights']} | {row['attention']} | {row['max_chunk_bytes'] / 1e6:g} | {len(row['chunks'])} | {sizes} | "
                     f"{row['total_weight_bytes'] / 1e6:.1f} | {row['total_package_bytes'] / 1e6:.1f} | {row['seconds']:.0f} | "
                     f"{(row['peak_rss_bytes'] or 0) / 2**30:.1f} |")
    lines += ["", "Per chunk: inputs (of which crossing from earlier chunks) and outputs.", ""]
    for row in data["variants"]:
        parts = ", ".join(f"{c['file']} {c['inputs']} in ({c['crossing_inputs']} crossing) / {c['outputs']} out" for c in row["chunks"])
        lines.append(f"- {row['weights']} at {row['max_chunk_bytes'] / 1e6:g} MB: {parts}; {row['einsum_ops']} einsum ops, "
                     f"{row['palettized_weights']} palettized weights")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    r.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "diffusion-compress-coreml-mobile")
    r.add_argument("--variants", default=DEFAULT_VARIANTS, help="weights:max-chunk-MB, comma-separated")
    r.add_argument("--attention", default="split-einsum")
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "run":
        variants = [(w, float(mb)) for w, mb in (v.split(":") for v in args.variants.split(","))]
        run(args.folder, args.out, variants, args.attention)
    else:
        data = json.loads((RESULTS / "coreml_mobile.json").read_text())
        (RESULTS / "coreml_mobile.md").write_text(report(data))


if __name__ == "__main__":
    main()
