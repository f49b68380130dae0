"""Calibration sets on disk: safetensors tensors plus a JSON header in the metadata.

The header says which model and schedule the set belongs to (a hash of the weights, the
schedule's fingerprint), how it was drawn (the `CalibrationConfig`, the solver for 'solver'
sets) and what it holds (counts, timesteps), so a run can be reproduced and a set recorded
from another model is refused. Files are written to a temporary name and renamed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compress.denoiser import NEGATIVE_PREFIX, SHARED_CONDITION_KEYS, condition_batch
from compress.errors import UserError
from compress.outputs import staged_file

SCHEMA = "diffusion-compress/calibration/1"
HEADER_KEY = "diffusion_compress.calibration"


def model_hash(module: torch.nn.Module) -> str:
    """Short hash of the weights (names, dtypes, shapes, bytes), independent of the device."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d buffers too (BatchNorm's step count)
    return digest.hexdigest()[:16]


def model_identity(denoiser) -> dict:
    d = denoiser.describe()
    return {
        "name": d["name"],
        "source": d["source"],
        "hash": model_hash(denoiser.module),
        "schedule_fingerprint": d["schedule_fingerprint"],
        "prediction_type": d["prediction_type"],
        "sample_shape": d["sample_shape"],
        "conditioning": d["conditioning"],
        "num_classes": d["num_classes"],
        "cond_shape": d["cond_shape"],
        "parameters": d["parameters"],
    }


def build_header(denoiser, config, solver, requests, inputs: int) -> dict:
    levels, counts = np.unique(requests.t, return_counts=True)
    return {
        "schema": SCHEMA,
        "model": model_identity(denoiser),
        "sampler": config.sampler,
        "seed": config.seed,
        "config": config.to_dict(),
        "solver": None if solver is None else {
            "name": solver.name, "steps": solver.steps, "spacing": solver.spacing,
            "options": dict(solver.options), "guidance_scale": solver.guidance_scale,
        },
        "trajectory": {"solver": "ddim", "steps": config.trajectory_steps, "spacing": "trailing"},
        "counts": {
            "states": int(len(requests.t)),
            "inputs": int(inputs),
            "trajectories": int(requests.trajectories),
            "guided": config.guidance_scale is not None and denoiser.conditioning != "none",
        },
        "timesteps": {"values": [float(v) for v in levels[::-1]], "counts": [int(c) for c in counts[::-1]]},
    }


@dataclass
class CalibrationSet:
    """Network inputs (sample, timestep, condition) and the trajectory starts they came from."""

    sample: torch.Tensor  # [N, C, H, W] float32: x_t
    timestep: torch.Tensor  # [N] float32
    # [N] int64 labels or [N, S, D] float32 states, or a dict of such parts named as the graphs' inputs
    # (SDXL's text_embeds/time_ids, SD3's pooled_projections); None for unconditional models
    condition: "torch.Tensor | dict[str, torch.Tensor] | None"
    noise: torch.Tensor  # [M, C, H, W] float32: x_T of each trajectory
    noise_condition: "torch.Tensor | dict[str, torch.Tensor] | None"  # [M, ...]: the condition of each trajectory
    header: dict
    # Text-to-image pipelines: the unconditional branch's condition (the encoded negative prompt, [1, S, D])
    # and the final latents the baked solver reaches from each trajectory start (what the VAE decoder sees).
    negative_condition: torch.Tensor | None = None
    latents: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.sample)

    @property
    def guidance_scale(self) -> float | None:
        return self.header["config"].get("guidance_scale")

    def denoiser_inputs(self, condition_name: str | None, limit: int | None = None) -> list[dict]:
        """One feed dict of batch 1 per recorded input, named as denoiser.onnx's inputs."""
        items = []
        for k in range(len(self) if limit is None else min(limit, len(self))):
            item = {"sample": self.sample[k : k + 1].numpy(), "timestep": self.timestep[k : k + 1].numpy()}
            if condition_name and self.condition is not None:
                item.update(_feed(self.condition, k, condition_name))
            items.append(item)
        return items

    def sampler_inputs(self, condition_name: str | None, guidance_scale: float | None, limit: int | None = None, negative_name: str | None = None) -> list[dict]:
        """One feed dict of batch 1 per trajectory start, named as sampler.onnx's inputs."""
        items = []
        if negative_name and self.negative_condition is None:
            raise UserError(f"the sampler takes {negative_name} but the calibration set has no negative condition; record it from the pipeline")
        for k in range(len(self.noise) if limit is None else min(limit, len(self.noise))):
            item = {"noise": self.noise[k : k + 1].numpy()}
            if condition_name and self.noise_condition is not None:
                item.update(_feed(self.noise_condition, k, condition_name))
            if isinstance(self.negative_condition, dict) and negative_name:
                item.update({NEGATIVE_PREFIX + key: v.numpy() for key, v in self.negative_condition.items() if key not in SHARED_CONDITION_KEYS})
            elif negative_name:
                item[negative_name] = self.negative_condition.numpy()
            if guidance_scale is not None:
                item["guidance_scale"] = np.array([guidance_scale], dtype=np.float32)
            items.append(item)
        return items


    def latent_inputs(self, limit: int | None = None) -> list[dict]:
        """One feed dict of batch 1 per final latent, named as vae_decoder.onnx's input."""
        if self.latents is None:
            raise UserError("the calibration set holds no final latents; record it from a text-to-image pipeline to calibrate its decoder")
        n = len(self.latents) if limit is None else min(limit, len(self.latents))
        return [{"latents": self.latents[k : k + 1].numpy()} for k in range(n)]


