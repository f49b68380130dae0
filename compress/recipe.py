"""The recipe: a YAML file validated by a schema. Unknown keys are errors that name the closest valid key."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from compress.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    ref: str
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    sample_shape: list[int] | None = None


class SolverSection(Section):
    name: str = "dpmpp-2m"  # or "model": the model's own scheduler config
    steps: int = Field(8, ge=1)
    spacing: str = "trailing"
    schedule: Literal["default", "optimized"] = "default"  # optimized: searched against a many-step teacher
    timesteps: list[int] | None = None  # explicit timesteps, e.g. from an earlier search
    guidance_scale: float | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class ReferenceSolver(Section):
    name: str = "ddim"
    steps: int = Field(100, ge=1)
    spacing: str = "trailing"


class ValidateSection(Section):
    reference: ReferenceSolver = Field(default_factory=ReferenceSolver)
    samples: int = Field(64, ge=2)
    seed: int = 0
    labels: list[int] | None = None  # class-conditional models: labels cycle over these (default: all classes)
    guidance_scale: float | None = None
    # Text-to-image pipelines: the prompts cycle over the samples (zoo:digits-t2i: every digit, by default)
    prompts: list[str] | None = None
    negative_prompt: str | None = None  # None: as diffusers without one ("" encoded, or zeros for SDXL)


class ExportSection(Section):
    formats: list[Literal["onnx", "coreml", "openvino"]] = Field(default_factory=lambda: ["onnx"])
    output: Literal["image", "latents"] = "image"  # text-to-image pipelines: the sampler ends in the VAE decoder or not
    resolution: list[int] | None = None  # text-to-image pipelines: [height, width] of the images (default: the UNet's sample size)
    batch_size: int | None = None  # None: dynamic batch
    opset: int = 18


class BenchSection(Section):
    runs: int = Field(10, ge=1)  # timed calls per (artifact, runtime), after 2 warm-up calls
    runtimes: list[str] | None = None  # None: every runtime that can run an artifact here

    @field_validator("runtimes")
    @classmethod
    def _known_runtimes(cls, value):
        from runtimes.runners import get_runner

        for name in value or []:
            get_runner(name)  # an unknown name is a UserError with a did-you-mean
        return value


class ReportSection(Section):
    checks: list[str] = Field(default_factory=list)


class Recipe(Section):
    name: str = "recipe"
    seed: int = 0
    model: ModelSection
    solver: SolverSection = Field(default_factory=SolverSection)
    calibration: dict[str, Any] | None = None
    quantize: dict[str, Any] | None = None
    prune: dict[str, Any] | None = None
    slim: dict[str, Any] | None = None
    export: ExportSection | None = None
    validate_: ValidateSection = Field(default_factory=ValidateSection, alias="validate")
    bench: BenchSection = Field(default_factory=BenchSection)
    report: ReportSection = Field(default_factory=ReportSection)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value):
        return {"ref": value} if isinstance(value, str) else value

    def section(self, name: str) -> dict:
        """The recipe text that made an artifact, for the manifest."""
        value = getattr(self, "validate_" if name == "validate" else name)
        return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _submodel(model: type[BaseModel], key: str):
    for name, f in model.model_fields.items():
        if key in (name, f.alias):
            ann = f.annotation
            for candidate in (ann, *getattr(ann, "__args__", ())):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    return candidate
    return None


def _check_keys(data: Any, model: type[BaseModel], where: str) -> None:
    if not isinstance(data, dict):
        return
    valid = _field_names(model)
    for key, value in data.items():
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f" (valid: {', '.join(valid)})"
            raise UserError(f"recipe: unknown key '{where}{key}'{hint}")
        sub = _submodel(model, key)
        if sub is not None:
            _check_keys(value, sub, f"{where}{key}.")


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe is a YAML mapping with at least a 'model' key")
    _check_keys(data, Recipe, "")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if p != "function-before[_model_shorthand(), ModelSection]")
        raise UserError(f"{source}: {where}: {err['msg']}") from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_recipe(data, str(path))
