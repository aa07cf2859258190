"""`specvae`: a VAE whose encoder and decoder are lists of compact layer strings in the profile.

Grammar, after the flexible-VAE reference (OmnixCode/FlexVAE, src/modules.py `model_creator`):

    C2d_in_out_k_s_p   Conv2d(in, out, kernel k, stride s, padding p)
    VAERB_in_out       residual block: (GroupNorm, SiLU, Conv3x3) x 2, 1x1 shortcut if in != out
    VAEA_ch            single-head self-attention block (GroupNorm, attention, residual)
    GN_groups_ch       GroupNorm(groups, ch)
    SiLU               SiLU
    MaxP_k             MaxPool2d(k)
    UpS_factor         nearest-neighbour upsampling by `factor`
    N*LAYER            LAYER repeated N times, e.g. "2*VAERB_128_128"

The encoder's output is split in half along channels into mu and logvar (a spatial latent,
logvar clamped to [-30, 20]); the decoder maps a sample (z = mu in eval mode) back to the image.
As in the reference (and the Stable Diffusion VAE it derives from), a stride-2 conv is preceded
by a (0, 1, 0, 1) zero pad. Departures from the reference: the attention block normalises its
input and attends to all positions (the reference's block skips its GroupNorm and applies a
causal mask); GroupNorm inside VAERB/VAEA uses 32 groups, or the largest divisor of the channel
count below 32; the output goes through a sigmoid so reconstructions lie in [0, 1] (the reference
trains on [-1, 1] images with a linear output); and the image-side channel counts (the first
encoder conv's input, the last decoder conv's output) follow the data, so the reference's
3-channel lists serve grayscale images too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from defectae.errors import DefectaeError
from defectae.models.blocks import (
    ResidualBlock,
    SelfAttention2d,
    group_count,
    reparameterize,
)
from defectae.models.registry import register

# The reference's model_structures/VAE_encoder.mstruct and VAE_decoder.mstruct (256x256 -> 4x16x16).
DEFAULT_ENCODER = (
    "C2d_3_128_3_1_1",
    "2*VAERB_128_128",
    "C2d_128_128_3_4_0",
    "VAERB_128_256",
    "VAERB_256_256",
    "C2d_256_256_3_4_0",
    "3*VAERB_256_256",
    "VAEA_256",
    "VAERB_256_256",
    "GN_32_256",
    "SiLU",
    "C2d_256_8_3_1_1",
    "C2d_8_8_1_1_0",
)
DEFAULT_DECODER = (
    "C2d_4_4_1_1_0",
    "C2d_4_512_3_1_1",
    "VAERB_512_512",
    "VAEA_512",
    "4*VAERB_512_512",
    "UpS_4",
    "C2d_512_512_3_1_1",
    "VAERB_512_256",
    "2*VAERB_256_256",
    "UpS_4",
    "C2d_256_256_3_1_1",
    "VAERB_256_128",
    "2*VAERB_128_128",
    "GN_32_128",
    "SiLU",
    "C2d_128_3_3_1_1",
)
LOGVAR_RANGE = (-30.0, 20.0)

# name -> the parameter names that follow it
GRAMMAR = {
    "C2d": ("in", "out", "k", "s", "p"),
    "VAERB": ("in", "out"),
    "VAEA": ("ch",),
    "GN": ("groups", "ch"),
    "SiLU": (),
    "MaxP": ("k",),
    "UpS": ("factor",),
}
_ENTRY = re.compile(r"^(?:(\d+)\*)?([A-Za-z0-9]+)((?:_[^_]*)*)$")


@dataclass(frozen=True)
class LayerSpec:
    """One parsed layer string: its kind, integer parameters and where it came from."""

    kind: str
    params: tuple[int, ...]
    where: str  # e.g. "model.args.encoder[3] 'C2d_64_128_3_1_1'"


def parse_layers(entries: object, key: str) -> list[LayerSpec]:
    """Parse a list of layer strings, expanding `N*` repeats; errors name the entry and position."""
    if not isinstance(entries, (list, tuple)) or not entries:
        raise DefectaeError(f"{key}: expected a non-empty list of layer strings")
    specs = []
    for i, entry in enumerate(entries):
        where = f"{key}[{i}] {entry!r}"
        if not isinstance(entry, str):
            raise DefectaeError(f"{where}: expected a layer string such as 'C2d_3_128_3_1_1'")
        m = _ENTRY.match(entry.strip())
        if not m or m.group(2) not in GRAMMAR:
            names = ", ".join(GRAMMAR)
            raise DefectaeError(f"{where}: expected [N*]NAME_args with NAME one of {names}")
        repeat, kind, rest = m.group(1), m.group(2), m.group(3)
        fields = GRAMMAR[kind]
        raw = rest.split("_")[1:] if rest else []
        form = "_".join((kind,) + fields)
        if len(raw) != len(fields) or not all(r.isdigit() for r in raw):
            expected = f"{form} with integers" if fields else f"{kind} without parameters"
            raise DefectaeError(f"{where}: expected {expected}")
        params = tuple(int(r) for r in raw)
        if any(v < 1 for name, v in zip(fields, params, strict=True) if name != "p"):
            raise DefectaeError(
                f"{where}: expected {form} with positive integers (padding may be 0)"
            )
        if kind == "GN" and params[1] % params[0]:
            raise DefectaeError(
                f"{where}: channels {params[1]} are not divisible by {params[0]} groups"
            )
        count = int(repeat) if repeat else 1
        if count < 1:
            raise DefectaeError(f"{where}: the repeat count must be at least 1")
        specs += [LayerSpec(kind, params, where)] * count
    return specs


def _in_channels(spec: LayerSpec) -> int | None:
    if spec.kind in ("C2d", "VAERB", "VAEA"):
        return spec.params[0]
    if spec.kind == "GN":
        return spec.params[1]
    return None


def _out_channels(spec: LayerSpec, channels: int) -> int:
    if spec.kind in ("C2d", "VAERB"):
        return spec.params[1]
    return channels


def _out_side(spec: LayerSpec, side: int) -> int:
    if spec.kind == "C2d":
        _, _, k, s, p = spec.params
        pad = 1 if s == 2 else 0  # the reference's extra right/bottom pad before stride-2 convs
        return (side + pad + 2 * p - k) // s + 1
    if spec.kind == "MaxP":
        return side // spec.params[0]
    if spec.kind == "UpS":
        return side * spec.params[0]
    return side


def _module(spec: LayerSpec) -> list[nn.Module]:
    p = spec.params
    if spec.kind == "C2d":
        conv = nn.Conv2d(p[0], p[1], p[2], p[3], p[4])
        return [nn.ZeroPad2d((0, 1, 0, 1)), conv] if p[3] == 2 else [conv]
    if spec.kind == "VAERB":
        return [ResidualBlock(p[0], p[1], groups=group_count(math.gcd(p[0], p[1])))]
    if spec.kind == "VAEA":
        return [SelfAttention2d(p[0], groups=group_count(p[0]))]
    if spec.kind == "GN":
        return [nn.GroupNorm(p[0], p[1])]
    if spec.kind == "SiLU":
        return [nn.SiLU()]
    if spec.kind == "MaxP":
        return [nn.MaxPool2d(p[0])]
    return [nn.Upsample(scale_factor=p[0], mode="nearest")]


def _with_image_channels(spec: LayerSpec, in_channels: int, index: int) -> LayerSpec:
    """The first encoder conv reads (index 0), the last decoder conv writes (1) the image."""
    if spec.kind != "C2d":
        side = "first encoder" if index == 0 else "last decoder"
        raise DefectaeError(f"{spec.where}: the {side} layer must be a C2d that touches the image")
    if spec.params[index] not in (1, 3):
        side = "in" if index == 0 else "out"
        raise DefectaeError(
            f"{spec.where}: {side} is the image channel count; expected 1 or 3 (it follows the data)"
        )
    params = list(spec.params)
    params[index] = in_channels
    return LayerSpec(spec.kind, tuple(params), spec.where)


def _trace(
    specs: Sequence[LayerSpec], channels: int, side: int, input_size: int
) -> tuple[int, int]:
    """Channels and side after `specs`, checking each layer's input channels against the last output."""
    for spec in specs:
        need = _in_channels(spec)
        if need is not None and need != channels:
            raise DefectaeError(
                f"{spec.where}: expects {need} input channels but the previous layer gives {channels}"
            )
        channels = _out_channels(spec, channels)
        side = _out_side(spec, side)
        if side < 1:
            raise DefectaeError(
                f"{spec.where}: the feature map shrinks to nothing at model.input_size {input_size}"
            )
    return channels, side


