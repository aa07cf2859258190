"""The SSIM autoencoder of Bergmann et al. (2018) and the extended network of Rádli & Czúni (2021).

`ae` is the published layer table for 128x128 patches (Bergmann et al., "Improving Unsupervised
Defect Segmentation by Applying Structural Similarity to Autoencoders", Table 1):

    Conv 4x4/s2 32, 4x4/s2 32, 3x3 32, 4x4/s2 64, 3x3 64, 4x4/s2 128, 3x3 64, 3x3 32,
    latent Conv 8x8 (valid) to d channels, i.e. a 1x1 code of size d (100 textures, 500 objects).

The decoder mirrors it with transposed convolutions: ConvT 8x8 from the 1x1 code back to 8x8, then
the encoder stack in reverse (stride-2 layers as ConvT 4x4/s2/p1, 3x3 layers as ConvT 3x3/p1).
LeakyReLU(0.2) follows every layer except the latent code (linear, as in the paper) and the
output (sigmoid, so reconstructions lie in [0, 1]). Other patch sizes adapt the latent kernel to
input_size / 16, so the code stays 1x1.

`aee` follows the extended network of Rádli & Czúni ("About the Application of Autoencoders for
Visual Defect Detection", WSCG 2021) as implemented in the first author's repository
(richardRadli/autoencoders_for_visual_defect_detection, models/extended_model.py): four stages of
one 3x3/s2 conv followed by two extra 3x3 convs, with 32, 64, 128 and a new 256-channel stage,
then the 8x8 latent conv; the decoder mirrors it (ConvT 3x3/s2 with output padding 1 between
stages) and ends in a ConvT 4x4/s2 to the image channels, as that code does. The extra stage
widens the network rather than adding a downsampling, so the input is still a multiple of 16
(the latent kernel is input_size / 16). Where the repository uses plain 3x3 convs between the
decoder's upsamplings we use 3x3 transposed convs, which have the same shape and parameter count.

`dae` and `daee` are the same two networks; they differ only in training, on inputs corrupted by
dominant-colour squares with a loss weighted towards the corrupted area (see their profiles).
"""

from __future__ import annotations

import torch
from torch import nn

from defectae.models.blocks import require_multiple, require_positive_int
from defectae.models.registry import register

# (out_channels, kernel, stride) of every encoder conv before the latent one; all use padding 1.
AE_ENCODER = (
    (32, 4, 2),
    (32, 4, 2),
    (32, 3, 1),
    (64, 4, 2),
    (64, 3, 1),
    (128, 4, 2),
    (64, 3, 1),
    (32, 3, 1),
)
AEE_ENCODER = tuple(
    layer for width in (32, 64, 128, 256) for layer in ((width, 3, 2), (width, 3, 1), (width, 3, 1))
)
DOWNSAMPLING = 16  # both encoders have four stride-2 convs


class ConvAutoencoder(nn.Module):
    """An encoder to a 1x1 latent code and a decoder back to the image: {"recon", "z"}."""

    def __init__(self, encoder: nn.Sequential, decoder: nn.Sequential) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        # He init (fan_out) as in Rádli & Czúni's code: PyTorch's default init lets the signal
        # fade through aee's 26 layers, leaving the first layers with ~1e-15 gradients.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        code = self.encoder(x)  # (B, d, 1, 1)
        return {"recon": self.decoder(code), "z": code.flatten(1)}


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2, inplace=True)


def mirrored_autoencoder(
    in_channels: int,
    input_size: int,
    layers: tuple[tuple[int, int, int], ...],
    latent_dim: int,
    family: str,
    last_kernel: int | None = None,
) -> ConvAutoencoder:
    """Build an encoder from `layers` plus an 8x8-style valid latent conv, and its transposed mirror.

    `last_kernel` replaces the kernel of the decoder's final (stride-2) layer, as aee does.
    """
    require_multiple(input_size, DOWNSAMPLING, family)
    require_positive_int(latent_dim, "model.args.latent_dim")
    latent_kernel = input_size // DOWNSAMPLING

    enc: list[nn.Module] = []
    widths = [in_channels] + [out for out, _, _ in layers]
    for (out, k, s), cin in zip(layers, widths[:-1], strict=True):
        enc += [nn.Conv2d(cin, out, k, s, padding=1), _act()]
    enc.append(nn.Conv2d(widths[-1], latent_dim, latent_kernel))  # valid: the code is 1x1

    dec: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, widths[-1], latent_kernel), _act()]
    mirrored = list(zip(layers, widths[:-1], strict=True))[::-1]
    for i, ((out, k, s), cin) in enumerate(mirrored):
        last = i == len(mirrored) - 1
        if last and last_kernel is not None:
            k = last_kernel
        extra = 1 if s == 2 and k % 2 else 0  # odd kernels need output padding to double exactly
        dec += [nn.ConvTranspose2d(out, cin, k, s, padding=1, output_padding=extra)]
        dec.append(nn.Sigmoid() if last else _act())
    return ConvAutoencoder(nn.Sequential(*enc), nn.Sequential(*dec))


@register("ae", "SSIM autoencoder of Bergmann et al. 2018 (1x1 latent code)", default_size=128)
def build_ae(in_channels: int, input_size: int, latent_dim: int = 100) -> nn.Module:
    """The published 128x128 layer table; latent_dim 100 for textures, 500 for objects."""
    return mirrored_autoencoder(in_channels, input_size, AE_ENCODER, latent_dim, "ae")


@register(
    "aee",
    "extended SSIM autoencoder of Rádli & Czúni 2021 (extra convs, 256-ch stage)",
    default_size=128,
)
def build_aee(in_channels: int, input_size: int, latent_dim: int = 100) -> nn.Module:
    """Three convs per resolution stage and a fourth, 256-channel stage."""
    return mirrored_autoencoder(
        in_channels, input_size, AEE_ENCODER, latent_dim, "aee", last_kernel=4
    )


@register("dae", "denoising ae: the ae network trained on corrupted patches", default_size=128)
def build_dae(in_channels: int, input_size: int, latent_dim: int = 100) -> nn.Module:
    """The ae network; the denoising comes from the profile's [corruption] and loss weighting."""
    return mirrored_autoencoder(in_channels, input_size, AE_ENCODER, latent_dim, "dae")


@register("daee", "denoising aee: the aee network trained on corrupted patches", default_size=128)
def build_daee(in_channels: int, input_size: int, latent_dim: int = 100) -> nn.Module:
    """The aee network; the denoising comes from the profile's [corruption] and loss weighting."""
    return mirrored_autoencoder(
        in_channels, input_size, AEE_ENCODER, latent_dim, "daee", last_kernel=4
    )
