"""zoo:digits-flow: a tiny rectified-flow text-to-image transformer on the digits, as a StableDiffusion3Pipeline folder.

The parts are diffusers' and transformers' own SD3 classes at digit scale: the frozen VAE of
zoo:digits-t2i (its 4x8x8 latents), two CLIPTextModelWithProjection encoders (the first starts from
digits-t2i's text encoder) with the digits' CLIP tokenizer padded to 16 tokens, no T5 (the pipeline
then feeds zeros in its place, as SD3 folders without text_encoder_3 do), an SD3Transformer2DModel,
and FlowMatchEulerDiscreteScheduler with SD3's shift of 3. `StableDiffusion3Pipeline.from_pretrained`
loads it offline and samples it with its defaults: it was trained with the 256 zero T5 tokens the
pipeline adds by default.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.progress import progress
from compress.training import EMA, train_loop
from compress.zoo.t2i import PROMPT_DROPOUT, _replace_folder, all_prompts, encode_training_set, training_batch, write_tokenizer
from compress.zoo.train import EMA_DECAY, zoo_schedule

NAME = "digits-flow"
TEXT_TOKENS = 16  # CLIP tokens per prompt: the longest template is 9
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length: zeros stand in for the absent T5
CLIP_L = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=64)
CLIP_G = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
TRANSFORMER = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=4,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=CLIP_L["hidden_size"] + CLIP_G["hidden_size"],  # the CLIP states, concatenated
    caption_projection_dim=64,  # the transformer's width
    pooled_projection_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"],
    pos_embed_max_size=8,
)
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
ITERATIONS = 3000
LR = 1e-3
TRAIN_THREADS = 1  # see compress/zoo/t2i.py


def build_text_encoders(tokenizer, init=None):
    """CLIP-L and CLIP-G stand-ins; CLIP-L copies ``init``'s (digits-t2i's) weights where the shapes agree."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    vocab = tokenizer.get_vocab()
    ids = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=TEXT_TOKENS, **ids, **c))
                for c in (CLIP_L, CLIP_G)]
    if init is not None:
        own = encoders[0].text_model.state_dict()
        for key, value in init.state_dict().items():  # transformers 5's CLIPTextModel holds the text model's parts itself
            if key in own and own[key].shape == value.shape:
                own[key] = value
            elif key.endswith("position_embedding.weight"):
                own[key] = value[:TEXT_TOKENS]
        encoders[0].text_model.load_state_dict(own)
    return encoders


def build_pipeline(vae, text_encoders, tokenizer, transformer):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                                    text_encoder=text_encoders[0], tokenizer=tokenizer, text_encoder_2=text_encoders[1],
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)


def train_transformer(pipe, latents, iterations: int, batch_size: int = 64, lr: float = LR, seed: int = 0):
    """Velocity prediction v = noise - x0 at logit-normal sigmas (SD3's default density); text encoders train jointly."""
    torch.manual_seed(seed)
    scaling = pipe.vae.config.scaling_factor
    prompts = all_prompts()
    model = torch.nn.ModuleDict({"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}).train()
    ema = EMA(model, EMA_DECAY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)

    def loss_at(step: int) -> torch.Tensor:
        z0, distinct, inverse = training_batch(latents, scaling, batch_size, gen)
        # The pipeline's own encoding (both CLIPs' penultimate states, zeros for T5, pooled projections), with gradients.
        embeds, _, pooled, _ = pipe.encode_prompt([prompts[i] for i in distinct.tolist()], None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=T5_TOKENS)
        noise = torch.randn(z0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn((batch_size,), generator=gen)).view(-1, 1, 1, 1)
        xt = (1 - sigma) * z0 + sigma * noise
        v = pipe.transformer(hidden_states=xt, timestep=sigma.flatten() * SCHEDULER["num_train_timesteps"], encoder_hidden_states=embeds[inverse],
                             pooled_projections=pooled[inverse]).sample
        return F.mse_loss(v, noise - z0)

    result = train_loop(model, optimizer, loss_at, iterations, zoo_schedule(lr), ema=ema, progress=progress, description=f"train {NAME}")
    ema.copy_to_module()
    model.requires_grad_(False).eval()
    return {"phase": "transformer", "iterations": iterations, "batch_size": batch_size, "lr": lr, "seed": seed,
            "prompt_dropout": PROMPT_DROPOUT, "sigma_density": "logit-normal(0, 1)", "final_loss": result.mean_loss(100)}


def train_digits_flow(out_dir: Path, iterations: int | None = None) -> Path:
    """Trains out_dir/digits-flow from zoo:digits-t2i's VAE and text encoder (written beside it, renamed at the end)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModel

    from compress.zoo import pipeline_folder

    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    start = time.time()
    folder, staging = out_dir / NAME, out_dir / f"{NAME}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        t2i = pipeline_folder("digits-t2i")
        vae = AutoencoderKL.from_pretrained(str(t2i / "vae")).eval().requires_grad_(False)
        vae.register_to_config(shift_factor=0.0)  # SD3's decode adds it after unscaling
        tokenizer = write_tokenizer(staging / "tokenizer", TEXT_TOKENS)
        encoders = build_text_encoders(tokenizer, CLIPTextModel.from_pretrained(str(t2i / "text_encoder")))
        torch.manual_seed(0)
        pipe = build_pipeline(vae, encoders, tokenizer, SD3Transformer2DModel(**TRANSFORMER))
        info = train_transformer(pipe, encode_training_set(vae), iterations or ITERATIONS)
        info["seconds"] = round(time.time() - start, 1)
        info["threads"] = torch.get_num_threads()
        pipe.save_pretrained(str(staging), safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):  # the pipeline's save drops vocab.json/merges.txt and the json's padding
            write_tokenizer(staging / name, TEXT_TOKENS)
        training = {"name": NAME, "phases": [info], "vae": "zoo:digits-t2i (frozen)", "train_seconds": info["seconds"]}
        (staging / "training.json").write_text(json.dumps(training, indent=2) + "\n")
        _replace_folder(staging, folder)
    finally:
        torch.set_num_threads(threads)
    return folder
