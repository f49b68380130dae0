"""optimum-intel + OpenVINO GenAI's side of bench/peers.py, run in bench/peers/.venv-openvino.

Export: `optimum-cli export openvino --task text-to-image` (float32 and ``--weight-format int8``,
run by bench/peers.py itself); hybrid W8A8 (UNet weights and activations int8, text encoder and
VAE int8 weights) has no offline dataset on the command line, so `export-hybrid` here calls
optimum-intel's Python API with our prompts as its calibration dataset.
Inference: `openvino_genai.Text2ImagePipeline`, its C++ scheduler loop, reshaped to static
batch-1 shapes (its documented fast path). It takes no latents, but it takes a `Generator`: ours
hands out our latent noise, so its images start from the same noise as every other tool's.

    bench/peers/.venv-openvino/bin/python bench/peers/drive_openvino_genai.py export-hybrid SRC OUT PROMPTS.json
    bench/peers/.venv-openvino/bin/python bench/peers/drive_openvino_genai.py   (requests on stdin, see serve.py)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import reply, serve  # noqa: E402


def export_hybrid(source: str, out: str, prompts: list[str]) -> dict:
    from optimum.intel import OVStableDiffusionPipeline, OVWeightQuantizationConfig

    config = OVWeightQuantizationConfig(bits=8, quant_method="hybrid", dataset=prompts, num_samples=len(prompts))
    pipe = OVStableDiffusionPipeline.from_pretrained(source, export=True, quantization_config=config)
    pipe.save_pretrained(out)
    from openvino_tokenizers import convert_tokenizer  # GenAI reads the tokenizer as OpenVINO models
    from transformers import CLIPTokenizer
    import openvino as ov

    tokenizer, detokenizer = convert_tokenizer(CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"), with_detokenizer=True)
    ov.save_model(tokenizer, str(Path(out) / "tokenizer" / "openvino_tokenizer.xml"))
    ov.save_model(detokenizer, str(Path(out) / "tokenizer" / "openvino_detokenizer.xml"))
    return {"calibration_prompts": len(prompts)}


def load(name: str, folder: str, threads: int, options: dict):
    import numpy as np
    import openvino as ov
    import openvino_genai as genai

    class Noise(genai.Generator):
        """Hands GenAI our latent noise instead of its own random draw (init_noise_sigma is 1 for DDIM)."""

        def __init__(self, noise):
            genai.Generator.__init__(self)
            self.noise = np.ascontiguousarray(noise, np.float32)

        def next(self):
            raise RuntimeError("GenAI asked for scalar random numbers: this scheduler is not deterministic")

        def randn_tensor(self, shape):
            if tuple(shape) != self.noise.shape:
                raise RuntimeError(f"GenAI asked for noise of shape {tuple(shape)}, we have {self.noise.shape}")
            return ov.Tensor(self.noise)

    pipe = genai.Text2ImagePipeline(folder)
    pipe.reshape(1, options["height"], options["width"], options["guidance"])
    pipe.compile("CPU", INFERENCE_NUM_THREADS=threads)

    def generate(prompts, noise):
        images = []
        for prompt, one in zip(prompts, noise):  # static batch-1 shapes: one prompt a call
            out = pipe.generate(prompt, width=options["width"], height=options["height"], num_inference_steps=options["steps"],
                                guidance_scale=options["guidance"], generator=Noise(one[None]))
            images.append(np.asarray(out.data, np.float32)[0].transpose(2, 0, 1) / 255)  # uint8 NHWC -> [0, 1] CHW
        return np.stack(images)

    return generate


if __name__ == "__main__":
    if sys.argv[1:2] == ["export-hybrid"]:
        reply(ok=True, **export_hybrid(sys.argv[2], sys.argv[3], json.loads(Path(sys.argv[4]).read_text())))
    else:
        serve(load)
