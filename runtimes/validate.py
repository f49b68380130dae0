"""Validation against the full-precision baseline: every artifact, on every runtime that can run it,
from the baseline's own noise.

The baseline (the float32 model with the reference solver, e.g. DDIM-100) is stored with its noise,
conditioning and the device it ran on, so a later validation on a machine without a GPU compares
against exactly the same reference.

OpenVINO artifacts get two CPU rows where the CPU has bf16: `openvino` at f32, which is what agrees
with onnxruntime and torch, and `openvino-bf16`, what OpenVINO runs by default on such a CPU, with
how far it lands from the f32 samples (`max_abs_diff_vs_openvino`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from compress.metrics import psnr, ssim
from runtimes.artifacts import Artifact, open_artifact
from runtimes.bench import benchmark
from runtimes.runners import Runner, first_line, get_runner

# Which runtimes read which artifact format, in the order rows appear in the report.
RUNTIMES_FOR_FORMAT = {
    "onnx": ("onnxruntime", "onnxruntime-cuda", "onnxruntime-tensorrt"),
    "openvino": ("openvino", "openvino-bf16", "openvino-gpu", "openvino-npu"),
    "coreml": ("coreml",),
}
# Runtimes that run wherever the one they vary is asked for: `bench.runtimes: [openvino]` also gets the
# bf16 row, because bf16 is what OpenVINO itself picks on CPUs that have it, and an app that compiles
# without a precision hint gets those numbers, not the f32 ones.
COMPANIONS = {"openvino-bf16": "openvino"}
SAMPLES_FILE, INFO_FILE = "samples.safetensors", "baseline.json"


@dataclass
class Baseline:
    samples: torch.Tensor  # [N, C, H, W] float32, the reference solver's output
    noise: torch.Tensor
    cond: torch.Tensor | None
    guidance_scale: float | None
    data_range: tuple[float, float]
    info: dict = field(default_factory=dict)  # solver, device, latency of the baseline itself
    judge: object | None = None  # DigitsJudge for zoo models
    held_out: torch.Tensor | None = None  # real images FD is measured against

    def quality(self, samples: torch.Tensor) -> dict:
        width = self.data_range[1] - self.data_range[0]
        out = {
            "psnr": psnr(samples, self.samples, width),
            "ssim": ssim(samples, self.samples, width),
            "max_abs_error": float((samples - self.samples).abs().max()),
        }
        if self.judge is not None:
            labels = self.cond if self.cond is not None and self.cond.dtype == torch.long else None
            out.update(self.judge.summary(samples, self.held_out, labels))
        return out

    def save(self, folder: Path) -> list[Path]:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"samples": self.samples, "noise": self.noise}
        if self.cond is not None:
            tensors["cond"] = self.cond
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / SAMPLES_FILE))
        info = {**self.info, "guidance_scale": self.guidance_scale, "data_range": list(self.data_range)}
        (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        return [folder / SAMPLES_FILE, folder / INFO_FILE]

    @classmethod
    def load(cls, folder: Path, **kwargs) -> "Baseline":
        from safetensors.torch import load_file

        tensors = load_file(str(folder / SAMPLES_FILE))
        info = json.loads((folder / INFO_FILE).read_text())
        return cls(tensors["samples"], tensors["noise"], tensors.get("cond"), info.pop("guidance_scale"),
                   tuple(info.pop("data_range")), info, **kwargs)


def sampler_feeds(artifact: Artifact, baseline: Baseline, start: int, stop: int) -> dict[str, np.ndarray]:
    """The artifact's inputs for baseline samples [start, stop), named and typed as its sidecar says."""
    feeds = {}
    for spec in artifact.sidecar["inputs"]:
        name, dtype = spec["name"], np.dtype(spec["dtype"])
        if name == "noise":
            feeds[name] = baseline.noise[start:stop].numpy().astype(dtype)
        elif name in ("class_labels", "encoder_hidden_states"):
            feeds[name] = baseline.cond[start:stop].numpy().astype(dtype)
        elif name == "guidance_scale":
            scale = baseline.guidance_scale if baseline.guidance_scale is not None else spec.get("default", 1.0)
            feeds[name] = np.array([scale], dtype)
        else:
            raise ValueError(f"{artifact.path.name}: sampler input {name!r} has no baseline counterpart")
    return feeds


