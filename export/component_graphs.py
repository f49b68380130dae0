"""The non-denoiser parts of a pipeline as traceable graphs, and the tokenizer in the form apps load.

Every graph here has the interface the writers need (``input_names``, ``output_names``,
``example_inputs(batch)``), as `SamplerGraph` and `TextEncoderGraph` do.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compress.components import Autoencoder, ImageEncoder, LatentDecoder, TextEncoder, TextEncoderGraph
from compress.errors import UserError

# Prompts whose ids the written tokenizer.json must reproduce exactly (padding, truncation, case, digits).
_TOKENIZER_PROBES = ("", "a handwritten seven", "The Digit 7!", "word " * 100)


class ComponentGraph(nn.Module):
    """One tensor in, one tensor out, with names: the VAE decoder and encoder."""

    def __init__(self, module: nn.Module, input_name: str, output_name: str, input_shape: tuple[int, ...], output_shape: tuple[int, ...]):
        super().__init__()
        self.module = module.eval()
        self.input_names, self.output_names = [input_name], [output_name]
        self.input_shape, self.output_shape = tuple(input_shape), tuple(output_shape)

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        x = torch.randn(batch, *self.input_shape, generator=torch.Generator().manual_seed(0))
        return (x.clamp(0, 1) if self.input_names == ["image"] else x,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


SAMPLER_OUTPUTS = ("image", "latents")


def pipeline_graphs(pipeline, solver_config, fmt: str, batch_size: int | None, guidance: bool | None = None, output: str = "image",
                    extra: dict | None = None):
    """Every graph of a text-to-image export with its sidecar, for one format: (sampler, [(graph, kind, sidecar)]).

    The sampler ends in the VAE decoder (``output`` 'image') or returns latents; it guides when the
    solver has a guidance scale (diffusers' do_classifier_free_guidance), taking the negative prompt's
    condition as inputs.
    """
    from export.sampler_graph import DenoiserGraph, SamplerGraph
    from export.sidecar import FORMAT_FILES, denoiser_sidecar, sampler_sidecar, text_encoder_sidecar, vae_sidecar

    if output not in SAMPLER_OUTPUTS:
        raise UserError(f"unknown sampler output {output!r}; expected one of {', '.join(SAMPLER_OUTPUTS)}")
    if pipeline.vae is None or not pipeline.text_encoders:
        raise UserError(f"{pipeline.name!r} is not a text-to-image pipeline (it needs text encoders and a VAE)")
    denoiser, extra = pipeline.denoiser, extra or {}
    if guidance is None:
        guidance = solver_config.guidance_scale is not None
    decoder = LatentDecoder(pipeline.vae) if output == "image" else None
    sampler = SamplerGraph(denoiser, solver_config, guidance, decoder=decoder, negative_inputs=True)
    network = DenoiserGraph(denoiser)

    def file(kind: str) -> str:
        return FORMAT_FILES[fmt].format(kind)

    graphs = [(TextEncoderGraph(e), e.name, text_encoder_sidecar(e, fmt, file(e.name), batch_size)) for e in pipeline.text_encoders]
    graphs += [(sampler, "sampler", sampler_sidecar(sampler, fmt, file("sampler"), batch_size)),
               (network, "denoiser", denoiser_sidecar(network, fmt, file("denoiser"), batch_size))]
    graphs += [(graph, kind, vae_sidecar(graph, kind, fmt, file(kind), batch_size)) for kind, graph in vae_graphs(pipeline.vae, tuple(denoiser.sample_shape)).items()]
    return sampler, [(graph, kind, {**sidecar, **extra}) for graph, kind, sidecar in graphs]


def vae_graphs(vae: Autoencoder, latent_shape: tuple[int, int, int]) -> dict[str, ComponentGraph]:
    decoder = LatentDecoder(vae)
    image_shape = decoder.output_shape(latent_shape)
    graphs = {"vae_decoder": ComponentGraph(decoder, "latents", "image", latent_shape, image_shape)}
    if getattr(vae.module, "encoder", None) is not None:
        graphs["vae_encoder"] = ComponentGraph(ImageEncoder(vae), "image", "latents", image_shape, latent_shape)
    return graphs


def write_tokenizer_json(encoder: TextEncoder, folder: Path) -> Path:
    """``folder/tokenizer.json`` for the `tokenizers` library, padding and truncating as the pipeline does.

    The written file is read back and must give the pipeline's own ids for a few probe prompts:
    an app that tokenizes with it feeds the text encoder exactly what diffusers would. An encoder
    with a prefix (Sana) also gets the tokenizer of its negative prompts, which have none.
    """
    from export.sidecar import NEGATIVE_TOKENIZER_FILE

    folder.mkdir(parents=True, exist_ok=True)
    if encoder.prefix:
        _write_tokenizer(encoder, folder / NEGATIVE_TOKENIZER_FILE, negative=True)
    return _write_tokenizer(encoder, folder / "tokenizer.json", negative=False)


def _write_tokenizer(encoder: TextEncoder, path: Path, negative: bool) -> Path:
    from tokenizers import Tokenizer, normalizers

    tokenizer = encoder.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (python) tokenizer: convert it as transformers does
        from transformers.convert_slow_tokenizer import convert_slow_tokenizer

        backend = convert_slow_tokenizer(tokenizer)
    fast = Tokenizer.from_str(backend.to_str())
    # The pipeline's own preprocessing (PixArt, Sana), so an app's tokenizer does it too; the prefix comes after it, as in Sana.
    steps = [normalizers.Strip(), normalizers.Lowercase()] if encoder.lowercase else []
    prefixed = bool(encoder.prefix) and not negative
    if prefixed:
        steps.append(normalizers.Prepend(encoder.prefix))
    if steps:
        fast.normalizer = normalizers.Sequence(steps + ([fast.normalizer] if fast.normalizer is not None else []))
    _, length = encoder.texts([], negative)
    fast.enable_truncation(max_length=length)
    fast.enable_padding(length=length, pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    fast.save(str(path))
    reloaded = Tokenizer.from_file(str(path))
    # The tokenizers library runs no normalizer on empty text: an empty prompt gets no prefix (pipeline.json says so).
    for prompt in [p for p in _TOKENIZER_PROBES if p or not prefixed]:
        ours = reloaded.encode(prompt).ids
        theirs = encoder.tokenize([prompt], negative)[0].tolist()
        if ours != theirs:
            raise UserError(f"{encoder.tokenizer_name} cannot be written as a tokenizer.json that reproduces its ids (prompt {prompt[:30]!r}: {ours[:8]}... vs {theirs[:8]}...)")
    return path
