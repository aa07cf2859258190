"""The synthetic dataset generator: deterministic, MVTec layout, exact and local defect masks."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectae.data import synthetic
from defectae.data.synthetic import (
    DEFECT_TYPES,
    apply_defect,
    generate,
    quantize,
    render,
    sample_texture,
)
from defectae.errors import DefectaeError
from defectae.profiles.schema import SyntheticOptions

SMALL = SyntheticOptions(texture="woven", size=64, n_train=3, n_test_good=2, n_test_defect=5)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.asarray(im)


@pytest.mark.parametrize("texture", ["woven", "grid"])
def test_same_seed_gives_identical_bytes_and_another_seed_other_images(tmp_path, texture):
    options = SyntheticOptions(texture=texture, size=64, n_train=3, n_test_good=2, n_test_defect=5)
    a = _files(generate(tmp_path / "a", options, seed=7))
    b = _files(generate(tmp_path / "b", options, seed=7))
    c = _files(generate(tmp_path / "c", options, seed=8))
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".png")]
    assert all(a[k] != c[k] for k in images if not k.startswith("ground_truth"))
    # every image is different from every other one in the same set
    pixels = [
        _load(tmp_path / "a" / k).tobytes() for k in images if not k.startswith("ground_truth")
    ]
    assert len(set(pixels)) == len(pixels)


def test_image_k_does_not_depend_on_how_many_images_are_generated(tmp_path):
    few = generate(tmp_path / "few", SMALL, seed=3)
    more = generate(
        tmp_path / "more",
        SyntheticOptions(size=64, n_train=6, n_test_good=4, n_test_defect=10),
        seed=3,
    )
    for rel in [
        "train/good/000.png",
        "train/good/002.png",
        "test/good/001.png",
        "test/scratch/000.png",
        "ground_truth/hole/000_mask.png",
    ]:
        assert (few / rel).read_bytes() == (more / rel).read_bytes(), rel


def test_layout_counts_names_and_masks(tmp_path):
    options = SyntheticOptions(
        size=48,
        n_train=4,
        n_test_good=3,
        n_test_defect=7,
        defect_types=["scratch", "stain", "broken_thread"],
    )
    root = generate(tmp_path / "data", options, seed=0)
    assert root == tmp_path / "data"
    names = lambda folder: sorted(p.name for p in (root / folder).iterdir())  # noqa: E731
    assert names("train/good") == ["000.png", "001.png", "002.png", "003.png"]
    assert names("test/good") == ["000.png", "001.png", "002.png"]
    assert sorted(p.name for p in (root / "test").iterdir()) == [
        "broken_thread",
        "good",
        "scratch",
        "stain",
    ]
    # 7 images over 3 types: 3, 2, 2 in the order given
    assert names("test/scratch") == ["000.png", "001.png", "002.png"]
    assert names("test/stain") == names("test/broken_thread") == ["000.png", "001.png"]
    assert sorted(p.name for p in (root / "ground_truth").iterdir()) == [
        "broken_thread",
        "scratch",
        "stain",
    ]
    for kind in ("scratch", "stain", "broken_thread"):
        assert names(f"ground_truth/{kind}") == [
            n.replace(".png", "_mask.png") for n in names(f"test/{kind}")
        ]
        for image in (root / "test" / kind).iterdir():
            mask = _load(root / "ground_truth" / kind / image.name.replace(".png", "_mask.png"))
            assert _load(image).shape == mask.shape == (48, 48)
            assert set(np.unique(mask)) == {0, 255}
    assert not (root / "ground_truth" / "good").exists()
    record = json.loads((root / "synthetic.json").read_text())
    assert record["seed"] == 0 and record["options"] == json.loads(json.dumps(asdict(options)))
    assert not [p for p in tmp_path.iterdir() if p.name != "data"]  # no temporary folders left


@pytest.mark.parametrize("texture", ["woven", "grid"])
@pytest.mark.parametrize("kind", DEFECT_TYPES)
def test_mask_is_exactly_the_changed_pixels_and_small(texture, kind):
    size = 128
    centroids = []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        spec = sample_texture(texture, size, rng)
        clean = render(spec)
        out, mask = apply_defect(clean, kind, rng, spec)
        assert mask.shape == (size, size) and mask.dtype == bool
        changed = quantize(out) != quantize(clean)
        np.testing.assert_array_equal(changed, mask)
        assert np.array_equal(out[~mask], clean[~mask])  # nothing outside the mask moves at all
        assert 0 < mask.mean() < 0.08, (seed, mask.mean())
        # a defect is visible: the mean change over its mask is at least a few grey levels
        assert np.abs(out[mask] - clean[mask]).mean() > 6 / 255
        centroids.append(np.argwhere(mask).mean(0))
    assert np.ptp(np.array(centroids), axis=0).min() > 5  # defects land in different places


def test_apply_defect_is_deterministic_for_one_seed():
    spec = sample_texture("woven", 64, np.random.default_rng(0))
    img = render(spec)
    a = apply_defect(img, "hole", np.random.default_rng(1), spec)
    b = apply_defect(img, "hole", np.random.default_rng(1), spec)
    c = apply_defect(img, "hole", np.random.default_rng(2), spec)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_the_two_textures_differ_in_pitch_and_look():
    def dominant_frequency(img: np.ndarray) -> int:
        power = np.abs(np.fft.rfft(img - img.mean(), axis=1)).mean(0)
        return int(np.argmax(power[1:]) + 1)

    for seed in range(3):
        woven = synthetic.texture("woven", 128, np.random.default_rng(seed))
        grid = synthetic.texture("grid", 128, np.random.default_rng(seed))
        assert woven.shape == grid.shape == (128, 128)
        assert 0 <= woven.min() and woven.max() <= 1
        assert 20 <= dominant_frequency(woven) <= 28  # ~24 threads across the image
        assert 7 <= dominant_frequency(grid) <= 11  # ~9 wires across the image
        assert woven.mean() - grid.mean() > 0.15  # dense fabric vs open mesh on a dark ground


def test_textures_are_regular_but_not_aligned():
    a = synthetic.texture("woven", 64, np.random.default_rng(0))
    b = synthetic.texture("woven", 64, np.random.default_rng(1))
    assert abs(a.mean() - b.mean()) < 0.05 and abs(a.std() - b.std()) < 0.05
    assert np.abs(a - b).mean() > 0.05  # a random phase: not the same picture twice


def test_unknown_defect_type_names_the_key_and_value(tmp_path):
    bad = SyntheticOptions(
        size=32, n_train=1, n_test_good=0, n_test_defect=2, defect_types=["scratch", "dent"]
    )
    with pytest.raises(DefectaeError, match=r"dataset\.synthetic\.defect_types.*'dent'"):
        generate(tmp_path / "x", bad, seed=0)
    assert not (tmp_path / "x").exists()
    with pytest.raises(DefectaeError, match=r"dataset\.synthetic\.defect_types.*'dent'"):
        apply_defect(np.zeros((32, 32)), "dent", np.random.default_rng(0))
    with pytest.raises(DefectaeError, match=r"dataset\.synthetic\.texture.*'felt'"):
        generate(tmp_path / "x", SyntheticOptions(texture="felt"), seed=0)  # type: ignore[arg-type]
    with pytest.raises(DefectaeError, match=r"dataset\.synthetic\.defect_types"):
        generate(tmp_path / "x", SyntheticOptions(size=32, defect_types=[]), seed=0)


def _fail_after(monkeypatch, calls: int) -> None:
    real = synthetic._write_png
    count = {"n": 0}

    def write(path, pixels):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        real(path, pixels)

    monkeypatch.setattr(synthetic, "_write_png", write)


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    _fail_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "data", SMALL, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_regeneration_keeps_the_previous_dataset(tmp_path, monkeypatch):
    root = generate(tmp_path / "data", SMALL, seed=0)
    before = _files(root)
    _fail_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        generate(root, SMALL, seed=1)
    assert _files(root) == before
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    monkeypatch.undo()
    generate(root, SMALL, seed=1)  # a completed run replaces it
    assert _files(root) != before
    assert json.loads((root / "synthetic.json").read_text())["seed"] == 1


def test_refuses_to_replace_a_folder_that_is_not_synthetic(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.png").write_bytes(b"precious")
    with pytest.raises(DefectaeError, match="synthetic.json"):
        generate(tmp_path / "mine", SMALL, seed=0)
    assert (tmp_path / "mine" / "photo.png").read_bytes() == b"precious"
