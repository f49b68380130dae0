"""Spectrum-aware distillation loss (Spectral Diffusion, CVPR 2023), in three readable terms:

    loss = denoising + lambda_feature * feature matching + lambda_freq * frequency loss

- denoising: MSE between the student's prediction and the true noise (the DDPM loss).
- feature matching: MSE between teacher features and 1x1-projected student features at every
  scale (the projections align the student's narrower widths and are trained with it).
- frequency: sum over frequency bins of w * |DFT(teacher) - DFT(student)|^2, with
  w = |DFT(x0)|^alpha. Natural images put most energy at low frequencies, so alpha = -1
  weights each bin inversely to the image's own energy there: the high frequencies that a
  slim network loses first count as much as the coarse structure.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Magnitudes below this share of the mean magnitude are clamped before the negative power,
# so that a bin where x0 happens to have no energy cannot get an unbounded weight.
MAGNITUDE_FLOOR = 0.05


def spectral_weights(x0: torch.Tensor, alpha: float = -1.0) -> torch.Tensor:
    """w = |DFT(x0)|^alpha per image and channel over the spatial DFT bins, normalised to mean 1."""
    magnitude = torch.fft.fft2(x0.float(), norm="ortho").abs()
    floor = MAGNITUDE_FLOOR * magnitude.mean(dim=(-2, -1), keepdim=True)
    w = torch.maximum(magnitude, floor) ** alpha
    return w / w.mean(dim=(-2, -1), keepdim=True)


def frequency_loss(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over images and channels of sum_bins w * |DFT(teacher) - DFT(student)|^2 / pixels.

    The DFT is orthonormal, so with w = 1 this is exactly the pixel MSE (Parseval): lambda_freq
    reads on the same scale as the denoising loss.
    """
    diff = torch.fft.fft2(teacher.float() - student.float(), norm="ortho")
    per_bin = weights * diff.abs() ** 2
    return per_bin.sum(dim=(-2, -1)).mean() / (student.shape[-1] * student.shape[-2])


def feature_loss(student_features: list[torch.Tensor], teacher_features: list[torch.Tensor], projections: nn.ModuleList) -> torch.Tensor:
    """Multi-scale feature matching: mean over scales of MSE(proj(student), teacher) / mean(teacher^2).

    Dividing by the teacher's own feature energy keeps every scale on the same footing (deep UNet
    features are larger than shallow ones) and keeps lambda_feature * loss below the denoising
    loss's scale, so matching features never outweighs denoising.
    """
    terms = [F.mse_loss(proj(s), t.detach()) / t.detach().pow(2).mean().clamp_min(1e-6)
             for s, t, proj in zip(student_features, teacher_features, projections)]
    return torch.stack(terms).mean()


def high_frequency_share(images: torch.Tensor) -> torch.Tensor:
    """Per image: the share of spectral energy (DC removed) above half the Nyquist frequency.

    A bin is "high" when its radial frequency sqrt(fy^2 + fx^2), in cycles per pixel, exceeds
    0.25 (Nyquist is 0.5).
    """
    x = images.float() - images.float().mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x, norm="ortho").abs() ** 2
    fy = torch.fft.fftfreq(x.shape[-2])[:, None]
    fx = torch.fft.fftfreq(x.shape[-1])[None, :]
    high = (torch.sqrt(fy**2 + fx**2) > 0.25).to(power.dtype)
    total = power.sum(dim=(-3, -2, -1)).clamp_min(1e-12)
    return (power * high).sum(dim=(-3, -2, -1)) / total


def noise_level_weights(schedule, cap: float) -> torch.Tensor:
    """Per-timestep loss weights clamp(sigma_t / alpha_t, 1, cap), normalised to mean 1 over the training timesteps.

    Why: a deterministic sampler integrates the predicted noise against d(sigma/alpha), which is
    huge at high noise, so an epsilon error there grows into a large sample error (slim students
    trained with uniform weights for a few hundred steps diverged under DDIM-100 from t ~ 900 on,
    while their uniform-t loss looked fine). cap = 1 gives the plain DDPM weighting.
    """
    t = np.arange(schedule.num_train_timesteps)
    w = torch.as_tensor(schedule.sigma(t) / schedule.alpha(t), dtype=torch.float64).clamp(1.0, max(1.0, cap))
    return (w / w.mean()).float()


class SpectralDistillationLoss(nn.Module):
    """Holds the feature projections; call with predictions, features and x0 to get the loss terms."""

    def __init__(self, student_widths: list[int], teacher_widths: list[int], lambda_feature: float = 0.1,
                 lambda_freq: float = 0.1, alpha: float = -1.0):
        super().__init__()
        self.projections = nn.ModuleList(nn.Conv2d(s, t, 1) for s, t in zip(student_widths, teacher_widths))
        self.lambda_feature, self.lambda_freq, self.alpha = lambda_feature, lambda_freq, alpha

    def forward(self, student_pred, teacher_pred, noise, x0, student_features=(), teacher_features=(),
                sample_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``sample_weights`` [B] scale each sample's denoising and frequency terms (see `noise_level_weights`)."""
        w = sample_weights.view(-1, *([1] * (student_pred.dim() - 1))) if sample_weights is not None else 1.0
        terms = {"denoise": (w * (student_pred.float() - noise.float()) ** 2).mean()}
        total = terms["denoise"]
        if self.lambda_feature and student_features:
            terms["feature"] = feature_loss(list(student_features), list(teacher_features), self.projections)
            total = total + self.lambda_feature * terms["feature"]
        if self.lambda_freq:
            terms["freq"] = frequency_loss(student_pred, teacher_pred.detach(), w * spectral_weights(x0, self.alpha))
            total = total + self.lambda_freq * terms["freq"]
        terms["total"] = total
        return terms
