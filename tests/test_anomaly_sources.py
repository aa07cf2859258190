"""DRAEM-style anomalies: the foreign-texture sources of the `perlin` corruption, its per-patch
Perlin scales, the source checks, and that the defaults still give the earlier output byte for byte."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import label

from defectae.data import anomaly_sources as S
from defectae.data import corruptions as C
from defectae.errors import DefectaeError
from defectae.profiles.schema import CorruptionConfig
from defectae.stores.patches import PatchDataset, write_patches

SOURCES = ("fractal", "procedural", "images", "folder", "mixed")


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """A folder of a few RGB and grey PNGs, one in a sub-folder, plus a file that is no image."""
    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    for i, (h, w) in enumerate([(40, 50), (64, 30), (90, 90)]):
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / ("sub" if i == 2 else ".") / f"rgb{i}.png")
    Image.fromarray((rng.random((48, 48)) * 255).astype(np.uint8)).save(tmp_path / "grey.png")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def smooth_batch(seed: int, channels: int, b: int = 8, p: int = 32) -> torch.Tensor:
    """(b, channels, p, p) uint8-valued floats with some structure."""
    x = torch.rand((b, channels, p, p), generator=torch.Generator().manual_seed(seed))
    x = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return torch.round(x * 255) / 255


def perlin_cfg(source: str, folder: Path | str = "", **kw) -> CorruptionConfig:
    return CorruptionConfig(
        kind="perlin", prob=1.0, source=source, anomaly_source_dir=str(folder), **kw
    )


# ----------------------------------------------------------------------------- every source


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("channels", [1, 3])
def test_mask_is_exactly_the_changed_pixels(source, channels, image_dir):
    cfg = perlin_cfg(source, image_dir if source in ("folder", "mixed") else "", perlin_min_scale=1)
    for seed in range(3):
        x = smooth_batch(seed, channels)
        out, mask = C.corrupt(x, cfg, torch.Generator().manual_seed(seed))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert mask.shape == (8, 1, 32, 32) and mask.dtype == torch.float32
        assert torch.equal(mask.bool(), (out != x).any(dim=1, keepdim=True))
        assert (mask.flatten(1).sum(1) > 0).all()
        assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("source", SOURCES)
def test_textures_are_in_range_and_reproducible(source, image_dir):
    cfg = perlin_cfg(source, image_dir if source in ("folder", "mixed") else "")
    x = smooth_batch(1, 3, b=16)
    first = S.textures(x, cfg, torch.Generator().manual_seed(5))
    again = S.textures(x, cfg, torch.Generator().manual_seed(5))
    other = S.textures(x, cfg, torch.Generator().manual_seed(6))
    assert first.shape == x.shape and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    out1, mask1 = C.corrupt(x, cfg, torch.Generator().manual_seed(5))
    out2, mask2 = C.corrupt(x, cfg, torch.Generator().manual_seed(5))
    out3, _ = C.corrupt(x, cfg, torch.Generator().manual_seed(6))
    assert torch.equal(out1, out2) and torch.equal(mask1, mask2)
    assert not torch.equal(out1, out3)


def test_a_blended_pixel_equal_to_the_original_is_not_in_the_mask(monkeypatch):
    x = smooth_batch(2, 3)
    x[:, :, 16:] = 0.0  # black bottom rows, and a texture black there too: the blend keeps them
    texture = x.clone()
    texture[:, :, :16] = 0.5
    monkeypatch.setattr(C, "textures", lambda x, cfg, g: texture)
    out, mask = C.corrupt(x, perlin_cfg("procedural", perlin_threshold=0.0), torch.Generator())
    assert mask[:, :, 16:].sum() == 0 and torch.equal(out[:, :, 16:], x[:, :, 16:])
    assert torch.equal(mask.bool(), (out != x).any(dim=1, keepdim=True))
    assert mask[:, :, :16].sum() > 0


def test_prob_one_half_leaves_about_half_the_batch_unchanged():
    x = smooth_batch(3, 1, b=64, p=16)
    cfg = CorruptionConfig(kind="perlin", prob=0.5, source="procedural", perlin_min_scale=1)
    out, mask = C.corrupt(x, cfg, torch.Generator().manual_seed(1))
    hit = mask.flatten(1).sum(1) > 0
    assert 16 < int(hit.sum()) < 48
    assert torch.equal(out[~hit], x[~hit])
    assert (out[hit] != x[hit]).flatten(1).any(1).all()


# ----------------------------------------------------------------------------- regions


def _components(mask: torch.Tensor) -> list[int]:
    return [int(label(m[0].numpy() > 0)[1]) for m in mask]


def test_perlin_min_scale_varies_the_region_sizes():
    x = smooth_batch(4, 1, b=32, p=64)
    fixed = perlin_cfg("fractal", perlin_scale=4)
    varied = perlin_cfg("fractal", perlin_scale=32, perlin_min_scale=1)
    _, mask_fixed = C.corrupt(x, fixed, torch.Generator().manual_seed(0))
    _, mask_varied = C.corrupt(x, varied, torch.Generator().manual_seed(0))
    counts = _components(mask_varied)
    assert min(counts) <= 2 and max(counts) >= 20, counts
    assert max(_components(mask_fixed)) < 12
    areas = mask_varied.flatten(1).sum(1)
    assert areas.std() > mask_fixed.flatten(1).sum(1).std()


def test_scale_exponents_are_the_powers_of_two_in_range():
    assert list(C.scale_exponents(1, 32)) == [0, 1, 2, 3, 4, 5]
    assert list(C.scale_exponents(3, 7)) == [2]
    assert list(C.scale_exponents(5, 7)) == []


def test_perlin_noise_with_other_cells_along_x():
    g = torch.Generator().manual_seed(0)
    noise = S.perlin_noise(3, 32, 1, g, torch.device("cpu"), cells_x=16)
    assert noise.shape == (3, 32, 32)
    # One cell down the rows, sixteen across: the noise changes much faster along x.
    assert noise.diff(dim=2).abs().mean() > 4 * noise.diff(dim=1).abs().mean()


# ----------------------------------------------------------------------------- sources


def test_images_source_takes_another_patch_of_the_batch(monkeypatch):
    monkeypatch.setattr(S, "_jitter", lambda t, g: t)
    b = 6
    x = torch.rand((b, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    out = S.image_textures(x, torch.Generator().manual_seed(3))
    donors = []
    for i in range(b):  # rotation and mirroring keep each patch's multiset of values
        same = [
            j for j in range(b) if torch.equal(out[i].flatten().sort()[0], x[j].flatten().sort()[0])
        ]
        assert len(same) == 1 and same[0] != i
        donors.append(same[0])
    assert sorted(donors) == list(range(b))


def test_procedural_patterns_are_in_range_and_varied():
    g, cpu = torch.Generator().manual_seed(0), torch.device("cpu")
    for name in S.PATTERNS:
        t = S._PATTERNS[name](4, 32, g, cpu)
        assert t.shape == (4, 1, 32, 32) and t.min() >= 0 and t.max() <= 1
        assert (t.flatten(1).amax(1) > t.flatten(1).amin(1)).all() == (name != "flat")
    tex = S.procedural_textures(64, 3, 32, g, cpu)
    flat = (tex.flatten(2).amax(2) == tex.flatten(2).amin(2)).all(1)
    assert 0 < int(flat.sum()) < 32  # some flat colours, mostly structure


@pytest.mark.parametrize("name", S.AUGMENTS)
def test_each_source_augmentation_stays_in_range(name):
    t = torch.rand((8, 3, 16, 16), generator=torch.Generator().manual_seed(1))
    t[:, :, 0, 0], t[:, :, 0, 1] = 0.0, 1.0
    out = S._AUGMENTS[name](t, torch.Generator().manual_seed(2)).clamp(0.0, 1.0)
    assert out.shape == t.shape and not torch.equal(out, t)
    assert S.augment(t, torch.Generator().manual_seed(2)).min() >= 0
    assert S.augment(t, torch.Generator().manual_seed(2)).max() <= 1


def test_augment_applies_three_of_the_list_and_returns_a_new_tensor():
    t = torch.rand((16, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    before = t.clone()
    out = S.augment(t, torch.Generator().manual_seed(0))
    assert torch.equal(t, before) and not torch.equal(out, t)
    assert torch.equal(S.augment(t, torch.Generator(), k=0), t)


def test_folder_source_converts_rgb_to_grey_and_grey_to_rgb(tmp_path):
    Image.new("RGB", (40, 30), (200, 50, 10)).save(tmp_path / "colour.png")
    grey = tmp_path / "grey"
    grey.mkdir()
    Image.new("L", (30, 50), 77).save(grey / "flat.png")
    cpu = torch.device("cpu")
    one = S.folder_textures(3, 1, 16, str(tmp_path), torch.Generator(), cpu)
    assert one.shape == (3, 1, 16, 16)
    # The folder has both files (recursive); each texture is one of the two flat values.
    expected_l = round(200 * 299 / 1000 + 50 * 587 / 1000 + 10 * 114 / 1000) / 255
    for t in one:
        assert torch.allclose(t, torch.full_like(t, expected_l), atol=1e-6) or torch.allclose(
            t, torch.full_like(t, 77 / 255), atol=1e-6
        )
    three = S.folder_textures(4, 3, 16, str(grey), torch.Generator(), cpu)
    assert three.shape == (4, 3, 16, 16)
    assert torch.allclose(three, torch.full_like(three, 77 / 255), atol=1e-6)


def test_folder_source_crops_vary_and_are_reproducible(image_dir):
    cpu = torch.device("cpu")
    a = S.folder_textures(6, 3, 24, str(image_dir), torch.Generator().manual_seed(1), cpu)
    b = S.folder_textures(6, 3, 24, str(image_dir), torch.Generator().manual_seed(1), cpu)
    c = S.folder_textures(6, 1, 24, str(image_dir), torch.Generator().manual_seed(2), cpu)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and c.shape == (6, 1, 24, 24)
    assert len(S.source_files(str(image_dir))) == 4  # the PNGs, the one in sub/ included
    assert all(not torch.equal(a[0], a[i]) for i in range(1, 6))


def test_mixed_draws_the_folder_only_when_one_is_set(image_dir):
    assert S.mixed_sources(perlin_cfg("mixed")) == ("procedural", "images")
    assert S.mixed_sources(perlin_cfg("mixed", image_dir)) == ("procedural", "images", "folder")


# ----------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (perlin_cfg("folder"), r"corruption.anomaly_source_dir'.*source = 'folder', got ''"),
        (
            perlin_cfg("folder", "/no/such/folder"),
            r"corruption.anomaly_source_dir'.*/no/such/folder",
        ),
        (perlin_cfg("mixed", "/no/such/folder"), r"corruption.anomaly_source_dir'.*not found"),
        (
            perlin_cfg("fractal", perlin_min_scale=5, perlin_scale=7),
            r"corruption.perlin_min_scale'.*5",
        ),
        (perlin_cfg("fractal", perlin_min_scale=8, perlin_scale=4), r"corruption.perlin_min_scale"),
    ],
)
def test_bad_sources_are_one_line_errors(cfg, match):
    with pytest.raises(DefectaeError, match=match) as e:
        C.check_corruption(cfg)
    assert "\n" not in str(e.value)


def test_an_empty_folder_is_an_error_naming_key_and_path(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DefectaeError, match="corruption.anomaly_source_dir") as e:
        C.check_corruption(perlin_cfg("folder", tmp_path))
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_checks_ignore_sources_that_are_not_used(tmp_path):
    C.check_corruption(None)
    C.check_corruption(CorruptionConfig(kind="dominant_square", source="folder"))
    C.check_corruption(perlin_cfg("procedural", tmp_path / "missing"))  # the folder is unused
    C.check_corruption(perlin_cfg("fractal", perlin_min_scale=3, perlin_scale=4))


def test_patch_dataset_checks_the_corruption_when_built(tmp_path):
    patches = np.zeros((4, 1, 8, 8), dtype=np.uint8)
    path = write_patches(tmp_path / "patches.h5", patches, patches[:1], {})
    with pytest.raises(DefectaeError, match="corruption.anomaly_source_dir.*missing"):
        PatchDataset(path, corruption=perlin_cfg("folder", tmp_path / "missing"))
    PatchDataset(path, corruption=perlin_cfg("procedural"))


# ----------------------------------------------------------------------------- unchanged defaults


def _old_lattice_weights(side: int, cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    coord = (torch.arange(side, dtype=torch.float32) + 0.5) * (cells / side)
    cell = coord.floor().long().clamp_(max=cells - 1)
    frac = coord - cell
    fade = frac * frac * frac * (frac * (frac * 6 - 15) + 10)
    near = torch.nn.functional.one_hot(cell, cells + 1).to(torch.float32)
    far = torch.nn.functional.one_hot(cell + 1, cells + 1).to(torch.float32)
    weight = near * (1 - fade)[:, None] + far * fade[:, None]
    offset = near * ((1 - fade) * frac)[:, None] + far * (fade * (frac - 1))[:, None]
    return weight, offset


def _old_perlin_noise(batch: int, side: int, cells: int, g: torch.Generator) -> torch.Tensor:
    angles = torch.rand((batch, cells + 1, cells + 1), generator=g) * (2 * math.pi)
    grad_x, grad_y = torch.cos(angles), torch.sin(angles)
    weight, offset = _old_lattice_weights(side, cells)
    return (weight @ grad_x @ offset.T + offset @ grad_y @ weight.T) * math.sqrt(2)


def _old_minmax(t: torch.Tensor) -> torch.Tensor:
    flat = t.flatten(1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    return (t - lo[:, None, None]) / (hi - lo).clamp_min(1e-12)[:, None, None]


def _old_perlin_corrupt(
    x: torch.Tensor, scale: int, threshold: float, prob: float, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `perlin` corruption and `corrupt`'s per-patch probability before the anomaly sources."""
    b, c, p, _ = x.shape
    region = _old_minmax(_old_perlin_noise(b, p, min(scale, p), g)) > threshold
    field = torch.zeros((b, p, p))
    for octave in range(3):
        field += _old_perlin_noise(b, p, min(p, 2 ** (octave + 2)), g) / 2**octave
    t = _old_minmax(field)[:, None]
    lo, hi = torch.rand((b, c, 1, 1), generator=g), torch.rand((b, c, 1, 1), generator=g)
    texture = (lo + (hi - lo) * t).to(x.dtype)
    beta = torch.rand((b, 1, 1, 1), generator=g).to(x.dtype) * 0.8
    blended = (beta * x + (1 - beta) * texture).clamp(0.0, 1.0)
    out = torch.where(region[:, None], blended, x)
    mask = (out != x).any(dim=1, keepdim=True).to(torch.float32)
    keep = torch.rand((b,), generator=g) < prob
    sel = keep[:, None, None, None]
    return torch.where(sel, out, x), mask * sel


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    ("scale", "threshold", "prob"), [(4, 0.5, 1.0), (8, 0.3, 0.5), (64, 0.7, 1.0)]
)
def test_default_perlin_is_byte_identical_to_before(channels, scale, threshold, prob):
    x = smooth_batch(7, channels, b=12, p=32)
    cfg = CorruptionConfig(kind="perlin", prob=prob, perlin_scale=scale, perlin_threshold=threshold)
    assert cfg.source == "fractal" and cfg.perlin_min_scale == 0 and cfg.anomaly_source_dir == ""
    for seed in (0, 1):
        out, mask = C.corrupt(x, cfg, torch.Generator().manual_seed(seed))
        ref_out, ref_mask = _old_perlin_corrupt(
            x, scale, threshold, prob, torch.Generator().manual_seed(seed)
        )
        assert torch.equal(out, ref_out) and torch.equal(mask, ref_mask)
