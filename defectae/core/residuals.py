"""Residual maps (how badly each pixel was reconstructed) and image anomaly scores.

Every map is (B, 1, H, W) float32, larger = more anomalous; colour images are averaged over
channels. Residuals, weighted by `tile.residual` {name: weight}:
    ssim    1 - local SSIM (window, Gaussian or uniform weights, k1, k2 from the profile)
    l2      squared error
    l1      absolute error
    msssim  1 - mean of the local SSIM maps at scales 1, 1/2 and 1/4 (2x2 average pooling),
            each upsampled bilinearly back to H x W; scales smaller than the window are skipped.
Then optional Gaussian smoothing (`tile.smooth_sigma`, scipy.ndimage's 'reflect' borders).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from defectae.core.ssim import gaussian_kernel1d, separable_filter, ssim_map
from defectae.errors import DefectaeError
from defectae.profiles import TileConfig

RESIDUALS = ("ssim", "l2", "l1", "msssim")
MSSSIM_SCALES = 3


def residual_weights(cfg: TileConfig) -> dict[str, float]:
    """The residuals with a positive weight; unknown names and negative weights are user errors."""
    valid = ", ".join(RESIDUALS)
    for name, weight in cfg.residual.items():
        if name not in RESIDUALS:
            raise DefectaeError(f"tile.residual.{name}: unknown residual; expected one of {valid}")
        if weight < 0:
            raise DefectaeError(f"tile.residual.{name}: weight {weight} must not be negative")
    weights = {name: float(w) for name, w in cfg.residual.items() if w > 0}
    if not weights:
        raise DefectaeError(
            f"tile.residual: expected a positive weight for at least one of {valid}"
        )
    return weights


def _ssim(x: torch.Tensor, recon: torch.Tensor, cfg: TileConfig) -> torch.Tensor:
    """Channel-mean local SSIM: (B, 1, H, W)."""
    s = ssim_map(
        x, recon, cfg.ssim_window, cfg.ssim_gaussian, cfg.ssim_sigma, cfg.ssim_k1, cfg.ssim_k2, 1.0
    )
    return s.mean(1, keepdim=True)


def residual_ssim(x: torch.Tensor, recon: torch.Tensor, cfg: TileConfig) -> torch.Tensor:
    """1 - local SSIM, as scikit-image's structural_similarity(full=True) computes it."""
    return 1.0 - _ssim(x, recon, cfg)


def residual_msssim(x: torch.Tensor, recon: torch.Tensor, cfg: TileConfig) -> torch.Tensor:
    """1 - mean of the local SSIM maps at scales 1, 1/2, 1/4, upsampled back to full size."""
    size = (int(x.shape[2]), int(x.shape[3]))
    maps = []
    for level in range(MSSSIM_SCALES):
        if level and min(int(x.shape[2]), int(x.shape[3])) < cfg.ssim_window:
            break
        s = _ssim(x, recon, cfg)
        maps.append(
            s if level == 0 else F.interpolate(s, size=size, mode="bilinear", align_corners=False)
        )
        x, recon = F.avg_pool2d(x, 2), F.avg_pool2d(recon, 2)
    return 1.0 - torch.stack(maps).mean(0)


def residual_l2(x: torch.Tensor, recon: torch.Tensor, cfg: TileConfig) -> torch.Tensor:
    """Channel-mean squared error."""
    return (x - recon).square().mean(1, keepdim=True)


def residual_l1(x: torch.Tensor, recon: torch.Tensor, cfg: TileConfig) -> torch.Tensor:
    """Channel-mean absolute error."""
    return (x - recon).abs().mean(1, keepdim=True)


_RESIDUAL = {"ssim": residual_ssim, "l2": residual_l2, "l1": residual_l1, "msssim": residual_msssim}


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing like scipy.ndimage.gaussian_filter(mode='reflect', truncate=4)."""
    radius = int(4.0 * sigma + 0.5)
    side = min(int(maps.shape[2]), int(maps.shape[3]))
    if radius >= side:
        raise DefectaeError(
            f"tile.smooth_sigma {sigma}: the kernel radius {radius} is not smaller than the image side {side}"
        )
    return separable_filter(maps, gaussian_kernel1d(sigma, truncate=4.0, device=maps.device))


def residual_map(x: torch.Tensor, recon: torch.Tensor, cfg: TileConfig) -> torch.Tensor:
    """The weighted residual of (B, C, H, W) images and reconstructions: (B, 1, H, W) float32."""
    weights = residual_weights(cfg)
    x, recon = x.float(), recon.float()
    side = min(int(x.shape[2]), int(x.shape[3]))
    if ("ssim" in weights or "msssim" in weights) and cfg.ssim_window > side:
        raise DefectaeError(
            f"tile.ssim_window {cfg.ssim_window}: larger than the image side {side}"
        )
    total = None
    for name, weight in weights.items():
        term = _RESIDUAL[name](x, recon, cfg)
        term = term if weight == 1.0 else weight * term
        total = term if total is None else total + term
    assert total is not None
    return smooth(total, cfg.smooth_sigma) if cfg.smooth_sigma > 0 else total


def image_scores(maps: torch.Tensor, cfg: TileConfig) -> torch.Tensor:
    """Anomaly score per image, (B, 1, H, W) -> (B,): the map's maximum, or the mean of its top k%."""
    flat = maps.flatten(1)  # (B, H * W)
    if cfg.score == "max":
        return flat.amax(1)
    k = max(1, math.ceil(int(flat.shape[1]) * cfg.topk_percent / 100.0))
    return flat.topk(k, dim=1).values.mean(1)
