"""Training patches cover what is tested: even crop placement and augment's intensity report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from builders import good_split

from defectae import console, profiles
from defectae.commands import augment
from defectae.data import augmentations as A
from defectae.errors import DefectaeError
from defectae.profiles.schema import AugmentConfig, DatasetConfig, ModelConfig, Profile
from defectae.stores.patches import open_patches
from defectae.stores.prepared import write_prepared

DEFECTAE = Path(sys.executable).with_name("defectae")
AXES = [(16, 16), (17, 16), (31, 16), (32, 16), (33, 16), (48, 8), (100, 16), (300, 128)]

# ----------------------------------------------------------------------------- coverage


def coverage(n: int, size: int, sampling: str) -> np.ndarray:
    """How many of the equally likely draws put each pixel of an n-pixel axis inside the crop."""
    counts = np.zeros(n, np.int64)
    for draw in A.origin_draws(n, size, sampling):
        origin = A.crop_origin(draw, n, size)
        assert 0 <= origin <= n - size
        counts[origin : origin + size] += 1
    return counts


@pytest.mark.parametrize("n,size", AXES)
def test_even_sampling_covers_every_pixel_exactly_as_proved(n, size):
    got = coverage(n, size, "even")
    i = np.arange(n)
    proved = size + np.where(i < size, i, 0) + np.where(i >= n - size, n - 1 - i, 0)
    np.testing.assert_array_equal(got, proved)
    assert len(A.origin_draws(n, size, "even")) == n + size - 1
    assert got.min() >= size
    if n > size:
        assert got[0] == got[-1] == size
    if n >= 2 * size:
        assert got.max() <= 2 * size - 1
    if n > 2 * size:  # the corners are covered exactly as often as the centre
        assert got[0] == got[n // 2] == got.min()


@pytest.mark.parametrize("n,size", AXES)
def test_uniform_origin_covers_a_corner_once_and_the_centre_up_to_size_times(n, size):
    i = np.arange(n)
    expected = np.minimum.reduce([i + 1, np.full(n, size), n - i, np.full(n, n - size + 1)])
    np.testing.assert_array_equal(coverage(n, size, "uniform-origin"), expected)


def test_random_crop_draws_the_clamped_origins_with_their_weights():
    # channel 0 holds the row index, channel 1 the column: a crop's top-left value is its origin
    h, w, size = 20, 28, 8
    image = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij")).astype(np.uint8)
    rng = np.random.default_rng(0)
    n = 20000
    origins = np.array([A.random_crop(image, size, rng)[:, 0, 0] for _ in range(n)])
    for axis, length in ((0, h), (1, w)):
        weights = np.ones(length - size + 1)
        weights[0] = weights[-1] = size  # the clamped draws
        expected = weights / weights.sum()
        seen = np.bincount(origins[:, axis], minlength=length - size + 1) / n
        np.testing.assert_allclose(seen, expected, atol=0.01)


def test_uniform_origin_is_the_previous_sampling_draw_for_draw():
    image = np.random.default_rng(1).integers(0, 256, (2, 30, 41), dtype=np.uint8)
    for seed in range(50):
        got = A.random_crop(image, 12, np.random.default_rng(seed), "uniform-origin")
        old = np.random.default_rng(seed)
        y, x = int(old.integers(0, 30 - 12 + 1)), int(old.integers(0, 41 - 12 + 1))
        np.testing.assert_array_equal(got, image[:, y : y + 12, x : x + 12])


def test_rotated_crops_reach_the_edges_of_the_inscribed_rectangle_only_when_even():
    # at 0 degrees on a column ramp a patch's first value is its left edge: 0 at the image edge
    ramp = np.tile(np.arange(48, dtype=np.uint8), (1, 48, 1))
    size, n = 16, 2000
    room = (47 - (size - 1)) / 2
    share = {}
    for sampling in ("even", "uniform-origin"):
        rng = np.random.default_rng(0)
        left = [A.rotated_crop(ramp, size, 0.0, rng, sampling)[0, 0, 0] for _ in range(n)]
        share[sampling] = np.mean(np.asarray(left) == 0)
    assert share["even"] == pytest.approx((size - 1) / (2 * (room + size - 1)), abs=0.03)
    assert share["uniform-origin"] == 0


def test_the_profile_key_defaults_to_even_and_is_checked():
    assert profiles.resolve("synthetic-ae").augment.sampling == "even"
    old = profiles.resolve("synthetic-ae", ["augment.sampling=uniform-origin"])
    assert old.augment.sampling == "uniform-origin"
    with pytest.raises(DefectaeError, match="augment.sampling") as e:
        profiles.resolve("synthetic-ae", ["augment.sampling=centre"])
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- intensity report


@pytest.fixture
def bright_border(tmp_path) -> Path:
    """48x48 gray images: a 6 px white frame (44% of the pixels) around mid-grey noise."""
    rng = np.random.default_rng(0)
    images = rng.integers(100, 156, (8, 1, 48, 48)).astype(np.uint8)
    images[:, :, :6], images[:, :, -6:], images[:, :, :, :6], images[:, :, :, -6:] = (
        255,
        255,
        255,
        255,
    )
    splits = {
        "train": good_split(images[:6]),
        "validation": good_split(images[6:]),
        "test": good_split(images[:1]),
    }
    attrs = {"layout": "synthetic", "source": "tests", "category": "frame", "image_size": [48, 48]}
    attrs |= {"color": "gray", "channels": 1, "dataset": {}}
    return write_prepared(tmp_path / "prepared.h5", splits, attrs)


def _reference(patches: np.ndarray, images: np.ndarray) -> dict:
    """The report's figures by np.histogram and direct counting."""
    p = np.histogram(patches, bins=32, range=(0, 256))[0] / patches.size
    q = np.histogram(images, bins=32, range=(0, 256))[0] / images.size
    return {
        "tv": 0.5 * np.abs(p - q).sum(),
        "white": ((patches >= 240).mean(), (images >= 240).mean()),
        "black": ((patches <= 15).mean(), (images <= 15).mean()),
        "p": p,
    }


