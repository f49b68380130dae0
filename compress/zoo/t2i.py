"""zoo:digits-t2i: a tiny latent text-to-image Stable Diffusion pipeline trained on scikit-learn's digits.

Every part is the standard diffusers / transformers class at digit scale (AutoencoderKL, CLIPTextModel
with a CLIPTokenizer, UNet2DConditionModel, DDIMScheduler), saved as a StableDiffusionPipeline folder,
so `StableDiffusionPipeline.from_pretrained(folder)` loads it offline and unchanged.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.errors import UserError
from compress.progress import progress
from compress.training import EMA, LABEL_DROPOUT, drop_conditions, train_loop
from compress.zoo.data import load_digits_tensors
from compress.zoo.train import EMA_DECAY, zoo_schedule

NAME = "digits-t2i"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_TEMPLATES = (
    "a handwritten {word}",
    "the digit {numeral}",
    "a picture of the number {word}",
    "{numeral}",
    "{word}",
    "a drawing of the digit {numeral}",
    "an image of a handwritten {word}",
    "the number {numeral}",
)
# Each of these words is one BPE token, so the text encoder learns words, not spellings. Numerals need
# no entry: CLIP's pre-tokenizer splits digits one by one and single characters are in every vocabulary.
VOCABULARY_WORDS = (
    "a", "an", "the", "of", "handwritten", "hand", "written", "digit", "digits", "number", "numeral",
    "picture", "image", "drawing", "photo", "sketch", "white", "black", "on", "in", "with",
) + DIGIT_WORDS
BOS, EOS = "<|startoftext|>", "<|endoftext|>"  # EOS is also the pad token, as in SD 1.x
MAX_LENGTH = 77
WORD_END = "</w>"

# Digits as RGB 3x16x16 (gray replicated) so the pipeline is the standard 3-channel one; one
# downsampling gives 4x8x8 latents.
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=16,
)
TEXT_ENCODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH)
UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(64, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32,
    cross_attention_dim=TEXT_ENCODER["hidden_size"],
    attention_head_dim=4,  # diffusers reads this as the number of heads for this class
)
# SD 1.x's noise schedule; clip_sample off because latents are not bounded to [-1, 1].
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

PROMPT_DROPOUT = LABEL_DROPOUT  # the empty prompt is diffusers' unconditional branch of classifier-free guidance
KL_WEIGHT = 1e-3  # per latent element: keeps latents near unit scale without blurring reconstructions
VAE_ITERATIONS = 1500
DIFFUSION_ITERATIONS = 3600
DIFFUSION_LR = 1e-3
RESUME_ITERATIONS = 1500
RESUME_LR = 3e-4
# One thread: on the shared 2-core machine two OpenMP threads ran a step 30x slower while other jobs
# ran (barrier spinning), one thread only 1.4x slower than two free cores.
TRAIN_THREADS = 1


# -- prompts --------------------------------------------------------------------------------------

def prompt(digit: int, template_index: int = 0) -> str:
    return PROMPT_TEMPLATES[template_index % len(PROMPT_TEMPLATES)].format(word=DIGIT_WORDS[digit], numeral=str(digit))


def digit_prompts(n: int) -> tuple[list[str], torch.Tensor]:
    """n prompts cycling through the digits 0..9 (fastest) and the templates, and their digits."""
    labels = torch.arange(n) % 10
    return [prompt(i % 10, (i // 10) % len(PROMPT_TEMPLATES)) for i in range(n)], labels


def all_prompts() -> list[str]:
    """The empty prompt, then every digit in every template: index 1 + digit * T + template."""
    return [""] + [prompt(d, t) for d in range(10) for t in range(len(PROMPT_TEMPLATES))]


# -- tokenizer ------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's and CLIP's printable stand-ins for the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one pre-tokenized (byte-encoded) word: merge the lowest-ranked pair until none applies."""
    parts = [*word[:-1], word[-1] + WORD_END]
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(parts, parts[1:])))
        if rank == math.inf:
            break
        first, second = parts[i], parts[i + 1]
        merged, j = [], 0
        while j < len(parts):
            if j + 1 < len(parts) and parts[j] == first and parts[j + 1] == second:
                merged.append(first + second)
                j += 2
            else:
                merged.append(parts[j])
                j += 1
        parts = merged
    return parts


