"""Tiling, fusion, residual maps, image scores and the Inspector, against independent references."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity
from skimage.transform import resize
from torch import nn

from defectae.core.inspector import Inspector
from defectae.core.normalize import MapStatistics, normalize_maps
from defectae.core.residuals import image_scores, residual_map
from defectae.core.tiling import extract_patches, fuse_patches, fusion_window, tile_origins
from defectae.errors import DefectaeError

# (H, W, size, stride): exact grids, (H - size) % stride != 0 borders, size == side, stride == size
GRIDS = [
    (32, 32, 8, 8),
    (37, 45, 16, 5),
    (50, 33, 33, 7),
    (20, 20, 20, 3),
    (64, 40, 16, 16),
    (33, 61, 10, 10),
    (70, 70, 32, 12),
]


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"recon": x}


class TinyAE(nn.Module):
    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"recon": torch.sigmoid(self.net(x))}


L1 = {"residual": {"l1": 1.0}}


# ----------------------------------------------------------------------------- tiling


@pytest.mark.parametrize(
    "length,size,stride",
    [(10, 4, 3), (10, 4, 2), (7, 7, 1), (100, 32, 32), (129, 128, 32), (5, 1, 1)],
)
def test_tile_origins_cover_everything(length, size, stride):
    origins = tile_origins(length, size, stride)
    covered = np.zeros(length, bool)
    for o in origins:
        covered[o : o + size] = True
    assert covered.all()
    assert origins[0] == 0 and origins[-1] == length - size
    assert origins == sorted(set(origins))
    assert np.all(np.diff(origins) <= stride)


def test_tile_origins_hand_cases():
    assert tile_origins(10, 4, 3) == [0, 3, 6]
    assert tile_origins(11, 4, 3) == [0, 3, 6, 7]
    assert tile_origins(512, 128, 32) == list(range(0, 385, 32))


@pytest.mark.parametrize(
    "length,size,stride,key",
    [(10, 11, 1, "model.input_size 11"), (10, 4, 5, "tile.stride 5"), (10, 4, 0, "tile.stride 0")],
)
def test_tile_origins_rejects(length, size, stride, key):
    with pytest.raises(DefectaeError, match=key):
        tile_origins(length, size, stride)


def test_patch_larger_than_the_image_is_a_user_error():
    with pytest.raises(
        DefectaeError, match="model.input_size 12: the patch is larger than the image side 10"
    ):
        extract_patches(torch.rand(1, 1, 10, 20), 12, 4)
    with pytest.raises(DefectaeError, match="tile.stride 9"):
        fuse_patches(torch.rand(4, 1, 8, 8), (16, 16), 8, 9)


@pytest.mark.parametrize("h,w,size,stride", GRIDS)
def test_extract_patches_matches_slicing(h, w, size, stride):
    x = torch.rand(2, 3, h, w)
    rows, cols = tile_origins(h, size, stride), tile_origins(w, size, stride)
    expected = torch.stack([x[:, :, r : r + size, c : c + size] for r in rows for c in cols], 1)
    assert torch.equal(extract_patches(x, size, stride), expected.reshape(-1, 3, size, size))


@pytest.mark.parametrize("h,w,size,stride", GRIDS)
def test_fused_identity_is_exact(h, w, size, stride):
    x = torch.rand(2, 3, h, w)
    assert torch.equal(fuse_patches(extract_patches(x, size, stride), (h, w), size, stride), x)


@pytest.mark.parametrize("h,w,size,stride", GRIDS)
def test_fusion_averages_overlaps(h, w, size, stride):
    rows, cols = tile_origins(h, size, stride), tile_origins(w, size, stride)
    patches = torch.randn(2 * len(rows) * len(cols), 1, size, size)
    total, count = np.zeros((2, 1, h, w)), np.zeros((h, w))
    tiles = patches.double().numpy().reshape(2, len(rows), len(cols), 1, size, size)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            total[:, :, r : r + size, c : c + size] += tiles[:, i, j]
            count[r : r + size, c : c + size] += 1
    fused = fuse_patches(patches, (h, w), size, stride)
    np.testing.assert_allclose(fused.numpy(), total / count, atol=2e-6)


# ----------------------------------------------------------------------------- residuals


def test_ssim_residual_matches_skimage_gaussian():
    rng = np.random.default_rng(0)
    x = rng.random((40, 52)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1).astype(np.float32)
    _, s = structural_similarity(
        x,
        y,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        full=True,
    )
    got = residual_map(torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None])
    assert got.shape == (1, 1, 40, 52) and got.dtype == torch.float32
    np.testing.assert_allclose(got[0, 0].numpy(), 1 - s, atol=1e-4)


def test_ssim_residual_matches_skimage_uniform_rgb():
    rng = np.random.default_rng(1)
    x = rng.random((3, 33, 30)).astype(np.float32)
    y = np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1).astype(np.float32)
    _, s = structural_similarity(
        x,
        y,
        win_size=7,
        gaussian_weights=False,
        use_sample_covariance=True,
        data_range=1.0,
        channel_axis=0,
        full=True,
        K1=0.02,
        K2=0.05,
    )
    c = {"ssim_gaussian": False, "ssim_window": 7, "ssim_k1": 0.02, "ssim_k2": 0.05}
    got = residual_map(torch.from_numpy(x)[None], torch.from_numpy(y)[None], **c)
    np.testing.assert_allclose(got[0, 0].numpy(), 1 - s.mean(0), atol=1e-4)


def test_l1_l2_and_weighted_combination():
    rng = np.random.default_rng(2)
    x, y = (
        rng.random((2, 3, 16, 17)).astype(np.float32),
        rng.random((2, 3, 16, 17)).astype(np.float32),
    )
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    l1 = residual_map(tx, ty, residual={"l1": 1.0})[:, 0].numpy()
    l2 = residual_map(tx, ty, residual={"l2": 1.0})[:, 0].numpy()
    np.testing.assert_allclose(l1, np.abs(x - y).mean(1), atol=1e-6)
    np.testing.assert_allclose(l2, ((x - y) ** 2).mean(1), atol=1e-6)
    ssim = residual_map(tx, ty)[:, 0].numpy()
    mixed = residual_map(tx, ty, residual={"ssim": 0.5, "l1": 2.0, "l2": 0.0})[:, 0].numpy()
    np.testing.assert_allclose(mixed, 0.5 * ssim + 2.0 * l1, atol=1e-5)


def _avg_pool(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    return a[:h, :w].reshape(h // 2, 2, w // 2, 2).mean((1, 3))


def test_msssim_residual_is_the_documented_multiscale_map():
    rng = np.random.default_rng(3)
    x = rng.random((64, 48))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    maps, a, b = [], x, y
    for _ in range(3):
        _, s = structural_similarity(
            a,
            b,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            full=True,
        )
        maps.append(resize(s, x.shape, order=1, mode="edge", anti_aliasing=False))
        a, b = _avg_pool(a), _avg_pool(b)
    expected = 1 - np.mean(maps, 0)
    tx, ty = (torch.from_numpy(v).float()[None, None] for v in (x, y))
    got = residual_map(tx, ty, residual={"msssim": 1.0})
    np.testing.assert_allclose(got[0, 0].numpy(), expected, atol=1e-4)
    assert residual_map(tx, tx, residual={"msssim": 1.0}).abs().max() < 1e-6


def test_smoothing_matches_scipy():
    rng = np.random.default_rng(4)
    x, y = (
        rng.random((1, 1, 40, 37)).astype(np.float32),
        rng.random((1, 1, 40, 37)).astype(np.float32),
    )
    got = residual_map(
        torch.from_numpy(x), torch.from_numpy(y), residual={"l1": 1.0}, smooth_sigma=2.5
    )
    expected = gaussian_filter(np.abs(x - y)[0, 0].astype(np.float64), sigma=2.5, mode="reflect")
    np.testing.assert_allclose(got[0, 0].numpy(), expected, atol=1e-4)


@pytest.mark.parametrize(
    "residual,key",
    [
        ({"ssmi": 1.0}, "tile.residual.ssmi"),
        ({"l1": -1.0}, "tile.residual.l1"),
        ({}, "tile.residual"),
        ({"l2": 0.0}, "tile.residual"),
    ],
)
def test_bad_residual_settings(residual, key):
    x = torch.rand(1, 1, 16, 16)
    with pytest.raises(DefectaeError, match=key) as e:
        residual_map(x, x, residual=residual)
    assert "ssim, l2, l1, msssim" in str(e.value) or "negative" in str(e.value)


def test_window_or_smoothing_larger_than_the_image():
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(DefectaeError, match="tile.ssim_window 11"):
        residual_map(x, x)
    with pytest.raises(DefectaeError, match="tile.smooth_sigma"):
        residual_map(x, x, residual={"l1": 1.0}, smooth_sigma=3.0)


@pytest.mark.parametrize(
    "score,pct", [("max", 1.0), ("topk", 1.0), ("topk", 10.0), ("topk", 0.001), ("topk", 100.0)]
)
def test_image_scores(score, pct):
    maps = torch.rand(3, 1, 20, 30)
    flat = maps.flatten(1).numpy()
    if score == "max":
        expected = flat.max(1)
    else:
        k = max(1, math.ceil(flat.shape[1] * pct / 100))
        expected = np.sort(flat, 1)[:, -k:].mean(1)
    np.testing.assert_allclose(
        image_scores(maps, score=score, topk_percent=pct).numpy(), expected, rtol=1e-6
    )


# ----------------------------------------------------------------------------- inspector


@pytest.mark.parametrize("h,w,size,stride", [(37, 45, 16, 5), (40, 40, 40, 8)])
def test_inspector_identity_gives_zero_residual(h, w, size, stride):
    x = torch.rand(2, 1, h, w)
    for residual in ({"ssim": 1.0}, {"l2": 1.0, "l1": 0.5}):
        res, score, recon = Inspector(
            Identity(),
            patch_size=size,
            stride=stride,
            batch_size=7,
            residual_options={"residual": residual},
        )(x)
        assert res.shape == (2, 1, h, w) and score.shape == (2,) and recon.shape == x.shape
        assert torch.equal(recon, x)
        assert torch.equal(res, torch.zeros_like(res)) and torch.equal(score, torch.zeros(2))


def test_inspector_chunks_patches_by_batch_size():
    calls = []

    class Recording(Identity):
        def forward(self, x):
            calls.append(x.shape[0])
            return super().forward(x)

    x = torch.rand(1, 1, 24, 24)  # 3 x 3 tiles of 12 with stride 6
    Inspector(Recording(), patch_size=12, stride=6, batch_size=4, residual_options=L1)(x)
    assert calls == [4, 4, 1]
    calls.clear()
    Inspector(Recording(), patch_size=12, stride=6, batch_size=0, residual_options=L1)(x)
    assert calls == [9]


def test_inspector_whole_image_resizes_in_and_out():
    seen = []

    class Recording(Identity):
        def forward(self, x):
            seen.append(tuple(x.shape))
            return super().forward(x)

    x = torch.rand(2, 3, 32, 32)
    res, _, recon = Inspector(
        Recording(), patch_size=32, stride=999, whole_image=True, batch_size=8, residual_options=L1
    )(x)
    assert seen == [(2, 3, 32, 32)] and torch.equal(recon, x) and res.abs().max() == 0
    res, _, recon = Inspector(
        Recording(), patch_size=16, stride=999, whole_image=True, batch_size=8, residual_options=L1
    )(torch.rand(2, 3, 40, 24))
    assert (
        seen[-1] == (2, 3, 16, 16) and recon.shape == (2, 3, 40, 24) and res.shape == (2, 1, 40, 24)
    )


def test_inspector_rejects_a_stride_beyond_the_patch():
    with pytest.raises(DefectaeError, match="tile.stride 20"):
        Inspector(Identity(), patch_size=16, stride=20, batch_size=8)


def test_inspector_traces_and_matches_eager():
    torch.manual_seed(0)
    inspector = Inspector(
        TinyAE(),
        patch_size=16,
        stride=5,
        batch_size=7,
        residual_options={"residual": {"ssim": 1.0, "l2": 0.5}, "smooth_sigma": 1.0},
        score_options={"score": "topk"},
    ).eval()
    x, other = torch.rand(2, 1, 37, 45), torch.rand(2, 1, 37, 45)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter(
            "ignore", FutureWarning
        )  # torch.jit.trace is deprecated, export still uses it
        traced = torch.jit.trace(inspector, x)
        for got, want in zip(traced(other), inspector(other), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- fusion weights


@pytest.mark.parametrize("h,w,size,stride", GRIDS)
def test_gaussian_fusion_is_the_weighted_mean_and_keeps_identity_exact(h, w, size, stride):
    window = fusion_window(size, "gaussian")
    x = torch.rand(2, 3, h, w)
    assert torch.equal(
        fuse_patches(extract_patches(x, size, stride), (h, w), size, stride, window), x
    )
    patches = torch.rand(
        2 * len(tile_origins(h, size, stride)) * len(tile_origins(w, size, stride)), 3, size, size
    )
    num, den = np.zeros((2, 3, h, w)), np.zeros((h, w))
    k, win = 0, window.double().numpy()
    tiles = patches.double().numpy().reshape(2, -1, 3, size, size)
    for y in tile_origins(h, size, stride):
        for x0 in tile_origins(w, size, stride):
            num[:, :, y : y + size, x0 : x0 + size] += tiles[:, k] * win
            den[y : y + size, x0 : x0 + size] += win
            k += 1
    got = fuse_patches(patches, (h, w), size, stride, window).double().numpy()
    np.testing.assert_allclose(got, num / den, rtol=1e-5, atol=1e-6)


def test_gaussian_window_weighs_the_tile_centre_most():
    window = fusion_window(32, "gaussian")
    assert window[15:17, 15:17].min() > 0.98 and window[0, 0] < 1e-6 and window[0, 16] < 1e-3
    with pytest.raises(DefectaeError, match="tile.fusion 'hann'"):
        fusion_window(32, "hann")


# ----------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("kind", ["global", "pixel"])
def test_a_map_equal_to_the_validation_mean_normalises_to_zero(kind):
    rng = np.random.default_rng(7)
    val = rng.gamma(2.0, 0.05, (12, 1, 16, 20)).astype(np.float32)
    stats = MapStatistics()
    stats.add(val[:5])
    stats.add(val[5:])
    mean, std = stats.mean_std(kind, floor=0.1)
    if kind == "global":
        assert mean.shape == (1, 1) and float(mean) == pytest.approx(val.mean(), rel=1e-5)
        assert float(std) == pytest.approx(val.std(), rel=1e-4)
        at_mean = torch.full((1, 1, 16, 20), float(mean))
    else:
        np.testing.assert_allclose(mean.numpy(), val[:, 0].mean(0), rtol=1e-5)
        expected = np.maximum(val[:, 0].std(0), 0.1 * val.std())
        np.testing.assert_allclose(std.numpy(), expected, rtol=1e-4)
        at_mean = mean[None, None]
    assert torch.allclose(normalize_maps(at_mean, mean, std), torch.zeros(1, 1, 16, 20), atol=1e-6)


def test_the_pixel_std_floor_keeps_constant_regions_finite():
    val = np.zeros((4, 1, 8, 8), np.float32)
    val[:, :, :, :4] = np.arange(4, dtype=np.float32)[
        :, None, None, None
    ]  # varies on the left only
    stats = MapStatistics()
    stats.add(val)
    mean, std = stats.mean_std("pixel", floor=0.5)
    assert float(std[:, 4:].min()) == pytest.approx(0.5 * val.std(), rel=1e-4)
    assert torch.isfinite(normalize_maps(torch.ones(1, 1, 8, 8), mean, std)).all()
    with pytest.raises(DefectaeError, match="validation split is empty"):
        MapStatistics().mean_std("global")


def test_the_inspector_normalises_before_scoring():
    x = torch.rand(2, 1, 24, 24)
    recon_noise = TinyAE()
    mean, std = torch.full((24, 24), 0.2), torch.full((24, 24), 0.5)
    plain = Inspector(recon_noise, patch_size=12, stride=6, residual_options=L1)
    normed = Inspector(
        recon_noise, patch_size=12, stride=6, residual_options=L1, normalization=(mean, std)
    )
    with torch.no_grad():
        (r, _, _), (z, score, _) = plain(x), normed(x)
    torch.testing.assert_close(z, (r - 0.2) / 0.5)
    torch.testing.assert_close(score, z.flatten(1).amax(1))


def test_the_image_score_can_ignore_a_border_frame():
    maps = torch.zeros(2, 1, 20, 30)
    maps[0, 0, 0, 0] = 9.0  # a border pixel: ignored with margin 2
    maps[1, 0, 10, 15] = 3.0
    np.testing.assert_allclose(image_scores(maps, margin=2).numpy(), [0.0, 3.0])
    np.testing.assert_allclose(image_scores(maps).numpy(), [9.0, 3.0])
    with pytest.raises(DefectaeError, match="tile.score_margin 10"):
        image_scores(maps, margin=10)


def test_area_score_is_the_share_of_pixels_above_the_threshold():
    maps = torch.zeros(2, 1, 4, 5)
    maps[0, 0, 0, :3] = 4.0  # 3 of 20 pixels above 3
    maps[1, 0, 1:3, 1:3] = 3.0  # on the threshold: not above
    np.testing.assert_allclose(image_scores(maps, score="area").numpy(), [0.15, 0.0])
    np.testing.assert_allclose(
        image_scores(maps, score="area", area_threshold=2.5).numpy(), [0.15, 0.2]
    )
    np.testing.assert_allclose(  # the margin frame leaves the 2 x 3 centre
        image_scores(maps, score="area", area_threshold=2.5, margin=1).numpy(), [0.0, 4 / 6]
    )
    with pytest.raises(DefectaeError, match="tile.score 'mean'"):
        image_scores(maps, score="mean")
