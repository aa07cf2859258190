"""Training losses: the reconstruction terms, KL, an extra SSIM term, latent sparsity and a
perceptual (feature-distance) term.

total = alpha*recon + kld_weight(epoch)*kl + beta*ssim_term + sparse_weight*sparse
        + perceptual_weight*perceptual,
as the flexible-VAE reference defines it (plus the perceptual term of Johnson et al., 2016).
Every term is returned by name so training logs each one. The settings are plain keyword
arguments (as pytorch-msssim takes them); training unpacks the profile's [loss] section once,
in `training.step.loss_kwargs`. Losses run in float32 whatever the autocast dtype; only the
perceptual term's encoder runs under it, for speed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim, ssim

from defectae.core.ssim import ssim_map
from defectae.errors import DefectaeError

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


def kl_weight(epoch: int, kld_weight: float, kl_warmup_epochs: int = 0) -> float:
    """kld_weight, ramped linearly over the first kl_warmup_epochs epochs (epoch is 0-based)."""
    if kl_warmup_epochs <= 0:
        return kld_weight
    return kld_weight * min(1.0, (epoch + 1) / kl_warmup_epochs)


def perceptual_loss(features: list[Tensor], features_of_target: list[Tensor]) -> Tensor:
    """Mean over levels of each level's MSE: squared distance / (C*H*W), as Johnson et al. (2016).

    Dividing by the level's size keeps wide, coarse and narrow, fine levels on one scale.
    Compared in float32, whatever precision the encoder ran in.
    """
    per_level = [
        F.mse_loss(f.float(), t.float()) for f, t in zip(features, features_of_target, strict=True)
    ]
    return torch.stack(per_level).mean()


def _perceptual_features(
    encoder: Callable[[Tensor], list[Tensor]], pred: Tensor, target: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """The encoder's features of both images, under the caller's autocast (for speed); gradients
    flow through the prediction's only."""
    with torch.no_grad():
        of_target = encoder(target.float())
    return encoder(pred.float()), of_target


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
    if kind == "ssim":
        return _weighted_mean(1.0 - ssim_map(recon, target, window=window), weight)
    return _weighted_mean((recon - target).pow(2), weight)


# each takes (recon, target, ssim_window, frequency_weight)
RECON: dict[str, Callable[[Tensor, Tensor, int, float], Tensor]] = {
    "mse": lambda r, t, window, fw: F.mse_loss(r, t),
    "l1": lambda r, t, window, fw: F.l1_loss(r, t),
    "ssim": lambda r, t, window, fw: ssim_loss(r, t, window),
    "msssim": lambda r, t, window, fw: msssim_loss(r, t, window),
    "frequency": lambda r, t, window, fw: frequency_loss(r, t),
    "logfrequency": lambda r, t, window, fw: logfrequency_loss(r, t),
    "hybrid": lambda r, t, window, fw: F.mse_loss(r, t) + fw * frequency_loss(r, t),
    "hybrid_spatial": lambda r, t, window, fw: (
        fw * frequency_loss(r, t) + F.mse_loss(r, t) + ssim_loss(r, t, window)
    ),
}
WEIGHTED = ("mse", "l1", "ssim")  # the kinds with a per-pixel map that corruption_weight can weight


def compute_losses(
    out: dict[str, Tensor],
    target: Tensor,
    *,
    recon: str = "mse",
    alpha: float = 1.0,
    beta: float = 0.0,
    kld_weight: float = 0.0,
    kl_warmup_epochs: int = 0,
    sparse_weight: float = 0.0,
    ssim_window: int = 11,
    frequency_weight: float = 1.0,
    corruption_weight: float = 1.0,
    epoch: int = 0,
    corruption_mask: Tensor | None = None,
    perceptual: Callable[[Tensor], list[Tensor]] | None = None,
    perceptual_weight: float = 0.0,
) -> dict[str, Tensor]:
    """Every active loss term by name ("recon", "kl", "ssim_term", "sparse", "perceptual") and
    their weighted sum "total".

    out: the model's output dict ("recon", and "mu"/"logvar" for VAEs, "z" for a latent code).
    corruption_mask: (B, 1, H, W), 1 on corrupted pixels; with corruption_weight != 1 the
    spatial reconstruction term weighs those pixels corruption_weight times more.
    perceptual: a frozen encoder, images in [0, 1] -> feature maps (models.backbones).
    """
    if perceptual_weight > 0 and perceptual is None:
        raise DefectaeError(
            f"loss.perceptual_weight = {perceptual_weight}: no perceptual encoder was given"
        )
    features = (
        _perceptual_features(perceptual, out["recon"], target)
        if perceptual is not None and perceptual_weight > 0
        else None
    )
    if corruption_mask is not None and corruption_weight != 1.0 and recon == "msssim":
        raise DefectaeError(
            f"loss.corruption_weight = {corruption_weight}: not available with loss.recon = "
            "'msssim' (MS-SSIM has no per-pixel map to weight); set it to 1 or use recon 'ssim'"
        )
    # Autocast would run the SSIM filters in bfloat16, where E[x^2] - E[x]^2 cancels to noise.
    with torch.autocast(device_type=target.device.type, enabled=False):
        target = target.float()
        pred = out["recon"].float()
        terms: dict[str, Tensor] = {}
        if corruption_mask is not None and corruption_weight != 1.0 and recon in WEIGHTED:
            weight = 1.0 + (corruption_weight - 1.0) * corruption_mask.float()
            terms["recon"] = _weighted_recon(recon, pred, target, weight, ssim_window)
        else:
            terms["recon"] = RECON[recon](pred, target, ssim_window, frequency_weight)
        total = alpha * terms["recon"]
        if "mu" in out and "logvar" in out:
            terms["kl"] = kl_divergence(out["mu"].float(), out["logvar"].float())
            total = total + kl_weight(epoch, kld_weight, kl_warmup_epochs) * terms["kl"]
        if beta > 0:
            terms["ssim_term"] = ssim_loss(pred, target, ssim_window)
            total = total + beta * terms["ssim_term"]
        if sparse_weight > 0:
            if "z" not in out:
                raise DefectaeError(
                    "loss.sparse_weight > 0: this model family returns no latent code 'z'"
                )
            terms["sparse"] = out["z"].float().abs().mean()
            total = total + sparse_weight * terms["sparse"]
        if features is not None:
            terms["perceptual"] = perceptual_loss(*features)
            total = total + perceptual_weight * terms["perceptual"]
        terms["total"] = total
    return terms


def focal_loss(logits: Tensor, mask: Tensor, gamma: float = 2.0) -> Tensor:
    """Mean per-pixel focal loss -(1 - p_t)^gamma log p_t (Lin et al. 2017) of two-class logits
    (B, 2, H, W) against a (B, 1, H, W) mask: down-weights the many easy background pixels."""
    log_p = F.log_softmax(logits.float(), dim=1)
    target = (mask > 0.5).long()  # (B, 1, H, W) class index
    log_pt = log_p.gather(1, target)
    return -((1.0 - log_pt.exp()).pow(gamma) * log_pt).mean()
