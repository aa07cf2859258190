"""Deep feature reconstruction (Shi, Yang & Qi, "Unsupervised anomaly segmentation via deep
feature reconstruction", Neurocomputing 2021), family `dfr`.

The frozen encoder's levels are resized to the finest one (stride 4), averaged over a 3x3
neighbourhood (so each location describes a small region, not one receptive-field centre) and
concatenated. A convolutional autoencoder of 1x1 convs squeezes that vector to `latent_channels`
and back; the anomaly map is the squared reconstruction error per location, averaged over
channels and upsampled to the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defectae.models.backbones import build_backbone
from defectae.models.blocks import require_multiple, require_positive_int
from defectae.models.featurespace import FeatureSpaceModel, conv_bn_relu, squared_distance
from defectae.models.registry import register

Tensor = torch.Tensor


class FeatureAutoencoder(nn.Module):
    """Concatenated multi-level features -> 1x1-conv autoencoder -> the same features."""

    def __init__(self, width: int, latent_channels: int) -> None:
        super().__init__()
        hidden = (width + latent_channels) // 2
        self.autoencoder = nn.Sequential(
            conv_bn_relu(width, hidden, kernel=1),
            conv_bn_relu(hidden, latent_channels, kernel=1),
            conv_bn_relu(latent_channels, hidden, kernel=1),
            nn.Conv2d(hidden, width, 1),
        )

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        size = features[0].shape[-2:]
        levels = [
            F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features[:3]
        ]
        target = F.avg_pool2d(
            torch.cat(levels, dim=1), 3, stride=1, padding=1, count_include_pad=False
        )
        return [target], [self.autoencoder(target)]


@register(
    "dfr",
    "deep feature reconstruction: a 1x1-conv autoencoder over frozen pretrained features",
    whole_image=True,
    default_size=256,
)
def build_dfr(
    in_channels: int,
    input_size: int,
    backbone: str = "efficientnet-lite0",
    weights: str = "",
    latent_channels: int = 64,
) -> nn.Module:
    require_multiple(input_size, 16, "dfr")
    require_positive_int(latent_channels, "model.args.latent_channels")
    encoder = build_backbone(backbone, weights or None)
    head = FeatureAutoencoder(sum(encoder.channels[:3]), latent_channels)
    return FeatureSpaceModel(encoder, head, squared_distance)
