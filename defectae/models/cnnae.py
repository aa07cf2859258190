"""`cnnae`: a symmetric convolutional autoencoder (64-128-256-512) with optional U-Net skips.

The four stages have base_channels x (1, 2, 4, 8) channels (64 by default).

Skips are off by default on purpose. A reconstruction model is trained on defect-free
patches and detects defects where it *fails* to reproduce the input. Skip connections
give the decoder a full-resolution path around the bottleneck, so the network learns
to copy its input, defects included: the residual at a defect vanishes and so does the
detection. Turn `skips = true` on only to study that effect or for denoising-style
training where the input is corrupted.

With `output = "tanh"` the network works in [-1, 1] internally (the input is mapped
there and the tanh output is mapped back with (y + 1) / 2), so "recon" is always in [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn

from defectae.errors import DefectaeError
from defectae.models.blocks import require_multiple, require_positive_int
from defectae.models.registry import register

STAGE_WIDTHS = (1, 2, 4, 8)  # times base_channels
DIVISOR = 2 ** len(STAGE_WIDTHS)


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    pad = (kernel - 1) // 2 if stride == 1 else (kernel - stride) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, pad, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.2, inplace=True),
    )


def _up_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.2, inplace=True),
    )


class CnnAE(nn.Module):
    """Encoder: per stage a 3x3 conv (skip taken here) then a 4x4 stride-2 conv; mirrored decoder."""

    def __init__(
        self,
        in_channels: int,
        input_size: int,
        base_channels: int,
        latent_dim: int,
        bottleneck: str,
        skips: bool,
        dropout: float,
        output: str,
    ) -> None:
        super().__init__()
        self.skips = skips
        self.tanh = output == "tanh"
        side = input_size // DIVISOR
        widths = [base_channels * m for m in STAGE_WIDTHS]
        top = widths[-1]

        self.enc_convs = nn.ModuleList()
        self.enc_downs = nn.ModuleList()
        cin = in_channels
        for c in widths:
            self.enc_convs.append(_conv_bn(cin, c))
            self.enc_downs.append(nn.Sequential(_conv_bn(c, c, 4, 2), nn.Dropout2d(dropout)))
            cin = c

        # Both bottlenecks squeeze the (top, side, side) map into a latent_dim vector.
        if bottleneck == "fc":
            self.to_latent = nn.Sequential(nn.Flatten(), nn.Linear(top * side * side, latent_dim))
            self.from_latent = nn.Sequential(
                nn.Linear(latent_dim, top * side * side),
                nn.Unflatten(1, (top, side, side)),
                nn.LeakyReLU(0.2, inplace=True),
            )
        else:
            self.to_latent = nn.Conv2d(top, latent_dim, side)
            self.from_latent = nn.Sequential(
                nn.ConvTranspose2d(latent_dim, top, side), nn.LeakyReLU(0.2, inplace=True)
            )

        self.dec_ups = nn.ModuleList()
        self.dec_convs = nn.ModuleList()
        cin = top
        for c in reversed(widths):
            self.dec_ups.append(_up_bn(cin, c))
            self.dec_convs.append(
                nn.Sequential(_conv_bn(2 * c if skips else c, c), nn.Dropout2d(dropout))
            )
            cin = c
        self.head = nn.Conv2d(widths[0], in_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = x * 2 - 1 if self.tanh else x
        feats = []
        for conv, down in zip(self.enc_convs, self.enc_downs, strict=True):
            h = conv(h)
            feats.append(h)  # (B, c, H / 2^k, W / 2^k), before downsampling
            h = down(h)
        z = self.to_latent(h)  # (B, latent_dim) or (B, latent_dim, 1, 1)
        h = self.from_latent(z)
        for up, conv, skip in zip(self.dec_ups, self.dec_convs, reversed(feats), strict=True):
            h = up(h)
            h = conv(torch.cat([h, skip], 1) if self.skips else h)
        y = self.head(h)
        recon = (torch.tanh(y) + 1) / 2 if self.tanh else torch.sigmoid(y)
        return {"recon": recon, "z": z}


@register("cnnae", "symmetric conv AE 64-128-256-512, latent 512, optional U-Net skips")
def build_cnnae(
    in_channels: int,
    input_size: int,
    base_channels: int = 64,
    latent_dim: int = 512,
    bottleneck: str = "fc",
    skips: bool = False,
    dropout: float = 0.1,
    output: str = "sigmoid",
) -> nn.Module:
    """Build `cnnae`; input_size must be a multiple of 16 (four stride-2 stages)."""
    require_multiple(input_size, DIVISOR, "cnnae")
    if bottleneck not in ("fc", "conv"):
        raise DefectaeError(f"model.args.bottleneck '{bottleneck}': expected 'fc' or 'conv'")
    if output not in ("sigmoid", "tanh"):
        raise DefectaeError(f"model.args.output '{output}': expected 'sigmoid' or 'tanh'")
    if not 0.0 <= dropout < 1.0:
        raise DefectaeError(f"model.args.dropout {dropout}: expected a value in [0, 1)")
    require_positive_int(base_channels, "model.args.base_channels")
    require_positive_int(latent_dim, "model.args.latent_dim")
    return CnnAE(
        in_channels, input_size, base_channels, latent_dim, bottleneck, bool(skips), dropout, output
    )
