"""Residual maps as z-scores of what good looks like: statistics of the good validation maps.

"global": one mean and std over every validation pixel (lighting or texture raise the residual
everywhere: the score then measures how unusual a residual is, not how large).
"pixel": a mean and std per position, for aligned objects whose edges always reconstruct
badly; the std is floored at `floor` x the global std so near-constant regions cannot explode.
"""

from __future__ import annotations

import numpy as np
import torch

from defectae.errors import DefectaeError

NORMALIZATIONS = ("none", "global", "pixel")
EPS = 1e-6


class MapStatistics:
    """Running sums of validation maps, in float64, fed a batch at a time."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: np.ndarray | None = None  # (H, W)
        self.sumsq: np.ndarray | None = None

    def add(self, maps: np.ndarray) -> None:
        """Add maps (N, 1, H, W) or (N, H, W)."""
        m = np.asarray(maps, np.float64).reshape(len(maps), *maps.shape[-2:])
        s, q = m.sum(0), np.square(m).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = q if self.sumsq is None else self.sumsq + q
        self.count += len(m)

    def mean_std(self, kind: str, floor: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
        """The (mean, std) to normalise with: scalars (1, 1) for "global", (H, W) maps for "pixel"."""
        if kind not in NORMALIZATIONS[1:]:
            raise DefectaeError(
                f"tile.normalize '{kind}': expected one of {', '.join(NORMALIZATIONS)}"
            )
        if self.count == 0 or self.sum is None or self.sumsq is None:
            raise DefectaeError(
                f"tile.normalize '{kind}': needs good validation images, and the validation split "
                "is empty; set dataset.val_fraction > 0"
            )
        pixels = self.count * self.sum.size
        g_mean = self.sum.sum() / pixels
        g_std = max(np.sqrt(max(self.sumsq.sum() / pixels - g_mean**2, 0.0)), EPS)
        if kind == "global":
            mean, std = np.full((1, 1), g_mean), np.full((1, 1), g_std)
        else:
            mean = self.sum / self.count
            std = np.sqrt(np.maximum(self.sumsq / self.count - mean**2, 0.0))
            std = np.maximum(std, max(floor * g_std, EPS))
        return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(std.astype(np.float32))


def normalize_maps(maps: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) maps as z-scores: (map - mean) / std, mean and std broadcast from (h, w)."""
    return (maps - mean.reshape(1, 1, *mean.shape[-2:])) / std.reshape(1, 1, *std.shape[-2:])
