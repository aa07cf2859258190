"""The latent space of VAE families: per-image codes, prior samples, and a Gaussian of good codes.

A test image's latent score is the Mahalanobis distance of its code (the encoder's mean, "mu")
to a Gaussian fitted on the codes of good training images. Its covariance is the Ledoit-Wolf
shrinkage estimate, which stays invertible when codes have more dimensions than there are images.
A tiled VAE's image code is the mean of its tiles' codes: one point per image in one space, so
the PCA figure, the fit and the score all see the same kind of vector, whatever the tiling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectae.core import metrics
from defectae.core.tiling import extract_patches

LATENT_METRICS = ("latent_image_auroc", "latent_image_auprc", "latent_image_f1_max")
MIN_FIT_CODES = 2  # a covariance needs two codes at least


def image_codes(
    model: nn.Module, images: torch.Tensor, patch: int, stride: int, whole_image: bool
) -> torch.Tensor:
    """Flattened latent means (B, D) of images (B, C, H, W) in [0, 1]: the whole image's code
    (resized to the model's input as the inspector does), or the mean over its tiles' codes."""
    b = images.shape[0]
    if whole_image:
        if images.shape[-2:] != (patch, patch):
            images = F.interpolate(
                images, size=(patch, patch), mode="bilinear", align_corners=False
            )
        return model(images)["mu"].float().flatten(1)
    tiles = extract_patches(images, patch, stride)  # (B * N, C, patch, patch), image-major
    mu = model(tiles)["mu"].float().flatten(1)  # (B * N, D)
    return mu.reshape(b, -1, mu.shape[1]).mean(dim=1)


def decode(model: nn.Module, z: torch.Tensor) -> torch.Tensor | None:
    """Images (B, C, H, W) in [0, 1] decoded from latent samples z by the decoder alone, or None
    when the decoder also needs the encoder's features (the skip variants vae5, vae6, vae8)."""
    if getattr(model, "merges", None):  # the skip variants' decoder merges encoder features
        return None
    decode_fn = getattr(model, "decode", None)
    return None if decode_fn is None else decode_fn(z)


def prior_samples(
    model: nn.Module, shape: tuple[int, ...], n: int, seed: int, device: torch.device
) -> torch.Tensor | None:
    """`n` images decoded from z ~ N(0, I) of the latent `shape` (fixed seed), or None (see decode)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *shape), generator=g).to(device)
    out = decode(model, z)
    return None if out is None else out.float().clamp(0.0, 1.0).cpu()


@dataclass(frozen=True)
class Gaussian:
    """A Gaussian in code space: its mean (D,) and precision matrix (D, D)."""

    mean: np.ndarray
    precision: np.ndarray


def fit_gaussian(codes: np.ndarray) -> Gaussian:
    """The Ledoit-Wolf Gaussian of codes (N, D), N >= 2."""
    if len(codes) < MIN_FIT_CODES:
        raise ValueError(f"fitting a Gaussian needs {MIN_FIT_CODES} codes, got {len(codes)}")
    from sklearn.covariance import LedoitWolf  # 1 s to import: only when a VAE is scored

    lw = LedoitWolf().fit(np.asarray(codes, np.float64))
    return Gaussian(lw.location_, lw.precision_)


def mahalanobis(codes: np.ndarray, gaussian: Gaussian) -> np.ndarray:
    """Mahalanobis distance (N,) of each code (N, D) to the Gaussian."""
    diff = np.asarray(codes, np.float64) - gaussian.mean
    squared = np.einsum("ij,jk,ik->i", diff, gaussian.precision, diff)
    return np.sqrt(np.maximum(squared, 0.0))


@dataclass(frozen=True)
class Projection:
    """A 2-D PCA: the mean it centres with, the components (2, D) and their variance ratios (2,)."""

    mean: np.ndarray
    components: np.ndarray
    explained_ratio: np.ndarray

    def transform(self, codes: np.ndarray) -> np.ndarray:
        """Codes (N, D) -> (N, 2)."""
        return (np.asarray(codes, np.float64) - self.mean) @ self.components.T


def pca_2d(codes: np.ndarray) -> Projection:
    """The first two principal components of codes (N, D), signs fixed so that each component's
    largest entry is positive; a missing component (N < 3 or D < 2) is all zero."""
    x = np.asarray(codes, np.float64)
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    k = min(2, len(s))
    components = np.zeros((2, x.shape[1]))
    components[:k] = vt[:k]
    rows = np.arange(k)
    components[:k] *= np.sign(components[rows, np.abs(components[:k]).argmax(axis=1)])[:, None]
    variance = s**2
    ratio = np.zeros(2)
    if variance.sum() > 0:
        ratio[:k] = variance[:k] / variance.sum()
    return Projection(mean, components, ratio)


def latent_metrics(
    scores: np.ndarray | None, labels: np.ndarray, types: list[str], reason: str = ""
) -> tuple[metrics.MetricSet, dict[str, metrics.MetricSet]]:
    """Image AUROC, AUPRC and F1-max of latent scores, overall and per defect type (each type's
    images with all good ones, as core.metrics.compute_all); undefined with `reason` when None."""
    labels = np.asarray(labels).astype(bool)
    kinds = np.asarray(types)
    names = sorted(set(kinds[labels].tolist()))

    def one(sel: np.ndarray) -> metrics.MetricSet:
        if scores is None:
            return {name: metrics.Metric.undefined(reason) for name in LATENT_METRICS}
        curve = metrics.rank_curve(np.asarray(scores, np.float64)[sel], labels[sel])
        values = (metrics.auroc(curve), metrics.average_precision(curve), metrics.f1_max(curve).f1)
        return dict(zip(LATENT_METRICS, values, strict=True))

    overall = one(np.ones(len(labels), bool))
    return overall, {t: one(((kinds == t) & labels) | ~labels) for t in names}
