"""Prompt -> PNG from a text-to-image export with numpy, openvino, tokenizers and pillow only.

    python text_to_image_openvino.py EXPORT_DIR "a handwritten seven" [--negative "blurry"] [--seed 0] [--device CPU] [--precision f32] [--out seven.png]

EXPORT_DIR is what `compress export --format openvino` wrote for a pipeline; pipeline.json says how the files chain.
OpenVINO's CPU plugin runs float32 IR in bf16 by default on CPUs with AMX or AVX512-BF16 (faster, less exact);
the toolkit validates the artifacts at f32, which is what this script asks for on the CPU unless `--precision bf16`.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import openvino as ov
from tokenizers import Tokenizer


def infer(folder: Path, kind: str, feeds: dict, device: str, config: dict) -> list[np.ndarray]:
    """One call of <kind>.xml, compiled for these inputs' shapes (static shapes run fastest, and NPUs need them)."""
    model = ov.Core().read_model(str(folder / f"{kind}.xml"))
    names = [p.get_any_name() for p in model.inputs]
    model.reshape({n: list(feeds[n].shape) for n in names})
    compiled = ov.Core().compile_model(model, device, config)
    result = compiled({n: feeds[n] for n in names})
    return [result[o] for o in compiled.outputs]


def join_text(info: dict, hidden: dict, pooled: list) -> dict:
    """The encoders' outputs -> the sampler's text inputs, as pipeline.json's text_layout says (SD3 pads and stacks on the sequence)."""
    names = [e["name"] for e in info["text_encoders"]]
    layout = info.get("text_layout") or {"channels": names, "pad_channels_to": None, "sequence": [], "zero_tokens": 0}
    states = np.concatenate([hidden[n] for n in layout["channels"]], axis=-1)
    if layout["pad_channels_to"]:
        states = np.pad(states, ((0, 0), (0, 0), (0, layout["pad_channels_to"] - states.shape[-1])))
    parts = [states] + [hidden[n] for n in layout["sequence"]]
    if layout["zero_tokens"]:
        parts.append(np.zeros((states.shape[0], layout["zero_tokens"], states.shape[-1]), np.float32))
    feeds = {"encoder_hidden_states": np.concatenate(parts, axis=1)}
    if pooled:
        feeds[info.get("pooled_input") or "text_embeds"] = np.concatenate(pooled, axis=-1)
    return feeds


def tokenizer_file(tokenizer: dict, negative: bool) -> str:
    """Sana's negative prompts have their own tokenizer (no instruction prefix); every other pipeline has one for both."""
    return tokenizer.get("negative_file", tokenizer["file"]) if negative else tokenizer["file"]


def generate(folder: Path, prompts: list[str], negative: str | None = None, seed: int = 0, guidance: float | None = None,
             device: str = "CPU", config: dict | None = None) -> np.ndarray:
    """Images [N, H, W, 3] in [0, 1]; the same seed gives the same images."""
    info = json.loads((folder / "pipeline.json").read_text())
    if config is None:  # f32, as validated: OpenVINO's CPU plugin would otherwise pick bf16 on CPUs that have it
        config = {"INFERENCE_PRECISION_HINT": "f32"} if device == "CPU" else {}
    wanted = [p.get_any_name() for p in ov.Core().read_model(str(folder / "sampler.xml")).inputs]

    def encode(texts: list[str], negative: bool = False) -> dict:
        hidden, pooled, masks = {}, [], []
        for encoder in info["text_encoders"]:
            tokenizer = Tokenizer.from_file(str(folder / tokenizer_file(info["tokenizers"][encoder["tokenizer"]], negative)))
            ids = np.array([t.ids for t in tokenizer.encode_batch(texts)], np.int64)
            outputs = infer(folder, encoder["name"], {"input_ids": ids}, device, config)
            hidden[encoder["name"]] = outputs[0]
            if encoder["pooled"]:
                pooled.append(outputs[1])
            if encoder.get("attention_mask"):  # PixArt: the sampler takes the prompt's mask too
                masks.append(outputs[-1])
        feeds = join_text(info, hidden, pooled)
        if masks:
            feeds["encoder_attention_mask"] = np.concatenate(masks, axis=-1)
        return feeds

    feeds = encode(prompts)
    if "negative_encoder_hidden_states" in wanted:
        negative_feeds = encode([negative or ""] * len(prompts), negative=True)
        if negative is None and info["guidance"]["zeros_for_empty_negative_prompt"]:
            negative_feeds = {k: np.zeros_like(v) for k, v in negative_feeds.items()}
        feeds.update({f"negative_{k}": v for k, v in negative_feeds.items()})
    if "guidance_scale" in wanted:  # classifier-free, or the value of a guidance embedding (FLUX-dev)
        feeds["guidance_scale"] = np.array([info["guidance"]["default_scale"] if guidance is None else guidance], np.float32)
    h, w = info["image"]["shape"][2:]
    feeds["time_ids"] = np.tile(np.array([[h, w, 0, 0, h, w]], np.float32), (len(prompts), 1))
    feeds["noise"] = np.random.default_rng(seed).standard_normal((len(prompts), *info["latents"]["shape"][1:]), dtype=np.float32)
    image = infer(folder, "sampler", {k: v for k, v in feeds.items() if k in wanted}, device, config)[0]
    return image.transpose(0, 2, 3, 1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("prompt")
    parser.add_argument("--negative", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--device", default="CPU", help="CPU, GPU or NPU (what openvino.Core().available_devices lists)")
    parser.add_argument("--precision", choices=["f32", "bf16"], default="f32", help="CPU inference precision (bf16: faster, less exact)")
    parser.add_argument("--out", type=Path, default=Path("image.png"))
    args = parser.parse_args()
    from PIL import Image

    # Named even for f32: without the hint OpenVINO runs f32 IR in bf16 on CPUs that have it.
    config = {"INFERENCE_PRECISION_HINT": args.precision} if args.device == "CPU" else {}
    image = generate(args.folder, [args.prompt], args.negative, args.seed, args.guidance, args.device, config)[0]
    Image.fromarray((image * 255).round().astype(np.uint8)).save(args.out)
    print(f"wrote {args.out}")
