"""What the sampler benchmarks share: the feeds of a sampler artifact, running it over many draws, and
batch-1 latency of several artifacts through the toolkit's own timing (`runtimes.bench`).

Imported by the scripts in bench/ (run as ``python bench/NAME.py``, which puts this folder on the path).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from compress.denoiser import Denoiser
from runtimes.bench import paired_benchmark
from runtimes.onnxruntime_runner import OnnxRuntimeRunner
from runtimes.openvino_runner import OpenVINORunner


def sampler_feeds(denoiser: Denoiser, n: int, seed: int, guidance: float | None) -> tuple[dict, torch.Tensor | None]:
    """Noise for ``n`` draws (torch's generator, as the toolkit's own sampling), and for a class model the
    labels cycling through its classes with the guidance scale; returns (feeds, labels or None)."""
    noise = torch.randn((n, *denoiser.sample_shape), generator=torch.Generator().manual_seed(seed))
    feeds = {"noise": noise.numpy()}
    labels = None
    if denoiser.conditioning == "class":
        labels = torch.arange(n) % denoiser.num_classes
        feeds["class_labels"] = labels.numpy()
        feeds["guidance_scale"] = np.array([guidance if guidance is not None else 1.0], dtype=np.float32)
    return feeds, labels


def _runner(path, threads: int):
    """An .onnx artifact on onnxruntime, an .xml on OpenVINO (f32, as validation runs it)."""
    return (OpenVINORunner if Path(path).suffix == ".xml" else OnnxRuntimeRunner)(threads=threads).load(path)


def run_sampler(path, feeds: dict, threads: int, batch: int = 64) -> torch.Tensor:
    """The artifact's samples for every draw of ``feeds``, ``batch`` draws per call."""
    runner = _runner(path, threads)
    outs = []
    for start in range(0, len(feeds["noise"]), batch):
        outs.append(np.asarray(runner.run({k: (v if k == "guidance_scale" else v[start: start + batch]) for k, v in feeds.items()})))
    return torch.from_numpy(np.concatenate(outs))


def paired_latency_ms(paths: dict, feeds: dict, threads: int, rounds: int = 5, runs: int = 4) -> dict[str, dict]:
    """Batch-1 latency of several artifacts, measured in alternation (`runtimes.bench.paired_benchmark`)."""
    one = {k: (v if k == "guidance_scale" else v[:1]) for k, v in feeds.items()}
    return paired_benchmark({k: _runner(p, threads) for k, p in paths.items()}, one, rounds=rounds, runs=runs)
