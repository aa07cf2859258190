"""The AITEX VAE series (vae1-vae6, vae8): whole-image VAEs for 256x256 grayscale fabric tiles.

Follows the `AitexVAE` .. `AitexVAEv8` classes of Oliver Grau's AITEX anomaly-detection project
(VAE track). Every version shares the encoder: stride-2 3x3 convs (32, 64, 128, 256 channels by
default), each followed by ReLU and Dropout2d, flattened into fully connected `mu` / `logvar`
layers; the decoder expands the latent vector with a linear layer into a feature map at the
encoder's resolution and upsamples it with transposed convolutions.

    vae1  baseline: decoder linear -> [64, s, s] -> two transposed convs (x4 each), sigmoid
    vae2  vae1 with the encoder and decoder channel lists as parameters
    vae3  the fixed vae1 configuration (the reference differs from vae1 only by a linear output)
    vae4  fc 1024 + BatchNorm1d + ReLU before mu / logvar, linear -> [256, s, s], 4 x2 steps
    vae5  vae4 + additive encoder -> decoder skips at every resolution
    vae6  vae4 + concatenated skips, each followed by a 1x1 conv back to the decoder width
    vae8  vae4 + gated skips: dec + enc * sigmoid(MLP(avgpool(enc))) per channel

(There is no v7 in the original series.) Choices where we depart from the reference:
- every version ends in a sigmoid, so reconstructions lie in [0, 1] like every other family
  (the reference's v3-v8 output is linear, for its MSE/frequency losses);
- logvar is clamped to [-10, 10] in every version (the reference clamps from v4 on);
- vae5/6/8 keep vae4's ReLU after each inner upsampling (the reference's skip versions drop it,
  which would leave their decoder linear apart from the skips);
- `attention` may be "se" (the reference's squeeze-excitation block) or "self" (single-head
  self-attention), applied to the expanded latent feature map before decoding.
Eval mode is deterministic: z = mu, and dropout is off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from defectae.errors import DefectaeError
from defectae.models.blocks import (
    bottleneck_attention,
    reparameterize,
    require_multiple,
    require_positive_int,
)
from defectae.models.registry import register

ENCODER_CHANNELS = (32, 64, 128, 256)
LOGVAR_RANGE = (-10.0, 10.0)


class SkipMerge(nn.Module):
    """Merge an encoder feature into the decoder feature of the same shape: add, concat or gate."""

    def __init__(self, mode: str, channels: int) -> None:
        super().__init__()
        self.mode = mode
        if mode == "concat":
            self.fuse = nn.Conv2d(2 * channels, channels, 1)
        elif mode == "gate":
            hidden = max(1, channels // 4)
            self.gate = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(channels, hidden, 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, channels, 1),
                nn.Sigmoid(),
            )

    def forward(self, dec: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        if self.mode == "add":
            return dec + enc
        if self.mode == "concat":
            return self.fuse(torch.cat([dec, enc], dim=1))
        return dec + enc * self.gate(enc)  # gate: (B, C, 1, 1)


def _upsample(cin: int, cout: int, factor: int) -> nn.Module:
    """A transposed conv that multiplies the side by `factor` (1 keeps it)."""
    if factor == 1:
        return nn.ConvTranspose2d(cin, cout, 3, 1, padding=1)
    if factor == 2:
        return nn.ConvTranspose2d(cin, cout, 4, 2, padding=1)
    return nn.ConvTranspose2d(cin, cout, factor, factor)


def split_exponent(total: int, steps: int) -> list[int]:
    """Split 2**total into `steps` power-of-two factors, largest first (4 over 2 steps: [4, 4])."""
    base, rest = divmod(total, steps)
    return [2 ** (base + (i < rest)) for i in range(steps)]


class AitexVAE(nn.Module):
    """Conv encoder -> (optional fc + BatchNorm1d) -> mu, logvar -> linear -> transposed-conv decoder.

    forward(x) -> {"recon" (B, C, H, W) in [0, 1], "mu" (B, D), "logvar" (B, D), "z" (B, D)}.
    """

    def __init__(
        self,
        in_channels: int,
        input_size: int,
        encoder_channels: tuple[int, ...],
        decoder_channels: tuple[int, ...],
        latent_dim: int,
        dropout: float,
        attention: str,
        hidden_dim: int = 0,
        skip: str = "none",
    ) -> None:
        super().__init__()
        n_down = len(encoder_channels)
        side = input_size // 2**n_down
        self.encoder = nn.ModuleList()
        cin = in_channels
        for cout in encoder_channels:
            self.encoder.append(
                nn.Sequential(
                    nn.Conv2d(cin, cout, 3, 2, padding=1),
                    nn.ReLU(inplace=True),
                    nn.Dropout2d(dropout),
                )
            )
            cin = cout
        flat = encoder_channels[-1] * side * side
        if hidden_dim:
            self.bottleneck: nn.Module = nn.Sequential(
                nn.Linear(flat, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)
            )
            flat = hidden_dim
        else:
            self.bottleneck = nn.Identity()
        self.fc_mu = nn.Linear(flat, latent_dim)
        self.fc_logvar = nn.Linear(flat, latent_dim)

        self.expand = nn.Sequential(
            nn.Linear(latent_dim, decoder_channels[0] * side * side),
            nn.Unflatten(1, (decoder_channels[0], side, side)),
        )
        self.attention = bottleneck_attention(attention, decoder_channels[0])
        widths = list(decoder_channels) + [in_channels]
        factors = split_exponent(n_down, len(decoder_channels))
        self.ups = nn.ModuleList(
            _upsample(a, b, f) for a, b, f in zip(widths[:-1], widths[1:], factors, strict=True)
        )
        # Skips need the decoder to mirror the encoder: one merge at each encoder resolution.
        self.merges = nn.ModuleList(
            [] if skip == "none" else [SkipMerge(skip, c) for c in reversed(encoder_channels)]
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = []
        h = x
        for stage in self.encoder:
            h = stage(h)
            feats.append(h)
        flat = self.bottleneck(h.flatten(1))
        mu = self.fc_mu(flat)
        logvar = self.fc_logvar(flat).clamp(*LOGVAR_RANGE)
        z = reparameterize(mu, logvar, self.training)
        recon = self.decode(z, feats[::-1])  # skips deepest first, matching the decoder
        return {"recon": recon, "mu": mu, "logvar": logvar, "z": z}

    def decode(self, z: torch.Tensor, skips: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Images in [0, 1] from codes z (B, D); the skip variants also need the encoder's features."""
        if self.merges and skips is None:
            raise ValueError("this VAE's decoder merges encoder features: pass skips")
        h = self.attention(self.expand(z))  # (B, C0, s, s)
        for i, up in enumerate(self.ups):
            if i < len(self.merges):
                h = self.merges[i](h, skips[i])
            h = up(h)
            if i < len(self.ups) - 1:
                h = torch.relu(h)
        return torch.sigmoid(h)


