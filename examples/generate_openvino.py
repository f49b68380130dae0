"""Generate a grid of samples from an exported sampler.xml (OpenVINO IR) with only numpy and openvino.

    python generate_openvino.py artifacts/sampler.xml --count 16 --seed 0 [--label 3] [--guidance 2.0] [--device CPU] [--precision f32] [--out grid.png]

Inputs, shapes and defaults come from the sidecar (sampler.openvino.json next to the model). Writes
a PNG when pillow is installed, else the grid as .npy (values 0..1, [rows*H, cols*W, C]).
"""
import argparse
import json
from pathlib import Path

import numpy as np
import openvino as ov

parser = argparse.ArgumentParser(description="Generate an image grid from sampler.xml")
parser.add_argument("model", type=Path, help="sampler.xml (its .bin and sampler.openvino.json sit next to it)")
parser.add_argument("--count", type=int, default=16, help="number of samples (a fixed-batch model uses its own)")
parser.add_argument("--seed", type=int, default=0, help="seed of the noise: the same seed gives the same images")
parser.add_argument("--label", type=int, help="class label for class-conditional models (default: cycle through classes)")
parser.add_argument("--guidance", type=float, help="guidance scale (default: the sidecar's)")
parser.add_argument("--device", default="CPU", help="CPU, GPU or NPU (whatever openvino.Core().available_devices lists)")
parser.add_argument("--precision", choices=["f32", "bf16"], help="CPU inference precision (default: the sidecar's, f32, as validated; "
                    "bf16 is OpenVINO's own default on CPUs with AVX512-BF16 or AMX: faster, less exact)")
parser.add_argument("--out", type=Path, default=Path("samples.png"))
args = parser.parse_args()

sidecar = json.loads(args.model.with_suffix(".openvino.json").read_text())
spec = {i["name"]: i for i in sidecar["inputs"]}
n = args.count if sidecar["batch"]["dynamic"] else sidecar["batch"]["size"]
c, h, w = spec["noise"]["shape"][1:]
feeds = {"noise": np.random.default_rng(args.seed).standard_normal((n, c, h, w), dtype=np.float32)}
if "class_labels" in spec:
    labels = np.full(n, args.label) if args.label is not None else np.arange(n) % sidecar["conditioning"]["num_classes"]
    feeds["class_labels"] = labels.astype(np.int64)
if "encoder_hidden_states" in spec:  # an app passes its text encoder's output; zeros mean "no prompt"
    feeds["encoder_hidden_states"] = np.zeros((n, *spec["encoder_hidden_states"]["shape"][1:]), np.float32)
if "guidance_scale" in spec:
    feeds["guidance_scale"] = np.array([spec["guidance_scale"]["default"] if args.guidance is None else args.guidance], np.float32)

model = ov.Core().read_model(args.model)
if model.is_dynamic():  # the NPU compiles static shapes only, and the CPU runs them faster
    model.reshape({name: list(value.shape) for name, value in feeds.items()})
# Always named on the CPU: without the hint OpenVINO runs f32 IR in bf16 on CPUs that have it.
precision = args.precision or sidecar.get("inference_precision", "f32")
config = {"INFERENCE_PRECISION_HINT": precision} if args.device == "CPU" else {}
sample = ov.Core().compile_model(model, args.device, config)(feeds)["sample"]

lo, hi = sidecar["data_range"]
images = np.clip((sample - lo) / (hi - lo), 0.0, 1.0).transpose(0, 2, 3, 1)  # [N, H, W, C] in 0..1
cols = int(np.ceil(np.sqrt(n)))
rows = -(-n // cols)
grid = np.zeros((rows * h, cols * w, c), np.float32)
for i, image in enumerate(images):
    grid[i // cols * h : (i // cols + 1) * h, i % cols * w : (i % cols + 1) * w] = image
try:
    from PIL import Image

    if c not in (1, 3):
        raise ImportError  # latents and other channel counts are no picture: keep the numbers
    pixels = (grid * 255).round().astype(np.uint8)
    Image.fromarray(pixels[..., 0] if c == 1 else pixels).save(args.out)
    print(f"wrote {args.out} ({n} samples)")
except ImportError:
    np.save(args.out.with_suffix(".npy"), grid)
    print(f"wrote {args.out.with_suffix('.npy')} ({n} samples)")
