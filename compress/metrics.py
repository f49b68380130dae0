"""Sample-quality metrics: Fréchet distance on zoo-classifier features, classifier agreement, PSNR, SSIM."""
from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula)."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():
        # Near-singular covariances: regularise as the FID reference implementation does.
        offset = np.eye(len(cov_a)) * 1e-6
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def psnr(samples: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR over the whole batch, for data in a range of width ``data_range`` ([-1, 1] -> 2)."""
    mse = torch.mean((samples.double() - reference.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * np.log10(data_range**2 / mse)


def ssim(samples: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004: Gaussian window, K1=0.01, K2=0.03) over the batch.

    The window is 11 pixels as in the paper, or the image size when that is smaller (16x16 digits).
    """
    x, y = samples.double(), reference.double()
    channels, size = x.shape[1], min(11, x.shape[-2], x.shape[-1])
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(channels, 1, size, size)

    def blur(t):
        return torch.nn.functional.conv2d(t, window, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(index.mean())


class DigitsJudge:
    """The zoo classifier as a judge of generated digits."""

    def __init__(self, classifier: torch.nn.Module | None = None):
        if classifier is None:
            from compress.zoo import load_classifier

            classifier = load_classifier()
        self.classifier = classifier.eval().cpu()

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        return torch.cat([self.classifier.features(b) for b in images.float().clamp(-1, 1).split(512)]).numpy().astype(np.float64)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier(b).softmax(1) for b in images.float().clamp(-1, 1).split(512)])

    def fd(self, images: torch.Tensor, reference: torch.Tensor) -> float:
        return frechet_distance(self.features(images), self.features(reference))

    def confident_share(self, images: torch.Tensor, threshold: float = 0.9) -> float:
        """Share of images the classifier labels with confidence above the threshold."""
        return float((self.probabilities(images).max(1).values > threshold).float().mean())

    def agreement(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Share of images whose predicted class is the asked one."""
        return float((self.probabilities(images).argmax(1) == labels.cpu()).float().mean())

    def summary(self, images: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        out = {"fd": self.fd(images, reference), "confident_share": self.confident_share(images)}
        if labels is not None:
            out["class_agreement"] = self.agreement(images, labels)
        return out
