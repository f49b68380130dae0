"""Stable-Diffusion scale: an SD-1.5-architecture pipeline (random weights) through every stage of `compress run`.

The folder is built here, not downloaded and not committed: the UNet of SD 1.5's configuration
(859.5 M parameters), the real-size VAE (83.7 M) and a CLIP text encoder of the real size (123.1 M)
with a byte-level tokenizer (the tests' character vocabulary, placed in the 49408-token embedding).
Random weights make the images noise, so quality is judged as PSNR against the float32 pipeline
from the same noise, which is what the chain must preserve.

    python bench/scale.py build [--folder DIR] [--resolution 256]
    python bench/scale.py run [--folder DIR] [--out DIR]      # compress run recipes/sd15-scale.yaml on it
    python bench/scale.py report                               # bench/results/scale.md from scale.json

Writes bench/results/scale.{json,md}: every stage's wall time and peak RSS (from the run's report),
the machine, and the artifacts' sizes.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_FOLDER = Path(tempfile.gettempdir()) / "diffusion-compress-sd15"
MAX_TOKENS = 77


def build(folder: Path, resolution: int) -> Path:
    """Writes the SD-1.5-architecture StableDiffusionPipeline folder (fp32 safetensors, about 4.3 GB)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(ROOT))
    from tests.tiny_pipelines import write_char_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=resolution // 8, cross_attention_dim=768, attention_head_dim=8)  # SD 1.5's config otherwise
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=resolution,
                        scaling_factor=0.18215)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_char_tokenizer(folder / "tokenizer")))
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu",
                                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id))
    for module in (unet, vae, text_encoder):
        module.eval()
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    print(json.dumps({"folder": str(folder), "parameters": counts}))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["build"])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args()
    if args.phase == "build":
        build(args.folder, args.resolution)


if __name__ == "__main__":
    main()
