"""The JSON sidecar that travels with every exported artifact: its whole interface, for app developers.

One builder per artifact kind, shared by all formats (ONNX, Core ML, OpenVINO): a consumer
reads the input names, shapes, dtypes and value ranges here and never needs this package.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from compress.denoiser import Denoiser
from export.sampler_graph import DenoiserGraph, SamplerGraph, condition_input

SCHEMA = "diffusion-compress/artifact-sidecar/1"
BATCH = "batch"  # the symbolic batch dimension's name, in the sidecar and in the graph


def _batch_dim(batch_size: int | None):
    return BATCH if batch_size is None else int(batch_size)


def _condition_spec(denoiser: Denoiser, batch) -> dict | None:
    name = condition_input(denoiser)
    if denoiser.conditioning == "class":
        return {
            "name": name,
            "shape": [batch],
            "dtype": "int64",
            "range": [0, denoiser.num_classes - 1],
            "null_value": denoiser.num_classes,
            "description": f"class label per sample; {denoiser.num_classes} is the null (unconditional) label",
        }
    if denoiser.conditioning == "text":
        return {
            "name": name,
            "shape": [batch, *denoiser.cond_shape],
            "dtype": "float32",
            "null_value": "zeros",
            "description": "text-encoder hidden states per sample; all zeros is the unconditional embedding",
        }
    return None


def _conditioning(denoiser: Denoiser, guidance: bool) -> dict:
    """How conditioning works, including how to ask for an unconditional sample."""
    info: dict = {"kind": denoiser.conditioning, "input": condition_input(denoiser)}
    if denoiser.conditioning == "class":
        info.update(num_classes=denoiser.num_classes, null_label=denoiser.num_classes)
        info["unconditional"] = f"class_labels = {denoiser.num_classes} (the null label)" + (" or guidance_scale = 0" if guidance else "")
    elif denoiser.conditioning == "text":
        info.update(tokens=denoiser.cond_shape[0], dim=denoiser.cond_shape[1], null_embedding="zeros")
        info["unconditional"] = "encoder_hidden_states = zeros" + (" or guidance_scale = 0" if guidance else "")
    return info


def _finite(values) -> list[float]:
    return [float(v) if math.isfinite(v) else None for v in values]


def sampler_sidecar(graph: SamplerGraph, fmt: str, file: str, batch_size: int | None, extra: dict | None = None) -> dict:
    denoiser, solver, table = graph.denoiser, graph.solver, graph.table
    batch = _batch_dim(batch_size)
    shape = [batch, *denoiser.sample_shape]
    inputs = [{
        "name": "noise",
        "shape": shape,
        "dtype": "float32",
        "distribution": "standard_normal",
        "description": "standard normal noise drawn by the caller (any initial scaling happens inside); the same noise gives the same sample",
    }]
    condition = _condition_spec(denoiser, batch)
    if condition:
        inputs.append(condition)
    default_scale = graph.default_guidance_scale
    if graph.guidance:
        inputs.append({
            "name": "guidance_scale",
            "shape": [1],
            "dtype": "float32",
            "default": default_scale,
            "description": "classifier-free guidance scale: 0 unconditional, 1 conditional, >1 stronger guidance",
        })
    return {
        "schema": SCHEMA,
        "kind": "sampler",
        "format": fmt,
        "file": file,
        "inputs": inputs,
        "outputs": [{
            "name": "sample",
            "shape": shape,
            "dtype": "float32",
            "range": list(denoiser.data_range),
            "clipped": False,
            "description": "the generated sample in the model's data range (not clipped)",
        }],
        "batch": {"dynamic": batch_size is None, "size": batch_size},
        "data_range": list(denoiser.data_range),
        "prediction_type": denoiser.prediction_type,
        "solver": {
            "name": solver.name,
            "steps": solver.steps,
            "spacing": solver.spacing,
            "options": dict(solver.options),
            "timesteps": [float(t) for t in table.timesteps],
            "sigmas": _finite(graph.plan.sigma),
            "nfe": table.evaluations,
            # Guidance runs conditional and unconditional halves as one doubled batch per evaluation.
            "network_batch": "2 x batch" if graph.guidance else "batch",
        },
        "guidance": {"enabled": graph.guidance, "default_scale": default_scale},
        "conditioning": _conditioning(denoiser, graph.guidance),
        "randomness": "none inside the graph: the caller owns the seed through the noise it passes",
        "model": denoiser.describe(),
        **(extra or {}),
    }


def denoiser_sidecar(graph: DenoiserGraph, fmt: str, file: str, batch_size: int | None, extra: dict | None = None) -> dict:
    denoiser = graph.denoiser
    batch = _batch_dim(batch_size)
    shape = [batch, *denoiser.sample_shape]
    inputs = [
        {"name": "sample", "shape": shape, "dtype": "float32", "description": "noisy sample x_t = alpha_t * x_0 + sigma_t * noise"},
        {"name": "timestep", "shape": [batch], "dtype": "float32", "range": [0, denoiser.schedule.num_train_timesteps - 1],
         "description": "training timestep of each sample (fractional values allowed)"},
    ]
    condition = _condition_spec(denoiser, batch)
    if condition:
        inputs.append(condition)
    return {
        "schema": SCHEMA,
        "kind": "denoiser",
        "format": fmt,
        "file": file,
        "inputs": inputs,
        "outputs": [{"name": "prediction", "shape": shape, "dtype": "float32",
                     "description": f"the raw network output ({denoiser.prediction_type}); no guidance, no solver step"}],
        "batch": {"dynamic": batch_size is None, "size": batch_size},
        "data_range": list(denoiser.data_range),
        "prediction_type": denoiser.prediction_type,
        "schedule": {
            "num_train_timesteps": denoiser.schedule.num_train_timesteps,
            "scheduler_config": denoiser.scheduler_config,
            "fingerprint": denoiser.schedule.fingerprint(),
            # x_t = sqrt(alphas_cumprod[t]) * x_0 + sqrt(1 - alphas_cumprod[t]) * noise, for a host-side scheduler.
            "alphas_cumprod": [float(a) for a in denoiser.schedule.alphas_cumprod],
        },
        "conditioning": _conditioning(denoiser, guidance=False),
        "model": denoiser.describe(),
        **(extra or {}),
    }


def write_sidecar(path: Path, sidecar: dict) -> Path:
    path.write_text(json.dumps(sidecar, indent=2) + "\n")
    return path