def build_vocabulary(words: tuple[str, ...] = VOCABULARY_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style vocabulary: the 256 byte characters, each also word-final, then merges that make each
    word one token, then BOS/EOS. New merges rank after all earlier ones, so words done stay one token."""
    encode = _bytes_to_unicode()
    tokens = {t: None for t in [*encode.values(), *(c + WORD_END for c in encode.values())]}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        encoded = "".join(encode[b] for b in word.encode("utf-8"))
        while len(parts := bpe(encoded, ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(merges)
            merges.append((parts[0], parts[1]))
            tokens.setdefault(parts[0] + parts[1], None)
    tokens.update({BOS: None, EOS: None})
    return {t: i for i, t in enumerate(tokens)}, merges


def with_legacy_prefix(weights: Path) -> None:
    """Rewrites a CLIPTextModel's keys as `text_model.*`. transformers 5 saves them without the prefix and
    loads both forms; transformers 4 (what Optimum and optimum-intel pin) loads the unprefixed form as
    random weights, with only a log line."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    if all(k.startswith("text_model.") for k in tensors):
        return
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})


def write_tokenizer(folder: Path, max_length: int = MAX_LENGTH):
    """Writes vocab.json + merges.txt (CLIP's slow format) and tokenizer.json (the `tokenizers` format,
    padded to ``max_length`` with EOS and truncated, as SD's text encoder wants); returns the loaded CLIPTokenizer."""
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    vocab, merges = build_vocabulary()
    folder.mkdir(parents=True, exist_ok=True)
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length).save_pretrained(str(folder))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
    fast.enable_truncation(max_length)
    fast.enable_padding(length=max_length, pad_id=vocab[EOS], pad_token=EOS)
    fast.save(str(folder / "tokenizer.json"))
    return CLIPTokenizer.from_pretrained(str(folder))


# -- models ---------------------------------------------------------------------------------------

def build_vae(config: dict | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**(config or VAE))


def build_text_encoder(vocab: dict[str, int], config: dict | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel

    ids = dict(bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    return CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), **ids, **(config or TEXT_ENCODER)))


def build_unet(config: dict | None = None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**(config or UNET))


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER)


def build_pipeline(vae, text_encoder, tokenizer, unet):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=build_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# -- training -------------------------------------------------------------------------------------

def _rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1).contiguous()


def train_vae(iterations: int = VAE_ITERATIONS, batch_size: int = 64, lr: float = 1e-3, seed: int = 0):
    torch.manual_seed(seed)
    images = _rgb(load_digits_tensors("train")[0])
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    recon_losses, kls = [], []

    def loss_at(step: int) -> torch.Tensor:
        x = images[torch.randint(0, len(images), (batch_size,), generator=gen)]
        # One-pixel shifts: the decoder must also render digits that are not training pixels.
        x = torch.roll(x, shifts=tuple(torch.randint(-1, 2, (2,), generator=gen).tolist()), dims=(2, 3))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        recon_loss = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        recon_losses.append(recon_loss.item())
        kls.append(kl.item())
        return recon_loss + KL_WEIGHT * kl

    train_loop(vae, optimizer, loss_at, iterations, zoo_schedule(lr), progress=progress, description=f"train {NAME} vae")
    info = {"phase": "vae", "iterations": iterations, "batch_size": batch_size, "lr": lr, "seed": seed, "kl_weight": KL_WEIGHT,
            "final_recon_loss": sum(recon_losses[-100:]) / len(recon_losses[-100:]), "final_kl": sum(kls[-100:]) / len(kls[-100:])}
    return vae.eval().requires_grad_(False), info


@torch.no_grad()
def encode_training_set(vae) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training digit (the VAE is frozen from here on), and labels."""
    images, labels = load_digits_tensors("train")
    dists = [vae.encode(b).latent_dist for b in _rgb(images).split(256)]
    return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists]), labels


def latent_scaling_factor(mean: torch.Tensor, std: torch.Tensor, seed: int = 0) -> float:
    """1 / std of sampled training latents, as SD's 0.18215: the denoiser sees unit-variance latents."""
    sampled = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
    return float(1.0 / sampled.std())


def training_batch(latents: tuple[torch.Tensor, torch.Tensor, torch.Tensor], scaling_factor: float, batch_size: int, gen: torch.Generator):
    """Scaled latents drawn from the training digits' posteriors, and their prompts as indices into `all_prompts()`: a
    random template of each digit, the empty prompt at the dropout rate. Returns (z0, distinct prompts, inverse): each
    distinct prompt is encoded once per batch, and gradients reach the text encoder all the same."""
    mean, std, labels = latents
    idx = torch.randint(0, len(mean), (batch_size,), generator=gen)
    z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling_factor
    template = torch.randint(0, len(PROMPT_TEMPLATES), (batch_size,), generator=gen)
    which = 1 + labels[idx] * len(PROMPT_TEMPLATES) + template
    which = drop_conditions(which, torch.zeros_like(which), gen, PROMPT_DROPOUT)  # prompt 0 is the empty one
    distinct, inverse = which.unique(return_inverse=True)
    return z0, distinct, inverse


