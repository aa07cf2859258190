"""Residual maps (how badly each pixel was reconstructed) and image anomaly scores.

Every map is (B, 1, H, W) float32, larger = more anomalous; colour images are averaged over
channels. Residuals, weighted by `tile.residual` {name: weight}:
    ssim    1 - local SSIM (window, Gaussian or uniform weights, k1, k2 from the profile)
    l2      squared error
    l1      absolute error
    msssim  1 - mean of the local SSIM maps at scales 1, 1/2 and 1/4 (2x2 average pooling),
            each upsampled bilinearly back to H x W; scales smaller than the window are skipped.
Then optional Gaussian smoothing (`tile.smooth_sigma`, scipy.ndimage's 'reflect' borders).
Settings are plain keyword arguments; the commands unpack them from the profile's [tile].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from defectae.core.ragged import Ragged
from defectae.core.ssim import gaussian_kernel1d, separable_filter, ssim_map
from defectae.errors import DefectaeError

RESIDUALS = ("ssim", "l2", "l1", "msssim")
MSSSIM_SCALES = 3


DEFAULT_RESIDUAL = {"ssim": 1.0}


def residual_weights(residual: Mapping[str, float]) -> dict[str, float]:
    """The residuals with a positive weight; unknown names and negative weights are user errors."""
    valid = ", ".join(RESIDUALS)
    for name, weight in residual.items():
        if name not in RESIDUALS:
            raise DefectaeError(f"tile.residual.{name}: unknown residual; expected one of {valid}")
        if weight < 0:
            raise DefectaeError(f"tile.residual.{name}: weight {weight} must not be negative")
    weights = {name: float(w) for name, w in residual.items() if w > 0}
    if not weights:
        raise DefectaeError(
            f"tile.residual: expected a positive weight for at least one of {valid}"
        )
    return weights


def _ssim(x: torch.Tensor, recon: torch.Tensor, ssim: Mapping[str, float | bool]) -> torch.Tensor:
    """Channel-mean local SSIM index: (B, 1, H, W)."""
    return ssim_map(x, recon, **ssim, data_range=1.0).mean(1, keepdim=True)


def residual_ssim(x: torch.Tensor, recon: torch.Tensor, **ssim: float | bool) -> torch.Tensor:
    """1 - local SSIM, as scikit-image's structural_similarity(full=True) computes it.

    `ssim` takes ssim_map's window, gaussian, sigma, k1 and k2.
    """
    return 1.0 - _ssim(x, recon, ssim)


def residual_msssim(x: torch.Tensor, recon: torch.Tensor, **ssim: float | bool) -> torch.Tensor:
    """1 - mean of the local SSIM maps at scales 1, 1/2, 1/4, upsampled back to full size."""
    size = (int(x.shape[2]), int(x.shape[3]))
    window = int(ssim.get("window", 11))
    maps = []
    for level in range(MSSSIM_SCALES):
        if level and min(int(x.shape[2]), int(x.shape[3])) < window:
            break
        s = _ssim(x, recon, ssim)
        maps.append(
            s if level == 0 else F.interpolate(s, size=size, mode="bilinear", align_corners=False)
        )
        x, recon = F.avg_pool2d(x, 2), F.avg_pool2d(recon, 2)
    return 1.0 - torch.stack(maps).mean(0)


def residual_l2(x: torch.Tensor, recon: torch.Tensor, **_: float | bool) -> torch.Tensor:
    """Channel-mean squared error."""
    return (x - recon).square().mean(1, keepdim=True)


def residual_l1(x: torch.Tensor, recon: torch.Tensor, **_: float | bool) -> torch.Tensor:
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


def residual_map(
    x: torch.Tensor,
    recon: torch.Tensor,
    *,
    residual: Mapping[str, float] = DEFAULT_RESIDUAL,
    ssim_window: int = 11,
    ssim_gaussian: bool = True,
    ssim_sigma: float = 1.5,
    ssim_k1: float = 0.01,
    ssim_k2: float = 0.03,
    smooth_sigma: float = 0.0,
) -> torch.Tensor:
    """The weighted residual of (B, C, H, W) images and reconstructions: (B, 1, H, W) float32."""
    weights = residual_weights(residual)
    x, recon = x.float(), recon.float()
    side = min(int(x.shape[2]), int(x.shape[3]))
    if ("ssim" in weights or "msssim" in weights) and ssim_window > side:
        raise DefectaeError(f"tile.ssim_window {ssim_window}: larger than the image side {side}")
    ssim = {"window": ssim_window, "gaussian": ssim_gaussian, "sigma": ssim_sigma}
    ssim.update(k1=ssim_k1, k2=ssim_k2)
    total = None
    for name, weight in weights.items():
        term = _RESIDUAL[name](x, recon, **ssim)
        term = term if weight == 1.0 else weight * term
        total = term if total is None else total + term
    assert total is not None
    return smooth(total, smooth_sigma) if smooth_sigma > 0 else total


def residual_reach(
    residual: Mapping[str, float] = DEFAULT_RESIDUAL,
    ssim_window: int = 11,
    smooth_sigma: float = 0.0,
    **_: object,
) -> int:
    """How many pixels away a map value still depends on the image: the SSIM window's radius
    (x4 for the coarsest MS-SSIM scale) plus two smoothing sigmas. Takes residual_map's kwargs."""
    weights = residual_weights(residual)
    radius = ssim_window // 2
    reach = 4 * radius if "msssim" in weights else radius if "ssim" in weights else 0
    return reach + math.ceil(2.0 * smooth_sigma)


