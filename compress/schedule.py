"""Noise schedules: the discrete alphas_cumprod of a trained model and what follows from it.

Betas are built exactly as diffusers builds them (float32, then cumprod in float32) so that a
schedule read from a scheduler config gives bit-identical levels; everything derived from it
is then computed in float64.
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


@dataclass(frozen=True)
class NoiseSchedule:
    """x_t = alpha_t * x_0 + sigma_t * eps with alpha_t^2 = alphas_cumprod[t] (variance preserving)."""

    alphas_cumprod: np.ndarray  # float64, [T]

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
        shape = (-1,) + (1,) * (dims - 1)
        return acp.sqrt().view(shape), (1 - acp).sqrt().view(shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t, x0.dim(), x0.device)
        return alpha * x0 + sigma * noise

    def fingerprint(self) -> str:
        """Short stable id of the schedule, stored with artifacts and calibration sets."""
        import hashlib

        return hashlib.sha256(np.ascontiguousarray(self.alphas_cumprod).tobytes()).hexdigest()[:16]
