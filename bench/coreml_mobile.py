"""Core ML mobile layouts at SD-1.5 size: the UNet as chained chunk packages (Apple's `--chunk-unet`), split-einsum
attention, float16 and 6-bit palettized weights.

The UNet is the one of the SD-1.5-architecture folder that `python bench/scale.py build` writes (random weights,
859.5 M parameters, 32x32 latents); it is read from that folder, not rebuilt. Each variant is what
`export_denoiser_coreml(weights=..., attention="split-einsum", chunk_bytes=...)` writes (torch.export, coremltools
conversion, weight compression, chunking, the structural checks); here the UNet is converted once and each weights option compressed once, every phase timed and metered (peak RSS
of this process). Prediction needs macOS: nothing here runs the packages.

    python bench/coreml_mobile.py run [--folder DIR] [--out DIR] [--variants float:1000,palettize6:1000,palettize6:500]
    python bench/coreml_mobile.py report          # bench/results/coreml_mobile.md from coreml_mobile.json

Writes bench/results/coreml_mobile.{json,md}: each phase's wall time and peak RSS; per variant the chunks (file,
weight bytes, package bytes, the inputs that cross from earlier chunks), the totals; and the machine.
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
DEFAULT_FOLDER = Path(tempfile.gettempdir()) / "diffusion-compress-sd15"
# Apple's float16 UNet in chunks under 1 GB; the 6-bit one under the same limit, and in two as --chunk-unet makes it
DEFAULT_VARIANTS = "float:1000,palettize6:1000,palettize6:500"
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
    """Converts the UNet once (float16, ``attention``), compresses it once per weights option, and chunks that per size.

    The three phases are export_denoiser_coreml's own steps (export.coreml_export's private helpers, called in turn so that
    one conversion serves every variant); each is timed and metered, and every chunk set passes the same structural checks."""
    import torch

    from compress.outputs import staged_files
    from export.coreml_export import _compress, _converted, _coreml_sidecar, _settings, _write_chunks, import_coremltools
    from export.sampler_graph import DenoiserGraph
    from export.sidecar import denoiser_sidecar
    from runtimes.bench import PeakRSS, processor_name

    torch.set_num_threads(os.cpu_count() or 1)
    ct = import_coremltools()
    denoiser = sd_denoiser(folder)
    graph = DenoiserGraph(denoiser)
    params = sum(p.numel() for p in denoiser.module.parameters())
    data = {
        "model": {"folder": str(folder), "unet_parameters": params, "float32_bytes": params * 4, "float16_bytes": params * 2,
                  "sample_shape": list(denoiser.sample_shape), "encoder_hidden_states": [TEXT_TOKENS, denoiser.cond_shape[-1]]},
        "machine": {"cpu": processor_name(), "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    "os": platform.platform(), **_versions()},
        "note": "structural only: Core ML prediction needs macOS; every chunk's spec loads and the chunks chain (checked at export)",
        "attention": attention,
        "phases": [],
        "variants": [],
    }

    def phase(name: str, seconds: float, meter) -> None:
        data["phases"].append({"phase": name, "seconds": round(seconds, 1), "peak_rss_bytes": meter.peak, "peak_rss_method": meter.method})
        print(json.dumps(data["phases"][-1]), flush=True)
        _write(data)

    print(f"converting ({attention}, float16) ...", flush=True)
    start = time.perf_counter()
    with PeakRSS() as meter:
        converted = _converted(ct, graph, _coreml_sidecar(denoiser_sidecar(graph, "coreml", "denoiser.mlpackage", 1)),
                               _settings("float", "float", None, attention, None))
    phase(f"torch.export + conversion to an ML program (float16, {attention})", time.perf_counter() - start, meter)
    compressed = {"float": converted}
    for weights, megabytes in variants:
        settings = _settings(weights, "float", None, attention, int(megabytes * 1e6))
        if weights not in compressed:
            print(f"compressing ({weights}) ...", flush=True)
            start = time.perf_counter()
            with PeakRSS() as meter:
                compressed[weights] = _compress(ct, converted, graph, 1, settings)
            phase(f"weights {weights}", time.perf_counter() - start, meter)
        target = out / f"{weights}-{attention}-{megabytes:g}MB"
        shutil.rmtree(target, ignore_errors=True)
        print(f"chunking {weights} into at most {megabytes:g} MB ...", flush=True)
        start = time.perf_counter()
        sidecar = _coreml_sidecar(denoiser_sidecar(graph, "coreml", "denoiser.mlpackage", 1, {"coreml": settings}))
        with PeakRSS() as meter, staged_files(target, ".coreml-export-") as stage:
            records = _write_chunks(compressed[weights], graph, "denoiser", sidecar, stage, settings)
        seconds = time.perf_counter() - start
        phase(f"chunking {weights} at {megabytes:g} MB (split, write, structural checks)", seconds, meter)
        sidecar = json.loads((target / "denoiser.coreml.json").read_text())
        chunks = [{"file": c["file"], "weight_bytes": c["weight_bytes"], "planned_weight_bytes": c["planned_weight_bytes"],
                   "package_bytes": r["bytes"], "inputs": len(c["inputs"]), "crossing_inputs": sum(1 for s in c["inputs"] if s["from"] != "input"),
                   "crossing_input_bytes": sum(4 * int(np.prod(s["shape"])) for s in c["inputs"] if s["from"] != "input"),
                   "outputs": len(c["outputs"]), "ops": r["ops"]} for c, r in zip(sidecar["chunks"], records)]
        row = {"weights": weights, "attention": attention, "max_chunk_bytes": int(megabytes * 1e6), "chunks": chunks,
               "total_weight_bytes": sum(c["weight_bytes"] for c in chunks), "total_package_bytes": sum(c["package_bytes"] for c in chunks),
               "chunking_seconds": round(seconds, 1), "chunking_peak_rss_bytes": meter.peak,
               "einsum_ops": sum(r["op_types"].get("einsum", 0) for r in records), "matmul_ops": sum(r["op_types"].get("matmul", 0) for r in records),
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
        f"{model['float16_bytes'] / gb:.2f} GB in float16; sample {model['sample_shape']}, encoder_hidden_states {model['encoder_hidden_states']}, "
        f"batch 1; attention {data['attention']}.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; torch {machine.get('torch')}, "
        f"diffusers {machine.get('diffusers')}, coremltools {machine.get('coremltools')}, kmeans1d {machine.get('kmeans1d')}.",
        "",
        f"{data['note'][0].upper()}{data['note'][1:]}. One conversion serves every variant; peak RSS is this process's "
        "(the kernel's high-water mark, reset per phase).",
        "",
        "| phase | seconds | peak RSS GiB |",
        "|---|---|---|",
    ]
    lines += [f"| {p['phase']} | {p['seconds']:.0f} | {(p['peak_rss_bytes'] or 0) / 2**30:.1f} |" for p in data["phases"]]
    lines += [
        "",
        "| weights | max chunk MB | chunks | weight MB per chunk | total weight MB | total package MB | einsum ops | palettized weights |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in data["variants"]:
        sizes = " + ".join(f"{c['weight_bytes'] / 1e6:.1f}" for c in row["chunks"])
        lines.append(f"| {row['weights']} | {row['max_chunk_bytes'] / 1e6:g} | {len(row['chunks'])} | {sizes} | "
                     f"{row['total_weight_bytes'] / 1e6:.1f} | {row['total_package_bytes'] / 1e6:.1f} | {row['einsum_ops']} | "
                     f"{row['palettized_weights']} |")
    lines += ["", "What crosses each cut (float32 inputs a chunk reads from earlier chunks):", ""]
    for row in data["variants"]:
        parts = ", ".join(f"{c['file']}: {c['inputs']} inputs ({c['crossing_inputs']} crossing, {c['crossing_input_bytes'] / 1e6:.2f} MB), "
                          f"{c['outputs']} outputs" for c in row["chunks"])
        lines.append(f"- {row['weights']} at {row['max_chunk_bytes'] / 1e6:g} MB: {parts}")
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
