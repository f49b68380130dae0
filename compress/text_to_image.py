"""diffusers text-to-image pipeline folders -> `Pipeline` (SD 1.x/2.x, SDXL, their Turbo/LCM folders, SD3, FLUX, PixArt, Sana).

Every component named in model_index.json is read, and everything that must agree between
them (tokenizer vocabulary and text encoder, text width and cross-attention, VAE latents and
UNet channels, SDXL's added embedding width, SD3's and FLUX's joint and pooled widths, PixArt's
and Sana's caption width) is checked here, so a bad folder fails with one line before any long work.
"""
from __future__ import annotations

import json
from pathlib import Path

from compress.components import Autoencoder, Pipeline, TextEncoder, TextLayout
from compress.denoiser import Denoiser, DiffusersUNet, FluxTransformer, PixArtTransformer, SanaTransformer, SD3Transformer
from compress.errors import UserError
from compress.schedule import NoiseSchedule, is_flow_scheduler_config, schedule_from_scheduler_config

# The pipeline classes read here, with the guidance scale their __call__ defaults to.
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": 7.5,
    "StableDiffusionXLPipeline": 5.0,
    "LatentConsistencyModelPipeline": 8.5,
    "StableDiffusion3Pipeline": 7.0,
    # FLUX-dev's guidance_scale is the value of its guidance embedding (one branch); FLUX-schnell has none (see _load_flux_folder).
    "FluxPipeline": 3.5,
    "PixArtAlphaPipeline": 4.5,
    "PixArtSigmaPipeline": 4.5,
    "SanaPipeline": 4.5,
}
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
SD3_CLIP_CLASSES = ("CLIPTextModelWithProjection",)  # SD3 conditions on both CLIPs' projected pooled outputs
SD3_T5_CLASSES = ("T5EncoderModel",)
SD3_TRANSFORMER_CLASS = "SD3Transformer2DModel"
# StableDiffusion3Pipeline's max_sequence_length default: the T5 tokens, or the zeros standing in for them.
SD3_T5_TOKENS = 256
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
FLUX_CLIP_CLASSES = ("CLIPTextModel",)  # FluxPipeline takes its pooler_output, which the projected CLIP has not
FLUX_TRANSFORMER_CLASS = "FluxTransformer2DModel"
FLUX_T5_TOKENS = 512  # FluxPipeline's max_sequence_length default
FLUX_DEFAULT_LATENT_SIZE = 128  # FluxPipeline's default_sample_size, in latents per side
# PixArt checkpoints on the hub name their transformer Transformer2DModel; diffusers maps it to PixArtTransformer2DModel.
PIXART_TRANSFORMER_CLASSES = ("PixArtTransformer2DModel", "Transformer2DModel")
PIXART_T5_TOKENS = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}  # the pipelines' max_sequence_length defaults
SANA_TEXT_ENCODER_CLASSES = ("Gemma2Model",)
SANA_TRANSFORMER_CLASS = "SanaTransformer2DModel"
SANA_VAE_CLASSES = ("AutoencoderDC",)
UNET_CLASS = "UNet2DConditionModel"
# Schedulers of guidance-distilled pipelines (one or few steps without classifier-free guidance).
DISTILLED_SCHEDULERS = ("LCMScheduler", "TCDScheduler")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _component_dir(folder: Path, index: dict, name: str, classes: tuple[str, ...] | None = None) -> Path:
    entry = index.get(name)
    if not entry or entry[1] is None:
        raise UserError(f"pipeline folder {folder} has no {name} (model_index.json does not name one); a text-to-image export needs it")
    if classes is not None and entry[1] not in classes:
        raise UserError(f"{folder}: {name} is a {entry[1]}, which is not supported (supported: {', '.join(classes)})")
    path = folder / name
    if not path.is_dir():
        raise UserError(f"pipeline folder {folder} names {name} in model_index.json but has no {name}/ folder")
    return path


def _from_pretrained(cls, path: Path):
    try:
        return cls.from_pretrained(str(path))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"cannot load {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _vae(folder: Path, index: dict, classes: tuple[str, ...] = VAE_CLASSES) -> Autoencoder:
    import diffusers

    path = _component_dir(folder, index, "vae", classes)  # first: it names what is missing or unsupported
    return Autoencoder.from_module(_from_pretrained(getattr(diffusers, index["vae"][1]), path))


def _present(index: dict, name: str) -> bool:
    return bool(index.get(name)) and index[name][1] is not None


def _text_encoder(folder: Path, index: dict, name: str, classes: tuple[str, ...], hidden_layer: int, pooled: bool,
                  length: int | None = None, **options) -> TextEncoder:
    import transformers

    tokenizer_name = name.replace("text_encoder", "tokenizer")
    model = _from_pretrained(getattr(transformers, index[name][1]), _component_dir(folder, index, name, classes))
    tokenizer = _from_pretrained(transformers.AutoTokenizer, _component_dir(folder, index, tokenizer_name))
    vocab, table = len(tokenizer), model.config.vocab_size
    if vocab > table:
        raise UserError(f"{folder}: {tokenizer_name} has {vocab} tokens but {name} embeds only {table}: the tokenizer does not belong to this text encoder")
    encoder = TextEncoder(name, model.eval(), tokenizer, tokenizer_name, hidden_layer=hidden_layer, pooled=pooled, length=length, **options)
    positions = model.config.get("max_position_embeddings") if hasattr(model.config, "get") else getattr(model.config, "max_position_embeddings", None)
    if positions is not None and encoder.prompt_length > positions:  # T5's relative positions have no such limit
        raise UserError(f"{folder}: {tokenizer_name} pads to {encoder.prompt_length} tokens but {name} has {positions} positions")
    return encoder


def _text_encoders(folder: Path, index: dict, sdxl: bool) -> tuple[TextEncoder, ...]:
    names = [n for n in ("text_encoder", "text_encoder_2") if _present(index, n)]
    if not names:
        raise UserError(f"pipeline folder {folder} has no text encoder")
    return tuple(_text_encoder(folder, index, name, TEXT_ENCODER_CLASSES, hidden_layer=-2 if sdxl else -1, pooled=sdxl and name == names[-1])
                 for name in names)


