"""Reverse distillation (Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class
Embedding", CVPR 2022), family `rd`.

A frozen pretrained encoder (the teacher) gives features at strides 4, 8 and 16. A trainable
one-class bottleneck fuses them: the two finer levels are brought to stride 16 by 3x3/s2 convs,
concatenated with the coarsest, and embedded at stride 32 (`embed_channels`, default twice the
coarsest width, as the paper's 2048 for Wide-ResNet-50). A decoder (the student) climbs back,
one transposed-conv block per level, and must reproduce the teacher's features at each level;
where it cannot (features it never learned to produce), 1 - cosine similarity is high. The map
is that distance per level, upsampled to the image and summed; the image score is taken from it
as from any residual map.

The loss is the per-location cosine distance averaged over each level and summed over levels
(the paper flattens each level into one vector; per location matches the map that is scored).
"""

from __future__ import annotations

import torch
from torch import nn

from defectae.models.backbones import build_backbone
from defectae.models.blocks import require_multiple, require_positive_int
from defectae.models.featurespace import FeatureSpaceModel, conv_bn_relu, cosine_distance
from defectae.models.registry import register

Tensor = torch.Tensor


class Bottleneck(nn.Module):
    """Multi-scale feature fusion and the one-class embedding: levels (strides 4, 8, 16) -> stride 32."""

    def __init__(self, channels: tuple[int, int, int], embed: int) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.down1 = nn.Sequential(conv_bn_relu(c1, c2, stride=2), conv_bn_relu(c2, c3, stride=2))
        self.down2 = conv_bn_relu(c2, c3, stride=2)
        self.embed = nn.Sequential(
            conv_bn_relu(3 * c3, embed, stride=2), conv_bn_relu(embed, embed)
        )

    def forward(self, features: list[Tensor]) -> Tensor:
        f1, f2, f3 = features
        return self.embed(torch.cat([self.down1(f1), self.down2(f2), f3], dim=1))


def up_block(cin: int, cout: int) -> nn.Sequential:
    """Double the resolution, then two 3x3 convs; the output is linear, like a feature to match."""
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        conv_bn_relu(cout, cout),
        nn.Conv2d(cout, cout, 3, padding=1),
    )


class Student(nn.Module):
    """Teacher features -> bottleneck -> student features at the same three levels."""

    def __init__(self, channels: tuple[int, int, int], embed_channels: int) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.bottleneck = Bottleneck(channels, embed_channels)
        self.decoder = nn.ModuleList(
            [up_block(embed_channels, c3), up_block(c3, c2), up_block(c2, c1)]
        )

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        h = self.bottleneck(features)
        outputs = []
        for block in self.decoder:
            h = block(h)
            outputs.append(h)
        return features, outputs[::-1]


@register(
    "rd",
    "reverse distillation: a student decoder reproduces a frozen pretrained encoder's features",
    whole_image=True,
    default_size=256,
)
def build_rd(
    in_channels: int,
    input_size: int,
    backbone: str = "efficientnet-lite0",
    weights: str = "",
    embed_channels: int = 0,
) -> nn.Module:
    """`embed_channels` 0 means twice the backbone's coarsest level width."""
    require_multiple(input_size, 32, "rd")
    if embed_channels:
        require_positive_int(embed_channels, "model.args.embed_channels")
    encoder = build_backbone(backbone, weights or None)
    channels = encoder.channels[:3]
    student = Student(channels, embed_channels or 2 * channels[2])
    return FeatureSpaceModel(encoder, student, cosine_distance)
