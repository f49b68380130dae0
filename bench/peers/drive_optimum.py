"""Optimum's side of bench/peers.py, run in bench/peers/.venv-optimum: its ONNX export
(`optimum-cli export onnx --task text-to-image`, run by bench/peers.py itself) loaded into its
ONNX Runtime diffusion pipeline, which keeps the scheduler loop in Python on the host and takes
our latent noise as ``latents=``.

    bench/peers/.venv-optimum/bin/python bench/peers/drive_optimum.py   (requests on stdin, see serve.py)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import serve  # noqa: E402


def load(name: str, folder: str, threads: int, options: dict):
    import numpy as np
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    torch.set_num_threads(threads)  # the host loop's tensor math, as our runtimes get `threads`
    session = ort.SessionOptions()
    session.intra_op_num_threads, session.inter_op_num_threads = threads, 1
    pipe = ORTStableDiffusionPipeline.from_pretrained(folder, session_options=session, provider="CPUExecutionProvider")
    pipe.set_progress_bar_config(disable=True)

    def generate(prompts, noise):
        out = pipe(list(prompts), num_inference_steps=options["steps"], guidance_scale=options["guidance"],
                   latents=torch.from_numpy(np.asarray(noise, np.float32)), height=options["height"], width=options["width"],
                   output_type="np")
        return np.asarray(out.images, np.float32).transpose(0, 3, 1, 2)

    return generate


if __name__ == "__main__":
    serve(load)
