"""`CalibrationConfig`: how a calibration set is drawn. A plain dataclass, so that the recipe's
``calibration`` section is simply ``CalibrationConfig(**section)``."""
from __future__ import annotations

from dataclasses import dataclass

from compress.errors import UserError, unknown_choice
from compress.section_config import SectionConfig

SAMPLERS = ("ndtc", "uniform", "solver")


@dataclass
class CalibrationConfig(SectionConfig):
    """Which network inputs (x_t, t, cond) to record, and from how many trajectories.

    sampler   'ndtc': PTQ4DM's normally distributed timesteps, t ~ Normal(mean, std) in fractions
              of T (clamped to the schedule), one trajectory per sample;
              'uniform': Q-Diffusion's fixed interval, t = T-1, T-1-interval, ... on every trajectory;
              'solver': exactly the timesteps the baked solver evaluates the network at.
    samples   recorded states (before guidance doubles them into conditional + unconditional inputs).
    trajectory_steps  the fine full-precision DDIM chain the states are taken from.
    guidance_scale    classifier-free guidance along that chain (conditional models); with guidance
              every state is recorded twice, with its condition and with the null condition.
    """

    section = "calibration"

    sampler: str = "ndtc"
    samples: int = 256
    seed: int = 0
    mean: float = 0.4  # ndtc: PTQ4DM's published script (its code's defaults are 0.5 / 0.35)
    std: float = 0.4
    interval: int | None = None  # uniform: training timesteps between recorded states (default T // 20)
    trajectory_steps: int = 100
    guidance_scale: float | None = None
    batch_size: int = 64
    prompts: list[str] | None = None  # text-to-image pipelines: the trajectories' prompts, cycled (default: the validation prompts)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "CalibrationConfig":
        if self.sampler not in SAMPLERS:
            raise unknown_choice("calibration sampler", self.sampler, SAMPLERS)
        for name in ("samples", "trajectory_steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"calibration {name} must be a positive integer, got {value!r}")
        if not self.std > 0:
            raise UserError(f"calibration std must be positive, got {self.std!r}")
        if self.interval is not None and (not isinstance(self.interval, int) or self.interval < 1):
            raise UserError(f"calibration interval must be a positive number of timesteps, got {self.interval!r}")
        return self