def _quiet_libraries() -> None:
    """Per-weight progress bars and notes about ignored config keys are noise on a command line."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def load_pipeline_folder(folder: str | Path, source: str, name: str) -> Pipeline:
    import diffusers

    _quiet_libraries()
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    class_name = index.get("_class_name", "")
    if class_name not in PIPELINE_CLASSES:
        raise UserError(f"{folder}: pipeline class {class_name!r} is not supported (supported: {', '.join(PIPELINE_CLASSES)}, and pixel-space pipelines with a unet/ or transformer/)")
    if class_name == "StableDiffusion3Pipeline":
        return _load_sd3_folder(folder, index, source, name)
    if class_name == "FluxPipeline":
        return _load_flux_folder(folder, index, source, name)
    if class_name in PIXART_T5_TOKENS:
        return _load_pixart_folder(folder, index, class_name, source, name)
    if class_name == "SanaPipeline":
        return _load_sana_folder(folder, index, source, name)
    sdxl = class_name == "StableDiffusionXLPipeline"
    encoders = _text_encoders(folder, index, sdxl)
    unet = _from_pretrained(diffusers.UNet2DConditionModel, _component_dir(folder, index, "unet", (UNET_CLASS,)))
    vae = _vae(folder, index)
    scheduler_config = _read_json(_component_dir(folder, index, "scheduler") / "scheduler_config.json")

    config = unet.config
    if vae.latent_channels != config.in_channels:
        raise UserError(f"{folder}: the VAE has {vae.latent_channels} latent channels but the UNet takes {config.in_channels}")
    width = sum(e.hidden_size for e in encoders)
    cross = config.cross_attention_dim if isinstance(config.cross_attention_dim, int) else config.cross_attention_dim[0]
    if width != cross:
        raise UserError(f"{folder}: the text encoders give {width}-wide hidden states but the UNet attends to {cross}")
    added = None
    if config.get("addition_embed_type") == "text_time":
        pooled = encoders[-1].pooled_size
        expected = pooled + 6 * config.addition_time_embed_dim
        if expected != config.projection_class_embeddings_input_dim:
            raise UserError(f"{folder}: SDXL conditioning gives {expected} features (pooled {pooled} + 6 time ids x {config.addition_time_embed_dim}) "
                            f"but the UNet's add_embedding takes {config.projection_class_embeddings_input_dim}")
        added = {"text_embeds": (pooled,), "time_ids": (6,)}
    elif sdxl:
        raise UserError(f"{folder}: an SDXL pipeline whose UNet has no text_time added embedding is not supported")
    if config.get("time_cond_proj_dim"):
        raise UserError(f"{folder}: UNets with a guidance embedding (time_cond_proj_dim, LCM-distilled) are not supported yet")

    size = config.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    denoiser = Denoiser(
        DiffusersUNet(unet).eval(),
        NoiseSchedule.from_scheduler_config(scheduler_config),
        scheduler_config.get("prediction_type", "epsilon"),
        (config.in_channels, *size),
        conditioning="text",
        cond_shape=(encoders[0].max_length, width),
        added_cond_shapes=added,
        space="latents",
        name=name,
        source=source,
        scheduler_config=scheduler_config,
    )
    distilled = scheduler_config.get("_class_name") in DISTILLED_SCHEDULERS
    pipeline = Pipeline(
        denoiser,
        encoders,
        vae,
        class_name=class_name,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", sdxl)),
        default_guidance_scale=None if distilled else PIPELINE_CLASSES[class_name],
        extra={"folder": str(folder)},
    )
    denoiser.null_text = pipeline.negative_condition(1)
    return pipeline


def _load_sd3_folder(folder: Path, index: dict, source: str, name: str) -> Pipeline:
    """A StableDiffusion3Pipeline folder: two CLIPs and an optional T5 in front of an SD3Transformer2DModel (MMDiT)."""
    import diffusers

    for required in ("text_encoder", "text_encoder_2"):
        if not _present(index, required):
            raise UserError(f"pipeline folder {folder} has no {required} (model_index.json does not name one); SD3 needs both CLIP encoders")
    first = _text_encoder(folder, index, "text_encoder", SD3_CLIP_CLASSES, hidden_layer=-2, pooled=True)
    # StableDiffusion3Pipeline pads both CLIP prompts to the first tokenizer's length (their states are joined on channels).
    clips = (first, _text_encoder(folder, index, "text_encoder_2", SD3_CLIP_CLASSES, hidden_layer=-2, pooled=True, length=first.max_length))
    t5 = _text_encoder(folder, index, "text_encoder_3", SD3_T5_CLASSES, hidden_layer=-1, pooled=False, length=SD3_T5_TOKENS) \
        if _present(index, "text_encoder_3") else None
    transformer = _from_pretrained(diffusers.SD3Transformer2DModel, _component_dir(folder, index, "transformer", (SD3_TRANSFORMER_CLASS,)))
    vae = _vae(folder, index)
    scheduler_config = _read_json(_component_dir(folder, index, "scheduler") / "scheduler_config.json")
    if not is_flow_scheduler_config(scheduler_config):
        raise UserError(f"{folder}: SD3's transformer predicts a flow velocity, but its scheduler is a {scheduler_config.get('_class_name')!r}, "
                        f"not a flow-matching one (FlowMatchEulerDiscreteScheduler)")

    config = transformer.config
    if vae.latent_channels != config.in_channels:
        raise UserError(f"{folder}: the VAE has {vae.latent_channels} latent channels but the transformer takes {config.in_channels}")
    joint, clip_width = int(config.joint_attention_dim), sum(e.hidden_size for e in clips)
    if clip_width > joint:
        raise UserError(f"{folder}: the CLIP encoders give {clip_width}-wide hidden states ({' + '.join(str(e.hidden_size) for e in clips)}) "
                        f"but the transformer's joint_attention_dim is {joint}")
    if t5 is not None and t5.hidden_size != joint:
        raise UserError(f"{folder}: text_encoder_3 gives {t5.hidden_size}-wide hidden states but the transformer's joint_attention_dim is {joint}")
    pooled = sum(e.pooled_size for e in clips)
    if pooled != config.pooled_projection_dim:
        raise UserError(f"{folder}: the CLIP encoders' pooled outputs give {pooled} features ({' + '.join(str(e.pooled_size) for e in clips)}) "
                        f"but the transformer's pooled_projection_dim is {config.pooled_projection_dim}")

    layout = TextLayout(tuple(e.name for e in clips), width=joint, sequence=(t5.name,) if t5 else (), zero_tokens=0 if t5 else SD3_T5_TOKENS)
    tokens = clips[0].max_length + SD3_T5_TOKENS
    size = config.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    denoiser = Denoiser(
        SD3Transformer(transformer.eval()).eval(),
        schedule_from_scheduler_config(scheduler_config),
        "flow",
        (config.in_channels, *size),
        conditioning="text",
        cond_shape=(tokens, joint),
        added_cond_shapes={"pooled_projections": (pooled,)},
        space="latents",
        name=name,
        source=source,
        scheduler_config=scheduler_config,
    )
    pipeline = Pipeline(
        denoiser,
        clips + ((t5,) if t5 else ()),
        vae,
        class_name="StableDiffusion3Pipeline",
        default_guidance_scale=PIPELINE_CLASSES["StableDiffusion3Pipeline"],
        text_layout=layout,
        extra={"folder": str(folder)},
    )
    pipeline = pipeline.at_resolution(size[0] * vae.downscale, size[1] * vae.downscale)  # checks the default size fits the positions
    pipeline.denoiser.null_text = pipeline.negative_condition(1)
    return pipeline



def _require(folder: Path, index: dict, names: tuple[str, ...], what: str) -> None:
    for required in names:
        if not _present(index, required):
            raise UserError(f"pipeline folder {folder} has no {required} (model_index.json does not name one); {what}")


def _flow_scheduler_config(folder: Path, index: dict, what: str) -> dict:
    config = _read_json(_component_dir(folder, index, "scheduler") / "scheduler_config.json")
    if not is_flow_scheduler_config(config):
        raise UserError(f"{folder}: {what} predicts a flow velocity, but its scheduler is a {config.get('_class_name')!r}, "
                        f"not a flow-matching one (FlowMatchEulerDiscreteScheduler)")
    return config


def _sample_size(config) -> tuple[int, int]:
    size = config.sample_size
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def _load_flux_folder(folder: Path, index: dict, source: str, name: str) -> Pipeline:
    """A FluxPipeline folder: CLIP (pooled output only) and T5 in front of a FluxTransformer2DModel on packed latents.

    Guidance: a guidance-distilled transformer (``guidance_embeds``, FLUX-dev) takes the guidance
    scale as an input and runs one branch; the toolkit's guidance scale (``--guidance``, the
    sampler's ``guidance_scale`` input) is that value, FluxPipeline's ``guidance_scale``, default
    3.5. Without the embedding (FLUX-schnell) there is no guidance at all. FluxPipeline's true
    classifier-free guidance (``true_cfg_scale`` with a negative prompt) is not reproduced.
    """
    import diffusers

    _require(folder, index, ("text_encoder", "text_encoder_2"), "FLUX needs its CLIP (text_encoder) and T5 (text_encoder_2) encoders")
    clip = _text_encoder(folder, index, "text_encoder", FLUX_CLIP_CLASSES, hidden_layer=-1, pooled=True)
    t5 = _text_encoder(folder, index, "text_encoder_2", SD3_T5_CLASSES, hidden_layer=-1, pooled=False, length=FLUX_T5_TOKENS)
    transformer = _from_pretrained(diffusers.FluxTransformer2DModel, _component_dir(folder, index, "transformer", (FLUX_TRANSFORMER_CLASS,)))
    vae = _vae(folder, index)
    scheduler_config = _flow_scheduler_config(folder, index, "FLUX's transformer")

    config = transformer.config
    if 4 * vae.latent_channels != config.in_channels:
        raise UserError(f"{folder}: the VAE has {vae.latent_channels} latent channels ({4 * vae.latent_channels} packed in 2x2 patches) "
                        f"but the transformer takes {config.in_channels}")
    if (config.out_channels or config.in_channels) != config.in_channels:
        raise UserError(f"{folder}: the transformer returns {config.out_channels} channels but takes {config.in_channels}; "
                        f"FluxPipeline unpacks its output as latents of the same width")
    if t5.hidden_size != config.joint_attention_dim:
        raise UserError(f"{folder}: text_encoder_2 gives {t5.hidden_size}-wide hidden states but the transformer's joint_attention_dim is "
                        f"{config.joint_attention_dim}")
    if clip.pooled_size != config.pooled_projection_dim:
        raise UserError(f"{folder}: text_encoder's pooled output has {clip.pooled_size} features but the transformer's pooled_projection_dim "
                        f"is {config.pooled_projection_dim}")

    module = FluxTransformer(transformer.eval()).eval()
    denoiser = Denoiser(
        module,
        schedule_from_scheduler_config(scheduler_config),
        "flow",
        (vae.latent_channels, FLUX_DEFAULT_LATENT_SIZE, FLUX_DEFAULT_LATENT_SIZE),
        conditioning="text",
        cond_shape=(FLUX_T5_TOKENS, int(config.joint_attention_dim)),
        added_cond_shapes={"pooled_projections": (clip.pooled_size,)},
        space="latents",
        name=name,
        source=source,
        scheduler_config=scheduler_config,
        has_null_condition=False,  # no unconditional branch: FLUX is guidance-distilled or guidance-free
    )
    if not scheduler_config.get("use_flow_sigmas"):
        # FluxPipeline hands the scheduler its own sigmas, linspace(1, 1/K, K), shifted by the scheduler:
        # the flow plan's trailing spacing, not the scheduler's own set_timesteps (see export_chain.resolve_solver).
        denoiser.extra["pipeline_spacing"] = "trailing"
    pipeline = Pipeline(
        denoiser,
        (clip, t5),
        vae,
        class_name="FluxPipeline",
        default_guidance_scale=PIPELINE_CLASSES["FluxPipeline"] if module.embeds_guidance else None,
        text_layout=TextLayout(("text_encoder_2",)),
        extra={"folder": str(folder)},
    )
    side = FLUX_DEFAULT_LATENT_SIZE * vae.downscale
    return pipeline.at_resolution(side, side)  # the dynamic shift of FluxPipeline's default size


def _load_pixart_folder(folder: Path, index: dict, class_name: str, source: str, name: str) -> Pipeline:
    """A PixArtAlphaPipeline or PixArtSigmaPipeline folder: one T5 (masked) in front of a PixArtTransformer2DModel."""
    import diffusers

    _require(folder, index, ("text_encoder",), "PixArt needs its T5 encoder")
    t5 = _text_encoder(folder, index, "text_encoder", SD3_T5_CLASSES, hidden_layer=-1, pooled=False, length=PIXART_T5_TOKENS[class_name],
                       attention_mask=True, lowercase=True)
    transformer_dir = _component_dir(folder, index, "transformer", PIXART_TRANSFORMER_CLASSES)
    transformer_config = _read_json(transformer_dir / "config.json")
    if transformer_config.get("norm_type", "ada_norm_single") != "ada_norm_single":
        raise UserError(f"{folder}: the transformer is a Transformer2DModel with norm_type {transformer_config.get('norm_type')!r}, not a PixArt "
                        f"transformer (norm_type 'ada_norm_single')")
    # diffusers' Transformer2DModel maps a PixArt config onto PixArtTransformer2DModel; loading that class directly does the same.
    transformer = _from_pretrained(diffusers.PixArtTransformer2DModel, transformer_dir)
    vae = _vae(folder, index)
    scheduler_config = _read_json(_component_dir(folder, index, "scheduler") / "scheduler_config.json")
    if is_flow_scheduler_config(scheduler_config):
        raise UserError(f"{folder}: PixArt's transformer predicts noise, but its scheduler {scheduler_config.get('_class_name')!r} is a flow-matching one")

    _check_caption_transformer(folder, transformer.config, vae, t5)
    module = PixArtTransformer(transformer.eval(), vae.downscale).eval()
    schedule = NoiseSchedule.from_scheduler_config(scheduler_config)
    return _masked_text_pipeline(folder, class_name, t5, module, vae, scheduler_config, schedule, scheduler_config.get("prediction_type", "epsilon"),
                                 source, name)


def _sana_call_defaults() -> tuple[str, int]:
    """SanaPipeline.__call__'s complex human instruction (joined as the pipeline joins it) and max_sequence_length."""
    import inspect

    import diffusers

    parameters = inspect.signature(diffusers.SanaPipeline.__call__).parameters
    return "\n".join(parameters["complex_human_instruction"].default), int(parameters["max_sequence_length"].default)


