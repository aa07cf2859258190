"""Small building blocks shared by model families: size checks, sampling, attention, residual blocks.

Every block is a plain nn.Module without Python-side data-dependent control flow, so the
models built from them compile (`torch.compile`) and export (TorchScript trace, ONNX).
"""

from __future__ import annotations

import torch
from torch import nn

from defectae.errors import DefectaeError


def require_multiple(input_size: int, divisor: int, family: str, minimum: int = 0) -> None:
    """A user error naming model.input_size unless it is a positive multiple of `divisor`."""
    lowest = max(minimum, divisor)
    if input_size % divisor or input_size < lowest:
        raise DefectaeError(
            f"model.input_size {input_size}: family '{family}' expects a multiple of {divisor}"
            f" (at least {lowest})"
        )


def require_positive_int(value: object, key: str) -> int:
    """A user error naming `key` unless `value` is a positive integer."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DefectaeError(f"{key} {value!r}: expected a positive integer")
    return value


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, training: bool) -> torch.Tensor:
    """z = mu + sigma * eps while training; the mean in eval mode, so inference is deterministic."""
    if not training:
        return mu
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


class SqueezeExcitation(nn.Module):
    """Channel re-weighting (Hu et al. 2018): x * sigmoid(MLP(global average pool(x)))."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc(x.mean(dim=(2, 3)))  # (B, C)
        return x * w[:, :, None, None]


class SelfAttention2d(nn.Module):
    """Single-head self-attention over all positions of a feature map, with a residual connection.

    GroupNorm, then softmax(QK^T / sqrt(C)) V with one linear in- and out-projection, as in the
    Stable Diffusion VAE attention block. Non-causal: every position sees every other one.
    """

    def __init__(self, channels: int, groups: int = 32) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        self.scale = channels**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        attn = torch.softmax((q @ k.transpose(1, 2)) * self.scale, dim=-1)  # (B, HW, HW)
        y = self.out(attn @ v).transpose(1, 2).reshape(b, c, h, w)
        return x + y


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-Conv3x3 twice, plus the input (through a 1x1 conv when channels change)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(groups, in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.shortcut = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


def bottleneck_attention(kind: str, channels: int, arg: str = "model.args.attention") -> nn.Module:
    """The switchable attention block of a family: 'none', 'se' (squeeze-excitation) or 'self'."""
    if kind == "none":
        return nn.Identity()
    if kind == "se":
        return SqueezeExcitation(channels)
    if kind == "self":
        return SelfAttention2d(channels, groups=group_count(channels))
    raise DefectaeError(f"{arg} '{kind}': expected one of none, se, self")


def group_count(channels: int, preferred: int = 32) -> int:
    """The largest GroupNorm group count <= `preferred` that divides `channels`."""
    return next(g for g in range(min(preferred, channels), 0, -1) if channels % g == 0)
