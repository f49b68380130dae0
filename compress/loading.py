"""Model references -> `Denoiser`.

    zoo:NAME                 the project's reference models
    diffusers:PATH           a pipeline folder (model_index.json + unet/ or transformer/ + scheduler/),
                             a bare model folder (schedule from flags), or a hub id where there is internet
    python:module:factory    any torch denoiser; the factory returns a Denoiser or an nn.Module
                             called as module(sample, timestep, cond)
    PATH                     a model folder the toolkit wrote (pruned, slim; see compress.model_folder)
"""
from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from compress.components import Pipeline
from compress.denoiser import PREDICTION_TYPES, Denoiser, DiffusersTransformer, DiffusersUNet
from compress.errors import UserError, first_line, register_user_code
from compress.schedule import NoiseSchedule, prediction_type_of, schedule_from_scheduler_config

SCHEMES = ("zoo", "diffusers", "python")
TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
# Transformers that only run with their pipeline's text encoders, and the pipeline folders that bring them.
PIPELINE_ONLY = {"PixArtTransformer2DModel": "PixArtAlphaPipeline or PixArtSigmaPipeline", "FluxTransformer2DModel": "FluxPipeline",
                 "SD3Transformer2DModel": "StableDiffusion3Pipeline", "SanaTransformer2DModel": "SanaPipeline"}


