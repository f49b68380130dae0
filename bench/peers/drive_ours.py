"""Our side of bench/peers.py, in our own environment: export (float32, or our W8A8 with the
recipes/digits-t2i.yaml settings) and prompt -> image with our files (runtimes/text_to_image.py).

    python bench/peers/drive_ours.py export --mode float32|w8a8|int8-weights --model M --out DIR --steps 8 --guidance 7.5
    python bench/peers/drive_ours.py serve      (requests on stdin, see serve.py)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from serve import reply, serve  # noqa: E402

SCHEDULER = "ddim"  # the one scheduler all three tools run (and the zoo folder's own)
# recipes/digits-t2i.yaml's calibration and quantization
CALIBRATION = dict(sampler="ndtc", samples=128, trajectory_steps=25)
SCHEMES = {"w8a8": dict(denoiser="w8a8", decoder="w8a8", text_encoder="int8-weights", granularity="per-step"),
           "int8-weights": dict(denoiser="int8-weights", decoder="int8-weights", text_encoder="int8-weights")}


def export(mode: str, model: str, out: Path, steps: int, guidance: float, prompts: list[str], float_dir: Path | None = None) -> dict:
    """``float_dir``: an earlier float32 export of the same model and solver to quantize instead of exporting again."""
    from calibration import CalibrationConfig, calibrate
    from compress.export_chain import add_openvino, export_artifacts
    from compress.loading import load_pipeline
    from compress.quantize import QuantizeConfig, quantize_
    from compress.scheduler_config import solver_from_scheduler_config
    from runtimes.text_to_image import diffusers_pipeline

    pipeline = load_pipeline(model)
    config = dict(diffusers_pipeline(pipeline.extra["folder"], SCHEDULER).scheduler.config)
    solver = solver_from_scheduler_config(config, steps, guidance)
    if float_dir is None:
        float_dir = out / "float32" if mode in SCHEMES else out
        export_artifacts(pipeline, solver, float_dir, ["onnx", "openvino"])
    calib = None
    if mode == "w8a8":
        pipeline.draw_from_prompts(prompts)
        calib = calibrate(pipeline.denoiser, CalibrationConfig(guidance_scale=guidance, **CALIBRATION), final_latents=solver)
    if mode in SCHEMES:
        add_openvino(quantize_(float_dir, calib, QuantizeConfig(**SCHEMES[mode]), out_dir=out / mode), out / mode)
    return {"solver": solver.name, "steps": steps}


def load(name: str, folder: str, threads: int, options: dict):
    from runtimes.text_to_image import PipelineRunner

    runner = PipelineRunner(folder, options["runtime"], threads=threads)
    guidance = options["guidance"]
    return lambda prompts, noise: runner.generate(list(prompts), noise, None, guidance)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["export", "serve"])
    parser.add_argument("--mode", default="float32")
    parser.add_argument("--model", default="zoo:digits-t2i")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--prompts", type=Path, help="a JSON list: the calibration prompts")
    parser.add_argument("--float-dir", type=Path, help="quantize this float32 export instead of exporting again")
    args = parser.parse_args()
    if args.what == "serve":
        return serve(load)
    prompts = json.loads(args.prompts.read_text()) if args.prompts else []
    reply(ok=True, **export(args.mode, args.model, args.out, args.steps, args.guidance, prompts))


if __name__ == "__main__":
    main()
