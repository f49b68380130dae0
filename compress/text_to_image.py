"""diffusers text-to-image pipeline folders -> `Pipeline` (SD 1.x/2.x, SDXL, their Turbo/LCM folders, SD3).

Every component named in model_index.json is read, and everything that must agree between
them (tokenizer vocabulary and text encoder, text width and cross-attention, VAE latents and
UNet channels, SDXL's added embedding width, SD3's joint and pooled widths) is checked here, so
a bad folder fails with one line before any long work.
"""
from __future__ import annotations

import json
from pathlib import Path

from compress.components import Autoencoder, Pipeline, TextEncoder, TextLayout
from compress.denoiser import Denoiser, DiffusersUNet, SD3Transformer
from compress.errors import UserError
from compress.schedule import NoiseSchedule, is_flow_scheduler_config, schedule_from_scheduler_config

# The pipeline classes read here, with the guidance scale their __call__ defaults to.
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": 7.5,
    "StableDiffusionXLPipeline": 5.0,
    "LatentConsistencyModelPipeline": 8.5,
    "StableDiffusion3Pipeline": 7.0,
}
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
SD3_CLIP_CLASSES = ("CLIPTextModelWithProjection",)  # SD3 conditions on both CLIPs' projected pooled outputs
SD3_T5_CLASSES = ("T5EncoderModel",)
SD3_TRANSFORMER_CLASS = "SD3Transformer2DModel"
# StableDiffusion3Pipeline's max_sequence_length default: the T5 tokens, or the zeros standing in for them.
SD3_T5_TOKENS = 256
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
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


def _present(index: dict, name: str) -> bool:
    return bool(index.get(name)) and index[name][1] is not None


def _text_encoder(folder: Path, index: dict, name: str, classes: tuple[str, ...], hidden_layer: int, pooled: bool,
                  length: int | None = None) -> TextEncoder:
    import transformers

    tokenizer_name = name.replace("text_encoder", "tokenizer")
    model = _from_pretrained(getattr(transformers, index[name][1]), _component_dir(folder, index, name, classes))
    tokenizer = _from_pretrained(transformers.AutoTokenizer, _component_dir(folder, index, tokenizer_name))
    vocab, table = len(tokenizer), model.config.vocab_size
    if vocab > table:
        raise UserError(f"{folder}: {tokenizer_name} has {vocab} tokens but {name} embeds only {table}: the tokenizer does not belong to this text encoder")
    encoder = TextEncoder(name, model.eval(), tokenizer, tokenizer_name, hidden_layer=hidden_layer, pooled=pooled, length=length)
    positions = model.config.get("max_position_embeddings") if hasattr(model.config, "get") else getattr(model.config, "max_position_embeddings", None)
    if positions is not None and encoder.max_length > positions:  # T5's relative positions have no such limit
        raise UserError(f"{folder}: {tokenizer_name} pads to {encoder.max_length} tokens but {name} has {positions} positions")
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
    sdxl = class_name == "StableDiffusionXLPipeline"
    encoders = _text_encoders(folder, index, sdxl)
    unet = _from_pretrained(diffusers.UNet2DConditionModel, _component_dir(folder, index, "unet", (UNET_CLASS,)))
    vae_dir = _component_dir(folder, index, "vae", VAE_CLASSES)
    vae = Autoencoder.from_module(_from_pretrained(getattr(diffusers, index["vae"][1]), vae_dir))
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
    clips = tuple(_text_encoder(folder, index, n, SD3_CLIP_CLASSES, hidden_layer=-2, pooled=True) for n in ("text_encoder", "text_encoder_2"))
    t5 = _text_encoder(folder, index, "text_encoder_3", SD3_T5_CLASSES, hidden_layer=-1, pooled=False, length=SD3_T5_TOKENS) \
        if _present(index, "text_encoder_3") else None
    transformer = _from_pretrained(diffusers.SD3Transformer2DModel, _component_dir(folder, index, "transformer", (SD3_TRANSFORMER_CLASS,)))
    vae_dir = _component_dir(folder, index, "vae", VAE_CLASSES)
    vae = Autoencoder.from_module(_from_pretrained(getattr(diffusers, index["vae"][1]), vae_dir))
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