def _load_sana_folder(folder: Path, index: dict, source: str, name: str) -> Pipeline:
    """A SanaPipeline folder: one Gemma2 encoder (masked, behind the pipeline's instruction) in front of a SanaTransformer2DModel
    on AutoencoderDC latents, a flow schedule (FlowMatchEulerDiscreteScheduler, or DPMSolverMultistepScheduler with flow sigmas)."""
    import diffusers

    _require(folder, index, ("text_encoder",), "Sana needs its Gemma2 encoder")
    instruction, tokens = _sana_call_defaults()
    gemma = _text_encoder(folder, index, "text_encoder", SANA_TEXT_ENCODER_CLASSES, hidden_layer=-1, pooled=False, length=tokens,
                          attention_mask=True, lowercase=True, prefix=instruction)
    gemma.tokenizer.padding_side = "right"  # SanaPipeline sets it so before every encoding; Gemma's tokenizers pad left
    transformer = _from_pretrained(diffusers.SanaTransformer2DModel, _component_dir(folder, index, "transformer", (SANA_TRANSFORMER_CLASS,)))
    if transformer.config.get("guidance_embeds"):
        raise UserError(f"{folder}: the transformer has a guidance embedding (guidance_embeds, Sana-Sprint), which SanaPipeline does not feed; "
                        f"Sana-Sprint pipelines are not supported")
    vae = _vae(folder, index, SANA_VAE_CLASSES)
    scheduler_config = _flow_scheduler_config(folder, index, "Sana's transformer")
    _check_caption_transformer(folder, transformer.config, vae, gemma)
    return _masked_text_pipeline(folder, "SanaPipeline", gemma, SanaTransformer(transformer.eval()).eval(), vae, scheduler_config,
                                 schedule_from_scheduler_config(scheduler_config), "flow", source, name)