def _channel_list(value: object, key: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise DefectaeError(f"{key} {value!r}: expected a non-empty list of positive integers")
    return tuple(require_positive_int(v, key) for v in value)


def _check_common(
    input_size: int, n_down: int, latent_dim: int, dropout: float, attention: str, family: str
) -> None:
    require_multiple(input_size, 2**n_down, family)
    require_positive_int(latent_dim, "model.args.latent_dim")
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, (int, float))
        or not 0.0 <= dropout < 1.0
    ):
        raise DefectaeError(f"model.args.dropout {dropout!r}: expected a number in [0, 1)")
    bottleneck_attention(attention, 1)  # validates the name


def _build(
    family: str,
    in_channels: int,
    input_size: int,
    *,
    latent_dim: int,
    dropout: float,
    attention: str,
    encoder_channels: tuple[int, ...] = ENCODER_CHANNELS,
    decoder_channels: tuple[int, ...] | None = None,
    hidden_dim: int = 0,
    skip: str = "none",
) -> AitexVAE:
    _check_common(input_size, len(encoder_channels), latent_dim, dropout, attention, family)
    if hidden_dim:
        require_positive_int(hidden_dim, "model.args.hidden_dim")
    decoder = tuple(reversed(encoder_channels)) if decoder_channels is None else decoder_channels
    return AitexVAE(
        in_channels,
        input_size,
        encoder_channels,
        decoder,
        latent_dim,
        float(dropout),
        attention,
        hidden_dim,
        skip,
    )


