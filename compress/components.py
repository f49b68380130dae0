"""A pipeline: the `Denoiser` with the components around it (tokenizers, text encoders, a VAE).

A pixel-space model is a pipeline with a denoiser alone. A latent text-to-image pipeline adds
text encoders (prompt -> the denoiser's condition) and an autoencoder (latents <-> images).
Every stage takes this one description: export writes one artifact per component and the
sampler with the decoder baked in, calibration and validation draw conditions from prompts.

The conventions follow diffusers' pipelines, which are the reference the tests compare with:
- prompts are padded to the tokenizer's max length and truncated;
- SD 1.x/2.x: the condition is the text encoder's last hidden state (after its final norm);
- SDXL: both encoders' penultimate hidden states, concatenated, plus the second encoder's
  projected pooled output (`text_embeds`) and `time_ids` (original size, crop, target size);
- SD3: both CLIP encoders' penultimate hidden states, concatenated on channels and zero-padded
  to the transformer's joint width, followed along the sequence by the T5 encoder's last hidden
  state (zeros of 256 tokens when the folder has no T5); `pooled_projections` is the concatenation
  of both CLIP encoders' projected pooled outputs;
- FLUX: the T5 encoder's last hidden state (512 tokens) is the whole sequence; the CLIP encoder
  contributes only its pooled output (CLIPTextModel's pooler_output, not projected) as
  `pooled_projections`;
- PixArt: the T5 encoder's last hidden state, the T5 encoder run with the attention mask of the
  padded prompt, and that mask (`encoder_attention_mask`) passed on to the transformer; prompts are
  lowercased and stripped first (the pipelines' _text_preprocessing with clean_caption off);
- Sana: as PixArt with a Gemma2 encoder, except that SanaPipeline puts its complex human instruction
  before each (lowercased) prompt, pads to the instruction's tokens + max_sequence_length - 2 and keeps
  the first token and the last max_sequence_length - 1 of the states and the mask; negative prompts get
  no instruction and are padded to max_sequence_length, so both come out equally long;
- the unconditional branch is the encoded negative prompt, "" by default, except that SDXL
  with ``force_zeros_for_empty_prompt`` uses zeros when no negative prompt is given;
- latents are decoded as ``vae.decode(latents / scaling_factor + shift_factor)`` (SDXL:
  ``latents * latents_std / scaling_factor + latents_mean``) and shown as ``image / 2 + 0.5``
  clipped to [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compress.denoiser import SHARED_CONDITION_KEYS, Denoiser
from compress.errors import UserError


@dataclass
class TextEncoder:
    """One tokenizer + text encoder pair of a pipeline."""

    name: str  # the pipeline's component name: text_encoder, text_encoder_2, text_encoder_3
    module: nn.Module  # transformers CLIPTextModel / CLIPTextModelWithProjection / T5EncoderModel
    tokenizer: Any  # a transformers tokenizer
    tokenizer_name: str  # tokenizer, tokenizer_2, tokenizer_3
    hidden_layer: int = -1  # -1: the last hidden state after the final norm; -2: the penultimate (SDXL, SD3's CLIPs)
    # Also returns the pooled output: projected (SDXL's text_encoder_2, both of SD3's CLIPs) or CLIPTextModel's pooler_output (FLUX).
    pooled: bool = False
    # Tokens the prompt is padded to when the pipeline sets it rather than the tokenizer (SD3's max_sequence_length for T5).
    length: int | None = None
    # The encoder runs with the padding mask, which it also returns for the denoiser (PixArt's T5).
    attention_mask: bool = False
    # Prompts are lowercased and stripped before tokenizing (PixArt's _text_preprocessing without clean_caption).
    lowercase: bool = False
    # Text put before each prompt, not before negative prompts (Sana's complex human instruction). The encoder then
    # keeps the first token and the last max_length - 1, so prompts and negative prompts give max_length tokens each.
    prefix: str = ""

    @property
    def max_length(self) -> int:
        return int(self.length or self.tokenizer.model_max_length)

    @property
    def prompt_length(self) -> int:
        """Tokens a prompt is padded to: SanaPipeline's max_length_all, the instruction's tokens + max_length - 2."""
        if not self.prefix:
            return self.max_length
        return len(self.tokenizer.encode(self.prefix)) + self.max_length - 2

    @property
    def hidden_size(self) -> int:
        return int(self.module.config.hidden_size)

    @property
    def pooled_size(self) -> int:
        # CLIPTextConfig always has a projection_dim; only CLIPTextModelWithProjection applies it (FLUX pools without).
        if not hasattr(self.module, "text_projection"):
            return int(self.module.config.hidden_size)
        config = self.module.config
        return int(getattr(config, "projection_dim", None) or config.hidden_size)

    def preprocess(self, prompts: list[str]) -> list[str]:
        return [p.lower().strip() for p in prompts] if self.lowercase else list(prompts)

    def texts(self, prompts: list[str], negative: bool = False) -> tuple[list[str], int]:
        """What the tokenizer is given and the length it pads to: negative prompts get no prefix."""
        texts = self.preprocess(prompts)
        if negative or not self.prefix:
            return texts, self.max_length
        return [self.prefix + t for t in texts], self.prompt_length

    def tokenize(self, prompts: list[str], negative: bool = False) -> torch.Tensor:
        """input_ids [B, length] int64: padded to the length and truncated, as diffusers does."""
        texts, length = self.texts(prompts, negative)
        return self.tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids.long()

    def truncated(self, prompt: str) -> bool:
        (text,), length = self.texts([prompt])
        return len(self.tokenizer(text, truncation=False).input_ids) > length

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor):
        """hidden states, then the pooled output (``pooled``) and the attention mask (``attention_mask``) where the encoder gives them."""
        return TextEncoderGraph(self)(input_ids.to(next(self.module.parameters()).device))


class TextEncoderGraph(nn.Module):
    """input_ids [B, L] int64 -> hidden_states [B, L, D] (+ pooled [B, P])."""

    def __init__(self, encoder: TextEncoder):
        super().__init__()
        self.encoder = encoder
        self.network = encoder.module.eval()

    @property
    def input_names(self) -> list[str]:
        return ["input_ids"]

    @property
    def sequence_inputs(self) -> list[str]:
        """Inputs whose token axis is dynamic: a prefixed encoder takes prompts and negative prompts of different lengths."""
        return ["input_ids"] if self.encoder.prefix else []

    @property
    def output_names(self) -> list[str]:
        return ["hidden_states"] + (["pooled"] if self.encoder.pooled else []) + (["attention_mask"] if self.encoder.attention_mask else [])

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        return (self.encoder.tokenize(["a handwritten seven", ""] * batch)[:batch],)

    def forward(self, input_ids: torch.Tensor):
        penultimate = self.encoder.hidden_layer != -1
        mask = None
        if self.encoder.attention_mask:
            # The tokenizer's mask of a max_length-padded prompt: 1 up to its last token, 0 on the padding.
            mask = (input_ids != self.encoder.tokenizer.pad_token_id).long()
            out = self.network(input_ids, attention_mask=mask, output_hidden_states=penultimate)
        else:
            out = self.network(input_ids, output_hidden_states=penultimate)
        hidden = out.hidden_states[self.encoder.hidden_layer] if penultimate else out.last_hidden_state
        if self.encoder.prefix:  # SanaPipeline's select_index: the first token and the last max_length - 1
            hidden, mask = (self._select(t) if t is not None else None for t in (hidden, mask))
        outputs = [hidden]
        if self.encoder.pooled:
            outputs.append(out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output)
        if mask is not None:
            outputs.append(mask.float())
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _select(self, tokens: torch.Tensor) -> torch.Tensor:
        keep = self.encoder.max_length - 1
        return torch.cat([tokens[:, :1], tokens[:, -keep:]], dim=1)


@dataclass(frozen=True)
class TextLayout:
    """How the text encoders' hidden states make the denoiser's encoder_hidden_states.

    The states of ``channels`` are concatenated on channels and zero-padded to ``width``; the
    states of ``sequence`` follow along the sequence, then ``zero_tokens`` of zeros (SD3 without
    its T5 encoder stands in zeros for the T5 tokens). A pipeline without a layout concatenates
    every encoder on channels (SD, SDXL).
    """

    channels: tuple[str, ...]
    width: int | None = None
    sequence: tuple[str, ...] = ()
    zero_tokens: int = 0

    def join(self, states: dict[str, torch.Tensor]) -> torch.Tensor:
        joined = torch.cat([states[n] for n in self.channels], dim=-1)
        if self.width is not None:
            joined = torch.nn.functional.pad(joined, (0, self.width - joined.shape[-1]))
        parts = [joined, *(states[n] for n in self.sequence)]
        if self.zero_tokens:
            parts.append(joined.new_zeros(joined.shape[0], self.zero_tokens, joined.shape[-1]))
        return torch.cat(parts, dim=-2)

    def describe(self) -> dict:
        return {"channels": list(self.channels), "pad_channels_to": self.width, "sequence": list(self.sequence), "zero_tokens": self.zero_tokens}


@dataclass
class Autoencoder:
    """The pipeline's VAE (AutoencoderKL, AutoencoderTiny, or Sana's AutoencoderDC) with its latent scaling."""

    module: nn.Module
    scaling_factor: float = 1.0
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @classmethod
    def from_module(cls, vae: nn.Module) -> "Autoencoder":
        c = vae.config
        mean, std = c.get("latents_mean"), c.get("latents_std")
        both = mean is not None and std is not None  # diffusers applies them only as a pair
        return cls(vae.eval(), float(c.get("scaling_factor") or 1.0), c.get("shift_factor"),
                   tuple(mean) if both else None, tuple(std) if both else None)

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    @property
    def latent_channels(self) -> int:
        return int(self.module.config.latent_channels)

    @property
    def image_channels(self) -> int:
        config = self.module.config
        return int(config.get("out_channels") or config.in_channels)  # AutoencoderDC decodes to its in_channels

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side, as diffusers' pipelines compute vae_scale_factor."""
        config = self.module.config
        if self.kind == "AutoencoderTiny":  # every decoder block but the last upsamples
            return int(config.upsampling_scaling_factor) ** (len(config.decoder_block_out_channels) - 1)
        return 2 ** (len(config.get("block_out_channels") or config.encoder_block_out_channels) - 1)  # the latter: AutoencoderDC

    def _view(self, values, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """The denoiser's (scaled) latents -> what the VAE decodes."""
        if self.latents_mean is not None:
            return latents * self._view(self.latents_std, latents) / self.scaling_factor + self._view(self.latents_mean, latents)
        x = latents / self.scaling_factor
        return x + self.shift_factor if self.shift_factor is not None else x

    def scale(self, raw: torch.Tensor) -> torch.Tensor:
        if self.latents_mean is not None:
            return (raw - self._view(self.latents_mean, raw)) * self.scaling_factor / self._view(self.latents_std, raw)
        x = raw - self.shift_factor if self.shift_factor is not None else raw
        return x * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1]."""
        image = self.module.decode(self.unscale(latents)).sample
        return (image / 2 + 0.5).clamp(0, 1)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> scaled latents (the posterior mean: an artifact draws no noise)."""
        out = self.module.encode(image * 2 - 1)
        if hasattr(out, "latent_dist"):
            raw = out.latent_dist.mode()
        else:  # AutoencoderTiny's latents, AutoencoderDC's latent: both deterministic
            raw = out.latents if hasattr(out, "latents") else out.latent
        return self.scale(raw)


