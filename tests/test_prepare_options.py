"""`prepare` options for data as it arrives on real lines: aspect-preserving resize
(dataset.resize) and per-image intensity normalisation (dataset.intensity)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from builders import untrained_checkpoint
from PIL import Image

from defectae import console, profiles
from defectae.commands import prepare
from defectae.data.images import short_side_size
from defectae.data.lighting import normalise_intensity
from defectae.errors import DefectaeError
from defectae.stores.prepared import read_split

DEFECTAE = Path(sys.executable).with_name("defectae")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setattr(console.mode, "quiet", True)


def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _image(h: int, w: int, seed: int, level: int = 0, spread: int = 256) -> np.ndarray:
    """Gray noise in [level, level + spread): `level` plays the lighting, `spread` the contrast."""
    rng = np.random.default_rng(seed)
    return (level + rng.integers(0, spread, (h, w))).astype(np.uint8)


def make_widget(
    root: Path, hw: tuple[int, int] = (40, 60), levels: list[int] | None = None
) -> Path:
    """MVTec layout, category widget: train/good 6, test/good 2, test/crack 2 with masks."""
    h, w = hw
    levels = levels or [0] * 10
    base = root / "widget"
    for i in range(6):
        level, spread = (levels[i], 20 + 15 * i) if any(levels) else (0, 256)
        _png(base / "train" / "good" / f"{i:03d}.png", _image(h, w, i, level, spread))
    for i in range(4):
        kind, name = ("good", f"{i:03d}") if i < 2 else ("crack", f"{i - 2:03d}")
        level, spread = (levels[6 + i], 25) if any(levels) else (0, 256)
        _png(base / "test" / kind / f"{name}.png", _image(h, w, 10 + i, level, spread))
        if kind == "crack":
            mask = np.zeros((h, w), np.uint8)
            mask[4:14, 8:20] = 255
            _png(base / "ground_truth" / "crack" / f"{name}_mask.png", mask)
    return root


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(DEFECTAE), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DEFECTAE_HOME": str(home), "COLUMNS": "400"},
    )


def _prepare_cli(home: Path, root: Path, out: Path, *sets: str) -> subprocess.CompletedProcess:
    args = ["dataset.category=widget", "dataset.color=gray", *sets]
    return _cli(
        home,
        "--json",
        "prepare",
        "--profile",
        "mvtec-bottle-ae",
        "--root",
        str(root),
        "--out",
        str(out),
        *[a for s in args for a in ("--set", s)],
    )


def _prepare(root: Path, out: Path, *sets: str) -> dict:
    base = ["dataset.category=widget", "dataset.color=gray", "dataset.val_fraction=0.2"]
    return prepare.run("mvtec-bottle-ae", [*base, *sets], str(root), out, None, None, None)


# ----------------------------------------------------------------------------- resize


def test_short_side_size() -> None:
    assert short_side_size((40, 60), 32) == (32, 48)
    assert short_side_size((60, 40), 32) == (48, 32)  # portrait: the width is the short side
    assert short_side_size((1000, 1003), 256) == (256, 256)  # a pixel off square stays square
    assert short_side_size((600, 800), 256) == (256, 344)  # 341.3 -> nearest multiple of 8
    assert short_side_size((20, 20), 20) == (20, 20)  # a short side off the grid: no stretch
    assert short_side_size((20, 30), 20) == (20, 32)


def test_short_side_keeps_the_aspect_ratio_and_tile_test_runs(tmp_path: Path) -> None:
    root = make_widget(tmp_path / "mvtec", (40, 60))
    home, out = tmp_path / "home", tmp_path / "p.h5"
    r = _prepare_cli(home, root, out, "dataset.image_size=[32, 32]", "dataset.resize=short-side")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["image_size"] == [32, 48]
    assert "aspect ratio" not in r.stderr
    with h5py.File(out, "r") as f:
        assert f.attrs["resize"] == "short-side" and list(f.attrs["image_size"]) == [32, 48]
        assert f.attrs["intensity"] == "none" and "intensity_mean" not in f.attrs
    test = read_split(out, "test")
    assert test.images.shape == (4, 1, 32, 48) and test.masks.shape == (4, 1, 32, 48)
    i = test.files.index("widget/test/crack/000.png")
    ref = Image.open(root / "widget" / "test" / "crack" / "000.png").resize(
        (48, 32), Image.Resampling.BILINEAR
    )
    np.testing.assert_array_equal(test.images[i, 0], np.asarray(ref))
    box = Image.open(root / "widget" / "ground_truth" / "crack" / "000_mask.png")
    ref_mask = np.asarray(box.resize((48, 32), Image.Resampling.NEAREST)) > 0
    np.testing.assert_array_equal(test.masks[i, 0], ref_mask)

    profile = profiles.resolve(
        "mvtec-bottle-ae",
        sets=[
            "dataset.color=gray",
            "dataset.image_size=[32, 32]",
            "dataset.resize=short-side",
            "model.input_size=16",
            "model.args.latent_dim=8",
            "tile.stride=8",
            "tile.device=cpu",
            "tile.amp=off",
        ],
    )
    run_dir = home / "runs" / profile.name / "20250101-000000"
    untrained_checkpoint(run_dir, profile)
    profiles.write_profile(profile, run_dir)
    maps = tmp_path / "maps"
    t = _cli(
        home, "tile-test", "--run", str(run_dir), "--prepared", str(out), "--export-maps", str(maps)
    )
    assert t.returncode == 0, t.stderr
    with h5py.File(run_dir / "residuals.h5", "r") as f:
        assert f["test/residuals"].shape == (4, 1, 32, 48)
        assert np.isfinite(f["test/residuals"][()]).all()
        assert f["validation/residuals"].shape[1:] == (1, 32, 48)
    assert tifffile.imread(maps / "widget" / "test" / "crack" / "000.tiff").shape == (40, 60)


def test_short_side_mismatched_aspect_ratios_exit_2_naming_both_files(tmp_path: Path) -> None:
    root = make_widget(tmp_path / "mvtec", (40, 60))
    _png(root / "widget" / "test" / "good" / "001.png", _image(40, 40, 99))
    out = tmp_path / "p.h5"
    r = _prepare_cli(
        tmp_path, root, out, "dataset.image_size=[32, 32]", "dataset.resize=short-side"
    )
    assert r.returncode == 2 and r.stdout == "" and not out.exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert re.search(r"widget/train/good/00\d\.png \(40x60\) becomes 32x48", lines[0])
    assert "widget/test/good/001.png (40x40) becomes 32x32" in lines[0]
    assert 'dataset.resize = "stretch"' in lines[0]


def test_squash_warning_names_both_sizes_and_suggests_short_side(tmp_path: Path, capsys) -> None:
    root = make_widget(tmp_path / "mvtec", (40, 60))
    s = _prepare(root, tmp_path / "p.h5", "dataset.image_size=[32, 32]")
    assert s["image_size"] == [32, 32]
    err = " ".join(capsys.readouterr().err.split())
    assert "10 image(s) have another aspect ratio than dataset.image_size 32x32" in err
    assert "40x60 -> 32x32" in err and 'dataset.resize = "short-side"' in err
    with h5py.File(tmp_path / "p.h5", "r") as f:
        assert f.attrs["resize"] == "stretch" and list(f.attrs["image_size"]) == [32, 32]


# ----------------------------------------------------------------------------- intensity

LEVELS = [40, 70, 100, 130, 150, 140, 60, 150, 90, 120]  # train 0-5, test good 0-1, crack 0-1


def _originals(root: Path, files: list[str]) -> list[np.ndarray]:
    return [np.asarray(Image.open(root / f), dtype=np.float64) for f in files]


def test_intensity_mean_matches_the_training_images_mean(tmp_path: Path) -> None:
    root = make_widget(tmp_path / "mvtec", (24, 32), LEVELS)
    out = tmp_path / "p.h5"
    _prepare(root, out, "dataset.image_size=[24, 32]", "dataset.intensity=mean")
    train = read_split(out, "train")
    target = float(np.mean([x.mean() for x in _originals(root, train.files)]))
    with h5py.File(out, "r") as f:
        assert f.attrs["intensity"] == "mean"
        assert f.attrs["intensity_mean"] == pytest.approx(target, abs=1e-9)
        assert f.attrs["intensity_std"] > 0
        stored = float(f.attrs["intensity_mean"])
    for split in ("train", "validation", "test"):
        s = read_split(out, split)
        originals = _originals(root, s.files)
        for image, orig in zip(s.images, originals, strict=True):
            assert abs(image.mean() - target) <= 0.5  # rounding only: nothing clipped here
            np.testing.assert_allclose(image[0], np.rint(orig + (stored - orig.mean())), atol=0)
        assert not np.any(s.masks[s.labels == 0])  # masks untouched
    # a brighter test image and a brighter validation image do not move the target
    val = read_split(out, "validation")
    assert len(val) >= 1
    for rel in (val.files[0], "widget/test/good/000.png"):
        _png(
            root / rel,
            np.clip(np.asarray(Image.open(root / rel)).astype(int) + 60, 0, 255).astype(np.uint8),
        )
    again = tmp_path / "again.h5"
    _prepare(root, again, "dataset.image_size=[24, 32]", "dataset.intensity=mean")
    with h5py.File(out, "r") as a, h5py.File(again, "r") as b:
        assert a.attrs["intensity_mean"] == b.attrs["intensity_mean"]
        assert np.array_equal(a["train/images"][()], b["train/images"][()])
    test = read_split(again, "test")
    i = test.files.index("widget/test/good/000.png")
    assert abs(test.images[i].mean() - target) <= 0.5


def test_intensity_mean_std_matches_the_training_images_std(tmp_path: Path) -> None:
    root = make_widget(tmp_path / "mvtec", (24, 32), LEVELS)
    out = tmp_path / "p.h5"
    _prepare(root, out, "dataset.image_size=[24, 32]", "dataset.intensity=mean-std")
    train = read_split(out, "train")
    originals = _originals(root, train.files)
    mean = float(np.mean([x.mean() for x in originals]))
    std = float(np.mean([x.std() for x in originals]))
    with h5py.File(out, "r") as f:
        assert f.attrs["intensity"] == "mean-std"
        assert f.attrs["intensity_mean"] == pytest.approx(mean, abs=1e-9)
        assert f.attrs["intensity_std"] == pytest.approx(std, abs=1e-9)
    stds = []
    for split in ("train", "validation", "test"):
        for image in read_split(out, split).images:
            assert abs(image.mean() - mean) <= 0.5
            assert abs(image.std() - std) <= 0.5
            stds.append(image.std())
    assert np.ptp([x.std() for x in originals]) > 10 and np.ptp(stds) < 1  # contrast evened out


def test_normalise_intensity_function() -> None:
    image = np.array([[[10, 20], [30, 40]]], np.uint8)
    assert normalise_intensity(image, "none", 0.0, 0.0) is image
    np.testing.assert_array_equal(normalise_intensity(image, "mean", 100.0, 1.0), image + 75)
    out = normalise_intensity(image, "mean-std", 100.0, 2 * image.astype(float).std())
    np.testing.assert_array_equal(out, [[[70, 90], [110, 130]]])
    assert normalise_intensity(image, "mean", 250.0, 1.0).max() == 255  # clipped, not wrapped
    flat = np.full((2, 2), 7, np.uint8)
    np.testing.assert_array_equal(normalise_intensity(flat, "mean-std", 9.0, 5.0), flat + 2)
    with pytest.raises(DefectaeError, match="dataset.intensity 'max': expected one of none, mean"):
        normalise_intensity(image, "max", 0.0, 1.0)


# ----------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("key", "value"), [("dataset.resize", "squash"), ("dataset.intensity", "bright")]
)
def test_bad_values_exit_2_with_one_line(tmp_path: Path, key: str, value: str) -> None:
    root = make_widget(tmp_path / "mvtec")
    out = tmp_path / "p.h5"
    r = _prepare_cli(tmp_path, root, out, f"{key}={value}")
    assert r.returncode == 2 and r.stdout == "" and not out.exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and value in lines[0], r.stderr


# ----------------------------------------------------------------------------- shared prepared.h5


def test_a_prepared_file_made_with_other_pixel_settings_is_refused(tmp_path: Path) -> None:
    """Profiles of one dataset share prepared.h5: augment must not sample images that another
    recipe prepared with another dataset.intensity (or size, resize, colour)."""
    root = make_widget(tmp_path / "mvtec")
    prepared = tmp_path / "p.h5"
    made = ["dataset.image_size=[24, 32]", "dataset.intensity=mean-std"]
    assert _prepare_cli(tmp_path, root, prepared, *made).returncode == 0

    def augment(*sets: str) -> subprocess.CompletedProcess:
        args = ["dataset.category=widget", "dataset.color=gray", "model.input_size=16"]
        args += ["augment.n_patches=4", "augment.n_val_patches=2", *sets]
        return _cli(
            tmp_path,
            "augment",
            "--profile",
            "mvtec-bottle-ae",
            "--prepared",
            str(prepared),
            "--out",
            str(tmp_path / "patches.h5"),
            *[a for s in args for a in ("--set", s)],
        )

    refused = augment("dataset.image_size=[24, 32]")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert str(prepared) in lines[0] and "dataset.intensity = 'mean-std'" in lines[0]
    assert "'none'" in lines[0] and "image_size" not in lines[0]
    assert not (tmp_path / "patches.h5").exists()
    assert augment(*made).returncode == 0
