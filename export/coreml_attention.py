"""Attention layouts for Core ML: 'original' (diffusers' own processors) and 'split-einsum' (for the Apple Neural Engine).

Apple's "Deploying Transformers on the Apple Neural Engine" and its ml-stable-diffusion `SPLIT_EINSUM`
attention (facts read there; code written here): the Neural Engine prefers 4-D channels-first tensors
(B, C, 1, S) and small per-head matrix products over one batched product across all heads, because
the batched form needs reshapes and transposes of the whole (B, heads, S, S) score tensor. So each
head is sliced out on the channel axis, its scores are ``einsum('bchq,bkhc->bkhq')`` (keys on axis 1,
queries last), softmax runs over axis 1, the values are mixed by ``einsum('bkhq,bchk->bchq')``, and the
heads are concatenated back on the channel axis.

Here that core replaces the attention of diffusers' `Attention` modules (the UNet's transformer blocks,
the VAE's mid-block attention) through their processor hook, for the duration of an export: the
projections, norms, residual and output scaling are diffusers' own, so the network computes the same
function (tested to 1e-5) and only the graph's layout changes.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from compress.errors import UserError

ATTENTIONS = ("original", "split-einsum")
# diffusers processors whose computation the split-einsum processor reproduces exactly.
_STANDARD_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0")


def _per_head_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, scale: float,
                        mask: torch.Tensor | None) -> torch.Tensor:
    """query (B, C, 1, Sq), key/value (B, C, 1, Sk), mask None or (B, heads, Sq or 1, Sk) additive -> (B, C, 1, Sq)."""
    head_dim = query.shape[1] // heads
    keys = key.transpose(1, 3)  # (B, Sk, 1, C)
    out = []
    for h in range(heads):
        channels = slice(h * head_dim, (h + 1) * head_dim)
        scores = torch.einsum("bchq,bkhc->bkhq", query[:, channels], keys[..., channels]) * scale  # (B, Sk, 1, Sq)
        if mask is not None:
            scores = scores + mask[:, h].transpose(1, 2).unsqueeze(2)  # (B, Sk, 1, Sq or 1)
        weights = scores.softmax(dim=1)
        out.append(torch.einsum("bkhq,bchk->bchq", weights, value[:, channels]))  # (B, D, 1, Sq)
    return torch.cat(out, dim=1)


def _to_bc1s(x: torch.Tensor) -> torch.Tensor:
    """(B, S, C) -> (B, C, 1, S)."""
    return x.transpose(1, 2).unsqueeze(2)


class SplitEinsumAttnProcessor:
    """A diffusers attention processor computing attention per head in the (B, C, 1, S) layout (Apple's split einsum)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        if attn.norm_q is not None:  # per-head norms act on the head's own channels
            query = attn.norm_q(query.unflatten(-1, (attn.heads, head_dim))).flatten(-2)
        if attn.norm_k is not None:
            key = attn.norm_k(key.unflatten(-1, (attn.heads, head_dim))).flatten(-2)
        out = _per_head_attention(_to_bc1s(query), _to_bc1s(key), _to_bc1s(value), attn.heads, attn.scale, attention_mask)
        hidden_states = out.squeeze(2).transpose(1, 2).to(query.dtype)  # (B, Sq, C)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def check_attention(attention: str) -> None:
    if attention not in ATTENTIONS:
        raise UserError(f"unknown Core ML attention option {attention!r} (available: {', '.join(ATTENTIONS)})")


def _attention_modules(module: nn.Module) -> list:
    from diffusers.models.attention_processor import Attention

    return [m for m in module.modules() if isinstance(m, Attention)]


@contextlib.contextmanager
def attention_layout(module: nn.Module, attention: str = "original"):
    """Within the block, every diffusers `Attention` in ``module`` runs ``attention``; their processors are restored after.

    'split-einsum' needs the standard processors (AttnProcessor / AttnProcessor2_0), whose computation it reproduces;
    a custom one (IP-Adapter, LoRA-fused variants, xformers) is refused by name rather than silently replaced."""
    check_attention(attention)
    if attention == "original":
        yield 0
        return
    modules = _attention_modules(module)
    custom = sorted({type(m.processor).__name__ for m in modules if type(m.processor).__name__ not in _STANDARD_PROCESSORS})
    if custom:
        raise UserError(f"Core ML attention 'split-einsum' replaces diffusers' standard attention processors; this model uses "
                        f"{', '.join(custom)}: export it with attention 'original'")
    saved = [m.processor for m in modules]
    processor = SplitEinsumAttnProcessor()
    try:
        for m in modules:
            m.set_processor(processor)
        yield len(modules)
    finally:
        for m, p in zip(modules, saved):
            m.set_processor(p)
