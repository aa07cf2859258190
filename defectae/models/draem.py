"""`draem`: a discriminatively trained reconstruction model (Zavrtanik, Kristan, Skocaj, ICCV 2021).

Two sub-networks trained together on defect-free images with synthetic anomalies
(`corruption.kind = "perlin"`: a foreign texture blended into a Perlin-noise region):
- a reconstructive encoder-decoder (no skips) restores the clean image (L2 + SSIM);
- a discriminative U-Net sees the input and its reconstruction, concatenated, and segments
  the synthetic anomaly (focal loss).
The anomaly map is the U-Net's anomaly probability, so the inspector uses it in place of a
pixel residual (`maps_anomalies = True`); the image score is the maximum of the smoothed map.
The published widths are recon_width 128, seg_width 64; a CPU can train 16 and 16.
Fully convolutional, so it may train on crops: tile-test then tiles test images at the
training scale (a tile of the image's size is the whole image), never resizes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim
from torch import nn

from defectae.core.losses import focal_loss
from defectae.models.blocks import require_multiple, require_positive_int
from defectae.models.registry import register

Tensor = torch.Tensor


def conv_block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU layers."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Up(nn.Module):
    """Bilinear 2x upsampling, a 3x3 conv-BN-ReLU, then (with a skip) concatenation and a block."""

    def __init__(self, cin: int, cout: int, skip: int = 0) -> None:
        super().__init__()
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )
        self.block = conv_block(cout + skip, cout)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        x = self.up(x)
        return self.block(x if skip is None else torch.cat([x, skip], dim=1))


class Encoder(nn.Module):
    """Conv blocks of the given widths with 2x max-pooling between them; returns every level."""

    def __init__(self, cin: int, widths: list[int]) -> None:
        super().__init__()
        ins = [cin, *widths[:-1]]
        self.blocks = nn.ModuleList(conv_block(i, o) for i, o in zip(ins, widths, strict=True))

    def forward(self, x: Tensor) -> list[Tensor]:
        levels = []
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            levels.append(x)
        return levels


class Reconstructive(nn.Module):
    """Encoder-decoder without skips (widths w, 2w, 4w, 8w, 8w; stride 16): restores the image."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        self.encoder = Encoder(channels, widths)
        outs = widths[-2::-1]  # 8w, 4w, 2w, w
        self.ups = nn.ModuleList(Up(i, o) for i, o in zip(widths[:0:-1], outs, strict=True))
        self.head = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(x)[-1]
        for up in self.ups:
            h = up(h)
        return torch.sigmoid(self.head(h))


class Discriminative(nn.Module):
    """U-Net (widths w, 2w, 4w, 8w, 8w, 8w; stride 32) from [input, reconstruction] to 2 logits."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width, 8 * width, 8 * width]
        self.encoder = Encoder(2 * channels, widths)
        skips = widths[-2::-1]
        self.ups = nn.ModuleList(
            Up(i, s, skip=s) for i, s in zip(widths[:0:-1], skips, strict=True)
        )
        self.head = nn.Conv2d(width, 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        *skips, h = self.encoder(x)
        for up, skip in zip(self.ups, reversed(skips), strict=True):
            h = up(h, skip)
        return self.head(h)


class Draem(nn.Module):
    """Reconstruct, then segment the difference: {"recon", "logits" (B, 2, H, W), "map" (B, 1, H, W)}."""

    maps_anomalies = True
    learns_from_corruptions = True

    def __init__(
        self, channels: int, recon_width: int, seg_width: int, focal_gamma: float = 2.0
    ) -> None:
        super().__init__()
        self.reconstructive = Reconstructive(channels, recon_width)
        self.discriminative = Discriminative(channels, seg_width)
        self.focal_gamma = focal_gamma

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        recon = self.reconstructive(x)
        logits = self.discriminative(torch.cat([x, recon], dim=1))
        return {"recon": recon, "logits": logits, "map": torch.softmax(logits, dim=1)[:, 1:]}

    def training_losses(self, clean: Tensor, corrupted: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """L2 and 1 - SSIM of the reconstruction against the clean image, focal loss of the
        segmentation against the synthetic anomaly mask, and their sum "total"."""
        out = self(corrupted)
        with torch.autocast(device_type=clean.device.type, enabled=False):
            recon, clean = out["recon"].float(), clean.float()
            terms = {
                "l2": F.mse_loss(recon, clean),
                "ssim_term": 1.0 - ssim(recon, clean, data_range=1.0, size_average=True),
                "focal": focal_loss(out["logits"].float(), mask, self.focal_gamma),
            }
            terms["total"] = terms["l2"] + terms["ssim_term"] + terms["focal"]
        return terms


@register(
    "draem",
    "discriminative reconstruction: a U-Net segments synthetic anomalies from the input and its reconstruction",
    default_size=256,
)
def build_draem(
    in_channels: int,
    input_size: int,
    recon_width: int = 128,
    seg_width: int = 64,
    focal_gamma: float = 2.0,
) -> Draem:
    """The published widths by default (128, 64); the input side must be a multiple of 32."""
    require_multiple(input_size, 32, "draem")
    require_positive_int(recon_width, "model.args.recon_width")
    require_positive_int(seg_width, "model.args.seg_width")
    return Draem(in_channels, recon_width, seg_width, float(focal_gamma))