def save_calibration(calib: CalibrationSet, path: str | Path) -> Path:
    """Writes ``path`` atomically (a temporary file in the same folder, then a rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"sample": calib.sample, "timestep": calib.timestep, "noise": calib.noise}
    for name in ("condition", "noise_condition", "negative_condition", "latents"):
        tensors.update(_flatten(name, getattr(calib, name)))
    with staged_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={HEADER_KEY: json.dumps(calib.header)})
    return path


def load_calibration(path: str | Path) -> CalibrationSet:
    """Reads a set written by `save_calibration`; anything else is a one-line `UserError`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(metadata[HEADER_KEY])
    except KeyError:
        raise UserError(f"{path} is not a calibration set (no {HEADER_KEY} header); record one with 'compress calibrate'") from None
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise UserError(f"calibration file {path} is corrupt or not safetensors: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(header, dict) or header.get("schema") != SCHEMA:
        raise UserError(f"{path}: unknown calibration schema {header.get('schema') if isinstance(header, dict) else None!r} (expected {SCHEMA})")
    missing = [k for k in ("sample", "timestep", "noise") if k not in tensors]
    if missing:
        raise UserError(f"calibration file {path} is corrupt: missing tensor {missing[0]!r}")
    n = len(tensors["sample"])
    condition = _gather(tensors, "condition")
    if len(tensors["timestep"]) != n or (condition is not None and condition_batch(condition) != n):
        raise UserError(f"calibration file {path} is corrupt: its tensors disagree in length")
    return CalibrationSet(tensors["sample"], tensors["timestep"], condition, tensors["noise"], _gather(tensors, "noise_condition"), header,
                          _gather(tensors, "negative_condition"), tensors.get("latents"))


def _feed(cond, k: int, name: str) -> dict:
    """Row k of a condition as feed-dict entries: the tensor under ``name``, or each part of a dict under its own."""
    if isinstance(cond, dict):
        return {key: value[k : k + 1].numpy() for key, value in cond.items()}
    return {name: cond[k : k + 1].numpy()}


def _flatten(name: str, value) -> dict:
    """safetensors holds flat names: a dict condition is stored as name/part."""
    if value is None:
        return {}
    return {f"{name}/{key}": v for key, v in value.items()} if isinstance(value, dict) else {name: value}


def _gather(tensors: dict, name: str):
    parts = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(name + "/")}
    return parts or tensors.get(name)


def check_calibration_matches(calib: CalibrationSet, model: dict, where: str = "the model") -> None:
    """Refuses a set recorded from another model: ``model`` is a `model_identity` or a sidecar's 'model'."""
    recorded = calib.header.get("model", {})
    name = recorded.get("source") or recorded.get("name")

    def refuse(what: str, theirs, ours) -> None:
        raise UserError(f"calibration set was recorded from {name!r} ({what} {theirs}), not from {where} ({what} {ours}); record one for this model with 'compress calibrate'")

    if recorded.get("schedule_fingerprint") != model.get("schedule_fingerprint"):
        refuse("schedule fingerprint", recorded.get("schedule_fingerprint"), model.get("schedule_fingerprint"))
    if model.get("hash") and recorded.get("hash") and model["hash"] != recorded["hash"]:
        refuse("weights hash", recorded["hash"], model["hash"])
    for key in ("sample_shape", "conditioning", "parameters"):
        if model.get(key) is not None and recorded.get(key) is not None and list(np.atleast_1d(model[key])) != list(np.atleast_1d(recorded[key])):
            refuse(key.replace("_", " "), recorded[key], model[key])
