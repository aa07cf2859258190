"""Losses: SSIM against scikit-image, zero on identical inputs, weighting and warm-up."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from defectae.core.losses import RECON, compute_losses, kl_weight, msssim_window, ssim_loss
from defectae.errors import DefectaeError
from defectae.profiles.schema import LossConfig
from defectae.training.step import loss_kwargs


def _pair(seed: int = 0, size: int = 64, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, channels, size, size, generator=g)
    y = (x + 0.15 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x, y


@pytest.mark.parametrize("window", [7, 11])
def test_ssim_term_matches_skimage(window: int) -> None:
    x, y = _pair(size=96)
    ours = ssim_loss(x[:1], y[:1], window).item()
    sigma = 1.5
    reference = structural_similarity(
        x[0, 0].double().numpy(),
        y[0, 0].double().numpy(),
        data_range=1.0,
        gaussian_weights=True,
        sigma=sigma,
        use_sample_covariance=False,
        truncate=((window - 1) / 2) / sigma,
    )
    assert ours == pytest.approx(1 - reference, abs=1e-3)


@pytest.mark.parametrize("kind", sorted(RECON))
def test_every_recon_loss_is_zero_on_identical_and_positive_otherwise(kind: str) -> None:
    x, y = _pair(size=64, channels=3)
    same = compute_losses({"recon": x}, x, recon=kind)["total"].item()
    diff = compute_losses({"recon": y}, x, recon=kind)["total"].item()
    assert same == pytest.approx(0.0, abs=1e-5)
    assert diff > 1e-3


def test_kl_sparse_and_ssim_terms() -> None:
    x, y = _pair()
    weights = {"recon": "mse", "kld_weight": 0.5, "beta": 2.0, "sparse_weight": 0.1}
    zero = {
        "recon": x,
        "mu": torch.zeros(2, 8),
        "logvar": torch.zeros(2, 8),
        "z": torch.zeros(2, 8),
    }
    terms = compute_losses(zero, x, **weights)
    assert set(terms) == {"recon", "kl", "ssim_term", "sparse", "total"}
    assert all(v.item() == pytest.approx(0.0, abs=1e-5) for v in terms.values())
    off = {"recon": y, "mu": torch.ones(2, 8), "logvar": torch.zeros(2, 8), "z": torch.ones(2, 8)}
    terms = compute_losses(off, x, **weights)
    assert terms["kl"].item() == pytest.approx(0.5 * 8)  # 0.5 * sum(mu^2) per sample
    expected = terms["recon"] + 0.5 * terms["kl"] + 2.0 * terms["ssim_term"] + 0.1 * terms["sparse"]
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_kl_warmup_is_linear() -> None:
    assert [kl_weight(e, 1.0, 4) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert kl_weight(0, 0.3) == 0.3


@pytest.mark.parametrize("kind", ["mse", "l1", "ssim"])
def test_corruption_weight_emphasises_the_corrupted_area(kind: str) -> None:
    x = torch.full((1, 1, 32, 32), 0.5)
    recon = x.clone()
    recon[..., 8:16, 8:16] = 0.9  # error only inside the corrupted square
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:16, 8:16] = 1
    base = compute_losses({"recon": recon}, x, recon=kind, corruption_mask=mask)["recon"].item()
    weighted = compute_losses(
        {"recon": recon}, x, recon=kind, corruption_weight=10.0, corruption_mask=mask
    )["recon"].item()
    assert weighted > 1.1 * base
    if kind == "mse":  # 64 of 1024 pixels off by 0.4, weighted 10x: 0.16*640 / (960 + 640)
        assert (base, weighted) == (
            pytest.approx(0.16 * 64 / 1024),
            pytest.approx(0.16 * 640 / 1600),
        )


def test_msssim_refuses_a_corruption_weight_it_cannot_apply() -> None:
    x, y = _pair(size=64)
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., 8:24, 8:24] = 1
    with pytest.raises(DefectaeError, match=r"loss.corruption_weight = 4.0: .*'msssim'"):
        compute_losses({"recon": y}, x, recon="msssim", corruption_weight=4.0, corruption_mask=mask)
    plain = compute_losses({"recon": y}, x, recon="msssim", corruption_mask=mask)["recon"]
    assert plain.item() == pytest.approx(RECON["msssim"](y, x, 11, 1.0).item())


def test_every_loss_setting_of_the_profile_is_a_keyword_of_compute_losses() -> None:
    x, y = _pair()
    cfg = LossConfig(recon="l1", alpha=2.0, beta=0.5, ssim_window=7)
    terms = compute_losses({"recon": y}, x, **loss_kwargs(cfg))
    expected = 2.0 * (y - x).abs().mean() + 0.5 * ssim_loss(y, x, 7)
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_msssim_adapts_window_and_rejects_tiny_patches() -> None:
    assert msssim_window(256, 11) == 11
    assert msssim_window(128, 11) == 7
    with pytest.raises(DefectaeError, match="msssim"):
        msssim_window(32, 11)


def test_sparse_needs_a_latent() -> None:
    x, _ = _pair()
    with pytest.raises(DefectaeError, match="sparse_weight"):
        compute_losses({"recon": x}, x, sparse_weight=1.0)


def test_losses_run_in_float32_under_bf16_inputs() -> None:
    x, y = _pair()
    terms = compute_losses({"recon": y.bfloat16()}, x, recon="frequency")
    assert terms["total"].dtype == torch.float32 and np.isfinite(terms["total"].item())


@pytest.mark.parametrize("kind", ["ssim", "msssim", "mse"])
def test_losses_ignore_autocast(kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    x = 0.1 + 0.02 * torch.rand(
        2, 1, 96, 96, generator=g
    )  # dark, low-contrast: bf16 breaks SSIM here
    y = (x + 0.01 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    plain = compute_losses({"recon": y}, x, recon=kind)["total"]
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = compute_losses({"recon": y}, x, recon=kind)["total"]
    assert mixed.item() == pytest.approx(plain.item(), rel=1e-5)