class LatentDecoder(nn.Module):
    """latents [B, c, h, w] (the denoiser's scaled latents) -> image [B, 3, H, W] in [0, 1]."""

    def __init__(self, vae: Autoencoder):
        super().__init__()
        self.vae = vae
        self.network = vae.module

    def output_shape(self, latent_shape) -> tuple[int, int, int]:
        _, h, w = latent_shape
        return (self.vae.image_channels, h * self.vae.downscale, w * self.vae.downscale)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents)


class ImageEncoder(nn.Module):
    """image [B, 3, H, W] in [0, 1] -> latents [B, c, h, w], scaled as the denoiser takes them."""

    def __init__(self, vae: Autoencoder):
        super().__init__()
        self.vae = vae
        self.network = vae.module

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image)


@dataclass
class Pipeline:
    """A denoiser and, for text-to-image pipelines, the components around it."""

    denoiser: Denoiser
    text_encoders: tuple[TextEncoder, ...] = ()
    vae: Autoencoder | None = None
    class_name: str = ""  # the diffusers pipeline class, or "" for a bare denoiser
    force_zeros_for_empty_prompt: bool = False
    default_guidance_scale: float | None = None  # what the pipeline's __call__ uses
    text_layout: TextLayout | None = None  # None: every encoder's states concatenated on channels
    extra: dict = field(default_factory=dict)

    @property
    def is_text_to_image(self) -> bool:
        return bool(self.text_encoders)

    @property
    def name(self) -> str:
        return self.denoiser.name

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """[C, H, W] of the pipeline's output (the decoded image, or the denoiser's sample)."""
        if self.vae is None:
            return tuple(self.denoiser.sample_shape)
        return LatentDecoder(self.vae).output_shape(self.denoiser.sample_shape)

    def at_resolution(self, height: int, width: int) -> "Pipeline":
        """The same pipeline generating ``height`` x ``width`` images (the denoiser's latents scaled to match)."""
        import dataclasses

        if self.vae is None:
            raise UserError(f"{self.name!r} samples pixels directly: its resolution is its sample shape {tuple(self.denoiser.sample_shape)}")
        unet = getattr(self.denoiser.module, "unet", None)
        transformer = getattr(self.denoiser.module, "transformer", None)
        packing = getattr(self.denoiser.module, "latent_patch", None)
        if unet is not None:
            multiple, what = 2 ** (len(unet.config.block_out_channels) - 1), "the UNet's"
        elif packing:
            multiple, what = int(packing), "the transformer's latent packing"
        elif transformer is not None and transformer.config.get("patch_size"):
            multiple, what = int(transformer.config.patch_size), "the transformer's patch size"
        else:
            multiple, what = 1, "the denoiser's"
        step = self.vae.downscale * multiple
        if height <= 0 or width <= 0 or height % step or width % step:
            raise UserError(f"resolution {height}x{width}: height and width must be positive multiples of {step} for {self.name!r} "
                            f"(VAE downscale {self.vae.downscale} x {what} {multiple})")
        # SD3's positional embedding is a learned grid cropped to the image: larger images have no positions.
        grid = transformer.config.get("pos_embed_max_size") if transformer is not None else None
        if grid and max(height, width) > grid * step:
            raise UserError(f"resolution {height}x{width}: {self.name!r} has positions for at most {grid * step} pixels per side "
                            f"(pos_embed_max_size {grid} x {step})")
        channels, h, w = self.denoiser.sample_shape[0], height // self.vae.downscale, width // self.vae.downscale
        schedule = self.denoiser.schedule
        if hasattr(schedule, "at_sequence_length") and transformer is not None:  # a dynamic flow shift follows the image's token count
            schedule = schedule.at_sequence_length((h // multiple) * (w // multiple))
        denoiser = dataclasses.replace(self.denoiser, sample_shape=(channels, h, w), schedule=schedule)
        return dataclasses.replace(self, denoiser=denoiser)

    def draw_from_prompts(self, prompts: list[str]) -> None:
        """Calibration, pruning and distillation draw the denoiser's conditions from these prompts, encoded here."""
        self.denoiser.condition_pool = self.encode_prompts(list(dict.fromkeys(prompts)))

    def with_denoiser(self, denoiser: Denoiser) -> "Pipeline":
        """The pipeline around another denoiser of the same interface (a pruned or slim one): the other parts stay."""
        import dataclasses

        own = self.denoiser
        carried = dataclasses.replace(denoiser, null_text=own.null_text, added_cond_shapes=own.added_cond_shapes, space=own.space,
                                      condition_pool=own.condition_pool, sample_shape=own.sample_shape)
        return dataclasses.replace(self, denoiser=carried)

    def components(self) -> dict[str, nn.Module]:
        """Every network of the pipeline by component name (what per-component recipes refer to)."""
        found = {"denoiser": self.denoiser.module}
        for encoder in self.text_encoders:
            found[encoder.name] = encoder.module
        if self.vae is not None:
            found["vae"] = self.vae.module
        return found

    def parameters(self) -> int:
        return sum(p.numel() for module in self.components().values() for p in module.parameters())

    def to(self, device) -> "Pipeline":
        for module in self.components().values():
            module.to(device)
        return self

    def time_ids(self, batch: int) -> torch.Tensor:
        """SDXL's added time ids for the denoiser's resolution: original size, crop (0, 0), target size."""
        _, h, w = self.image_shape
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(batch, 6).contiguous()

    @property
    def layout(self) -> TextLayout:
        return self.text_layout or TextLayout(tuple(e.name for e in self.text_encoders))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], negative: bool = False):
        """Prompts -> the denoiser's condition: hidden states [B, L, D], or a dict with the added parts (SDXL, SD3).

        ``negative``: they are negative prompts, which Sana encodes without its instruction prefix.
        """
        if not self.text_encoders:
            raise UserError(f"model {self.name!r} takes no text prompts")
        states, pooled, masks = {}, [], []
        for encoder in self.text_encoders:
            out = encoder.encode(encoder.tokenize(prompts, negative))
            out = list(out) if isinstance(out, tuple) else [out]
            if encoder.attention_mask:
                masks.append(out.pop().float().cpu())
            if encoder.pooled:
                pooled.append(out.pop().float().cpu())
            states[encoder.name] = out[0].float().cpu()
        hidden = self.layout.join(states)
        if self.denoiser.added_cond_shapes is None:
            return hidden
        # Added parts: SDXL's time_ids, PixArt's mask, and the pooled prompt (SDXL's text_embeds, SD3's and FLUX's pooled_projections).
        made = {"time_ids": lambda: self.time_ids(len(prompts)), "encoder_attention_mask": lambda: torch.cat(masks, dim=-1)}
        added = {k: made[k]() if k in made else torch.cat(pooled, dim=-1) for k in self.denoiser.added_cond_shapes}
        return {"encoder_hidden_states": hidden, **added}

    def negative_condition(self, batch: int, negative_prompt: str | list[str] | None = None):
        """The unconditional branch's condition, as the diffusers pipeline builds it."""
        if negative_prompt is None and self.force_zeros_for_empty_prompt:
            shapes = self.denoiser.condition_shapes()
            zeros = {k: torch.zeros((batch, *shape)) for k, shape in shapes.items() if k not in SHARED_CONDITION_KEYS}
            if self.denoiser.added_cond_shapes is None:
                return zeros["encoder_hidden_states"]
            return {**zeros, **({"time_ids": self.time_ids(batch)} if "time_ids" in shapes else {})}
        prompts = [negative_prompt or ""] * batch if not isinstance(negative_prompt, list) else negative_prompt
        return self.encode_prompts(prompts, negative=True)

    def check_prompts(self, prompts: list[str], log=lambda message: None) -> None:
        for encoder in self.text_encoders:
            for prompt in prompts:
                if encoder.truncated(prompt):
                    log(f"prompt truncated to {encoder.prompt_length} tokens by {encoder.tokenizer_name}: {prompt[:60]!r}...")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        if self.vae is None:
            return latents
        device = next(self.vae.module.parameters()).device
        return torch.cat([self.vae.decode(latents[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(latents), batch_size)])
