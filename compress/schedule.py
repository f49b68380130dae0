"""Noise schedules: how a trained model mixes data and noise, x_t = alpha(t) * x_0 + sigma(t) * noise.

Two families, one interface (``kind``, ``num_train_timesteps``, ``alpha``, ``sigma``,
``alpha_sigma``, ``add_noise``, ``fingerprint``, ``describe``):

- `NoiseSchedule`, variance preserving: the discrete alphas_cumprod of a DDPM-style model.
  Betas are built exactly as diffusers builds them (float32, then cumprod in float32) so that a
  schedule read from a scheduler config gives bit-identical levels; everything derived from it
  is then computed in float64.
- `FlowSchedule`, rectified flow: x_t = (1 - s) x_0 + s noise with s = t / num_train_timesteps,
  the network's timestep. Its `shift` (SD3's static one, or FLUX's resolution-dependent
  ``exp(mu)``) moves where sampling spends its steps, not what a timestep means.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from compress.errors import UserError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float32)


def _per_sample(values: torch.Tensor, dims: int) -> torch.Tensor:
    return values.view((-1,) + (1,) * (dims - 1))


@dataclass(frozen=True)
class NoiseSchedule:
    """x_t = alpha_t * x_0 + sigma_t * eps with alpha_t^2 = alphas_cumprod[t] (variance preserving)."""

    alphas_cumprod: np.ndarray  # float64, [T]
    kind = "vp"

    @classmethod
    def from_betas(
        cls,
        beta_schedule: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        trained_betas=None,
    ) -> "NoiseSchedule":
        if trained_betas is not None:
            betas = torch.tensor(trained_betas, dtype=torch.float32)
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            betas = _cosine_betas(num_train_timesteps)
        else:
            raise UserError(f"unknown beta schedule {beta_schedule!r}; expected one of {', '.join(BETA_SCHEDULES)}")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        return cls(alphas_cumprod.double().numpy())

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "NoiseSchedule":
        return cls.from_betas(
            config.get("beta_schedule", "linear"),
            config.get("num_train_timesteps", 1000),
            config.get("beta_start", 0.0001),
            config.get("beta_end", 0.02),
            config.get("trained_betas"),
        )

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def alpha(self, t) -> np.ndarray:
        return np.sqrt(self.alphas_cumprod[np.asarray(t, dtype=np.int64)])

    def sigma(self, t) -> np.ndarray:
        return np.sqrt(1.0 - self.alphas_cumprod[np.asarray(t, dtype=np.int64)])

    def alpha_sigma(self, t: torch.Tensor, dims: int = 4, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t and sigma_t per sample as float32 tensors that broadcast over a batch of ``dims`` dimensions.

        Taken in float32 from float32 levels, as diffusers' add_noise takes them: what training used."""
        acp = torch.as_tensor(self.alphas_cumprod, dtype=torch.float32, device=device)[t]
        return _per_sample(acp.sqrt(), dims), _per_sample((1 - acp).sqrt(), dims)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t, x0.dim(), x0.device)
        return alpha * x0 + sigma * noise

    def fingerprint(self) -> str:
        """Short stable id of the schedule, stored with artifacts and calibration sets."""
        import hashlib

        return hashlib.sha256(np.ascontiguousarray(self.alphas_cumprod).tobytes()).hexdigest()[:16]

    def describe(self) -> dict:
        return {"kind": self.kind, "num_train_timesteps": self.num_train_timesteps}


def shift_sigmas(sigmas, shift: float):
    """SD3's timestep shift, s' = shift * s / (1 + (shift - 1) * s); FLUX's exponential shift by mu is shift = exp(mu)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def dynamic_shift(sequence_length: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift: exp(mu), mu linear in the image's token count (diffusers' calculate_shift)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(sequence_length * slope + base_shift - slope * base_seq_len)


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow: x_t = (1 - s) x_0 + s noise, s = t / num_train_timesteps (FlowMatchEulerDiscreteScheduler).

    `shift` is the static shift the sampling levels go through. A model with dynamic shifting
    (`dynamic` holds diffusers' base/max shift and sequence lengths) gets its shift from the
    image's token count when it is loaded at a resolution (`at_sequence_length`).
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    dynamic: tuple[tuple[str, float], ...] | None = None  # (name, value) pairs of calculate_shift's arguments
    kind = "flow"

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "FlowSchedule":
        dynamic = None
        if config.get("use_dynamic_shifting"):
            keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
            defaults = (256, 4096, 0.5, 1.15)
            dynamic = tuple((k, float(config.get(k) if config.get(k) is not None else d)) for k, d in zip(keys, defaults))
        shift = config.get("shift", config.get("flow_shift", 1.0))
        return cls(int(config.get("num_train_timesteps", 1000)), float(shift), dynamic)

    @classmethod
    def from_description(cls, d: dict) -> "FlowSchedule":
        """The inverse of `describe`."""
        dynamic = d.get("dynamic_shifting")
        return cls(int(d["num_train_timesteps"]), float(d["shift"]), tuple(dynamic.items()) if dynamic else None)

    def at_sequence_length(self, tokens: int) -> "FlowSchedule":
        """The static shift a dynamically shifted model samples with at ``tokens`` image tokens."""
        if self.dynamic is None:
            return self
        d = dict(self.dynamic)
        shift = dynamic_shift(tokens, int(d["base_image_seq_len"]), int(d["max_image_seq_len"]), d["base_shift"], d["max_shift"])
        return FlowSchedule(self.num_train_timesteps, shift, self.dynamic)

    def sigma(self, t) -> np.ndarray:
        return np.asarray(t, dtype=np.float64) / self.num_train_timesteps

    def alpha(self, t) -> np.ndarray:
        return 1.0 - self.sigma(t)

    def alpha_sigma(self, t: torch.Tensor, dims: int = 4, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = torch.as_tensor(t, dtype=torch.float32, device=device) / self.num_train_timesteps
        return _per_sample(1 - sigma, dims), _per_sample(sigma, dims)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t, x0.dim(), x0.device)
        return alpha * x0 + sigma * noise

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(repr(("flow", self.num_train_timesteps, round(self.shift, 12), self.dynamic)).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        return {"kind": self.kind, "num_train_timesteps": self.num_train_timesteps, "shift": self.shift,
                "dynamic_shifting": dict(self.dynamic) if self.dynamic else None}


Schedule = NoiseSchedule | FlowSchedule
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


def is_flow_scheduler_config(config: dict) -> bool:
    return config.get("_class_name") in FLOW_SCHEDULERS or bool(config.get("use_flow_sigmas")) or config.get("prediction_type") == "flow_prediction"


def prediction_type_of(config: dict, default: str = "epsilon") -> str:
    """The denoiser's parametrization a scheduler config implies: a flow's velocity, else its prediction_type."""
    return "flow" if is_flow_scheduler_config(config) else config.get("prediction_type", default)


def schedule_from_scheduler_config(config: dict) -> Schedule:
    """The schedule a diffusers scheduler config describes: rectified flow for the flow-matching ones, else VP."""
    return FlowSchedule.from_scheduler_config(config) if is_flow_scheduler_config(config) else NoiseSchedule.from_scheduler_config(config)
