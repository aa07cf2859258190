"""`prepare`: every layout from tiny generated folders, the prepared file, bad input, download."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectae.commands import prepare
from defectae.data import download as dl
from defectae.data.images import read_image, read_mask, resize_mask
from defectae.errors import DefectaeError
from defectae.stores.prepared import open_prepared, read_split

# ----------------------------------------------------------------------------- fixtures


def _png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _texture(h: int, w: int, seed: int, rgb: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if rgb else (h, w)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _mask(h: int, w: int, box: tuple[int, int, int, int] | None, value: int = 255) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    if box:
        t, left, bh, bw = box
        m[t : t + bh, left : left + bw] = value
    return m


def make_mvtec(root: Path, category: str = "widget") -> Path:
    """train/good 6, test/good 2, test/crack 2 and test/dent 1 with masks; 40x48 RGB."""
    base = root / category
    for i in range(6):
        _png(base / "train" / "good" / f"{i:03d}.png", _texture(40, 48, i, rgb=True))
    for i in range(2):
        _png(base / "test" / "good" / f"{i:03d}.png", _texture(40, 48, 10 + i, rgb=True))
    for kind, n in (("crack", 2), ("dent", 1)):
        for i in range(n):
            _png(base / "test" / kind / f"{i:03d}.png", _texture(40, 48, 20 + i, rgb=True))
            _png(base / "ground_truth" / kind / f"{i:03d}_mask.png", _mask(40, 48, (4, 8, 10, 12)))
    return root


def make_mvtec3d(root: Path, category: str = "bagel") -> Path:
    base = root / category
    for split, kinds in (
        ("train", {"good": 5}),
        ("validation", {"good": 2}),
        ("test", {"good": 2, "hole": 2}),
    ):
        for kind, n in kinds.items():
            for i in range(n):
                _png(
                    base / split / kind / "rgb" / f"{i:03d}.png",
                    _texture(36, 36, 100 + i, rgb=True),
                )
                (base / split / kind / "xyz").mkdir(parents=True, exist_ok=True)
                if split == "test":
                    box = (3, 3, 9, 9) if kind == "hole" else None
                    _png(base / split / kind / "gt" / f"{i:03d}.png", _mask(36, 36, box, value=1))
    return root


def make_aitex(root: Path) -> Path:
    """Two defect-free strips (fabrics 00, 01) and one defective strip, 64x512, tiles of 64."""
    _png(root / "NODefect_images" / "2306881-210020u" / "0001_000_00.png", _texture(64, 512, 1))
    _png(root / "NODefect_images" / "2311694-1930c7u" / "0002_000_01.png", _texture(64, 512, 2))
    _png(root / "Defect_images" / "0003_002_00.png", _texture(64, 512, 3))
    # defect in tile 2 (x 128..191) only, split over two mask files
    _png(root / "Mask_images" / "0003_002_00_mask1.png", _mask(64, 512, (10, 130, 5, 5)))
    _png(root / "Mask_images" / "0003_002_00_mask2.png", _mask(64, 512, (40, 170, 5, 5)))
    return root


def _jpg(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def make_magnetic(root: Path) -> Path:
    """Magnetic-Tile-like folders: jpg images of differing sizes, same-stem png masks."""
    sizes = [(30, 20), (34, 26), (28, 40), (40, 30), (25, 25), (33, 21)]
    for i, (h, w) in enumerate(sizes):
        _jpg(root / "MT_Free" / "Imgs" / f"exp1_num_{i}.jpg", _texture(h, w, i))
        _png(root / "MT_Free" / "Imgs" / f"exp1_num_{i}.png", _mask(h, w, None))
    for kind, n in (("MT_Crack", 2), ("MT_Uneven", 1)):
        for i in range(n):
            h, w = 30 + 4 * i, 22 + 6 * i
            stem = f"exp2_num_{kind[3:].lower()}{i}"
            _jpg(root / kind / "Imgs" / f"{stem}.jpg", _texture(h, w, 50 + i))
            box = None if kind == "MT_Uneven" else (2, 2, 6, 6)  # an all-zero defect mask
            _png(root / kind / "Imgs" / f"{stem}.png", _mask(h, w, box))
    (root / "train.txt").write_text(
        "exp1_num_0.jpg\nexp1_num_1.jpg\n\nexp1_num_2.jpg\nexp1_num_3.jpg\n"
    )
    return root


def _mt_sets(root: Path, *extra: str) -> list[str]:
    """The magnetic-tile profile on the tiny copy: every MT_ folder but MT_Free is a defect type."""
    return [
        "dataset.image_size=[16, 16]",
        "dataset.val_fraction=0.25",
        "dataset.folders.defect_dirs=[]",
        *extra,
    ]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    from defectae import console

    monkeypatch.setattr(console.mode, "quiet", True)


# ----------------------------------------------------------------------------- layouts


def test_mvtec_layout(tmp_path: Path, home: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    out = tmp_path / "out" / "prepared.h5"
    s = prepare.run(
        "mvtec-bottle-ae",
        ["dataset.category=widget", "dataset.image_size=[20, 24]"],
        str(root),
        out,
        None,
        None,
        None,
    )
    assert s["splits"] == {"train": 5, "validation": 1, "test_good": 2, "test_defect": 3}
    assert s["defect_types"] == {"crack": 2, "dent": 1}
    assert s["image_size"] == [20, 24]
    test = read_split(out, "test")
    assert test.images.shape == (5, 3, 20, 24) and test.masks.shape == (5, 1, 20, 24)
    assert set(np.unique(test.masks)) == {0, 1}
    assert test.masks[test.labels == 0].sum() == 0
    i = test.files.index("widget/test/crack/000.png")
    assert test.names[i] == "000" and test.labels[i] == 1 and test.defect_types[i] == "crack"
    assert test.orig_sizes.tolist() == [[40, 48]] * 5
    # the stored mask is the nearest-neighbour resize of the file's mask
    ref = resize_mask(
        read_mask(root / "widget" / "ground_truth" / "crack" / "000_mask.png"), (20, 24)
    )
    np.testing.assert_array_equal(test.masks[i, 0], ref.astype(np.uint8))
    assert (out.parent / "prepared.profile.toml").is_file()


def test_mvtec_gray_profile_converts_color(tmp_path: Path, home: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    out = tmp_path / "p.h5"
    prepare.run(
        "mvtec-grid-ae",
        ["dataset.category=widget", "dataset.image_size=[40, 48]"],
        str(root),
        out,
        None,
        None,
        None,
    )
    train = read_split(out, "train")
    assert train.images.shape[1] == 1
    # unresized images equal PIL's own grayscale conversion
    ref = np.asarray(
        Image.open(root / "widget" / "train" / "good" / f"{train.names[0]}.png").convert("L")
    )
    np.testing.assert_array_equal(train.images[0, 0], ref)


def test_mvtec3d_layout(tmp_path: Path, home: Path) -> None:
    root = make_mvtec3d(tmp_path / "m3d")
    out = tmp_path / "p.h5"
    s = prepare.run(
        "mvtec3d-bagel-ae", ["dataset.image_size=[18, 18]"], str(root), out, None, None, None
    )
    assert s["splits"] == {"train": 5, "validation": 2, "test_good": 2, "test_defect": 2}
    assert s["defect_types"] == {"hole": 2}
    val = read_split(out, "validation")
    assert all(f.startswith("bagel/validation/good/rgb/") for f in val.files)
    test = read_split(out, "test")
    # gt value 1 counts as defect (non-zero), resized 36 -> 18: box 3..12 -> 2..6
    hole = test.masks[np.array(test.defect_types) == "hole"]
    ref = resize_mask(read_mask(root / "bagel" / "test" / "hole" / "gt" / "000.png"), (18, 18))
    assert ref.sum() > 0
    np.testing.assert_array_equal(hole[0, 0], ref.astype(np.uint8))


def test_aitex_tiles(tmp_path: Path, home: Path) -> None:
    root = make_aitex(tmp_path / "aitex")
    out = tmp_path / "p.h5"
    s = prepare.run(
        "aitex-ae",
        ["dataset.image_size=[64, 64]", "dataset.val_fraction=0.5"],
        str(root),
        out,
        None,
        None,
        None,
    )
    # 2 good strips x 8 tiles: one strip trains, one validates; defective strip: 1 defect tile + 7 good
    assert s["splits"] == {"train": 8, "validation": 8, "test_good": 7, "test_defect": 1}
    assert s["defect_types"] == {"broken_end": 1}
    test = read_split(out, "test")
    i = test.labels.tolist().index(1)
    assert test.names[i] == "0003_002_00_y0_x128" and test.defect_types[i] == "broken_end"
    assert test.masks[i].sum() == 50  # both mask files united
    strip = read_image(root / "Defect_images" / "0003_002_00.png", "gray")
    np.testing.assert_array_equal(test.images[i, 0], strip[:, 128:192, 0])
    assert test.orig_sizes.tolist() == [[64, 64]] * 8
    train, val = read_split(out, "train"), read_split(out, "validation")
    assert len(set(train.files)) == 1 and set(train.files).isdisjoint(val.files)


def test_aitex_fabric_selection_and_stride(tmp_path: Path, home: Path) -> None:
    root = make_aitex(tmp_path / "aitex")
    (root / "NODefect_images" / "2306881-210020u" / "0004_000_00.png").write_bytes(
        (root / "NODefect_images" / "2306881-210020u" / "0001_000_00.png").read_bytes()
    )
    sets = [
        "dataset.image_size=[64, 64]",
        "dataset.aitex.fabrics=['00']",
        "dataset.aitex.tile_stride=32",
        "dataset.val_fraction=0.5",
    ]
    s = prepare.run("aitex-ae", sets, str(root), tmp_path / "p.h5", None, None, None)
    # stride 32 over 512: 15 tiles per strip; fabric 01 left out
    assert s["splits"]["train"] == 15 and s["splits"]["validation"] == 15
    assert s["splits"]["test_good"] + s["splits"]["test_defect"] == 15
    files = (
        read_split(tmp_path / "p.h5", "train").files
        + read_split(tmp_path / "p.h5", "validation").files
    )
    assert all("_01" not in f for f in files)


def test_folders_magnetic_tile_with_train_list(tmp_path: Path, home: Path) -> None:
    root = make_magnetic(tmp_path / "mt")
    out = tmp_path / "p.h5"
    s = prepare.run(
        "magnetic-tile-ae",
        _mt_sets(root, f"dataset.train_list={root / 'train.txt'}"),
        str(root),
        out,
        None,
        None,
        None,
    )
    assert s["splits"] == {"train": 3, "validation": 1, "test_good": 2, "test_defect": 3}
    assert s["defect_types"] == {"crack": 2, "uneven": 1}
    assert s["empty_defect_masks"] == 1
    train, val, test = (read_split(out, k) for k in ("train", "validation", "test"))
    listed = {f"exp1_num_{i}" for i in range(4)}
    assert set(train.names) | set(val.names) == listed
    assert {n for n, lab in zip(test.names, test.labels, strict=True) if lab == 0} == {
        "exp1_num_4",
        "exp1_num_5",
    }
    uneven = test.defect_types.index("uneven")
    assert test.labels[uneven] == 1 and test.masks[uneven].sum() == 0
    # differing original sizes are recorded, all stored at 16x16
    sizes = dict(
        zip(
            train.names + val.names,
            train.orig_sizes.tolist() + val.orig_sizes.tolist(),
            strict=True,
        )
    )
    assert sizes["exp1_num_2"] == [28, 40] and train.images.shape[2:] == (16, 16)


def test_split_is_deterministic_and_seeded(tmp_path: Path, home: Path) -> None:
    root = make_magnetic(tmp_path / "mt")
    runs = []
    for seed, name in ((0, "a.h5"), (0, "b.h5"), (5, "c.h5")):
        prepare.run(
            "magnetic-tile-ae",
            _mt_sets(root, f"dataset.seed={seed}", "dataset.test_fraction=0.34"),
            str(root),
            tmp_path / name,
            None,
            None,
            None,
        )
        runs.append(
            read_split(tmp_path / name, "validation").names
            + read_split(tmp_path / name, "test").names
        )
    assert runs[0] == runs[1]
    # without train_list a share of the good images becomes test-good
    assert sum(n.startswith("exp1") for n in runs[0]) == 1 + 2
    a, b = (hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.h5", "b.h5"))
    assert a == b  # byte-identical output
    assert runs[2] != runs[0]


def test_val_list_fixes_the_validation_images(tmp_path: Path, home: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    lst = tmp_path / "val.txt"
    lst.write_text("# validation\n001.png\n004\n")
    _run_mvtec(root, tmp_path, f"dataset.val_list={lst}")
    assert read_split(tmp_path / "p.h5", "validation").names == ["001", "004"]
    assert len(read_split(tmp_path / "p.h5", "train")) == 4
    m3d = make_mvtec3d(tmp_path / "m3d")
    with pytest.raises(
        DefectaeError, match="dataset.val_list: layout 'mvtec3d' ships its own validation"
    ):
        prepare.run(
            "mvtec3d-bagel-ae",
            [f"dataset.val_list={lst}"],
            str(m3d),
            tmp_path / "q.h5",
            None,
            None,
            None,
        )


def test_aitex_bad_input(tmp_path: Path, home: Path) -> None:
    root = make_aitex(tmp_path / "aitex")
    sets = ["dataset.image_size=[64, 64]", "dataset.val_fraction=0.5"]
    with pytest.raises(DefectaeError, match="tile_stride 65: larger than the 64x64 tile"):
        prepare.run(
            "aitex-ae",
            [*sets, "dataset.aitex.tile_stride=65"],
            str(root),
            tmp_path / "p.h5",
            None,
            None,
            None,
        )
    with pytest.raises(
        DefectaeError, match=r"0001_000_00.png: 64x512 image is smaller than the 128x128 tile"
    ):
        prepare.run(
            "aitex-ae",
            ["dataset.image_size=[128, 128]"],
            str(root),
            tmp_path / "p.h5",
            None,
            None,
            None,
        )
    _png(root / "Mask_images" / "0009_002_00_mask.png", _mask(64, 512, None))
    with pytest.raises(DefectaeError, match=r"0009_002_00_mask.png: mask without its image"):
        prepare.run("aitex-ae", sets, str(root), tmp_path / "p.h5", None, None, None)
    # the shipped profile's exclude list drops a strip together with its mask
    prepare.run(
        "aitex-ae",
        [*sets, "dataset.aitex.exclude=['0009_002_00']"],
        str(root),
        tmp_path / "p.h5",
        None,
        None,
        None,
    )
    for m in (root / "Mask_images").glob("0003_*"):
        m.unlink()
    with pytest.raises(DefectaeError, match=r"0003_002_00.png: image without its mask"):
        prepare.run(
            "aitex-ae",
            [*sets, "dataset.aitex.exclude=['0009_002_00']"],
            str(root),
            tmp_path / "p.h5",
            None,
            None,
            None,
        )


def test_folders_mask_dir_and_suffix(tmp_path: Path, home: Path) -> None:
    root = tmp_path / "plain"
    for i in range(4):
        _png(root / "ok" / f"g{i}.png", _texture(20, 20 + i, i))
    _png(root / "scratch" / "s0.png", _texture(24, 24, 9))
    _png(root / "masks" / "scratch" / "s0_gt.png", _mask(24, 24, (0, 0, 4, 4)))
    sets = [
        "dataset.layout=folders",
        "dataset.image_size=[12, 12]",
        "dataset.folders.good_dir=ok",
        "dataset.folders.mask_dir=masks",
        "dataset.folders.mask_suffix=_gt",
        "dataset.test_fraction=0.25",
        "dataset.val_fraction=0.34",
    ]
    s = prepare.run(
        "magnetic-tile-ae",
        sets
        + [
            "dataset.folders.defect_dirs=[]",
            "dataset.folders.image_subdir=",
            "dataset.folders.type_prefix=",
            "dataset.folders.image_exts=['.png']",
        ],
        str(root),
        tmp_path / "p.h5",
        None,
        None,
        None,
    )
    assert s["splits"] == {"train": 2, "validation": 1, "test_good": 1, "test_defect": 1}
    assert s["defect_types"] == {"scratch": 1}


def test_prepared_round_trip_and_attrs(tmp_path: Path, home: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    s = prepare.run(
        "mvtec-bottle-ae",
        ["dataset.category=widget", "dataset.image_size=[40, 48]"],
        str(root),
        None,
        None,
        None,
        None,
    )
    out = Path(s["out"])
    assert out == home / "work" / "mvtec-bottle" / "prepared.h5"
    with open_prepared(out) as f:
        assert f.attrs["layout"] == "mvtec" and f.attrs["source"] == str(root)
        assert f.attrs["category"] == "widget" and list(f.attrs["image_size"]) == [40, 48]
        assert json.loads(f.attrs["dataset"])["category"] == "widget"
        assert json.loads(f.attrs["splits"])["test_defect"] == 3
    train = read_split(out, "train")
    for name, image in zip(train.names, train.images, strict=True):
        ref = np.asarray(Image.open(root / "widget" / "train" / "good" / f"{name}.png"))
        np.testing.assert_array_equal(image.transpose(1, 2, 0), ref)  # no resize: exact pixels
    from defectae.profiles import load_written

    assert load_written(out.parent / "prepared.profile.toml").dataset.root == str(root)


def test_json_summary_through_cli(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    out = tmp_path / "p.h5"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "defectae",
            "--json",
            "prepare",
            "--profile",
            "mvtec-bottle-ae",
            "--root",
            str(root),
            "--set",
            "dataset.category=widget",
            "--set",
            "dataset.image_size=[8, 8]",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["out"] == str(out) and summary["image_size"] == [8, 8]
    assert summary["splits"] == {"train": 5, "validation": 1, "test_good": 2, "test_defect": 3}
    assert summary["defect_types"] == {"crack": 2, "dent": 1}


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_without_profile_picks_the_texture_profile() -> None:
    assert prepare.resolve_profile(None, [], None, "grid").dataset.name == "synthetic-grid"
    prof = prepare.resolve_profile(None, [], None, "woven")
    assert prof.name == "synthetic-ae" and prof.dataset.synthetic.texture == "woven"
    with pytest.raises(DefectaeError, match="--synthetic 'stripes': expected one of woven, grid"):
        prepare.resolve_profile(None, [], None, "stripes")
    with pytest.raises(DefectaeError, match="has dataset.layout = 'mvtec'"):
        prepare.resolve_profile("mvtec-bottle-ae", [], None, "grid")
    with pytest.raises(DefectaeError, match="--profile: expected"):
        prepare.resolve_profile(None, [], None, None)


def test_synthetic_prepare(tmp_path: Path, home: Path) -> None:
    sets = [
        "dataset.synthetic.size=32",
        "dataset.synthetic.n_train=4",
        "dataset.synthetic.n_test_good=1",
        "dataset.synthetic.n_test_defect=2",
        "dataset.image_size=[32, 32]",
        "dataset.val_fraction=0.25",
    ]
    s = prepare.run(None, sets, None, None, "grid", None, None)
    assert s["out"] == str(home / "work" / "synthetic-grid" / "prepared.h5")
    assert s["splits"] == {"train": 3, "validation": 1, "test_good": 1, "test_defect": 2}
    assert Path(s["source"]).is_relative_to(home)
    test = read_split(s["out"], "test")
    assert test.masks[test.labels == 1].reshape(2, -1).any(axis=1).all()


# ----------------------------------------------------------------------------- bad input


def _run_mvtec(root: Path, tmp_path: Path, *sets: str) -> dict:
    return prepare.run(
        "mvtec-bottle-ae",
        ["dataset.category=widget", "dataset.image_size=[8, 8]", *sets],
        str(root),
        tmp_path / "p.h5",
        None,
        None,
        None,
    )


def test_missing_folders(tmp_path: Path, home: Path) -> None:
    with pytest.raises(DefectaeError, match=r"nowhere: folder not found"):
        _run_mvtec(tmp_path / "nowhere", tmp_path)
    root = make_mvtec(tmp_path / "mvtec")
    with pytest.raises(
        DefectaeError, match=r"other: folder not found; expected the category 'other'"
    ):
        _run_mvtec(root, tmp_path, "dataset.category=other")
    import shutil

    shutil.rmtree(root / "widget" / "ground_truth" / "dent")
    with pytest.raises(DefectaeError, match=r"ground_truth/dent: folder not found"):
        _run_mvtec(root, tmp_path)


def test_image_without_mask_and_mask_without_image(tmp_path: Path, home: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    (root / "widget" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DefectaeError, match=r"crack/001.png: image without its mask"):
        _run_mvtec(root, tmp_path)
    root = make_mvtec(tmp_path / "mvtec2")
    _png(root / "widget" / "ground_truth" / "crack" / "007_mask.png", _mask(40, 48, None))
    with pytest.raises(DefectaeError, match=r"crack/007_mask.png: mask without its image"):
        _run_mvtec(root, tmp_path)
    mt = make_magnetic(tmp_path / "mt")
    (mt / "MT_Crack" / "Imgs" / "exp2_num_crack0.jpg").unlink()
    with pytest.raises(DefectaeError, match=r"exp2_num_crack0.png: mask without its image"):
        prepare.run("magnetic-tile-ae", _mt_sets(mt), str(mt), tmp_path / "p.h5", None, None, None)


def test_unreadable_and_truncated_images(tmp_path: Path, home: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    bad = root / "widget" / "train" / "good" / "002.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DefectaeError, match=r"train/good/002.png: unreadable or truncated image"):
        _run_mvtec(root, tmp_path)
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DefectaeError, match=r"train/good/002.png: unreadable or truncated image"):
        _run_mvtec(root, tmp_path)
    from PIL import ImageFile

    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_mask_size_differs_from_image(tmp_path: Path, home: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    _png(root / "widget" / "ground_truth" / "dent" / "000_mask.png", _mask(40, 47, (1, 1, 3, 3)))
    with pytest.raises(
        DefectaeError, match=r"dent/000_mask.png: mask is 40x47 but its image .*000.png is 40x48"
    ):
        _run_mvtec(root, tmp_path)


def test_good_image_with_nonempty_mask(tmp_path: Path, home: Path) -> None:
    mt = make_magnetic(tmp_path / "mt")
    _png(mt / "MT_Free" / "Imgs" / "exp1_num_3.png", _mask(40, 30, (0, 0, 2, 2)))
    with pytest.raises(
        DefectaeError, match=r"exp1_num_3.png: the mask of a defect-free image is not all-zero"
    ):
        prepare.run("magnetic-tile-ae", _mt_sets(mt), str(mt), tmp_path / "p.h5", None, None, None)


def test_empty_splits(tmp_path: Path, home: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    with pytest.raises(DefectaeError, match=r"the validation split is empty"):
        _run_mvtec(root, tmp_path, "dataset.val_fraction=0")
    for p in (root / "widget" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(DefectaeError, match=r"train/good: the training split is empty"):
        _run_mvtec(root, tmp_path)


def test_split_file_naming_missing_images(tmp_path: Path, home: Path) -> None:
    mt = make_magnetic(tmp_path / "mt")
    lst = tmp_path / "split.txt"
    lst.write_text("exp1_num_0.jpg\nexp9_num_404.jpg\n")
    with pytest.raises(DefectaeError, match=r"split.txt: names 'exp9_num_404.jpg' not found"):
        prepare.run(
            "magnetic-tile-ae",
            _mt_sets(mt, f"dataset.train_list={lst}"),
            str(mt),
            tmp_path / "p.h5",
            None,
            None,
            None,
        )
    with pytest.raises(DefectaeError, match=r"absent.txt: split file not found"):
        prepare.run(
            "magnetic-tile-ae",
            _mt_sets(mt, f"dataset.train_list={tmp_path / 'absent.txt'}"),
            str(mt),
            tmp_path / "p.h5",
            None,
            None,
            None,
        )


def test_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    (root / "widget" / "ground_truth" / "crack" / "000_mask.png").unlink()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "defectae",
            "prepare",
            "--profile",
            "mvtec-bottle-ae",
            "--root",
            str(root),
            "--set",
            "dataset.category=widget",
            "--out",
            str(tmp_path / "p.h5"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "crack/000.png: image without its mask" in lines[0]
    assert r.stdout == "" and not (tmp_path / "p.h5").exists()


def test_interrupt_leaves_no_partial_file(tmp_path: Path, home: Path, monkeypatch) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    out = tmp_path / "out" / "prepared.h5"
    out.parent.mkdir()
    out.write_bytes(b"earlier complete output")
    calls = {"n": 0}
    real = prepare.read_image

    def interrupted(path, color):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(path, color)

    monkeypatch.setattr(prepare, "read_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.run(
            "mvtec-bottle-ae", ["dataset.category=widget"], str(root), out, None, None, None
        )
    assert calls["n"] == 4
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared.h5"]
    assert out.read_bytes() == b"earlier complete output"


def test_interrupt_while_writing_removes_temp(tmp_path: Path, home: Path, monkeypatch) -> None:
    import h5py

    root = make_mvtec(tmp_path / "mvtec")
    out = tmp_path / "out" / "prepared.h5"
    real = h5py.Group.create_dataset
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:  # inside the second group
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.run(
            "mvtec-bottle-ae", ["dataset.category=widget"], str(root), out, None, None, None
        )
    assert list(out.parent.iterdir()) == []


# ----------------------------------------------------------------------------- images


def test_read_image_modes(tmp_path: Path) -> None:
    sixteen = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    Image.fromarray(sixteen).save(tmp_path / "16.png")
    np.testing.assert_array_equal(
        read_image(tmp_path / "16.png", "gray")[:, :, 0], (sixteen >> 8).astype(np.uint8)
    )
    rgb = _texture(5, 6, 0, rgb=True)
    _png(tmp_path / "rgb.png", rgb)
    assert read_image(tmp_path / "rgb.png", "rgb").shape == (5, 6, 3)
    gray = read_image(tmp_path / "rgb.png", "gray")
    np.testing.assert_array_equal(gray[:, :, 0], np.asarray(Image.fromarray(rgb).convert("L")))
    _png(tmp_path / "m.png", np.array([[0, 1], [2, 255]], np.uint8))
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), [[False, True], [True, True]])
    with pytest.raises(DefectaeError, match="missing.png: image file not found"):
        read_image(tmp_path / "missing.png", "gray")


# ----------------------------------------------------------------------------- download


class _Server:
    """A loopback HTTP server for one payload; honours Range, can drop the first transfer."""

    def __init__(self, payload: bytes, cut_after: int | None = None) -> None:
        self.payload, self.cut_after, self.ranges = payload, cut_after, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                rng = self.headers.get("Range")
                server.ranges.append(rng)
                start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
                body = server.payload[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header(
                        "Content-Range",
                        f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}",
                    )
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_after is not None:
                    body, server.cut_after = body[: server.cut_after], None
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/files/{name}"


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _zip_of(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, Path("dataset") / p.relative_to(folder))
    return buf.getvalue()


def test_download_resumes_after_a_dropped_connection(tmp_path: Path, no_proxy) -> None:
    payload = _zip_of(make_mvtec(tmp_path / "src"))
    digest = hashlib.sha256(payload).hexdigest()
    with _Server(payload, cut_after=1000) as server:
        root = dl.download(server.url("mvtec.zip"), digest, "widget", cache=tmp_path / "cache")
    assert server.ranges == [None, "bytes=1000-"]
    assert (root / "widget" / "train" / "good" / "000.png").is_file()
    assert root.name == "dataset"
    archive = tmp_path / "cache" / f"{digest[:12]}-mvtec.zip"
    assert (
        archive.read_bytes() == payload and not archive.with_name(archive.name + ".part").exists()
    )


def test_download_continues_a_part_file_from_an_earlier_run(tmp_path: Path, no_proxy) -> None:
    payload = bytes(range(256)) * 40
    digest = hashlib.sha256(payload).hexdigest()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"{digest[:12]}-blob.bin.part").write_bytes(payload[:3000])
    with _Server(payload) as server:
        path = dl.fetch(server.url("blob.bin"), digest, cache=cache)
    assert server.ranges == ["bytes=3000-"] and path.read_bytes() == payload


def test_download_refuses_a_wrong_checksum(tmp_path: Path, no_proxy) -> None:
    payload = b"x" * 5000
    wrong = hashlib.sha256(b"something else").hexdigest()
    with (
        _Server(payload) as server,
        pytest.raises(DefectaeError, match=f"expected {wrong}; the download was deleted"),
    ):
        dl.fetch(server.url("a.zip"), wrong, cache=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(DefectaeError, match="expected 64 hexadecimal digits"):
        dl.fetch("http://127.0.0.1:9/a.zip", "abc", cache=tmp_path / "cache")


def test_unpack_refuses_paths_escaping_the_target(tmp_path: Path, no_proxy) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        t.addfile(info, io.BytesIO(b"bad"))
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    with _Server(payload) as server, pytest.raises(DefectaeError, match="would unpack outside"):
        dl.download(server.url("evil.tar.gz"), digest, cache=tmp_path / "cache")
    assert (
        not (tmp_path / "escaped.txt").exists()
        and not (tmp_path / "cache" / "escaped.txt").exists()
    )


def test_prepare_download(tmp_path: Path, home: Path, no_proxy, monkeypatch) -> None:
    buf = io.BytesIO()
    src = make_mvtec(tmp_path / "src")
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(src / "widget", arcname="widget")
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    monkeypatch.setenv("DEFECTAE_CACHE", str(tmp_path / "cache"))
    with _Server(payload) as server:
        s = prepare.run(
            "mvtec-bottle-ae",
            ["dataset.category=widget", "dataset.image_size=[8, 8]"],
            None,
            tmp_path / "p.h5",
            None,
            server.url("widget.tar.gz"),
            digest,
        )
    assert s["splits"]["test_defect"] == 3
    assert Path(s["source"]) == tmp_path / "cache" / f"{digest[:12]}-widget.tar.gz.d"


def test_root_may_be_the_category_folder_itself(tmp_path: Path, home: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    via_parent = _run_mvtec(root, tmp_path)
    (tmp_path / "p.h5").rename(tmp_path / "parent.h5")
    via_category = _run_mvtec(root / "widget", tmp_path)
    assert (
        via_category["splits"]
        == via_parent["splits"]
        == {
            "train": 5,
            "validation": 1,
            "test_good": 2,
            "test_defect": 3,
        }
    )


def test_a_folder_given_as_a_prepared_file_is_named_as_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DefectaeError, match=r"is a folder; expected a prepared file"):
        open_prepared(tmp_path)


def test_enlarged_and_squashed_images_are_named_in_a_warning(
    tmp_path: Path, home: Path, capsys
) -> None:
    root = make_mvtec(tmp_path / "mvtec")  # 40x48 images
    _run_mvtec(root, tmp_path, "dataset.image_size=[80, 96]")
    err = " ".join(capsys.readouterr().err.split())
    assert "11 image(s) are smaller than dataset.image_size 80x96" in err and "40x48" in err
    assert "aspect ratio" not in err
    _run_mvtec(root, tmp_path, "dataset.image_size=[40, 40]")
    err = " ".join(capsys.readouterr().err.split())
    assert "11 image(s) have another aspect ratio than dataset.image_size 40x40" in err
    assert "smaller" not in err
