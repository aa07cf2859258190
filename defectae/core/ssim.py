"""Local SSIM maps as batched tensor code, shared by the SSIM loss and the SSIM residual.

Matches scikit-image's `structural_similarity(full=True)`: scipy-style 'reflect' borders,
Gaussian weights (sigma 1.5, truncated at 3.5 sigma) or a uniform window with the
sample-covariance correction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, truncate: float = 3.5, device=None, dtype=None) -> torch.Tensor:
    """Normalised 1-D Gaussian with scipy.ndimage's radius round(truncate * sigma)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype or torch.float32)


def _pad_symmetric(x: torch.Tensor, r: int) -> torch.Tensor:
    """Half-sample symmetric padding (scipy.ndimage's 'reflect': d c b a | a b c d)."""
    x = torch.cat([x[..., :r, :].flip(-2), x, x[..., -r:, :].flip(-2)], dim=-2)
    return torch.cat([x[..., :r].flip(-1), x, x[..., -r:].flip(-1)], dim=-1)


def separable_filter(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Separable depthwise filter with symmetric padding. x: (B, C, H, W), k: (K,)."""
    c, r = x.shape[1], k.numel() // 2
    x = _pad_symmetric(x, r)
    kh = k.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    kw = k.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    return F.conv2d(F.conv2d(x, kh, groups=c), kw, groups=c)


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    window: int = 11,
    gaussian: bool = True,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    data_range: float = 1.0,
) -> torch.Tensor:
    """Per-pixel SSIM of two (B, C, H, W) images, same size as the input; 1 where identical."""
    x, y = x.float(), y.float()
    if gaussian:
        k = gaussian_kernel1d(sigma, truncate=((window - 1) / 2) / sigma, device=x.device)
        cov_norm = 1.0
    else:
        k = torch.full((window,), 1.0 / window, device=x.device)
        n = window * window
        cov_norm = n / (n - 1)
    mx, my = separable_filter(x, k), separable_filter(y, k)
    vx = cov_norm * (separable_filter(x * x, k) - mx * mx)
    vy = cov_norm * (separable_filter(y * y, k) - my * my)
    cxy = cov_norm * (separable_filter(x * y, k) - mx * my)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
