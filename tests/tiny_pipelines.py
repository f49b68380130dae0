"""Tiny random text-to-image pipeline folders built in place: SD 1.x (AutoencoderKL or AutoencoderTiny), SDXL, SD3, FLUX, PixArt and Sana.

Saved with diffusers' own `save_pretrained`, so the folders are what users have on disk, and
diffusers' pipelines loaded from them are the reference every export is compared with.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

MAX_TOKENS = 77


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte-level alphabet: one printable character per byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_char_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> Path:
    """A CLIP tokenizer whose vocabulary is the byte alphabet (no merges: one token per character)."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    staging = folder / ".raw"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "vocab.json").write_text(json.dumps(vocab))
    (staging / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(staging / "vocab.json"), str(staging / "merges.txt"), pad_token=pad_token, model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(str(folder))
    for f in staging.iterdir():
        f.unlink()
    staging.rmdir()
    return folder


def _text_encoder(hidden: int, projection: int | None, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=514, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=projection or hidden,
                            bos_token_id=512, eos_token_id=513, pad_token_id=513)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _unet(cross: int, sdxl: bool, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8) if sdxl else {}
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross, attention_head_dim=4, norm_num_groups=8, **extra,
    ).eval()


def _vae(kind: str, seed: int):
    from diffusers import AutoencoderKL, AutoencoderTiny

    torch.manual_seed(seed)
    if kind == "tiny":
        return AutoencoderTiny(in_channels=3, out_channels=3, encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                               num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4).eval()
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8, scaling_factor=0.5).eval()


def _scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing", steps_offset=1)


def build_sd_folder(folder: Path, vae: str = "kl", seed: int = 0) -> Path:
    """A StableDiffusionPipeline folder: char tokenizer, 32-wide CLIP encoder, 4x8x8 latents, 16x16 images."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=_vae(vae, seed), text_encoder=_text_encoder(32, None, seed + 1), tokenizer=_tokenizer(folder),
        unet=_unet(32, False, seed + 2), scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder))
    return folder


def build_sdxl_folder(folder: Path, seed: int = 0) -> Path:
    """A StableDiffusionXLPipeline folder: two encoders (16 + 32 wide), pooled 16, time ids."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=_vae("kl", seed), text_encoder=_text_encoder(16, None, seed + 1), text_encoder_2=_text_encoder(32, 16, seed + 3),
        tokenizer=_tokenizer(folder), tokenizer_2=_tokenizer(folder, "tokenizer_2", pad_token="!"),
        unet=_unet(48, True, seed + 2), scheduler=_scheduler(),
    )
    pipe.save_pretrained(str(folder))
    return folder


def _tokenizer(folder: Path, name: str = "tokenizer", pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_char_tokenizer(folder / f".{name}", pad_token)))


T5_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"


def write_t5_tokenizer(folder: Path) -> Path:
    """A T5 tokenizer (Unigram) whose pieces are single characters after the word marker, as SentencePiece writes them."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in T5_CHARACTERS]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    tokenizer.save_pretrained(str(folder))
    return folder


def _t5_encoder(width: int, vocab: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab, d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def _sd3_transformer(joint: int, pooled: int, seed: int, sample_size: int = 8):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                 joint_attention_dim=joint, caption_projection_dim=16, pooled_projection_dim=pooled, out_channels=4,
                                 pos_embed_max_size=16).eval()


def build_sd3_folder(folder: Path, with_t5: bool = True, seed: int = 0) -> Path:
    """A StableDiffusion3Pipeline folder: CLIPs 8 and 16 wide (pooled 8 + 16), an optional 32-wide T5, a 32-wide joint
    attention (so the CLIP states are zero-padded), 4x8x8 latents from a VAE with a shift factor, 16x16 images."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import T5Tokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8, scaling_factor=1.5,
                        shift_factor=0.1).eval()
    t5_tokenizer = T5Tokenizer.from_pretrained(str(write_t5_tokenizer(folder / ".tokenizer_3"))) if with_t5 else None
    pipe = StableDiffusion3Pipeline(
        transformer=_sd3_transformer(32, 24, seed + 2), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=_text_encoder(8, 8, seed + 1), tokenizer=_tokenizer(folder),
        text_encoder_2=_text_encoder(16, 16, seed + 3), tokenizer_2=_tokenizer(folder, "tokenizer_2", pad_token="!"),
        text_encoder_3=_t5_encoder(32, len(t5_tokenizer), seed + 4) if with_t5 else None, tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(str(folder))
    return folder


def _shifted_vae(seed: int, scaling_factor: float, shift_factor: float | None):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8, scaling_factor=scaling_factor,
                         shift_factor=shift_factor).eval()


def _flux_transformer(joint: int, pooled: int, guidance_embeds: bool, seed: int, in_channels: int = 16):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    # The rotary axes (2 + 2 + 4) split the head width 8: text/time, rows, columns.
    return FluxTransformer2DModel(patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=joint, pooled_projection_dim=pooled,
                                  guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4)).eval()