def _check_caption_transformer(folder: Path, config, vae: Autoencoder, encoder: TextEncoder) -> None:
    """PixArt's and Sana's transformer against their VAE and text encoder."""
    if vae.latent_channels != config.in_channels:
        raise UserError(f"{folder}: the VAE has {vae.latent_channels} latent channels but the transformer takes {config.in_channels}")
    if config.out_channels not in (None, config.in_channels, 2 * config.in_channels):
        raise UserError(f"{folder}: the transformer returns {config.out_channels} channels; the pipeline reads {config.in_channels} "
                        f"(or twice that with learned sigma)")
    if config.caption_channels != encoder.hidden_size:
        raise UserError(f"{folder}: {encoder.name} gives {encoder.hidden_size}-wide hidden states but the transformer's caption_channels is "
                        f"{config.caption_channels}")


def _masked_text_pipeline(folder: Path, class_name: str, encoder: TextEncoder, module, vae: Autoencoder, scheduler_config: dict, schedule,
                          prediction_type: str, source: str, name: str) -> Pipeline:
    """One masked text encoder in front of a caption transformer (PixArt, Sana): the mask is part of the condition."""
    config = module.transformer.config
    denoiser = Denoiser(
        module,
        schedule,
        prediction_type,
        (config.in_channels, *_sample_size(config)),
        conditioning="text",
        cond_shape=(encoder.max_length, encoder.hidden_size),
        added_cond_shapes={"encoder_attention_mask": (encoder.max_length,)},
        space="latents",
        name=name,
        source=source,
        scheduler_config=scheduler_config,
    )
    pipeline = Pipeline(denoiser, (encoder,), vae, class_name=class_name, default_guidance_scale=PIPELINE_CLASSES[class_name],
                        extra={"folder": str(folder)})
    pipeline.denoiser.null_text = pipeline.negative_condition(1)  # the encoded "" with its mask, as both pipelines guide
    return pipeline