def train_denoiser(latents: tuple[torch.Tensor, torch.Tensor, torch.Tensor], scaling_factor: float, tokenizer, text_encoder, unet,
                   iterations: int, batch_size: int = 64, lr: float = DIFFUSION_LR, seed: int = 0):
    """Epsilon prediction on scaled latents; the text encoder trains jointly. Returns them with their EMA weights."""
    torch.manual_seed(seed)
    scheduler = build_scheduler()
    ids = tokenizer(all_prompts(), padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt").input_ids
    model = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder}).train()
    ema = EMA(model, EMA_DECAY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)

    def loss_at(step: int) -> torch.Tensor:
        z0, distinct, inverse = training_batch(latents, scaling_factor, batch_size, gen)
        context = text_encoder(ids[distinct]).last_hidden_state[inverse]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        pred = unet(scheduler.add_noise(z0, noise, t), t, context).sample
        return F.mse_loss(pred, noise)

    result = train_loop(model, optimizer, loss_at, iterations, zoo_schedule(lr), ema=ema, progress=progress,
                        description=f"train {NAME} unet+text")
    ema.copy_to_module()
    model.requires_grad_(False)
    info = {"phase": "denoiser", "iterations": iterations, "batch_size": batch_size, "lr": lr, "seed": seed,
            "prompt_dropout": PROMPT_DROPOUT, "final_loss": result.mean_loss(100)}
    return unet.eval(), text_encoder.eval(), info


def _load_folder(folder: Path):
    from diffusers import StableDiffusionPipeline

    if not (folder / "model_index.json").is_file():
        raise UserError(f"no {NAME} pipeline folder at {folder} to resume; run 'compress zoo train {NAME}' first")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    return pipe, json.loads((folder / "training.json").read_text())


def _replace_folder(staging: Path, folder: Path) -> None:
    """Swaps the finished folder in by renames, so a crash never leaves a half-written pipeline."""
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def train_digits_t2i(out_dir: Path, iterations: int | None = None, resume: bool = False, lr: float | None = None) -> Path:
    """Trains the pipeline into out_dir/digits-t2i: the VAE, then UNet + text encoder. ``resume`` keeps the
    folder's VAE and tokenizer and continues UNet + text encoder for another phase at a lower rate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        return _train(out_dir, iterations, resume, lr)
    finally:
        torch.set_num_threads(threads)


def _train(out_dir: Path, iterations: int | None, resume: bool, lr: float | None) -> Path:
    start = time.time()
    folder = out_dir / NAME
    staging = out_dir / f"{NAME}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    if resume:
        pipe, earlier = _load_folder(folder)
        vae, tokenizer, text_encoder, unet = pipe.vae, pipe.tokenizer, pipe.text_encoder, pipe.unet
        phases, scaling = earlier["phases"], vae.config.scaling_factor
        latents = encode_training_set(vae)
        iterations, lr, seed = iterations or RESUME_ITERATIONS, lr or RESUME_LR, len(phases)
    else:
        vae, vae_info = train_vae(VAE_ITERATIONS)
        latents = encode_training_set(vae)
        scaling = latent_scaling_factor(*latents[:2])
        vae.register_to_config(scaling_factor=scaling)
        vae_info["seconds"] = round(time.time() - start, 1)
        phases = [vae_info]
        tokenizer = write_tokenizer(staging / "tokenizer")
        text_encoder, unet = build_text_encoder(tokenizer.get_vocab()), build_unet()
        iterations, lr, seed = iterations or DIFFUSION_ITERATIONS, lr or DIFFUSION_LR, 0
    phase_start = time.time()
    unet, text_encoder, info = train_denoiser(latents, scaling, tokenizer, text_encoder.train(), unet.train(), iterations, lr=lr, seed=seed)
    info["seconds"] = round(time.time() - phase_start, 1)
    info["threads"] = torch.get_num_threads()
    build_pipeline(vae, text_encoder, tokenizer, unet).save_pretrained(str(staging), safe_serialization=True)
    write_tokenizer(staging / "tokenizer")  # the pipeline's save drops vocab.json/merges.txt and the json's padding
    with_legacy_prefix(staging / "text_encoder" / "model.safetensors")
    run_seconds = time.time() - start
    training = {
        "name": NAME,
        "phases": phases + [info],
        "scaling_factor": scaling,
        # Wall time of every run that made this folder (a --resume run adds its own).
        "train_seconds": round(earlier["train_seconds"] + run_seconds if resume else run_seconds, 1),
        "threads": torch.get_num_threads(),
    }
    (staging / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    _replace_folder(staging, folder)
    return folder
