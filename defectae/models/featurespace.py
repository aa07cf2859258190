"""What the feature-space families share: a frozen encoder, per-level maps, one output contract.

A feature-space model reconstructs what a pretrained network sees rather than the pixels. It
returns {"recon": the input itself, "map": (B, 1, H, W)}: the anomaly map is its own output, so
the inspector uses it in place of a pixel residual (`maps_anomalies = True`), and training uses
the model's `training_losses` (the mean over levels of the per-location feature distance).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from defectae.models.backbones import FrozenEncoder

Tensor = torch.Tensor


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - cosine similarity over channels, per location: (B, C, h, w) x2 -> (B, 1, h, w) in [0, 2]."""
    return 1.0 - F.cosine_similarity(a.float(), b.float(), dim=1, eps=1e-6).unsqueeze(1)


def squared_distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared difference over channels, per location: (B, 1, h, w)."""
    return (a.float() - b.float()).pow(2).mean(1, keepdim=True)


def upsampled_sum(maps: list[Tensor], size: tuple[int, int]) -> Tensor:
    """Per-level (B, 1, h, w) maps resized bilinearly to `size` and summed: (B, 1, H, W)."""
    return sum(F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps)


class FeatureSpaceModel(nn.Module):
    """A frozen encoder and a trainable `head` that reproduces its features.

    `head(features) -> (targets, outputs)`: lists of feature maps compared level by level
    with `distance` (cosine_distance or squared_distance).
    """

    maps_anomalies = True

    def __init__(
        self,
        encoder: FrozenEncoder,
        head: nn.Module,
        distance: Callable[[Tensor, Tensor], Tensor],
    ) -> None:
        super().__init__()
        self.encoder, self.head, self.distance = encoder, head, distance

    def level_maps(self, x: Tensor) -> list[Tensor]:
        """The feature distance at each level: (B, 1, h_i, w_i)."""
        with torch.no_grad():
            features = [f.detach() for f in self.encoder(x)]
        targets, outputs = self.head(features)
        return [self.distance(t, o) for t, o in zip(targets, outputs, strict=True)]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"recon": x, "map": upsampled_sum(self.level_maps(x), tuple(x.shape[-2:]))}

    def training_losses(self, x: Tensor) -> dict[str, Tensor]:
        levels = [m.mean() for m in self.level_maps(x)]
        terms = {f"level{i + 1}": v for i, v in enumerate(levels)}
        terms["total"] = torch.stack(levels).sum()
        return terms


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (no bias), BatchNorm, ReLU; 'same' padding for odd kernels."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )
