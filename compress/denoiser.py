"""`Denoiser`: everything the toolkit needs to know about a diffusion model, in one place.

Whatever the source (zoo, diffusers, a python factory), the network is wrapped into a module
with one calling convention, ``module(sample, timestep, cond) -> prediction``, so solvers,
calibration, pruning and export never look at where a model came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from compress.errors import UserError
from compress.schedule import Schedule

PredictionType = Literal["epsilon", "v_prediction", "sample", "flow"]
# A condition is one batch-first tensor, or a dict of them (SDXL's added conditioning, SD3's and FLUX's pooled
# projections, PixArt's attention mask; FLUX-dev's guidance, which `guided` adds).
Condition = "torch.Tensor | dict[str, torch.Tensor]"
# Parts of a dict condition that are the same for the conditional and the unconditional branch.
SHARED_CONDITION_KEYS = ("time_ids",)
NEGATIVE_PREFIX = "negative_"  # graph inputs of the unconditional branch: negative_<part> for each part but the shared ones
Conditioning = Literal["none", "class", "text"]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def batch_timesteps(timestep, batch: int, device) -> torch.Tensor:
    t = torch.as_tensor(timestep, dtype=torch.float32, device=device)
    return t.reshape(-1).expand(batch) if t.numel() == 1 else t


def map_condition(fn, *conds):
    """Applies ``fn`` to the tensors of one or more conditions of the same structure."""
    if conds[0] is None:
        return None
    if isinstance(conds[0], dict):
        return {k: fn(*(c[k] for c in conds)) for k in conds[0]}
    return fn(*conds)


def cat_conditions(*conds):
    return map_condition(lambda *ts: torch.cat(ts), *conds)


def select_condition(cond, index):
    """Rows ``index`` of a condition (a tensor, or each tensor of a dict condition)."""
    return map_condition(lambda t: t[index], cond)


def condition_to(cond, device):
    return map_condition(lambda t: t.to(device), cond)


def condition_batch(cond) -> int:
    return next(iter(cond.values())).shape[0] if isinstance(cond, dict) else cond.shape[0]


class DiffusersUNet(nn.Module):
    """UNet2DModel (optionally with class embeddings) or UNet2DConditionModel.

    SDXL-style UNets (``addition_embed_type == "text_time"``) take a dict condition:
    encoder_hidden_states, text_embeds (the pooled prompt) and time_ids.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.takes_text = hasattr(unet.config, "cross_attention_dim") and unet.config.get("cross_attention_dim") is not None
        self.out_channels = unet.config.out_channels

    def forward(self, sample, timestep, cond=None):
        t = batch_timesteps(timestep, sample.shape[0], sample.device)
        if isinstance(cond, dict):
            added = {k: v for k, v in cond.items() if k != "encoder_hidden_states"}
            out = self.unet(sample, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample
        elif self.takes_text:
            out = self.unet(sample, t, encoder_hidden_states=cond).sample
        else:
            out = self.unet(sample, t, class_labels=cond).sample
        return out


class DiffusersTransformer(nn.Module):
    """DiT-style transformers (DiTTransformer2DModel, Transformer2DModel with patches)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.in_channels = transformer.config.in_channels

    def forward(self, sample, timestep, cond=None):
        t = batch_timesteps(timestep, sample.shape[0], sample.device)
        out = self.transformer(sample, timestep=t, class_labels=cond).sample
        # DiT checkpoints with learned variance put it in the second half of the channels.
        return out[:, : self.in_channels]


class SD3Transformer(nn.Module):
    """SD3Transformer2DModel (MMDiT): the condition is a dict of the joint text sequence and the pooled prompt.

    It takes the timestep as StableDiffusion3Pipeline passes it, the flow time scaled to
    [0, num_train_timesteps] as a float, not rounded to an integer step.
    """

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.out_channels = transformer.config.out_channels

    def forward(self, sample, timestep, cond=None):
        t = batch_timesteps(timestep, sample.shape[0], sample.device)
        return self.transformer(hidden_states=sample, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                                pooled_projections=cond["pooled_projections"]).sample


def _pack(sample: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C]: FluxPipeline's _pack_latents (2x2 patches, channels first within a patch)."""
    b, c, h, w = sample.shape
    return sample.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `_pack` (FluxPipeline's _unpack_latents)."""
    b, _, channels = packed.shape
    return packed.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, channels // 4, h, w)


def flux_image_ids(h: int, w: int) -> torch.Tensor:
    """FluxPipeline's _prepare_latent_image_ids for packed latents of h x w patches: [h*w, 3] of (0, row, column)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(w, dtype=torch.float32)[None, :]
    return ids.reshape(h * w, 3)


class FluxTransformer(nn.Module):
    """FluxTransformer2DModel behind the toolkit's [B, C, H, W] interface, called as FluxPipeline calls it.

    The condition is a dict: the T5 hidden states (encoder_hidden_states) and the CLIP pooled
    output (pooled_projections). Guidance-distilled models (``guidance_embeds``, FLUX-dev) also
    take ``guidance`` [B], the guidance scale itself, which `guided` puts there: they run one
    branch, never classifier-free guidance. The position ids depend only on the latent size and
    the text length, so a traced graph holds them as constants.
    """

    latent_patch = 2  # the 2x2 packing: latent height and width must be even
    # The transformer embeds float32(timestep / 1000) * 1000, not the plan's timestep, and with a guidance
    # embedding its time_proj also embeds the guidance: features precomputed per timestep would be wrong.
    time_features_foldable = False

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.embeds_guidance = bool(transformer.config.get("guidance_embeds", False))
        self.out_channels = int(transformer.config.in_channels) // 4

    def forward(self, sample, timestep, cond=None):
        from compress.errors import UserError

        b, _, h, w = sample.shape
        t = batch_timesteps(timestep, b, sample.device)
        guidance = cond.get("guidance") if self.embeds_guidance else None
        if self.embeds_guidance and guidance is None:
            raise UserError("this FLUX transformer is guidance-distilled (guidance_embeds): it needs a guidance scale (FluxPipeline's default is 3.5)")
        text = cond["encoder_hidden_states"]
        out = self.transformer(
            hidden_states=_pack(sample),
            # FluxPipeline passes timestep / 1000 and the transformer multiplies it back: the same float32 rounding here.
            timestep=t / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=text.new_zeros(text.shape[1], 3),
            img_ids=flux_image_ids(h // 2, w // 2).to(sample.device, sample.dtype),
        ).sample
        return _unpack(out, h, w)


class PixArtTransformer(nn.Module):
    """PixArtTransformer2DModel (PixArt-alpha and -sigma), called as their pipelines call it.

    The condition is a dict: the T5 hidden states and their attention mask (1 for tokens, 0 for
    padding), which the pipelines pass to the transformer. Micro-conditions (resolution and aspect
    ratio of the image, PixArt-alpha at 1024 px) follow from the latent size, so they are constants
    of a traced graph. With learned sigma the variance channels are dropped, as the pipelines do.
    """

    def __init__(self, transformer: nn.Module, vae_downscale: int):
        super().__init__()
        self.transformer = transformer
        self.in_channels = int(transformer.config.in_channels)
        self.micro_conditions = bool(getattr(transformer, "use_additional_conditions", False))
        self.vae_downscale = int(vae_downscale)

    def forward(self, sample, timestep, cond=None):
        b, _, h, w = sample.shape
        t = batch_timesteps(timestep, b, sample.device)
        added = {"resolution": None, "aspect_ratio": None}
        if self.micro_conditions:
            height, width = h * self.vae_downscale, w * self.vae_downscale
            added = {"resolution": sample.new_tensor([[height, width]]).expand(b, 2),
                     "aspect_ratio": sample.new_tensor([[height / width]]).expand(b, 1)}
        out = self.transformer(sample, encoder_hidden_states=cond["encoder_hidden_states"], encoder_attention_mask=cond["encoder_attention_mask"],
                               timestep=t, added_cond_kwargs=added).sample
        return out[:, : self.in_channels]


class SanaTransformer(nn.Module):
    """SanaTransformer2DModel (linear attention), called as SanaPipeline calls it.

    The condition is a dict: the Gemma2 hidden states and their attention mask, as PixArt's. The
    pipeline multiplies the scheduler's timestep by the config's ``timestep_scale`` first; with
    learned sigma it keeps the first half of the output channels.
    """

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.in_channels = int(transformer.config.in_channels)
        self.timestep_scale = float(transformer.config.get("timestep_scale", 1.0))

    def forward(self, sample, timestep, cond=None):
        t = batch_timesteps(timestep, sample.shape[0], sample.device) * self.timestep_scale
        out = self.transformer(sample, encoder_hidden_states=cond["encoder_hidden_states"], encoder_attention_mask=cond["encoder_attention_mask"],
                               timestep=t).sample
        return out[:, : self.in_channels]


class ClassTokenUNet(nn.Module):
    """A cross-attention UNet conditioned on a class label turned into one token.

    Label ``num_classes`` is the null label used for classifier-free guidance.
    """

    def __init__(self, unet: nn.Module, num_classes: int):
        super().__init__()
        self.unet = unet
        self.num_classes = num_classes
        self.label_embedding = nn.Embedding(num_classes + 1, unet.config.cross_attention_dim)

    def forward(self, sample, timestep, cond=None):
        t = batch_timesteps(timestep, sample.shape[0], sample.device)
        if cond is None:
            cond = torch.full((sample.shape[0],), self.num_classes, dtype=torch.long, device=sample.device)
        tokens = self.label_embedding(cond.long())[:, None, :]
        return self.unet(sample, t, encoder_hidden_states=tokens).sample


@dataclass
class Denoiser:
    module: nn.Module
    schedule: Schedule
    prediction_type: PredictionType = "epsilon"
    sample_shape: tuple[int, int, int] = (1, 16, 16)
    conditioning: Conditioning = "none"
    num_classes: int | None = None  # class conditioning; label num_classes is the null label
    cond_shape: tuple[int, ...] | None = None  # text conditioning: (tokens, dim)
    data_range: tuple[float, float] = (-1.0, 1.0)
    space: Literal["pixels", "latents"] = "pixels"  # latents: a VAE's scaled latents, unbounded (data_range is nominal)
    name: str = "model"
    source: str = ""
    scheduler_config: dict | None = None  # the model's own scheduler, when it came with one
    has_null_condition: bool = True  # False: conditional, but trained without an unconditional input
    # Text: the condition of the unconditional branch (batch 1), as the pipeline encodes the empty
    # negative prompt; None means zeros. Added conditioning (SDXL) is a dict of the same keys.
    null_text: Condition | None = None
    # Parts of a text condition beside encoder_hidden_states. SDXL: {"text_embeds": (P,), "time_ids": (6,)}; SD3 and FLUX:
    # {"pooled_projections": (P,)}; PixArt and Sana: {"encoder_attention_mask": (L,)}
    added_cond_shapes: dict[str, tuple[int, ...]] | None = None
    # Text: real conditions (a pipeline's encoded prompts) that calibration, pruning and distillation draw
    # from; without a pool they draw random states.
    condition_pool: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def guidance_embedded(self) -> bool:
        """Guidance-distilled (FLUX-dev): the guidance scale is an input of the network, one branch, no unconditional one."""
        return bool(getattr(self.module, "embeds_guidance", False))

    @property
    def supports_guidance(self) -> bool:
        return self.conditioning != "none" and (self.has_null_condition or self.guidance_embedded)

    def null_condition(self, batch: int, device="cpu") -> torch.Tensor | None:
        if self.conditioning == "class":
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if self.conditioning == "text":
            if self.null_text is None:
                if self.added_cond_shapes:  # zeros in every part, so the condition keeps its structure
                    return {k: torch.zeros((batch, *shape), device=device) for k, shape in self.condition_shapes().items()}
                return torch.zeros((batch, *self.cond_shape), device=device)
            return map_condition(lambda t: t.to(device).expand(batch, *t.shape[1:]).contiguous(), self.null_text)
        return None

    def condition_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of each part of a text condition (one part unless it has added conditioning)."""
        return {"encoder_hidden_states": tuple(self.cond_shape), **(self.added_cond_shapes or {})}

    def to(self, device) -> "Denoiser":
        self.module.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def describe(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "prediction_type": self.prediction_type,
            "sample_shape": list(self.sample_shape),
            "conditioning": self.conditioning,
            "num_classes": self.num_classes,
            "cond_shape": list(self.cond_shape) if self.cond_shape else None,
            "data_range": list(self.data_range) if self.space == "pixels" else None,
            "space": self.space,
            "num_train_timesteps": self.schedule.num_train_timesteps,
            "schedule_fingerprint": self.schedule.fingerprint(),
            "parameters": sum(p.numel() for p in self.module.parameters()),
        }


def draw_conditions(denoiser: Denoiser, count: int, generator: torch.Generator):
    """Conditions for inputs the toolkit makes itself: random classes; text states from the model's pool, else random."""
    if denoiser.conditioning == "class":
        return torch.randint(0, denoiser.num_classes, (count,), generator=generator)
    if denoiser.conditioning != "text":
        return None
    pool = denoiser.condition_pool
    if pool is None:
        if denoiser.added_cond_shapes:
            raise UserError(f"model {denoiser.name!r} takes added conditioning ({', '.join(denoiser.added_cond_shapes)}): draw its conditions "
                            "from encoded prompts (calibration and validation prompts of its pipeline)")
        return torch.randn((count, *denoiser.cond_shape), generator=generator)
    return select_condition(pool, torch.randint(0, condition_batch(pool), (count,), generator=generator))


def guided(module: nn.Module, x: torch.Tensor, t, cond, null_cond, guidance_scale) -> torch.Tensor:
    """One network evaluation with classifier-free guidance: both halves in one batch.

    A guidance-distilled network (``embeds_guidance``) takes the scale as its ``guidance`` input
    instead: one branch, ``null_cond`` unused.
    """
    if getattr(module, "embeds_guidance", False) and cond is not None and guidance_scale is not None:
        scale = torch.as_tensor(guidance_scale, dtype=torch.float32, device=x.device).reshape(-1)
        return module(x, t, {**cond, "guidance": scale.expand(x.shape[0])})
    if cond is None or guidance_scale is None:
        return module(x, t, cond)
    both = module(torch.cat([x, x]), t, cat_conditions(null_cond, cond))
    uncond, conditional = both.chunk(2)
    return uncond + guidance_scale * (conditional - uncond)
