"""Training losses: the reconstruction terms, KL, an extra SSIM term and latent sparsity.

total = alpha*recon + kld_weight(epoch)*kl + beta*ssim_term + sparse_weight*sparse,
as the flexible-VAE reference defines it. Every term is returned by name so training
logs each one. Losses run in float32 whatever the autocast dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim, ssim

from defectae.core.ssim import ssim_map
from defectae.errors import DefectaeError
from defectae.profiles.schema import LossConfig

Tensor = torch.Tensor


def ssim_loss(x: Tensor, y: Tensor, window: int = 11) -> Tensor:
    """1 - mean SSIM (pytorch-msssim, Gaussian window, data range 1)."""
    return 1.0 - ssim(x, y, data_range=1.0, win_size=window, size_average=True)


def msssim_window(side: int, window: int) -> int:
    """The largest odd window <= `window` that MS-SSIM's four downsamplings allow at this size."""
    fit = (side - 1) // 16 + 1  # pytorch-msssim needs side > (win - 1) * 16
    win = min(window, fit if fit % 2 == 1 else fit - 1)
    if win < 3:
        raise DefectaeError(
            f"loss.recon = 'msssim': patches of {side} px are too small; expected at least 33 px"
        )
    return win


def msssim_loss(x: Tensor, y: Tensor, window: int = 11) -> Tensor:
    """1 - MS-SSIM; the window shrinks on small patches so all five scales fit."""
    win = msssim_window(min(x.shape[-2:]), window)
    return 1.0 - ms_ssim(x, y, data_range=1.0, win_size=win, size_average=True)


def _spectrum(x: Tensor, log: bool) -> Tensor:
    mag = torch.fft.rfft2(x, norm="ortho").abs()
    return torch.log1p(mag) if log else mag


def frequency_loss(x: Tensor, y: Tensor) -> Tensor:
    """MSE between the FFT magnitudes (catches lost texture periodicity)."""
    return F.mse_loss(_spectrum(x, False), _spectrum(y, False))


def logfrequency_loss(x: Tensor, y: Tensor) -> Tensor:
    """MSE between log(1 + |FFT|): evens out the weight of low and high frequencies."""
    return F.mse_loss(_spectrum(x, True), _spectrum(y, True))


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent dimensions, averaged over the batch."""
    per_sample = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).flatten(1).sum(dim=1)
    return per_sample.mean()


def kl_weight(cfg: LossConfig, epoch: int) -> float:
    """kld_weight, ramped linearly over the first kl_warmup_epochs epochs (epoch is 0-based)."""
    if cfg.kl_warmup_epochs <= 0:
        return cfg.kld_weight
    return cfg.kld_weight * min(1.0, (epoch + 1) / cfg.kl_warmup_epochs)


def _weighted_mean(per_pixel: Tensor, weight: Tensor) -> Tensor:
    """Mean of a (B, C, H, W) loss map under a (B, 1, H, W) pixel weight, normalised so weight 1 = plain mean."""
    weight = weight.expand_as(per_pixel)
    return (per_pixel * weight).sum() / weight.sum()


def _weighted_recon(
    kind: str, recon: Tensor, target: Tensor, weight: Tensor, window: int
) -> Tensor:
    """Per-pixel reconstruction loss weighted towards the corrupted area (denoising models)."""
    if kind == "l1":
        return _weighted_mean((recon - target).abs(), weight)
    if kind in ("ssim", "msssim"):
        return _weighted_mean(1.0 - ssim_map(recon, target, window=window), weight)
    return _weighted_mean((recon - target).pow(2), weight)


RECON: dict[str, Callable[[Tensor, Tensor, LossConfig], Tensor]] = {
    "mse": lambda r, t, c: F.mse_loss(r, t),
    "l1": lambda r, t, c: F.l1_loss(r, t),
    "ssim": lambda r, t, c: ssim_loss(r, t, c.ssim_window),
    "msssim": lambda r, t, c: msssim_loss(r, t, c.ssim_window),
    "frequency": lambda r, t, c: frequency_loss(r, t),
    "logfrequency": lambda r, t, c: logfrequency_loss(r, t),
    "hybrid": lambda r, t, c: F.mse_loss(r, t) + c.frequency_weight * frequency_loss(r, t),
    "hybrid_spatial": lambda r, t, c: (
        c.frequency_weight * frequency_loss(r, t)
        + F.mse_loss(r, t)
        + ssim_loss(r, t, c.ssim_window)
    ),
}


def compute_losses(
    out: dict[str, Tensor],
    target: Tensor,
    cfg: LossConfig,
    epoch: int = 0,
    corruption_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Every active loss term by name, plus their weighted sum under "total".

    out: the model's output dict ("recon", and "mu"/"logvar" for VAEs, "z" for a latent code).
    corruption_mask: (B, 1, H, W), 1 on corrupted pixels; with corruption_weight != 1 the
    spatial reconstruction term weighs those pixels corruption_weight times more.
    """
    # Autocast would run the SSIM filters in bfloat16, where E[x^2] - E[x]^2 cancels to noise.
    with torch.autocast(device_type=target.device.type, enabled=False):
        return _compute_losses(out, target.float(), cfg, epoch, corruption_mask)


def _compute_losses(
    out: dict[str, Tensor],
    target: Tensor,
    cfg: LossConfig,
    epoch: int,
    corruption_mask: Tensor | None,
) -> dict[str, Tensor]:
    recon = out["recon"].float()
    terms: dict[str, Tensor] = {}
    if (
        corruption_mask is not None
        and cfg.corruption_weight != 1.0
        and cfg.recon in ("mse", "l1", "ssim", "msssim")
    ):
        weight = 1.0 + (cfg.corruption_weight - 1.0) * corruption_mask.float()
        terms["recon"] = _weighted_recon(cfg.recon, recon, target, weight, cfg.ssim_window)
    else:
        terms["recon"] = RECON[cfg.recon](recon, target, cfg)
    total = cfg.alpha * terms["recon"]
    if "mu" in out and "logvar" in out:
        terms["kl"] = kl_divergence(out["mu"].float(), out["logvar"].float())
        total = total + kl_weight(cfg, epoch) * terms["kl"]
    if cfg.beta > 0:
        terms["ssim"] = ssim_loss(recon, target, cfg.ssim_window)
        total = total + cfg.beta * terms["ssim"]
    if cfg.sparse_weight > 0:
        if "z" not in out:
            raise DefectaeError(
                "loss.sparse_weight > 0: this model family returns no latent code 'z'"
            )
        terms["sparse"] = out["z"].float().abs().mean()
        total = total + cfg.sparse_weight * terms["sparse"]
    terms["total"] = total
    return terms