_VAE = {"is_vae": True, "whole_image": True, "default_size": 256}


def _fixed_vae(name: str) -> Callable[..., nn.Module]:
    """vae1 and vae3: the fixed encoder to 256 channels and a [64, 16, 16] decoder in two x4 steps.

    In the reference the two differ only by v1's final sigmoid, which every version here has.
    """

    def build(
        in_channels: int,
        input_size: int,
        latent_dim: int = 32,
        dropout: float = 0.2,
        attention: str = "none",
    ) -> nn.Module:
        return _build(
            name,
            in_channels,
            input_size,
            latent_dim=latent_dim,
            dropout=dropout,
            attention=attention,
            decoder_channels=(64, 32),
        )

    return build


build_vae1 = register(
    "vae1", "AITEX VAE v1: 4 stride-2 convs, fc mu/logvar, [64,16,16] -> 2 x4 ConvT", **_VAE
)(_fixed_vae("vae1"))
build_vae3 = register(
    "vae3", "AITEX VAE v3: fixed 256-ch encoder, [64,16,16] decoded in two large steps", **_VAE
)(_fixed_vae("vae3"))


@register("vae2", "AITEX VAE v2: vae1 with encoder/decoder channel lists as parameters", **_VAE)
def build_vae2(
    in_channels: int,
    input_size: int,
    encoder_channels: list[int] | tuple[int, ...] = ENCODER_CHANNELS,
    decoder_channels: list[int] | tuple[int, ...] = (64, 32),
    latent_dim: int = 32,
    dropout: float = 0.2,
    attention: str = "none",
) -> nn.Module:
    """One stride-2 conv per encoder entry; one ConvT per decoder entry (the last maps to the image).

    The decoder's upsampling factors are powers of two splitting 2**len(encoder_channels) as
    evenly as possible over its steps (x4 twice for the defaults).
    """
    enc = _channel_list(encoder_channels, "model.args.encoder_channels")
    dec = _channel_list(decoder_channels, "model.args.decoder_channels")
    return _build(
        "vae2",
        in_channels,
        input_size,
        latent_dim=latent_dim,
        dropout=dropout,
        attention=attention,
        encoder_channels=enc,
        decoder_channels=dec,
    )


def _v4_family(name: str, skip: str) -> Callable[..., nn.Module]:
    """A builder for vae4 and its skip variants (same arguments, different skip merge)."""

    def build(
        in_channels: int,
        input_size: int,
        latent_dim: int = 32,
        dropout: float = 0.2,
        attention: str = "none",
        hidden_dim: int = 1024,
    ) -> nn.Module:
        return _build(
            name,
            in_channels,
            input_size,
            latent_dim=latent_dim,
            dropout=dropout,
            attention=attention,
            hidden_dim=hidden_dim,
            skip=skip,
        )

    build.__name__ = f"build_{name}"
    build.__doc__ = (
        f"AITEX {name}: fc bottleneck with BatchNorm1d, 4-step mirrored decoder, skips: {skip}."
    )
    return build


build_vae4 = register(
    "vae4", "AITEX VAE v4: fc+BatchNorm1d bottleneck, optional SE, [256,16,16] in 4 steps", **_VAE
)(_v4_family("vae4", "none"))
build_vae5 = register("vae5", "AITEX VAE v5: vae4 with additive encoder->decoder skips", **_VAE)(
    _v4_family("vae5", "add")
)
build_vae6 = register(
    "vae6", "AITEX VAE v6: vae4 with concatenated skips fused by 1x1 convs", **_VAE
)(_v4_family("vae6", "concat"))
build_vae8 = register("vae8", "AITEX VAE v8: vae4 with channel-gated skips", **_VAE)(
    _v4_family("vae8", "gate")
)
