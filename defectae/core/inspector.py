"""The whole-image inspector: tile, reconstruct, fuse, residual map and image score in one module.

`tile-test` runs it eagerly and `export` traces it, so the deployable graph is the same code.
Whole-image models (registry `Family.whole_image`, e.g. the AITEX VAEs) skip tiling; an image
of another size than the model's input (`patch_size`) is resized bilinearly to it and the
reconstruction resized back, so the residual is always at the image's own resolution.
Feature-space models (models/featurespace.py) return their own anomaly map ("map"),
which takes the residual's place: it is fused, resized and smoothed the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectae.core.normalize import normalize_maps
from defectae.core.residuals import (
    DEFAULT_RESIDUAL,
    image_scores,
    residual_map,
    residual_reach,
    residual_weights,
    smooth,
)
from defectae.core.tiling import extract_patches, fuse_patches, fusion_window, tile_origins
from defectae.errors import DefectaeError


class Inspector(nn.Module):
    """image (B, C, H, W) in [0, 1] -> (residual (B, 1, H, W), score (B,), recon (B, C, H, W)).

    Tiles are fused with `fusion` weights (core.tiling.fusion_window). The image is first
    reflect-padded by `border_pad` pixels (-1: half a patch plus the residual's reach), so that
    its border lies inside tiles rather than on their edges, where a model reconstructs worst,
    and the residual's filters see neighbours there; the maps are cropped back to H x W. `normalization`, the
    (mean, std) of good validation maps (scalars or (H, W) maps), turns the residual into a
    z-score before the image score, so an export scores exactly as tile-test does.

    `residual_options` are `residual_map`'s keyword arguments, `score_options` `image_scores`'.
    Patches go through the model in chunks of `batch_size` (0 = all at once, e.g. for an export
    with a dynamic batch axis). Shapes are read as Python ints, so a trace is valid for one H x W.
    ONNX: `torch.onnx.export(..., dynamo=True)` (the TorchScript-based exporter cannot export
    the unfold and padding with a dynamic batch).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        patch_size: int,
        stride: int,
        whole_image: bool = False,
        batch_size: int = 0,
        fusion: str = "uniform",
        border_pad: int = 0,
        residual_options: Mapping[str, Any] | None = None,
        score_options: Mapping[str, Any] | None = None,
        normalization: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.residual_options = dict(residual_options or {})
        self.score_options = dict(score_options or {})
        residual_weights(self.residual_options.get("residual", DEFAULT_RESIDUAL))  # fail early
        if not whole_image:
            tile_origins(patch_size, patch_size, stride)  # checks the stride against the patch
        self.model = model
        self.register_buffer("window", None if whole_image else fusion_window(patch_size, fusion))
        self.register_buffer("norm_mean", None)
        self.register_buffer("norm_std", None)
        if normalization is not None:
            self.normalize_with(*normalization)
        self.patch_size = patch_size
        self.stride = stride
        self.whole_image = whole_image
        self.batch_size = batch_size
        self.auto_pad = border_pad < 0
        if self.auto_pad:
            border_pad = patch_size // 2 + residual_reach(**self.residual_options)
        self.border_pad = 0 if whole_image else border_pad

    def normalize_with(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """From now on, return maps as z-scores of these good-image statistics (core.normalize)."""
        self.norm_mean, self.norm_std = mean.float(), std.float()

    def run_model(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The model's float32 anomaly "map" on model-sized inputs, in chunks, if it makes one
        (feature-space models; True), else its "recon" (False)."""
        n = x.shape[0]
        step = self.batch_size if self.batch_size > 0 else n
        outs = (
            [self.model(x)]
            if n <= step
            else [self.model(x[i : i + step]) for i in range(0, n, step)]
        )
        key = "map" if "map" in outs[0] else "recon"
        if len(outs) == 1:
            return outs[0][key].float(), key == "map"
        return torch.cat([o[key].float() for o in outs]), key == "map"

    def anomaly_map(self, x: torch.Tensor, out: torch.Tensor, is_map: bool) -> torch.Tensor:
        """The model's own map (smoothed as a residual would be), or the residual of its recon."""
        if is_map:
            sigma = self.residual_options.get("smooth_sigma", 0.0)
            return smooth(out, sigma) if sigma > 0 else out
        return residual_map(x, out, **self.residual_options)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = image.float()
        h, w = int(x.shape[2]), int(x.shape[3])
        size = self.patch_size
        if self.whole_image:
            if (h, w) == (size, size):
                out, is_map = self.run_model(x)
            else:
                small = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
                out, is_map = self.run_model(small)
                out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
            residual = self.anomaly_map(x, out, is_map)
            recon = x if is_map else out
        else:
            pad = min(self.border_pad, min(h, w) - 1) if self.auto_pad else self.border_pad
            if pad >= min(h, w):
                raise DefectaeError(
                    f"tile.border_pad {pad}: must be smaller than the image side {min(h, w)}"
                )
            xp = F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad > 0 else x
            hp, wp = h + 2 * pad, w + 2 * pad
            patches = extract_patches(xp, size, self.stride)  # (B * N, C, size, size)
            out, is_map = self.run_model(patches)
            out = fuse_patches(out, (hp, wp), size, self.stride, self.window)
            residual = self.anomaly_map(xp, out, is_map)
            recon = xp if is_map else out
            if pad > 0:
                residual = residual[:, :, pad : pad + h, pad : pad + w]
                recon = recon[:, :, pad : pad + h, pad : pad + w]
        if self.norm_mean is not None and self.norm_std is not None:
            residual = normalize_maps(residual, self.norm_mean, self.norm_std)
        return residual, image_scores(residual, **self.score_options), recon


def inspect_uint8(
    inspector: Inspector, images: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """uint8 (B, C, H, W) images -> residual (float32), score, uint8 recon, all on the CPU."""
    x = torch.from_numpy(images).to(device).float().div_(255.0)
    residual, score, recon = inspector(x)
    recon8 = recon.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return residual.cpu(), score.float().cpu(), recon8.cpu()