def build_flux_folder(folder: Path, guidance_embeds: bool = True, seed: int = 0) -> Path:
    """A FluxPipeline folder: a 16-wide CLIPTextModel (pooled 16), a 32-wide T5, a FLUX transformer on 4-channel latents
    packed into 16-channel 2x2 patches, a VAE with a shift factor. ``guidance_embeds``: FLUX-dev style (dynamic shift);
    without: FLUX-schnell style (no guidance, a static shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import T5TokenizerFast

    t5_tokenizer = T5TokenizerFast.from_pretrained(str(write_t5_tokenizer(folder / ".tokenizer_2")))
    if guidance_embeds:  # black-forest-labs/FLUX.1-dev's scheduler config
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
    else:  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        scheduler=scheduler, vae=_shifted_vae(seed, 0.3611, 0.1159),
        text_encoder=_text_encoder(16, None, seed + 1), tokenizer=_tokenizer(folder),
        text_encoder_2=_t5_encoder(32, len(t5_tokenizer), seed + 4), tokenizer_2=t5_tokenizer,
        transformer=_flux_transformer(32, 16, guidance_embeds, seed + 2),
    )
    pipe.save_pretrained(str(folder))
    return folder


def _pixart_transformer(caption_channels: int, seed: int, sample_size: int = 8, use_additional_conditions: bool | None = None):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    # Micro-conditions split the width in thirds (resolution 2/3, aspect ratio 1/3): 24 wide then, 16 otherwise.
    head = 12 if use_additional_conditions else 8
    # out_channels = 2 x in_channels: learned sigma, as the released checkpoints have it.
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=head, in_channels=4, out_channels=8, num_layers=2,
                                    cross_attention_dim=2 * head, sample_size=sample_size, patch_size=2, caption_channels=caption_channels,
                                    use_additional_conditions=use_additional_conditions).eval()


def build_pixart_folder(folder: Path, legacy_class_name: bool = False, sigma: bool = False, seed: int = 0) -> Path:
    """A PixArtAlphaPipeline (or PixArtSigmaPipeline) folder: a 32-wide T5, a PixArt transformer with learned sigma on
    4x8x8 latents, 16x16 images. ``legacy_class_name``: the transformer is saved under the name Transformer2DModel, as
    the PixArt checkpoints on the hub are."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(str(write_t5_tokenizer(folder / ".tokenizer")))
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = cls(tokenizer=tokenizer, text_encoder=_t5_encoder(32, len(tokenizer), seed + 1), vae=_shifted_vae(seed, 0.18215, None),
               transformer=_pixart_transformer(32, seed + 2), scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(str(folder))
    if legacy_class_name:
        config_file, index_file = folder / "transformer" / "config.json", folder / "model_index.json"
        config, index = json.loads(config_file.read_text()), json.loads(index_file.read_text())
        config["_class_name"] = index["transformer"][1] = "Transformer2DModel"
        config_file.write_text(json.dumps(config, indent=2))
        index_file.write_text(json.dumps(index, indent=2))
    return folder


# Every character of SanaPipeline's complex human instruction and of the tests' prompts; "▁" is the word marker.
GEMMA_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;>\n"
# Merges across the join of the instruction ("User Prompt: ") and the prompt, so tokenizing them apart would differ.
GEMMA_MERGES = [("▁", "a"), ("▁", "t"), ("t", "h"), ("e", "n")]


def gemma_tokenizer():
    """A Gemma tokenizer (BPE with byte fallback) over single characters and a few merges, adding <bos> as Gemma's does."""
    from transformers import GemmaTokenizer

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "▁", *GEMMA_CHARACTERS])}
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(GEMMA_MERGES)})
    return GemmaTokenizer(vocab=vocab, merges=GEMMA_MERGES, add_bos_token=True)


def _gemma_encoder(width: int, vocab: int, seed: int):
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return Gemma2Model(config).eval()


def _sana_transformer(caption_channels: int, seed: int, sample_size: int = 16, **options):
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    return SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=8,
                                  num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                                  caption_channels=caption_channels, sample_size=sample_size, **options).eval()


def _dc_vae(seed: int):
    """An AutoencoderDC (ResBlock, then EfficientViT linear attention; pixel (un)shuffle) with 2x downscaling, 4 latent channels."""
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    blocks = ("ResBlock", "EfficientViTBlock")
    return AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=4, encoder_block_types=blocks, decoder_block_types=blocks,
                         encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
                         decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                         scaling_factor=0.41407).eval()


def build_sana_folder(folder: Path, scheduler: str = "dpm", seed: int = 0) -> Path:
    """A SanaPipeline folder: a 32-wide Gemma2 encoder, a Sana transformer on 4x16x16 AutoencoderDC latents, 32x32 images
    (SanaPipeline takes multiples of 32 only). ``scheduler`` 'dpm': DPMSolverMultistepScheduler with flow sigmas and a flow
    shift, as Sana's checkpoints have it; 'euler': FlowMatchEulerDiscreteScheduler."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SanaPipeline

    tokenizer = gemma_tokenizer()
    if scheduler == "dpm":
        schedule = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    else:
        schedule = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=_gemma_encoder(32, len(tokenizer), seed + 1), vae=_dc_vae(seed),
                        transformer=_sana_transformer(32, seed + 2), scheduler=schedule)
    pipe.save_pretrained(str(folder))
    return folder
