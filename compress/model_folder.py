"""Model folders: how the toolkit saves a model it made (a pruned network, a slim student).

A model folder holds two files:

    model.json          {"format": "diffusion-compress-model", "version": 1,
                         "builder": NAME, "builder_args": {...}, "denoiser": {...}}
    model.safetensors   the module's state dict, plus the schedule's alphas_cumprod

The module is rebuilt by a registered builder from plain JSON arguments (for a pruned
UNet: its original config and the pruned shapes), then the weights are loaded. Nothing is
unpickled and builders come from `BUILDERS` only. The one piece of code a file can name is
the ``python:module:factory`` a pruned user model came from: loading imports it exactly as
that reference itself would be (the user gave it when pruning), builds its module and narrows
the pruned tensors. A folder is loaded wherever a model reference is accepted, by its path.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from torch import nn

from compress.errors import UserError

FORMAT = "diffusion-compress-model"
VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "model.json", "model.safetensors"
SCHEDULE_KEY = "__schedule__.alphas_cumprod"

# builder name -> "module:function"; function(builder_args: dict) -> nn.Module (random weights)
BUILDERS = {
    "pruned": "compress.prune:rebuild_module",
    "slim": "compress.slim:build_student_module",
}


def is_model_folder(path: str | Path) -> bool:
    return Path(path, CONFIG_FILE).is_file()


def save_model_folder(denoiser, folder: str | Path, builder: str, builder_args: dict) -> Path:
    """Writes ``denoiser`` (its module rebuilt by ``builder`` from ``builder_args``) into ``folder``."""
    from safetensors.torch import save_file

    if builder not in BUILDERS:
        raise ValueError(f"unknown builder {builder!r}; register it in compress.model_folder.BUILDERS")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    description = {
        "name": denoiser.name,
        "source": denoiser.source,
        "prediction_type": denoiser.prediction_type,
        "sample_shape": list(denoiser.sample_shape),
        "conditioning": denoiser.conditioning,
        "num_classes": denoiser.num_classes,
        "cond_shape": list(denoiser.cond_shape) if denoiser.cond_shape else None,
        "data_range": list(denoiser.data_range),
        "has_null_condition": denoiser.has_null_condition,
        "scheduler_config": denoiser.scheduler_config,
        "extra": denoiser.extra,
    }
    config = {"format": FORMAT, "version": VERSION, "builder": builder, "builder_args": builder_args, "denoiser": description}
    tensors = {k: v.detach().contiguous().cpu() for k, v in denoiser.module.state_dict().items()}
    if denoiser.schedule.kind == "flow":
        description["flow_schedule"] = denoiser.schedule.describe()
    else:
        tensors[SCHEDULE_KEY] = torch.from_numpy(denoiser.schedule.alphas_cumprod.copy())
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_model_folder(path: str | Path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from compress.denoiser import Denoiser
    from compress.schedule import FlowSchedule, NoiseSchedule

    folder = Path(path)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read model folder {folder}: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{folder / CONFIG_FILE} is not a diffusion-compress model description")
    if config.get("version") != VERSION:
        raise UserError(f"{folder / CONFIG_FILE}: model format version {config.get('version')} is not supported (this toolkit reads {VERSION})")
    builder = config.get("builder")
    if builder not in BUILDERS:
        raise UserError(f"{folder / CONFIG_FILE}: unknown builder {builder!r} (known: {', '.join(BUILDERS)})")
    if not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"model folder {folder} has no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read {folder / WEIGHTS_FILE}: {str(e).splitlines()[0]}") from None
    module_name, _, function = BUILDERS[builder].partition(":")
    build = getattr(importlib.import_module(module_name), function)
    module: nn.Module = build(config.get("builder_args") or {})
    d = config["denoiser"]
    levels = tensors.pop(SCHEDULE_KEY, None)
    if d.get("flow_schedule"):
        schedule = FlowSchedule.from_description(d["flow_schedule"])
    elif levels is not None:
        schedule = NoiseSchedule(levels.double().numpy())
    else:
        raise UserError(f"{folder / WEIGHTS_FILE} holds no noise schedule")
    try:
        module.load_state_dict(tensors)
    except RuntimeError as e:
        raise UserError(f"{folder / WEIGHTS_FILE} does not match the architecture in {CONFIG_FILE}: {str(e).splitlines()[0]}") from None
    return Denoiser(
        module.eval(),
        schedule,
        d["prediction_type"],
        tuple(d["sample_shape"]),
        conditioning=d["conditioning"],
        num_classes=d.get("num_classes"),
        cond_shape=tuple(d["cond_shape"]) if d.get("cond_shape") else None,
        data_range=tuple(d["data_range"]),
        name=d.get("name", folder.name),
        source=str(folder),
        scheduler_config=d.get("scheduler_config"),
        has_null_condition=d.get("has_null_condition", True),
        extra=d.get("extra") or {},
    )
