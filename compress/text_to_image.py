"""diffusers text-to-image pipeline folders -> `Pipeline` (SD 1.x/2.x, SDXL, their Turbo/LCM folders).

Every component named in model_index.json is read, and everything that must agree between
them (tokenizer vocabulary and text encoder, text width and cross-attention, VAE latents and
UNet channels, SDXL's added embedding width) is checked here, so a bad folder fails with one
line before any long work.
"""
from __future__ import annotations

import json
from pathlib import Path

from compress.components import Autoencoder, Pipeline, TextEncoder
from compress.denoiser import Denoiser, DiffusersUNet
from compress.errors import UserError
from compress.schedule import NoiseSchedule

# The pipeline classes read here, with the guidance scale their __call__ defaults to.
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": 7.5,
    "StableDiffusionXLPipeline": 5.0,
    "LatentConsistencyModelPipeline": 8.5,
}
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
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


def _text_encoders(folder: Path, index: dict, sdxl: bool) -> tuple[TextEncoder, ...]:
    import transformers

    names = [n for n in ("text_encoder", "text_encoder_2") if index.get(n) and index[n][1] is not None]
    if not names:
        raise UserError(f"pipeline folder {folder} has no text encoder")
    encoders = []
    for name in names:
        tokenizer_name = name.replace("text_encoder", "tokenizer")
        model = _from_pretrained(getattr(transformers, index[name][1]), _component_dir(folder, index, name, TEXT_ENCODER_CLASSES))
        tokenizer = _from_pretrained(transformers.AutoTokenizer, _component_dir(folder, index, tokenizer_name))
        vocab, table = len(tokenizer), model.config.vocab_size
        if vocab > table:
            raise UserError(f"{folder}: {tokenizer_name} has {vocab} tokens but {name} embeds only {table}: the tokenizer does not belong to this text encoder")
        if tokenizer.model_max_length > model.config.max_position_embeddings:
            raise UserError(f"{folder}: {tokenizer_name} pads to {tokenizer.model_max_length} tokens but {name} has {model.config.max_position_embeddings} positions")
        pooled = sdxl and name == names[-1]
        encoders.append(TextEncoder(name, model.eval(), tokenizer, tokenizer_name, hidden_layer=-2 if sdxl else -1, pooled=pooled))
    return tuple(encoders)


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
