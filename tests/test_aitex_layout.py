"""The AITEX reader on a miniature of the database as its three archives unpack: defect-free
strips in one folder per fabric roll, defective strips and their masks side by side, a strip
with two masks, a narrower strip, and the defective strip that ships without a mask; prepared
through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from builders import defectae
from PIL import Image

from defectae.stores.prepared import read_split

H, W, NARROW = 64, 512, 474  # as 256 x 4096 and 256 x 3796, at a quarter of the height
TILE = ["--set", "dataset.image_size=[64, 64]"]
ROLLS = {"00": "2311694-2040n7u", "04": "2311517-195063u", "05": "2306881-210020u"}
# defective strips: stem -> (width, {mask file suffix: (top, left, height, width)})
DEFECTS = {
    "0010_002_00": (W, {"_mask": (20, 130, 10, 10)}),  # tile x128
    "0044_019_04": (W, {"_mask1": (5, 10, 5, 10), "_mask2": (40, 300, 10, 10)}),  # x0 and x256
    "0094_027_05": (NARROW, {"_mask": (30, 460, 8, 10)}),  # only the last, shifted tile (x410)
    "0100_025_08": (W, {}),  # shipped without a mask
}


def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(path)


def _mask(width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    top, left, h, w = box
    mask = np.zeros((H, width), np.uint8)
    mask[top : top + h, left : left + w] = 255
    return mask


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The miniature database: two defect-free strips for each of three fabric rolls."""
    root = tmp_path_factory.mktemp("aitex") / "aitex"
    rng = np.random.default_rng(0)
    n = 0
    for fabric, roll in ROLLS.items():
        for _ in range(2):
            n += 1
            strip = rng.integers(60, 200, (H, W), dtype=np.uint8)
            _png(root / "NODefect_images" / roll / f"{n:04d}_000_{fabric}.png", strip)
    for stem, (width, masks) in DEFECTS.items():
        _png(root / "Defect_images" / f"{stem}.png", rng.integers(60, 200, (H, width), np.uint8))
        for suffix, box in masks.items():
            _png(root / "Mask_images" / f"{stem}{suffix}.png", _mask(width, box))
    return root


def _prepare(home: Path, root: Path, *sets: str, code: int = 0):
    args = [a for s in sets for a in ("--set", s)]
    return defectae(
        home, "prepare", "--profile", "aitex-ae", "--root", str(root), *TILE, *args, code=code
    )


def _error(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    return lines[0]


def _expected_test_tiles(fabrics: set[str] | None = None) -> dict[str, np.ndarray]:
    """Name -> united mask of every tile of the usable defective strips, computed here."""
    tiles = {}
    for stem, (width, masks) in DEFECTS.items():
        if not masks or (fabrics and stem[-2:] not in fabrics):
            continue
        united = np.zeros((H, width), bool)
        for box in masks.values():
            united |= _mask(width, box) > 0
        lefts = sorted({*range(0, width - 64 + 1, 64), width - 64})
        for left in lefts:
            tiles[f"{stem}_y0_x{left}"] = united[:, left : left + 64]
    return tiles


def test_the_shipped_profile_excludes_the_maskless_strip_and_tiles_the_rest(root, tmp_path):
    summary = json.loads(_prepare(tmp_path, root).stdout)
    expected = _expected_test_tiles()
    defective = {n for n, m in expected.items() if m.any()}
    assert len(expected) == 24 and len(defective) == 4  # 3 strips x 8 tiles (474: x410 last)
    assert summary["splits"]["train"] + summary["splits"]["validation"] == 6 * 8
    assert summary["splits"]["test_defect"] == 4 and summary["splits"]["test_good"] == 20
    assert summary["defect_types"] == {"broken_end": 1, "fuzzyball": 2, "knots": 1}
    assert summary["empty_defect_masks"] == 0

    test = read_split(summary["out"], "test")
    assert sorted(test.names) == sorted(expected)
    for i, name in enumerate(test.names):
        mask = expected[name]
        np.testing.assert_array_equal(test.masks[i, 0], mask.astype(np.uint8))  # masks united
        assert test.labels[i] == mask.any()
        assert (test.defect_types[i] == "good") == (not mask.any())
    i = test.names.index("0094_027_05_y0_x410")
    strip = np.asarray(Image.open(root / "Defect_images" / "0094_027_05.png"))
    np.testing.assert_array_equal(test.images[i, 0], strip[:, NARROW - 64 :])
    assert test.defect_types[i] == "knots"
    assert all("0100_025_08" not in f for f in test.files)

    train, val = read_split(summary["out"], "train"), read_split(summary["out"], "validation")
    assert set(train.files).isdisjoint(val.files)  # whole strips on one side
    assert all(f.startswith("NODefect_images/") and f.count("/") == 2 for f in train.files)
    assert len(val) % 8 == 0 and len(val) > 0


def test_a_defect_strip_without_mask_is_a_one_line_error_naming_the_exclude_key(root, tmp_path):
    line = _error(_prepare(tmp_path, root, "dataset.aitex.exclude=[]", code=2))
    assert "Defect_images/0100_025_08.png: image without its mask" in line
    assert "Mask_images/0100_025_08_mask.png" in line
    assert "add '0100_025_08' to dataset.aitex.exclude" in line


def test_fabric_selection(root, tmp_path):
    summary = json.loads(_prepare(tmp_path, root, "dataset.aitex.fabrics=['04']").stdout)
    assert summary["splits"]["train"] + summary["splits"]["validation"] == 2 * 8
    assert summary["defect_types"] == {"fuzzyball": 2}
    test = read_split(summary["out"], "test")
    assert sorted(test.names) == sorted(_expected_test_tiles({"04"}))


def test_a_fabric_code_naming_no_strip_is_a_one_line_error(root, tmp_path):
    line = _error(_prepare(tmp_path, root, "dataset.aitex.fabrics=['04', '07']", code=2))
    assert line == (
        f"error: dataset.aitex.fabrics: no strips of fabric '07' under {root}; "
        "found fabric codes 00, 04, 05, 08"
    )


def test_an_excluded_stem_naming_no_strip_is_said(root, tmp_path):
    """A typo in the exclude list warns (and the strip it meant is still a one-line error)."""
    proc = _prepare(tmp_path, root, "dataset.aitex.exclude=['0100_025_8']", code=2)
    err = " ".join(proc.stderr.split())
    assert (
        f"warning: dataset.aitex.exclude: '0100_025_8' names no strip or mask under {root}" in err
    )
    assert "0100_025_08.png: image without its mask" in err


def test_a_defect_strip_with_an_all_zero_mask_is_said(root, tmp_path):
    copy = tmp_path / "aitex"
    shutil.copytree(root, copy)
    stem = "0106_010_04"
    _png(copy / "Defect_images" / f"{stem}.png", np.full((H, W), 128, np.uint8))
    _png(copy / "Mask_images" / f"{stem}_mask.png", np.zeros((H, W), np.uint8))
    proc = _prepare(tmp_path / "home", copy)
    assert "1 defective image(s) have an all-zero mask, so all their tiles" in proc.stderr
    assert f"Defect_images/{stem}.png" in proc.stderr
