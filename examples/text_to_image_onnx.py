"""Prompt -> PNG from a text-to-image export with numpy, onnxruntime, tokenizers and pillow only.

    python text_to_image_onnx.py EXPORT_DIR "a handwritten seven" [--negative "blurry"] [--seed 0] [--guidance 7.5] [--out seven.png]

EXPORT_DIR is what `compress export` wrote for a pipeline; pipeline.json there says how the files chain.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def session(folder: Path, kind: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(folder / f"{kind}.onnx"), providers=["CPUExecutionProvider"])


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


def encode(folder: Path, info: dict, prompts: list[str], negative: bool = False) -> dict:
    """Prompts -> the sampler's condition inputs (every encoder's hidden states joined; the pooled outputs of SDXL, SD3 and FLUX;
    PixArt's and Sana's attention mask)."""
    hidden, pooled, masks = {}, [], []
    for encoder in info["text_encoders"]:
        tokenizer = Tokenizer.from_file(str(folder / tokenizer_file(info["tokenizers"][encoder["tokenizer"]], negative)))
        ids = np.array([t.ids for t in tokenizer.encode_batch(prompts)], np.int64)
        outputs = session(folder, encoder["name"]).run(None, {"input_ids": ids})
        hidden[encoder["name"]] = outputs[0]
        if encoder["pooled"]:
            pooled.append(outputs[1])
        if encoder.get("attention_mask"):
            masks.append(outputs[-1])
    feeds = join_text(info, hidden, pooled)
    if masks:
        feeds["encoder_attention_mask"] = np.concatenate(masks, axis=-1)
    return feeds


def generate(folder: Path, prompts: list[str], negative: str | None = None, seed: int = 0, guidance: float | None = None,
             noise: np.ndarray | None = None) -> np.ndarray:
    """Images [N, H, W, 3] in [0, 1]; the same seed (or ``noise``, standard normal latents) gives the same images."""
    info = json.loads((folder / "pipeline.json").read_text())
    sampler = session(folder, "sampler")
    wanted = {i.name for i in sampler.get_inputs()}
    feeds = encode(folder, info, prompts)
    if "negative_encoder_hidden_states" in wanted:
        negative_feeds = encode(folder, info, [negative or ""] * len(prompts), negative=True)
        if negative is None and info["guidance"]["zeros_for_empty_negative_prompt"]:
            negative_feeds = {k: np.zeros_like(v) for k, v in negative_feeds.items()}
        feeds.update({f"negative_{k}": v for k, v in negative_feeds.items()})
    if "guidance_scale" in wanted:  # classifier-free, or the value of a guidance embedding (FLUX-dev)
        feeds["guidance_scale"] = np.array([info["guidance"]["default_scale"] if guidance is None else guidance], np.float32)
    if "time_ids" in wanted:
        h, w = info["image"]["shape"][2:]
        feeds["time_ids"] = np.tile(np.array([[h, w, 0, 0, h, w]], np.float32), (len(prompts), 1))
    latent_shape = info["latents"]["shape"][1:]
    if noise is None:
        noise = np.random.default_rng(seed).standard_normal((len(prompts), *latent_shape), dtype=np.float32)
    feeds["noise"] = noise
    image = sampler.run(["image"], {k: v for k, v in feeds.items() if k in wanted})[0]
    return image.transpose(0, 2, 3, 1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("prompt")
    parser.add_argument("--negative", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--out", type=Path, default=Path("image.png"))
    args = parser.parse_args()
    from PIL import Image

    image = generate(args.folder, [args.prompt], args.negative, args.seed, args.guidance)[0]
    Image.fromarray((image * 255).round().astype(np.uint8)).save(args.out)
    print(f"wrote {args.out}")