SCORES = ("max", "topk", "area")


def image_scores(
    maps: torch.Tensor,
    *,
    score: str = "max",
    topk_percent: float = 1.0,
    area_threshold: float = 3.0,
    margin: int = 0,
) -> torch.Tensor:
    """Anomaly score per image, (B, 1, H, W) -> (B,): the map's maximum ("max"), the mean of its
    top k% ("topk"), or the share of pixels above `area_threshold` ("area", e.g. z > 3 on
    normalised maps), over the map without a frame of `margin` pixels."""
    if score not in SCORES:
        raise DefectaeError(f"tile.score '{score}': expected one of {', '.join(SCORES)}")
    if margin > 0:
        h, w = int(maps.shape[2]), int(maps.shape[3])
        if 2 * margin >= min(h, w):
            raise DefectaeError(
                f"tile.score_margin {margin}: leaves nothing of a {h}x{w} map to score"
            )
        maps = maps[:, :, margin : h - margin, margin : w - margin]
    flat = maps.flatten(1)  # (B, H * W)
    if score == "max":
        return flat.amax(1)
    if score == "area":
        return (flat > area_threshold).float().mean(1)
    k = max(1, math.ceil(int(flat.shape[1]) * topk_percent / 100.0))
    return flat.topk(k, dim=1).values.mean(1)


BORDER_BAND = 8  # pixels: the frame whose excess `BorderExcess` measures


class BorderExcess:
    """How much a set of (good) maps is raised at the image border, inside the frame the image
    score ignores (`margin`), accumulated batch by batch: the mean within `band` pixels of the
    border over the mean elsewhere ("ratio"), and the share of maps whose maximum lies within
    it ("maxima_share"; about 4 x band / side for maps without border excess)."""

    def __init__(self, margin: int = 0, band: int = BORDER_BAND) -> None:
        self.margin, self.band = margin, band
        self.edge_sum = self.inner_sum = 0.0
        self.edge_count = self.inner_count = self.maps = self.at_edge = 0

    def add(self, maps: torch.Tensor) -> None:
        """(B, 1, H, W) maps."""
        m, b = self.margin, self.band
        h, w = int(maps.shape[2]), int(maps.shape[3])
        maps = maps[:, 0, m : h - m, m : w - m].double()
        edge = torch.zeros(maps.shape[1:], dtype=torch.bool)
        edge[:b], edge[-b:], edge[:, :b], edge[:, -b:] = True, True, True, True
        self.edge_sum += float(maps[:, edge].sum())
        self.inner_sum += float(maps[:, ~edge].sum())
        self.edge_count += int(edge.sum()) * len(maps)
        self.inner_count += int((~edge).sum()) * len(maps)
        self.at_edge += int(edge.flatten()[maps.flatten(1).argmax(1)].sum())
        self.maps += len(maps)

    def result(self) -> dict[str, Any]:
        inner = self.inner_sum / max(self.inner_count, 1)
        edge = self.edge_sum / max(self.edge_count, 1)
        return {
            "ratio": edge / inner if inner > 0 else float("inf"),
            "maxima_share": self.at_edge / max(self.maps, 1),
            "band": self.band,
            "maps": self.maps,
        }


def resize_map(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps (B, 1, H, W) resized bilinearly (align_corners=False) to `size` = (H, W), as float32:
    the one way a map goes back to its image's original resolution."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def upsample_maps(maps: np.ndarray, sizes: np.ndarray) -> Ragged:
    """Each map of (N, H, W) resized to its image's original (H, W) in `sizes` (N, 2), packed
    flat as float32, for pixel metrics over every original pixel (MVTec AD protocol)."""
    sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
    if len(sizes) != len(maps):
        raise ValueError(f"{len(maps)} maps but {len(sizes)} sizes")
    out = Ragged(np.empty(int(sizes.prod(axis=1).sum()), np.float32), sizes)
    with torch.no_grad():
        for i, (h, w) in enumerate(sizes.tolist()):
            m = torch.from_numpy(np.asarray(maps[i], np.float32))[None, None]  # (1, 1, H, W)
            out[i][...] = resize_map(m, (h, w))[0, 0].numpy()
    return out
