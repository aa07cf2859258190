"""`augment`: patch sampling, augmentations, corruptions, patches.h5 and PatchDataset."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from builders import good_split
from scipy.ndimage import gaussian_filter
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from defectae import console, profiles
from defectae.commands import augment
from defectae.data import augmentations as A
from defectae.data import corruptions as C
from defectae.data import sampling
from defectae.errors import DefectaeError
from defectae.files import sha256_file
from defectae.profiles.schema import (
    AugmentConfig,
    CorruptionConfig,
    DatasetConfig,
    ModelConfig,
    Profile,
)
from defectae.stores.patches import PatchDataset, open_patches, write_patches
from defectae.stores.prepared import write_prepared

# ----------------------------------------------------------------------------- fixtures


def texture(rng: np.random.Generator, channels: int, size: int, sigma: float = 2.0) -> np.ndarray:
    """A smooth random uint8 texture (C, size, size)."""
    field = gaussian_filter(rng.normal(0, 1, (channels, size, size)), (0, sigma, sigma))
    field = (field - field.mean()) / (field.std() + 1e-9)
    return np.clip(field * 40 + 128, 0, 255).astype(np.uint8)


def make_prepared(path: Path, train: np.ndarray, validation: np.ndarray) -> Path:
    c, h, w = train.shape[1:]
    splits = {
        "train": good_split(train),
        "validation": good_split(validation),
        "test": good_split(train[:1]),
    }
    attrs = {
        "layout": "synthetic",
        "source": "tests",
        "category": "tiny",
        "image_size": [h, w],
        "color": "gray" if c == 1 else "rgb",
        "channels": c,
        "dataset": {},
    }
    return write_prepared(path, splits, attrs)


@pytest.fixture
def prepared(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    train = np.stack([texture(rng, 1, 48) for _ in range(6)])
    validation = np.stack([texture(rng, 1, 48) for _ in range(2)])
    return make_prepared(tmp_path / "prepared.h5", train, validation)


def profile(input_size: int = 16, color: str = "gray", **augment_kw) -> Profile:
    aug = {"n_patches": 40, "n_val_patches": 8, "chunk_patches": 8, **augment_kw}
    return Profile(
        name="tiny-ae",
        dataset=DatasetConfig(name="tiny", color=color),
        model=ModelConfig(input_size=input_size),
        augment=AugmentConfig(**aug),
    )


FULL = dict(
    rotation_prob=0.7,
    max_angle=40.0,
    hflip_prob=0.5,
    vflip_prob=0.5,
    jitter_prob=0.5,
    brightness=0.1,
    contrast=0.2,
    noise_prob=0.5,
    noise_std=0.03,
)


# ----------------------------------------------------------------------------- geometry


def _inside_rotated(px: float, py: float, w: float, h: float, angle: float) -> bool:
    # Point relative to the centre of a w x h rectangle rotated by `angle`: undo the rotation.
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * px + s * py, -s * px + c * py
    return abs(u) <= w / 2 + 1e-7 and abs(v) <= h / 2 + 1e-7


@pytest.mark.parametrize("w,h", [(100, 100), (200, 60), (50, 300), (64, 48)])
def test_inscribed_rect_is_inside_and_maximal(w, h):
    assert A.inscribed_rect(w, h, 0.0) == pytest.approx((w, h))
    for angle in np.linspace(0.05, math.pi / 2 - 0.05, 23):
        rw, rh = A.inscribed_rect(w, h, angle)
        corners = [(sx * rw / 2, sy * rh / 2) for sx in (-1, 1) for sy in (-1, 1)]
        assert all(_inside_rotated(x, y, w, h, angle) for x, y in corners)
        # 1% larger in both directions pokes out of the rotated rectangle.
        assert not all(_inside_rotated(1.01 * x, 1.01 * y, w, h, angle) for x, y in corners)


def test_inscribed_square_at_45_degrees():
    rw, rh = A.inscribed_rect(100, 100, math.pi / 4)
    assert rw == pytest.approx(100 / math.sqrt(2)) and rh == pytest.approx(100 / math.sqrt(2))


@pytest.mark.parametrize(
    "shape,size", [((1, 64, 64), 45), ((3, 48, 80), 30), ((1, 64, 64), 60), ((1, 33, 120), 20)]
)
def test_rotation_and_crop_never_contain_padding(shape, size):
    image = np.full(shape, 200, np.uint8)
    rng = np.random.default_rng(0)
    for angle in np.linspace(-180, 180, 361):
        patch = A.to_uint8(A.rotated_crop(image, size, float(angle), rng))
        assert patch.shape == (shape[0], size, size)
        assert (patch == 200).all(), f"padding entered a patch at {angle} deg"


def test_sampled_rotations_never_contain_padding():
    image = np.full((1, 40, 40), 200, np.uint8)
    cfg = AugmentConfig(rotation_prob=1.0, max_angle=180.0)
    for i in range(200):
        assert (A.sample_patch(image, 24, cfg, A.sample_rng(0, "train", i)) == 200).all()


def test_bilinear_pads_with_zeros_and_interpolates_exactly():
    # Outside the image the sampler reads zeros, so the padding test above can fail.
    image = np.full((1, 8, 8), 200, np.uint8)
    out = A.bilinear(
        image, np.array([[-0.5, 7.5, -3.0, 7.0, 3.25]]), np.array([[2.0, 2.0, 2.0, 7.0, 4.0]])
    )
    np.testing.assert_allclose(out[0, 0], [100, 100, 0, 200, 200])
    ramp = np.arange(64, dtype=np.uint8).reshape(1, 8, 8)
    got = A.bilinear(ramp, np.array([[2.0, 2.5, 6.0]]), np.array([[3.0, 3.0, 6.5]]))
    np.testing.assert_allclose(got[0, 0], [19, 23, 54.5])
    assert A.fitting_angle(64, 64, 60, 45.0) < 45.0  # a 60px patch cannot rotate 45 deg in 64px


def test_angle_reduced_only_when_the_patch_does_not_fit():
    assert A.fitting_angle(256, 256, 128, 30.0) == 30.0
    reduced = A.fitting_angle(64, 64, 60, 45.0)
    rw, rh = A.inscribed_rect(63, 63, math.radians(reduced))
    assert 0 < reduced < 45 and min(rw, rh) >= 59 - 1e-6


def test_rotation_by_90_degrees_is_exact():
    image = np.random.default_rng(1).integers(0, 256, (2, 31, 31), dtype=np.uint8)
    patch = A.to_uint8(A.rotated_crop(image, 31, 90.0, np.random.default_rng(0)))
    np.testing.assert_array_equal(patch, np.rot90(image, -1, axes=(1, 2)))
    np.testing.assert_array_equal(
        A.to_uint8(A.rotated_crop(image, 31, 0.0, np.random.default_rng(0))), image
    )


def test_flips_are_exact_mirrors():
    image = texture(np.random.default_rng(2), 3, 40)
    base = AugmentConfig()
    for i in range(10):
        plain = A.sample_patch(image, 16, base, A.sample_rng(0, "train", i))
        h = A.sample_patch(image, 16, replace(base, hflip_prob=1.0), A.sample_rng(0, "train", i))
        v = A.sample_patch(image, 16, replace(base, vflip_prob=1.0), A.sample_rng(0, "train", i))
        np.testing.assert_array_equal(h, plain[:, :, ::-1])
        np.testing.assert_array_equal(v, plain[:, ::-1, :])


def test_flips_and_rotation_keep_patch_statistics():
    image = texture(np.random.default_rng(3), 1, 256, sigma=3.0)
    aug = AugmentConfig(rotation_prob=1.0, max_angle=180.0, hflip_prob=0.5, vflip_prob=0.5)
    plain = np.stack(
        [A.sample_patch(image, 48, None, A.sample_rng(1, "train", i)) for i in range(300)]
    )
    rotated = np.stack(
        [A.sample_patch(image, 48, aug, A.sample_rng(2, "train", i)) for i in range(300)]
    )
    p, r = plain.astype(float), rotated.astype(float)
    assert abs(p.mean() - r.mean()) < 2.0
    assert r.std(axis=(1, 2, 3)).mean() == pytest.approx(p.std(axis=(1, 2, 3)).mean(), rel=0.06)


def test_photometric_augmentations():
    rng = np.random.default_rng(0)
    flat = np.full((1, 64, 64), 128.0, np.float32)
    noisy = A.add_noise(flat, 0.05, rng)
    assert noisy.std() == pytest.approx(0.05 * 255, rel=0.05)
    shifted = A.jitter(flat, 0.2, 0.0, rng)
    assert np.ptp(shifted) == 0 and abs(shifted.mean() - 128) <= 0.2 * 255
    assert A.to_uint8(np.array([-5.0, 0.4, 254.6, 300.0])).tolist() == [0, 0, 255, 255]


def test_patches_spread_evenly_over_images():
    images = A.spread_over_images(20, 6, np.random.default_rng(0))
    counts = np.bincount(images, minlength=6)
    assert sorted(counts.tolist()) == [3, 3, 3, 3, 4, 4]


# ----------------------------------------------------------------------------- corruptions


def batch(seed: int, channels: int, b: int = 6, p: int = 32) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return (
        torch.from_numpy(np.stack([texture(rng, channels, p, 1.5) for _ in range(b)])).float() / 255
    )


@pytest.mark.parametrize("kind", C.KINDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_corruption_mask_is_exactly_the_changed_pixels(kind, channels):
    cfg = CorruptionConfig(kind=kind, prob=1.0, size=10, count=2, noise_std=0.3, perlin_scale=4)
    for seed in range(4):
        x = batch(seed, channels)
        out, mask = C.corrupt(x, cfg, torch.Generator().manual_seed(seed))
        assert (
            out.shape == x.shape
            and mask.shape == (x.shape[0], 1, 32, 32)
            and mask.dtype == torch.float32
        )
        changed = (out != x).any(dim=1, keepdim=True)
        assert torch.equal(mask.bool(), changed)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert (mask.flatten(1).sum(1) > 0).all(), "every patch should be corrupted with prob = 1"
        assert out.min() >= 0 and out.max() <= 1
        again, _ = C.corrupt(x, cfg, torch.Generator().manual_seed(seed))
        assert torch.equal(out, again)


@pytest.mark.parametrize("kind", ["dominant_square", "random_square", "noise_block"])
def test_square_corruptions_stay_inside_one_square(kind):
    cfg = CorruptionConfig(kind=kind, prob=1.0, size=7, count=1, noise_std=0.3)
    x = batch(5, 3)
    _, mask = C.corrupt(x, cfg, torch.Generator().manual_seed(0))
    for m in mask[:, 0]:
        rows, cols = torch.nonzero(m, as_tuple=True)
        assert rows.max() - rows.min() < 7 and cols.max() - cols.min() < 7


def test_dominant_square_skips_pixels_that_already_have_the_colour():
    x = torch.full((2, 1, 24, 24), 102 / 255)
    x[1, 0, :4] = torch.linspace(0, 1, 24)  # a few other values; 102 stays the mode
    out, mask = C.dominant_square(x, 8, 1, torch.Generator().manual_seed(0))
    assert mask[0].sum() == 0 and torch.equal(out[0], x[0])
    assert torch.all(out[1][mask[1].bool()] == 102 / 255)
    assert torch.equal(mask[1, 0].bool(), out[1, 0] != x[1, 0])


def test_random_square_on_a_flat_patch_is_one_full_square():
    x = torch.full((4, 3, 20, 20), 0.5)
    _, mask = C.random_square(x, 6, 1, torch.Generator().manual_seed(3))
    assert mask.flatten(1).sum(1).tolist() == [36.0] * 4


@pytest.mark.parametrize("channels", [1, 3])
def test_dominant_colour_matches_numpy_mode(channels):
    rng = np.random.default_rng(channels)
    q = rng.integers(0, 4, (8, channels, 16, 16)) * 60  # few colours, so ties are common
    x = torch.from_numpy(q).float() / 255
    got = (C.dominant_colour(x)[:, :, 0, 0] * 255).round().long().numpy()
    for i in range(8):
        colours, counts = np.unique(q[i].reshape(channels, -1).T, axis=0, return_counts=True)
        np.testing.assert_array_equal(
            got[i], colours[np.argmax(counts)]
        )  # first = smallest on ties


def test_perlin_noise_matches_the_textbook_formula():
    # Per pixel: fade-weighted sum over the 4 cell corners of dot(gradient, offset to the corner).
    side, cells = 12, 3
    noise = C.perlin_noise(2, side, cells, torch.Generator().manual_seed(4), torch.device("cpu"))
    angles = (
        torch.rand((2, cells + 1, cells + 1), generator=torch.Generator().manual_seed(4))
        * 2
        * math.pi
    )
    fade = lambda t: 6 * t**5 - 15 * t**4 + 10 * t**3  # noqa: E731
    for b in range(2):
        for i in range(side):
            for j in range(side):
                y, x = (i + 0.5) * cells / side, (j + 0.5) * cells / side
                cy, cx = min(int(y), cells - 1), min(int(x), cells - 1)
                value = 0.0
                for oy in (0, 1):
                    for ox in (0, 1):
                        a = float(angles[b, cy + oy, cx + ox])
                        dot = math.cos(a) * (x - cx - ox) + math.sin(a) * (y - cy - oy)
                        wy = fade(y - cy) if oy else 1 - fade(y - cy)
                        wx = fade(x - cx) if ox else 1 - fade(x - cx)
                        value += wy * wx * dot
                assert float(noise[b, i, j]) == pytest.approx(value * math.sqrt(2), abs=1e-5)


def test_corruption_probability_and_none():
    x = batch(0, 1, b=64, p=16)
    out, mask = C.corrupt(
        x, CorruptionConfig(kind="noise_block", prob=0.0, size=4), torch.Generator()
    )
    assert torch.equal(out, x) and mask.sum() == 0
    out, mask = C.corrupt(x, CorruptionConfig(kind="none"), torch.Generator())
    assert torch.equal(out, x) and mask.sum() == 0
    out, mask = C.corrupt(
        x,
        CorruptionConfig(kind="random_square", prob=0.5, size=6),
        torch.Generator().manual_seed(1),
    )
    hit = mask.flatten(1).sum(1) > 0
    assert 10 < int(hit.sum()) < 54
    assert torch.equal(out[~hit], x[~hit])


# ----------------------------------------------------------------------------- augment command


def test_equal_seeds_give_byte_identical_files(tmp_path, prepared):
    prof = profile(compression="lzf", **FULL)
    augment.run(prof, prepared, tmp_path / "a" / "patches.h5")
    time.sleep(1.1)  # a timestamp anywhere in the file would now differ
    augment.run(prof, prepared, tmp_path / "b" / "patches.h5")
    other = replace(prof, augment=replace(prof.augment, seed=1))
    augment.run(other, prepared, tmp_path / "c" / "patches.h5")
    a, b, c = ((tmp_path / d / "patches.h5").read_bytes() for d in "abc")
    assert a == b
    assert a != c
    with (
        h5py.File(tmp_path / "a" / "patches.h5") as f,
        h5py.File(tmp_path / "c" / "patches.h5") as g,
    ):
        assert not np.array_equal(f["train/patches"][()], g["train/patches"][()])


def test_patch_file_contents(tmp_path):
    # Train images are flat at 10, 20, ...; validation images flat at 7: the source of a patch shows.
    train = np.stack([np.full((1, 32, 32), 10 * (i + 1), np.uint8) for i in range(6)])
    validation = np.full((2, 1, 32, 32), 7, np.uint8)
    src = make_prepared(tmp_path / "prepared.h5", train, validation)
    out = tmp_path / "work" / "patches.h5"
    summary = augment.run(
        profile(n_patches=20, n_val_patches=5, rotation_prob=1.0, max_angle=30.0, hflip_prob=0.5),
        src,
        out,
    )
    assert (
        summary["train_patches"] == 20
        and summary["validation_patches"] == 5
        and summary["patch_size"] == 16
    )
    with open_patches(out) as f:
        tr, va = f["train/patches"][()], f["validation/patches"][()]
        assert f["train/patches"].chunks == (8, 1, 16, 16)
        assert f.attrs["source_sha256"] == sha256_file(src) and f.attrs["seed"] == 0
        assert json.loads(f.attrs["augment"])["max_angle"] == 30.0 and "kind" in json.loads(
            f.attrs["corruption"]
        )
    assert tr.shape == (20, 1, 16, 16) and va.shape == (5, 1, 16, 16)
    assert (va == 7).all()
    values = tr.reshape(20, -1)
    assert (values == values[:, :1]).all()  # flat images stay flat: no padding entered
    counts = np.unique(values[:, 0], return_counts=True)[1]
    assert sorted(counts.tolist()) == [3, 3, 3, 3, 4, 4]
    assert values[:, 0].tolist() != sorted(values[:, 0].tolist())  # stored shuffled
    assert profiles.load_written(out.parent / f"{out.stem}.profile.toml") == profile(
        n_patches=20, n_val_patches=5, rotation_prob=1.0, max_angle=30.0, hflip_prob=0.5
    )


def test_whole_image_mode(tmp_path):
    rng = np.random.default_rng(0)
    train = np.stack([texture(rng, 1, 16) for _ in range(3)])
    validation = np.stack([texture(rng, 1, 16) for _ in range(2)])
    src = make_prepared(tmp_path / "prepared.h5", train, validation)
    out = tmp_path / "patches.h5"
    augment.run(profile(n_patches=6, n_val_patches=5, whole_image=True, hflip_prob=1.0), src, out)
    with open_patches(out) as f:
        tr, va = f["train/patches"][()], f["validation/patches"][()]
    flipped = {img[:, :, ::-1].tobytes() for img in train}
    assert all(p.tobytes() in flipped for p in tr)
    assert len(va) == 2 and {p.tobytes() for p in va} == {img.tobytes() for img in validation}
    with pytest.raises(
        DefectaeError, match="model.input_size: 12 does not match the image size 16x16"
    ):
        augment.run(profile(input_size=12, whole_image=True), src, tmp_path / "x.h5")


def test_interrupted_run_leaves_nothing(tmp_path, prepared, monkeypatch):
    out = tmp_path / "out" / "patches.h5"
    calls = {"n": 0}
    real = sampling.sample_patch

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample_patch", interrupting)
    with pytest.raises(KeyboardInterrupt):
        augment.run(profile(), prepared, out)
    assert calls["n"] == 25
    assert list(out.parent.iterdir()) == []


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_inputs(tmp_path, prepared):
    out = tmp_path / "patches.h5"
    with pytest.raises(DefectaeError, match="patch size 64 is larger than the images") as e:
        augment.run(profile(input_size=64), prepared, out)
    assert "model.input_size" in _one_line(e)
    with pytest.raises(DefectaeError, match="run `defectae prepare` first") as e:
        augment.run(profile(), tmp_path / "missing.h5", out)
    _one_line(e)
    with pytest.raises(DefectaeError, match="1 channel.*expects 3") as e:
        augment.run(profile(color="rgb"), prepared, out)
    _one_line(e)
    old = tmp_path / "old.h5"
    old.write_bytes(prepared.read_bytes())
    with h5py.File(old, "r+") as f:
        f.attrs["format_version"] = 0
    with pytest.raises(DefectaeError, match="format version 0, expected 2") as e:
        augment.run(profile(), old, out)
    _one_line(e)
    assert not out.exists()


def test_no_validation_images(tmp_path):
    rng = np.random.default_rng(0)
    src = make_prepared(
        tmp_path / "p.h5", np.stack([texture(rng, 1, 32)]), np.zeros((0, 1, 32, 32), np.uint8)
    )
    with pytest.raises(
        DefectaeError, match="validation split has no images.*dataset.val_fraction"
    ) as e:
        augment.run(profile(), src, tmp_path / "patches.h5")
    _one_line(e)


@pytest.mark.parametrize(
    "setting,message",
    [
        ("augment.n_patches=0", r"key 'augment.n_patches': expected a value in \[1, inf\], got 0"),
        (
            "augment.hflip_prob=1.5",
            r"key 'augment.hflip_prob': expected a value in \[0.0, 1.0\], got 1.5",
        ),
        (
            "corruption.prob=-0.1",
            r"key 'corruption.prob': expected a value in \[0.0, 1.0\], got -0.1",
        ),
    ],
)
def test_profile_ranges_are_checked(setting, message):
    with pytest.raises(DefectaeError, match=message) as e:
        profiles.resolve("synthetic-ae", [setting])
    assert _one_line(e).startswith("--set ")


def test_cli_json_summary(tmp_path, prepared, monkeypatch):
    from defectae.cli import app

    monkeypatch.setattr(console, "mode", console.OutputMode())
    out = tmp_path / "cli" / "patches.h5"
    result = CliRunner().invoke(
        app,
        [
            "--json",
            "augment",
            "--profile",
            "synthetic-ae",
            "--set",
            "augment.n_patches=12",
            "--set",
            "augment.n_val_patches=3",
            "--set",
            "model.input_size=16",
            "--prepared",
            str(prepared),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert set(summary) == {
        "out",
        "train_patches",
        "validation_patches",
        "patch_size",
        "channels",
        "seconds",
        "patches_per_s",
        "intensity",
    }
    assert summary["train_patches"] == 12 and summary["validation_patches"] == 3 and out.is_file()


# ----------------------------------------------------------------------------- PatchDataset


@pytest.fixture
def patch_file(tmp_path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (300, 1, 12, 12), dtype=np.uint8)
    validation = rng.integers(0, 256, (20, 1, 12, 12), dtype=np.uint8)
    path = write_patches(
        tmp_path / "patches.h5",
        train,
        validation,
        {"seed": 0},
        chunk_patches=32,
        compression="gzip",
    )
    return path, train


def test_dataset_batches_and_float_conversion(patch_file):
    path, train = patch_file
    ds = PatchDataset(path, batch_size=64)
    assert (len(ds), ds.num_patches, ds.patch_size, ds.channels) == (5, 300, 12, 1)
    item = ds[1]
    assert item["clean"].dtype == torch.float32 and item["clean"].shape == (64, 1, 12, 12)
    assert torch.equal(item["clean"], torch.from_numpy(train[64:128]).float() / 255)
    assert float(item["clean"].min()) >= 0 and float(item["clean"].max()) <= 1
    assert (
        item["input"] is item["clean"]
        and item["mask"].shape == (64, 1, 12, 12)
        and item["mask"].sum() == 0
    )
    assert ds[4]["clean"].shape[0] == 300 - 4 * 64
    with pytest.raises(IndexError):
        ds[5]
    val = PatchDataset(path, split="validation", batch_size=8)
    assert len(val) == 3 and val[2]["clean"].shape[0] == 4


def test_dataset_corruption_is_seeded_per_epoch(patch_file):
    path, _ = patch_file
    ds = PatchDataset(
        path, batch_size=32, corruption=CorruptionConfig(kind="random_square", size=4), seed=3
    )
    first = ds[0]
    assert first["mask"].sum() > 0 and torch.equal(
        first["mask"].bool(), (first["input"] != first["clean"]).any(1, keepdim=True)
    )
    assert torch.equal(ds[0]["input"], first["input"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["input"], first["input"])
    clone = pickle.loads(pickle.dumps(ds))  # picklable even with an open file
    assert torch.equal(clone[0]["input"], ds[0]["input"])


def test_dataset_with_two_workers_matches_one_process(patch_file):
    path, _ = patch_file
    ds = PatchDataset(
        path, batch_size=32, corruption=CorruptionConfig(kind="dominant_square", size=4, count=2)
    )
    ds.set_epoch(2)
    serial = list(DataLoader(ds, batch_size=None, num_workers=0))
    parallel = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert len(parallel) == len(ds) == 10
    for a, b in zip(serial, parallel, strict=True):
        for key in ("clean", "input", "mask"):
            assert torch.equal(a[key], b[key])


def test_open_patches_errors(tmp_path, prepared, patch_file):
    with pytest.raises(DefectaeError, match="patches file not found; run `defectae augment` first"):
        open_patches(tmp_path / "nothing.h5")
    with pytest.raises(DefectaeError, match="not a defectae patches file"):
        open_patches(prepared)
    path, _ = patch_file
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 2
    with pytest.raises(DefectaeError, match="patches format version 2, expected 1"):
        PatchDataset(path)


def test_cli_user_error_exits_2_with_one_line(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "defectae",
        "augment",
        "--profile",
        "synthetic-ae",
        "--prepared",
        str(tmp_path / "missing.h5"),
        "--out",
        str(tmp_path / "p.h5"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "run `defectae prepare` first" in lines[0]
    assert result.stdout == "" and not (tmp_path / "p.h5").exists()