def test_uniform_origin_patches_miss_a_bright_border_and_augment_warns(tmp_path, bright_border):
    out = tmp_path / "patches.h5"
    sets = ["model.input_size=8", "augment.n_patches=600", "augment.n_val_patches=8"]
    sets += ["augment.sampling=uniform-origin"]
    args = [arg for s in sets for arg in ("--set", s)]
    cmd = [str(DEFECTAE), "--json", "augment", "--profile", "synthetic-ae", *args]
    cmd += ["--prepared", str(bright_border), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEFECTAE_HOME": str(tmp_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)["intensity"]
    with open_patches(out) as f, h5py.File(bright_border) as g:
        stored = json.loads(f.attrs["intensity"])
        ref = _reference(f["train/patches"][()], g["train/images"][()])
    assert stored == report
    assert report["tv_distance"] == pytest.approx(ref["tv"], abs=1e-5)
    assert report["tv_distance"] > 0.1
    np.testing.assert_allclose(report["patch_histogram"], ref["p"], atol=1e-5)
    assert (report["near_white"]["patches"], report["near_white"]["images"]) == pytest.approx(
        ref["white"], abs=1e-5
    )
    assert (report["near_black"]["patches"], report["near_black"]["images"]) == pytest.approx(
        ref["black"], abs=1e-5
    )
    assert report["near_white"]["images"] == pytest.approx(1 - (36 / 48) ** 2, abs=1e-6)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, proc.stderr
    white = report["near_white"]
    assert f"{white['patches']:.1%} of patches vs {white['images']:.1%} of images" in warnings[0]
    assert "patch vs image intensities: total variation" in proc.stderr


def test_even_sampling_represents_the_bright_border(tmp_path, bright_border, monkeypatch):
    warned = []
    monkeypatch.setattr(console, "warn", warned.append)
    prof = Profile(
        name="frame-ae",
        dataset=DatasetConfig(name="frame"),
        model=ModelConfig(input_size=8),
        augment=AugmentConfig(n_patches=600, n_val_patches=8),
    )
    report = augment.run(prof, bright_border, tmp_path / "patches.h5")["intensity"]
    assert report["tv_distance"] < 0.1 and not warned
    assert report["near_white"]["patches"] >= 0.9 * report["near_white"]["images"]


def test_reflect_pad_crops_show_the_mirror_seams_tile_test_pads_with():
    from defectae.data.sampling import make_plan, write_split

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, 1, 16, 16), dtype=np.uint8)
    padded = np.pad(image[0], ((0, 0), (6, 6), (6, 6)), mode="reflect")
    windows = {
        padded[:, y : y + 8, x : x + 8].tobytes() for y in range(0, 21) for x in range(0, 21)
    }
    inside = {image[0, :, y : y + 8, x : x + 8].tobytes() for y in range(9) for x in range(9)}
    plan = make_plan("train", 200, 1, seed=0)
    out = np.zeros((200, 1, 8, 8), np.uint8)
    write_split(image, out, plan, None, 0, 64, lambda n: None, "even", reflect_pad=6)
    crops = {p.tobytes() for p in out}
    assert crops <= windows and crops - inside  # every crop is of the padded image, some cross it
    write_split(image, out, plan, None, 0, 64, lambda n: None, "even")
    assert {p.tobytes() for p in out} <= inside
