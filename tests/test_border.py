"""No tile-grid lines and no image-border frame in the residual maps of a model that errs at patch edges.

The model is the identity plus a fixed noise pattern that grows towards the patch edges, as a
trained autoencoder's error does. Its residual should be about as high on the tile grid lines
and the image border as elsewhere (at most 1.1x), for every residual kind.
"""

from __future__ import annotations

import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from defectae.core.inspector import Inspector
from defectae.core.residuals import residual_reach
from defectae.core.tiling import tile_origins

SIZE, STRIDE, SIDE, FRAME = 32, 8, 128, 8


class EdgeNoise(nn.Module):
    """recon = x + noise, the noise amplitude rising from 0.01 at the patch centre to 0.2 at its edge."""

    def __init__(self, size: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        axis = torch.linspace(-1.0, 1.0, size).abs()
        edge = torch.maximum(axis[:, None], axis[None, :]) ** 4
        self.register_buffer("noise", (0.01 + 0.19 * edge) * torch.randn(size, size, generator=g))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"recon": x + self.noise}


def _texture(n: int) -> torch.Tensor:
    """n smooth random textures in [0.2, 0.8], (n, 1, SIDE, SIDE)."""
    rng = torch.Generator().manual_seed(1)
    noise = torch.rand(n, SIDE, SIDE, generator=rng).numpy()
    smooth = torch.from_numpy(gaussian_filter(noise, (0, 2, 2)))
    lo, hi = smooth.amin((1, 2), keepdim=True), smooth.amax((1, 2), keepdim=True)
    return (0.2 + 0.6 * (smooth - lo) / (hi - lo))[:, None].float()


def _ratios(maps: torch.Tensor, pad: int) -> tuple[float, float]:
    """(grid-line mean / mean elsewhere, border-frame mean / mean elsewhere) of (B, 1, H, W) maps."""
    h = int(maps.shape[2])
    edges = set()
    for o in tile_origins(h + 2 * pad, SIZE, STRIDE):
        edges.update({o - pad, o - pad + SIZE - 1})
    lines = torch.zeros(h, dtype=torch.bool)
    lines[[e for e in edges if 0 <= e < h]] = True
    grid = lines[:, None] | lines[None, :]
    frame = torch.ones(h, h, dtype=torch.bool)
    frame[FRAME:-FRAME, FRAME:-FRAME] = False
    grid &= ~frame
    rest = ~grid & ~frame
    m = maps[:, 0]
    base = m[:, rest].mean()
    return float(m[:, grid].mean() / base), float(m[:, frame].mean() / base)


def _maps(residual: str, fusion: str, border_pad: int) -> torch.Tensor:
    inspector = Inspector(
        EdgeNoise(SIZE),
        patch_size=SIZE,
        stride=STRIDE,
        fusion=fusion,
        border_pad=border_pad,
        residual_options={"residual": {residual: 1.0}},
    )
    with torch.no_grad():
        return inspector(_texture(4))[0]


def _auto_pad(residual: str) -> int:
    return SIZE // 2 + residual_reach({residual: 1.0})


@pytest.mark.parametrize("residual", ["ssim", "l1", "l2", "msssim"])
def test_no_grid_lines_and_no_border_frame(residual):
    grid, border = _ratios(_maps(residual, "gaussian", -1), _auto_pad(residual))
    assert grid <= 1.1, f"{residual}: grid lines {grid:.2f}x the rest"
    assert border <= 1.1, f"{residual}: border frame {border:.2f}x the rest"


def test_without_padding_and_weights_the_border_and_grid_stand_out():
    """The measurement above can fail: plain averaging without padding shows both artefacts."""
    grid, border = _ratios(_maps("l2", "uniform", 0), 0)
    assert grid > 1.1 and border > 1.5


def test_padding_keeps_the_identity_exact():
    class Identity(nn.Module):
        def forward(self, x):
            return {"recon": x}

    x = _texture(2)
    res, score, recon = Inspector(
        Identity(), patch_size=SIZE, stride=STRIDE, border_pad=SIZE // 2, fusion="gaussian"
    )(x)
    assert torch.equal(recon, x) and recon.shape == x.shape
    assert torch.equal(res, torch.zeros_like(res)) and torch.equal(score, torch.zeros(2))


def test_padding_beyond_the_image_is_refused():
    from defectae.errors import DefectaeError

    with pytest.raises(DefectaeError, match="tile.border_pad 40"):
        Inspector(nn.Identity(), patch_size=32, stride=8, border_pad=40)(torch.rand(1, 1, 40, 40))


def test_border_excess_sees_a_raised_frame_and_not_plain_noise():
    from defectae.core.residuals import BorderExcess

    noise = torch.rand(40, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    plain = BorderExcess()
    plain.add(noise[:25])
    plain.add(noise[25:])  # accumulated over batches as tile-test adds them
    r = plain.result()
    frame = 1 - (48 / 64) ** 2  # the band's share of the map: where a random maximum falls
    assert r["maps"] == 40 and abs(r["ratio"] - 1) < 0.02 and r["maxima_share"] < frame + 0.25
    raised = noise.clone()
    raised[..., :2, :] += 1.0
    framed = BorderExcess()
    framed.add(raised)
    r = framed.result()
    band = 2 * 64 / (64 * 64 - 48 * 48)  # the raised rows' share of the band
    assert r["maxima_share"] == 1.0 and r["ratio"] == pytest.approx(1 + 2 * band, rel=0.05)
    beyond = BorderExcess(margin=2)  # a frame the image score ignores is not counted
    beyond.add(raised)
    assert beyond.result()["maxima_share"] < frame + 0.25