@dataclass(frozen=True)
class ScheduleFlags:
    """What a bare model or a python factory cannot tell about itself."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    sample_shape: tuple[int, ...] | None = None
    text_tokens: int = 77

    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)


def load_model(reference: str, flags: ScheduleFlags | None = None) -> Denoiser:
    """The denoiser of ``reference`` (of its pipeline, for a text-to-image pipeline)."""
    return load_pipeline(reference, flags).denoiser


def load_pipeline(reference: str, flags: ScheduleFlags | None = None) -> Pipeline:
    """``reference`` with every component: a text-to-image pipeline, or a denoiser alone."""
    loaded = _load(reference, flags or ScheduleFlags())
    return loaded if isinstance(loaded, Pipeline) else Pipeline(loaded)


def _load(reference: str, flags: ScheduleFlags) -> Denoiser | Pipeline:
    if flags.prediction_type not in PREDICTION_TYPES:
        raise UserError(f"unknown prediction type {flags.prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    if flags.prediction_type == "flow":
        raise UserError("prediction type 'flow' needs a flow-matching schedule: load the model from a diffusers folder whose scheduler is "
                        "FlowMatchEulerDiscreteScheduler (or a python factory returning a Denoiser with a FlowSchedule)")
    from compress.model_folder import is_model_folder, load_model_folder

    if is_model_folder(reference):
        return load_model_folder(reference)
    scheme, sep, rest = reference.partition(":")
    if not sep or scheme not in SCHEMES or not rest:
        raise UserError(f"bad model reference {reference!r}: expected zoo:NAME, diffusers:PATH, python:module:factory or a model folder written by compress")
    if scheme == "zoo":
        from compress.zoo import DATA, ZOO, load_denoiser

        if rest in ZOO and ZOO[rest].kind == "pipeline":
            from compress.text_to_image import load_pipeline_folder
            from compress.zoo import pipeline_folder

            pipeline = load_pipeline_folder(pipeline_folder(rest), source=reference, name=rest)
            pipeline.denoiser.extra["data"] = DATA
            return pipeline
        return load_denoiser(rest)
    if scheme == "diffusers":
        return _load_diffusers(rest, flags)
    return _load_python(rest, flags)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _load_diffusers(location: str, flags: ScheduleFlags) -> Denoiser:
    import diffusers

    path = Path(location)
    scheduler_config = None
    if path.is_dir():
        from compress.memory import folder_weight_bytes, require_memory

        require_memory(folder_weight_bytes(path), f"loading {path} in float32")
    if path.is_dir() and (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json")
        if any(key.startswith("text_encoder") for key in index):
            from compress.text_to_image import load_pipeline_folder

            return load_pipeline_folder(path, source=f"diffusers:{location}", name=path.name)
        sub = next((s for s in ("unet", "transformer") if s in index), None)
        if sub is None or not (path / sub).is_dir():
            raise UserError(f"pipeline folder {path} has no unet/ or transformer/ model")
        model_dir = path / sub
        if (path / "scheduler" / "scheduler_config.json").is_file():
            scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")
    elif path.is_dir() and (path / "config.json").is_file():
        model_dir = path
    elif path.exists():
        raise UserError(f"{path} is neither a diffusers pipeline folder (model_index.json) nor a model folder (config.json)")
    elif location.count("/") == 1 and not location.startswith((".", "/")):
        return _load_diffusers_hub(location, flags)
    else:
        raise UserError(f"model folder {path} does not exist")

    config = _read_json(model_dir / "config.json")
    class_name = config.get("_class_name", "")
    # PixArt checkpoints are saved as Transformer2DModel; diffusers loads that config as a PixArtTransformer2DModel.
    kind = "PixArtTransformer2DModel" if class_name == "Transformer2DModel" and config.get("norm_type") == "ada_norm_single" else class_name
    if kind in PIPELINE_ONLY:
        raise UserError(f"{model_dir}: a {kind} is conditioned by its pipeline's text encoders: load the whole {PIPELINE_ONLY[kind]} folder "
                        f"(model_index.json with its text_encoder/ and tokenizer/), not the model alone")
    if class_name not in UNET_CLASSES + TRANSFORMER_CLASSES:
        raise UserError(f"{model_dir}: unsupported model class {class_name!r} (supported: {', '.join(UNET_CLASSES + TRANSFORMER_CLASSES)})")
    try:
        model = getattr(diffusers, class_name).from_pretrained(str(model_dir))
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load {model_dir}: {str(e).splitlines()[0]}") from None
    return _describe_diffusers(model, scheduler_config, flags, source=f"diffusers:{location}", name=path.name)


def _load_diffusers_hub(repo_id: str, flags: ScheduleFlags) -> Denoiser:
    import diffusers

    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(repo_id)
    except Exception as e:  # any network or hub failure is the user's reference, not our bug
        raise UserError(f"cannot fetch {repo_id!r} from the hub: {str(e).splitlines()[0]}") from None
    model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    return _describe_diffusers(model, dict(pipe.scheduler.config), flags, source=f"diffusers:{repo_id}", name=repo_id.split("/")[-1])


def _describe_diffusers(model: nn.Module, scheduler_config: dict | None, flags: ScheduleFlags, source: str, name: str) -> Denoiser:
    config = model.config
    schedule = schedule_from_scheduler_config(scheduler_config) if scheduler_config else flags.schedule()
    prediction_type = prediction_type_of(scheduler_config, flags.prediction_type) if scheduler_config else flags.prediction_type
    size = config.get("sample_size", 32)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    in_channels = config.get("in_channels", 4)
    kwargs: dict = {}
    if model.__class__.__name__ in TRANSFORMER_CLASSES:
        module = DiffusersTransformer(model)
        if config.get("num_embeds_ada_norm"):
            kwargs = {"conditioning": "class", "num_classes": config["num_embeds_ada_norm"]}
    else:
        module = DiffusersUNet(model)
        if module.takes_text:
            dim = config["cross_attention_dim"]
            kwargs = {"conditioning": "text", "cond_shape": (flags.text_tokens, dim if isinstance(dim, int) else dim[0])}
        elif config.get("num_class_embeds"):
            # Class-embedding UNets in diffusers have no null class: guidance is not defined for them.
            kwargs = {"conditioning": "class", "num_classes": config["num_class_embeds"], "has_null_condition": False}
    shape = flags.sample_shape or (in_channels, *size)
    return Denoiser(module.eval(), schedule, prediction_type, tuple(shape), name=name, source=source, scheduler_config=scheduler_config, **kwargs)


def _load_python(target: str, flags: ScheduleFlags) -> Denoiser:
    module_name, sep, factory_name = target.rpartition(":")
    if not sep or not module_name or not factory_name:
        raise UserError(f"bad python reference 'python:{target}': expected python:module:factory")
    if "" not in sys.path:
        sys.path.insert(0, "")  # a factory in the working directory is the common case
    # From here on an exception raised inside this package's code (the module's forward during sampling,
    # calibration or export) is the user's: the CLI reports it as such (compress.errors.user_code_error).
    register_user_code(module_name, f"python:{target}")
    try:
        py_module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"cannot import {module_name!r}: {e}") from None
    except Exception as e:  # a SyntaxError or any exception at the module's top level: the user's code
        raise UserError(f"python:{target}: importing {module_name!r} raised {first_line(e)}") from None
    factory = getattr(py_module, factory_name, None)
    if not callable(factory):
        raise UserError(f"module {module_name!r} has no callable {factory_name!r}")
    try:
        made = factory()
    except UserError:
        raise
    except Exception as e:  # the user's code failed: say so in one line, not as our internal error
        raise UserError(f"python:{target}: the factory raised {first_line(e)}") from None
    if isinstance(made, Denoiser):
        made.source = made.source or f"python:{target}"
        return made
    if not isinstance(made, nn.Module):
        raise UserError(f"python:{target} returned {type(made).__name__}; expected a Denoiser or a torch.nn.Module")
    if flags.sample_shape is None:
        raise UserError(f"python:{target} returned a bare module: give its sample shape with --sample-shape C,H,W")
    return Denoiser(made.eval(), flags.schedule(), flags.prediction_type, tuple(flags.sample_shape), name=factory_name, source=f"python:{target}")
