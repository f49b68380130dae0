"""An exported artifact as the runtimes see it: its file, its format and its sidecar, plus inputs to run it with.

Every artifact this project writes has a JSON sidecar naming its inputs, shapes and dtypes, so
benchmark inputs are built from the sidecar and never guessed from the graph.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compress.errors import UserError

# Suffix of the model file -> format. A Core ML package is a folder.
FORMATS = {".onnx": "onnx", ".xml": "openvino", ".mlpackage": "coreml"}


@dataclass(frozen=True)
class Artifact:
    path: Path
    format: str  # 'onnx', 'openvino' or 'coreml'
    sidecar: dict

    @property
    def kind(self) -> str:
        return self.sidecar.get("kind", "sampler")

    @property
    def input_names(self) -> list[str]:
        return [spec["name"] for spec in self.sidecar["inputs"]]

    @property
    def output_name(self) -> str:
        return self.sidecar["outputs"][0]["name"]

    @property
    def fixed_batch(self) -> int | None:
        batch = self.sidecar.get("batch", {})
        return None if batch.get("dynamic", True) else int(batch["size"])


def artifact_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown artifact type {path.suffix or '(no suffix)'!r} (expected .onnx, .xml or .mlpackage)")
    return fmt


def sidecar_candidates(path: Path, fmt: str) -> list[Path]:
    """The ONNX model's sidecar is <stem>.json; other formats share its folder and use <stem>.<format>.json."""
    stem = path.parent / path.stem
    if fmt == "onnx":
        return [Path(f"{stem}.json")]
    return [Path(f"{stem}.{fmt}.json"), Path(f"{stem}.json")]


def open_artifact(path: str | Path) -> Artifact:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    fmt = artifact_format(path)
    if fmt == "coreml" and not path.is_dir():
        raise UserError(f"{path} is not a Core ML package (a .mlpackage is a folder)")
    if fmt != "coreml" and not path.is_file():
        raise UserError(f"{path} is not a file")
    for candidate in sidecar_candidates(path, fmt):
        if candidate.is_file():
            return Artifact(path, fmt, _read_sidecar(candidate))
    names = " or ".join(p.name for p in sidecar_candidates(path, fmt))
    raise UserError(f"{path} has no sidecar ({names} next to it); it describes the inputs a runtime must be given")


def _read_sidecar(path: Path) -> dict:
    try:
        sidecar = json.loads(path.read_text())
        names = [spec["name"] for spec in sidecar["inputs"]]
        sidecar["outputs"][0]["name"]
    except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise UserError(f"sidecar {path} is corrupt: {type(e).__name__}: {e}") from None
    if not names:
        raise UserError(f"sidecar {path} lists no inputs")
    return sidecar


def example_feeds(artifact: Artifact, batch: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for one call, shaped and typed as the sidecar says; noise from ``seed``."""
    fixed = artifact.fixed_batch
    if batch is not None and fixed is not None and batch != fixed:
        raise UserError(f"{artifact.path.name} was exported with a fixed batch of {fixed}; drop --batch or re-export with --batch-size {batch}")
    batch = batch or fixed or 1
    if batch < 1:
        raise UserError(f"batch must be at least 1, got {batch}")
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in artifact.sidecar["inputs"]:
        shape = [batch if dim == "batch" else int(dim) for dim in spec["shape"]]
        shape[0] = shape[0] if spec["name"] == "guidance_scale" else batch
        feeds[spec["name"]] = _example_input(spec, shape, rng)
    return feeds


def _example_input(spec: dict, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    dtype = np.dtype(spec["dtype"])
    name = spec["name"]
    if name == "guidance_scale":
        default = spec.get("default")
        return np.array([1.0 if default is None else default], dtype)
    if name == "class_labels":
        high = int(spec.get("range", [0, 0])[1])
        return (np.arange(shape[0]) % (high + 1)).astype(dtype)
    if name == "timestep":
        high = float(spec.get("range", [0, 999])[1])
        return np.linspace(high, 0, shape[0]).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def baked_solver(sidecar: dict, schedule, prediction_type: str):
    """The SolverConfig that reproduces a sampler sidecar's timesteps and sigmas on ``schedule`` (named spacing first,
    then explicit timesteps): the solver baked into the artifact, for a runtime that rebuilds or replays it."""
    from compress.solvers import SolverConfig, compile_solver

    baked = sidecar["solver"]
    guidance = sidecar.get("guidance") or {}
    scale = guidance.get("default_scale") if guidance.get("enabled") else None
    candidates = [SolverConfig(baked["name"], baked["steps"], baked["spacing"], scale, dict(baked.get("options") or {}), **(baked.get("plan") or {}))]
    if all(float(t).is_integer() for t in baked["timesteps"]):
        candidates.append(SolverConfig(baked["name"], baked["steps"], baked["spacing"], scale, dict(baked.get("options") or {}),
                                       timesteps=tuple(int(t) for t in baked["timesteps"])))
    for config in candidates:
        try:
            plan = config.plan(schedule)
            table = compile_solver(config.name, plan, prediction_type, **config.options)
        except UserError:
            continue
        sigmas = [float(s) for s in plan.sigma]
        if np.allclose([float(t) for t in table.timesteps], baked["timesteps"]) and np.allclose(sigmas, [s if s is not None else np.inf for s in baked["sigmas"]], rtol=1e-9):
            return config
    raise UserError(f"cannot rebuild the artifact's {baked['name']}-{baked['steps']} solver exactly from its sidecar; "
                    "compare it with a runtime that reads the artifact itself")


def sidecar_schedule(denoiser_sidecar: dict):
    """The noise schedule a denoiser sidecar spells out (VP: its alphas_cumprod; flow: its shift), checked against its fingerprint."""
    from compress.schedule import FlowSchedule, NoiseSchedule

    section = denoiser_sidecar.get("schedule") or {}
    if section.get("kind") == "flow":
        schedule = FlowSchedule.from_description(section)
    elif section.get("alphas_cumprod"):
        schedule = NoiseSchedule(np.asarray(section["alphas_cumprod"], dtype=np.float64))
    else:
        raise UserError(f"the sidecar of {denoiser_sidecar.get('file', 'the denoiser')} spells out no noise schedule")
    if section.get("fingerprint") and schedule.fingerprint() != section["fingerprint"]:
        raise UserError(f"the schedule in the sidecar of {denoiser_sidecar.get('file', 'the denoiser')} does not match its fingerprint")
    return schedule
