"""The project's reference models, trained on scikit-learn's digits; checkpoints are committed."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from compress.errors import UserError, did_you_mean

CHECKPOINTS = Path(__file__).parent / "checkpoints"
# What every zoo model was trained on, in ``Denoiser.extra["data"]``: it names the judge validation
# uses (the digits classifier's FD and prompted-digit share) and the default validation prompts, and
# travels with pruned and slim variants, so no stage has to recognise a "zoo:" reference.
DATA = "digits"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str  # "denoiser", "classifier" or "pipeline" (a diffusers pipeline folder)
    summary: str


ZOO = {
    e.name: e
    for e in (
        ZooEntry("digits", "denoiser", "unconditional UNet2DModel, 16x16x1, epsilon, 1000-step linear schedule"),
        ZooEntry("digits-cond", "denoiser", "class-conditional UNet2DConditionModel (class token via cross-attention, CFG)"),
        ZooEntry("digits-classifier", "classifier", "small CNN; penultimate features define FD, its labels check samples"),
        ZooEntry("digits-t2i", "pipeline", "latent text-to-image StableDiffusionPipeline: VAE to 4x8x8, tiny CLIP text encoder, UNet2DConditionModel"),
        ZooEntry("digits-flow", "pipeline", "rectified-flow StableDiffusion3Pipeline: digits-t2i's VAE, two tiny CLIPs, no T5, SD3Transformer2DModel"),
    )
}


def _known(name: str) -> ZooEntry:
    if name not in ZOO:
        raise UserError(f"unknown zoo model {name!r}{did_you_mean(name, ZOO, prefix='zoo:')} (available: {', '.join(ZOO)})")
    return ZOO[name]


def checkpoint_path(name: str) -> Path:
    """The single safetensors file of a denoiser or classifier entry."""
    if _known(name).kind == "pipeline":
        raise UserError(f"zoo:{name} is a pipeline folder, not one checkpoint file (see pipeline_folder)")
    path = CHECKPOINTS / f"{name}.safetensors"
    if not path.is_file():
        raise UserError(f"zoo checkpoint {path} is missing; run 'compress zoo train {name}'")
    return path


def pipeline_folder(name: str) -> Path:
    """The diffusers pipeline folder of a pipeline entry (StableDiffusionPipeline.from_pretrained loads it)."""
    if _known(name).kind != "pipeline":
        raise UserError(f"zoo:{name} is a {ZOO[name].kind}, not a pipeline")
    folder = CHECKPOINTS / name
    if not (folder / "model_index.json").is_file():
        raise UserError(f"zoo pipeline folder {folder} is missing; run 'compress zoo train {name}'")
    return folder


def stored_path(name: str) -> Path:
    """Where an entry lives, trained or not: its checkpoint file or, for a pipeline, its folder."""
    return CHECKPOINTS / (name if _known(name).kind == "pipeline" else f"{name}.safetensors")


def read_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def load_denoiser(name: str):
    from compress.denoiser import DiffusersUNet, Denoiser
    from compress.schedule import NoiseSchedule
    from compress.zoo.models import build_digits_cond_unet, build_digits_unet

    if _known(name).kind != "denoiser":
        raise UserError(f"zoo:{name} is a {ZOO[name].kind}, not a diffusion model")
    path = checkpoint_path(name)
    meta = read_metadata(path)
    schedule = NoiseSchedule.from_betas("linear", 1000)
    if name == "digits":
        module = DiffusersUNet(build_digits_unet(meta["config"]))
        module.unet.load_state_dict(load_file(str(path)))
        kwargs = {}
    else:
        module = build_digits_cond_unet(meta["config"])
        module.load_state_dict(load_file(str(path)))
        kwargs = {"conditioning": "class", "num_classes": module.num_classes}
    return Denoiser(module.eval(), schedule, "epsilon", (1, 16, 16), name=name, source=f"zoo:{name}",
                    extra={"training": meta.get("training"), "data": DATA}, **kwargs)


def load_classifier():
    from compress.zoo.models import DigitsClassifier

    model = DigitsClassifier()
    model.load_state_dict(load_file(str(checkpoint_path("digits-classifier"))))
    return model.eval()


def training_info(name: str) -> dict:
    if _known(name).kind == "pipeline":  # a folder keeps its training record beside the parts
        return json.loads((pipeline_folder(name) / "training.json").read_text())
    return read_metadata(checkpoint_path(name)).get("training", {})