def run_all(runner: Runner, artifact: Artifact, baseline: Baseline, chunk: int = 64) -> torch.Tensor:
    """The artifact's samples for the baseline's whole noise batch, in chunks the artifact accepts."""
    n = baseline.noise.shape[0]
    fixed = artifact.fixed_batch
    size = fixed or chunk
    outputs = []
    for start in range(0, n, size):
        stop = min(start + size, n)
        feeds = sampler_feeds(artifact, baseline, start, stop)
        if fixed and stop - start < fixed:  # pad the last chunk to the exported batch, then drop the padding
            feeds = {k: v if k == "guidance_scale" else np.concatenate([v, np.repeat(v[-1:], fixed - len(v), 0)]) for k, v in feeds.items()}
        outputs.append(torch.from_numpy(np.asarray(runner.run(feeds)))[: stop - start])
    return torch.cat(outputs).float()


def latency(runner: Runner, artifact: Artifact | None, baseline: Baseline, runs: int, feeds: dict | None = None) -> dict:
    """Median and p90 per call at the smallest batch the artifact takes (1 unless it was exported fixed)."""
    if feeds is None:
        feeds = sampler_feeds(artifact, baseline, 0, artifact.fixed_batch or 1)
    result = benchmark(runner, feeds, runs=runs, warmup=2)
    return {
        "batch": result["batch"],
        "latency_ms": result["latency_ms"]["median"] / result["batch"],
        "latency_p90_ms": result["latency_ms"]["p90"] / result["batch"],
        "peak_rss_mb": result["memory"].get("peak_rss_mb"),
    }


def artifact_bytes(path: Path) -> int:
    """Bytes on disk: the file with its weights (.bin next to an IR, the external weights an ONNX graph reads), or
    the whole Core ML package."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    if path.suffix == ".onnx":
        from export.onnx_weights import onnx_bytes

        return onnx_bytes(path)
    extra = path.with_suffix(".bin") if path.suffix == ".xml" else None
    return path.stat().st_size + (extra.stat().st_size if extra and extra.is_file() else 0)


def validate_artifact(path: Path, baseline: Baseline, name: str, runtimes: list[str] | None = None, runs: int = 10,
                      log=lambda m: None, on_samples=lambda row, samples: None) -> list[dict]:
    """One row per runtime that reads ``path``'s format: metrics and latency, or why it was skipped.

    ``on_samples(row, samples)`` sees each runtime's samples (for grids) before they are dropped.
    """
    artifact = open_artifact(path)
    solver = artifact.sidecar.get("solver", {})
    common = {
        "artifact": name,
        "format": artifact.format,
        "scheme": (artifact.sidecar.get("quantization") or {}).get("scheme", "float32"),
        "solver": solver.get("name"),
        "steps": solver.get("steps"),
        "nfe": solver.get("nfe"),
        "bytes": artifact_bytes(path),
        "params": (artifact.sidecar.get("model") or {}).get("parameters"),
    }
    rows, outputs = [], {}
    for runtime in RUNTIMES_FOR_FORMAT[artifact.format]:
        if not selected(runtime, runtimes):
            continue
        runner = get_runner(runtime)
        ok, reason = runner.available()
        if not ok:
            # The format's own runtime and one asked for by name say why they did not run; the accelerators
            # and variants looked for on every machine stay out of the report where they are absent.
            if runtime in RUNTIMES_FOR_FORMAT[artifact.format][:1] or (runtimes is not None and runtime in runtimes):
                rows.append({**common, "runtime": runtime, "device": runner.device, "status": "skipped", "reason": reason})
            continue
        log(f"validate: {name} on {runtime}")
        try:
            runner.load(path)
            samples = run_all(runner, artifact, baseline)
            timing = latency(runner, artifact, baseline, runs)
        except Exception as e:  # a runtime that cannot run an artifact is a finding for the report, not a crash
            rows.append({**common, "runtime": runtime, "device": runner.device, "status": "failed", "reason": first_line(e)})
            continue
        row = {**common, "runtime": runtime, "device": runner.device, "status": "ok", **timing, **baseline.quality(samples),
               "runner": runner.describe()}
        parent = COMPANIONS.get(runtime)
        if parent in outputs:  # how far the variant moves the samples from its parent on the same noise
            row[f"max_abs_diff_vs_{parent}"] = float((samples - outputs[parent]).abs().max())
        if runtime in COMPANIONS.values():
            outputs[runtime] = samples
        rows.append(row)
        on_samples(row, samples)
    return rows


def selected(runtime: str, runtimes: list[str] | None) -> bool:
    """Whether a validation restricted to ``runtimes`` (None: every one that runs here) includes ``runtime``."""
    return runtimes is None or runtime in runtimes or COMPANIONS.get(runtime) in runtimes