def _round_trip(specs: Sequence[LayerSpec], size: int) -> int:
    """The output side of encoder + decoder for a square input of `size` (0 when it collapses)."""
    side = size
    for spec in specs:
        side = _out_side(spec, side)
        if side < 1:
            return 0
    return side


class SpecVAE(nn.Module):
    """Sequential encoder (-> 2D channels, split into mu / logvar) and sequential decoder.

    forward(x) -> {"recon" (B, C, H, W) in [0, 1], "mu", "logvar", "z" (B, D, h, w)}.
    """

    def __init__(self, encoder: Sequence[LayerSpec], decoder: Sequence[LayerSpec]) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*[m for s in encoder for m in _module(s)])
        self.decoder = nn.Sequential(*[m for s in decoder for m in _module(s)])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)  # (B, D, h, w) each
        logvar = logvar.clamp(*LOGVAR_RANGE)
        z = reparameterize(mu, logvar, self.training)
        return {"recon": self.decode(z), "mu": mu, "logvar": logvar, "z": z}

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from latent maps z (B, D, h, w)."""
        return torch.sigmoid(self.decoder(z))


@register(
    "specvae",
    "VAE built from compact layer strings (C2d, VAERB, VAEA, ...)",
    is_vae=True,
    default_size=256,
)
def build_specvae(
    in_channels: int,
    input_size: int,
    encoder: Sequence[str] = DEFAULT_ENCODER,
    decoder: Sequence[str] = DEFAULT_DECODER,
) -> nn.Module:
    """Parse and check both layer lists, then build the VAE; defaults are the reference's 256x256 lists."""
    enc = parse_layers(encoder, "model.args.encoder")
    dec = parse_layers(decoder, "model.args.decoder")
    enc[0] = _with_image_channels(enc[0], in_channels, 0)
    dec[-1] = _with_image_channels(dec[-1], in_channels, 1)

    latent2, side = _trace(enc, in_channels, input_size, input_size)
    if latent2 % 2:
        raise DefectaeError(
            f"{enc[-1].where}: the encoder must end in an even channel count (split into mu and logvar), got {latent2}"
        )
    if _in_channels(dec[0]) != latent2 // 2:
        raise DefectaeError(
            f"{dec[0].where}: expects {_in_channels(dec[0])} input channels but the latent has {latent2 // 2}"
            f" (half of the encoder's {latent2})"
        )
    _, out_side = _trace(dec, latent2 // 2, side, input_size)
    if out_side != input_size:
        fits = [s for s in range(8, 4097) if _round_trip(enc + dec, s) == s][:6]
        hint = f"; sizes that round-trip: {', '.join(map(str, fits))}, ..." if fits else ""
        raise DefectaeError(
            f"model.input_size {input_size}: encoder and decoder return {out_side}x{out_side}{hint}"
        )
    return SpecVAE(enc, dec)
