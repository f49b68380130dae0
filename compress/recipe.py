"""The recipe: a YAML file validated by a schema. Unknown keys are errors that name the closest valid key.

Every section is a `SectionConfig` dataclass (compress.section_config), as the transforms' configs
are: one checker for keys and types, one error path (`UserError`). The transforms' sections
(calibration, quantize, prune, slim) stay the recipe's own mappings here and become their engines'
configs (CalibrationConfig, QuantizeConfig, PruneConfig, SlimConfig) through the same checker in
compress.pipeline.stage_configs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from compress.errors import UserError
from compress.section_config import SectionConfig


def _at_least(minimum: int, default: int):
    return field(default=default, metadata={"ge": minimum})


@dataclass
class ModelSection(SectionConfig):
    section = "model"
    shorthand = "ref"  # model: zoo:digits

    ref: str
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    sample_shape: list[int] | None = None


@dataclass
class SolverSection(SectionConfig):
    section = "solver"

    name: str = "dpmpp-2m"  # or "model": the model's own scheduler config
    steps: int = _at_least(1, 8)
    spacing: str | None = None  # None: the pipeline scheduler's own spacing and steps offset, else trailing
    schedule: Literal["default", "optimized"] = "default"  # optimized: searched against a many-step teacher
    timesteps: list[int] | None = None  # explicit timesteps, e.g. from an earlier search
    guidance_scale: float | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReferenceSolver(SectionConfig):
    section = "validate.reference"

    name: str = "ddim"
    steps: int = _at_least(1, 100)
    spacing: str = "trailing"


@dataclass
class ValidateSection(SectionConfig):
    section = "validate"

    reference: ReferenceSolver = field(default_factory=ReferenceSolver)
    samples: int = _at_least(2, 64)
    seed: int = 0
    labels: list[int] | None = None  # class-conditional models: labels cycle over these (default: all classes)
    guidance_scale: float | None = None
    # Text-to-image pipelines: the prompts cycle over the samples (zoo:digits-t2i: every digit, by default)
    prompts: list[str] | None = None
    negative_prompt: str | None = None  # None: as diffusers without one ("" encoded, or zeros for SDXL)


@dataclass
class CoremlOptions(SectionConfig):
    """Core ML settings (export.coreml_export); the mobile layout of Apple's ml-stable-diffusion is
    weights palettize6, attention split-einsum, chunk_mb 1000."""
    section = "export.coreml"

    weights: Literal["float", "int8", "palettize6"] = "float"  # float16, int8 linear, or 6-bit k-means palettization
    attention: Literal["original", "split-einsum"] = "original"  # split-einsum: per-head attention for the Neural Engine
    chunk_mb: float | None = None  # the denoiser as chained packages of at most this many MB (1e6 bytes) of weights each

    def __post_init__(self):
        chunk_bytes(self.chunk_mb, "export.coreml.chunk_mb")

    def export_options(self) -> dict:
        return {"weights": self.weights, "attention": self.attention, "chunk_bytes": chunk_bytes(self.chunk_mb, "export.coreml.chunk_mb")}


def chunk_bytes(megabytes: float | None, where: str) -> int | None:
    """A chunk size in MB (1e6 bytes) as bytes; None stays None (no chunking)."""
    if megabytes is None:
        return None
    if isinstance(megabytes, bool) or not isinstance(megabytes, (int, float)) or not megabytes > 0:
        raise UserError(f"{where}: the Core ML chunk size is a positive number of MB, got {megabytes!r}")
    return int(megabytes * 1_000_000)


@dataclass
class ExportSection(SectionConfig):
    section = "export"

    formats: list[Literal["onnx", "coreml", "openvino"]] = field(default_factory=lambda: ["onnx"])
    coreml: CoremlOptions = field(default_factory=CoremlOptions)
    output: Literal["image", "latents"] = "image"  # text-to-image pipelines: the sampler ends in the VAE decoder or not
    resolution: list[int] | None = None  # text-to-image pipelines: [height, width] of the images (default: the UNet's sample size)
    batch_size: int | None = None  # None: dynamic batch
    opset: int = 18


@dataclass
class BenchSection(SectionConfig):
    section = "bench"

    runs: int = _at_least(1, 10)  # timed calls per (artifact, runtime), after 2 warm-up calls
    runtimes: list[str] | None = None  # None: every runtime that can run an artifact here

    def __post_init__(self):
        from runtimes.runners import get_runner

        for name in self.runtimes or []:
            get_runner(name)  # an unknown name is a UserError with a did-you-mean


@dataclass
class ReportSection(SectionConfig):
    section = "report"

    checks: list[str] = field(default_factory=list)


@dataclass
class Recipe(SectionConfig):
    model: ModelSection
    name: str = "recipe"
    seed: int = 0
    solver: SolverSection = field(default_factory=SolverSection)
    # The transforms' sections: their engines' configs check them (compress.pipeline.stage_configs).
    calibration: dict[str, Any] | None = None
    quantize: dict[str, Any] | None = None
    prune: dict[str, Any] | None = None
    slim: dict[str, Any] | None = None
    export: ExportSection | None = None
    validate_: ValidateSection = field(default_factory=ValidateSection, metadata={"key": "validate"})
    bench: BenchSection = field(default_factory=BenchSection)
    report: ReportSection = field(default_factory=ReportSection)

    def section(self, name: str) -> dict:
        """The recipe text that made an artifact, for the manifest."""
        value = getattr(self, "validate_" if name == "validate" else name)
        return value.to_dict() if isinstance(value, SectionConfig) else value


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe is a YAML mapping with at least a 'model' key")
    return Recipe.from_dict(data, where="", source=source)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_recipe(data, str(path))
