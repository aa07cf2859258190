"""`score --resolution`: pixel metrics over every original pixel (ragged sizes) or on the grid.

A tiny MVTec-layout dataset with images of different sizes goes through `prepare`; residual
maps are written on the prepared grid without training. Original-resolution figures are
checked against scikit-learn and a plainly written AU-PRO on maps upsampled here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from defectae import profiles, workspace
from defectae.commands import prepare, score
from defectae.core import metrics
from defectae.core.ragged import Ragged
from defectae.core.residuals import upsample_maps
from defectae.files import sha256_file
from defectae.stores.prepared import read_split
from defectae.stores.residuals import read_residuals

GRID = 16
PROFILE = "mvtec-bottle-ae"
SETS = ["dataset.category=woven", f"dataset.image_size=[{GRID}, {GRID}]", "dataset.color=gray"]
# (defect type, original H, W) of each test image: no two alike, none a multiple of the grid
TEST = [
    ("good", 40, 52),
    ("good", 64, 48),
    ("good", 36, 37),
    ("hole", 50, 70),
    ("hole", 44, 60),
    ("hole", 58, 41),
    ("scratch", 48, 49),
    ("scratch", 38, 66),
]
CLI = str(Path(sys.executable).with_name("defectae"))


def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _mask(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    top, left = rng.integers(2, h // 2), rng.integers(2, w // 2)
    if kind == "hole":
        m[top : top + h // 4, left : left + w // 5] = 255
    else:  # a thin line, a dot, and two pixels touching at a corner (one 8-connected region)
        m[top, left : left + w // 2] = 255
        m[h - 4 : h - 2, 2:5] = 255
        m[h - 8, w - 6] = m[h - 7, w - 5] = 255
    return m


def make_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    base = root / "woven"
    for i in range(5):
        _png(base / "train" / "good" / f"{i:03d}.png", rng.integers(0, 256, (40, 44), np.uint8))
    for i, (kind, h, w) in enumerate(TEST):
        _png(base / "test" / kind / f"{i:03d}.png", rng.integers(0, 256, (h, w), np.uint8))
        if kind != "good":
            _png(base / "ground_truth" / kind / f"{i:03d}_mask.png", _mask(kind, h, w, rng))
    return root


def write_residuals(path: Path, prepared: Path, dataset: str, seed: int = 1) -> np.ndarray:
    """residuals.h5 on the prepared grid, per its contract: noisy maps, higher inside the masks."""
    test = read_split(prepared, "test")
    rng = np.random.default_rng(seed)
    n = len(test)
    maps = (0.5 * rng.random((n, 1, GRID, GRID)) + 0.35 * test.masks).astype(np.float16)
    val = (0.5 * rng.random((3, 1, GRID, GRID))).astype(np.float16)
    strings = h5py.string_dtype()
    with h5py.File(path, "w") as f:
        f.attrs.update(
            format="defectae-residuals",
            format_version=1,
            checkpoint="best.pt",
            prepared=str(prepared),
            prepared_sha256=sha256_file(prepared),
            dataset=dataset,
            category="woven",
            tile=json.dumps({"residual": {"ssim": 1.0}}),
            profile=PROFILE,
            version="0.1.0",
        )
        for split, m, sel in (("test", maps, test), ("validation", val, None)):
            g = f.create_group(split)
            k = len(m)
            g.create_dataset("residuals", data=m)
            g.create_dataset("scores", data=m.astype(np.float32).max(axis=(1, 2, 3)))
            g.create_dataset("labels", data=sel.labels if sel else np.zeros(k, np.uint8))
            for key in ("names", "defect_types", "files"):
                values = getattr(sel, key) if sel else [f"v{j}" for j in range(k)]
                g.create_dataset(key, data=np.array(values, dtype=object), dtype=strings)
            g.create_dataset(
                "orig_sizes", data=sel.orig_sizes if sel else np.full((k, 2), 40, np.int32)
            )
    return maps[:, 0]


@pytest.fixture
def setup(home):
    """prepare on the ragged dataset, then a run folder with its profile and residuals.h5."""
    root = make_dataset(home / "data")
    summary = prepare.run(PROFILE, SETS, str(root), None, None, None, None)
    prepared = Path(summary["out"])
    profile = profiles.resolve(PROFILE, [*SETS, "score.panels=false"], str(root))
    run = workspace.runs_root(profile) / "20250101-000000"
    run.mkdir(parents=True)
    profiles.write_profile(profile, run)
    maps = write_residuals(run / "residuals.h5", prepared, profile.dataset.name)
    return profile, run, prepared, maps, root


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True)


# ----------------------------------------------------------------------------- references


def _originals(prepared: Path) -> tuple[list[np.ndarray], list[str], np.ndarray]:
    test = read_split(prepared, "test")
    assert test.orig_masks is not None
    return [m.astype(bool) for m in test.orig_masks], test.defect_types, test.labels


def _upsampled(maps: np.ndarray, masks: list[np.ndarray]) -> list[np.ndarray]:
    """Each float16 map upsampled as the MVTec protocol asks: torch bilinear, align_corners=False."""
    return [
        F.interpolate(
            torch.from_numpy(m.astype(np.float32))[None, None],
            size=gt.shape,
            mode="bilinear",
            align_corners=False,
        )[0, 0].numpy()
        for m, gt in zip(maps, masks, strict=True)
    ]


def reference_au_pro(maps: list[np.ndarray], masks: list[np.ndarray], max_fpr: float) -> float:
    """AU-PRO by a plain threshold sweep, as core.metrics.au_pro defines it.

    Predicted = score >= t for every distinct score t (high to low); PRO = mean over all
    8-connected ground-truth regions (labelled per image) of the share of the region
    predicted; FPR = share of defect-free pixels predicted. The curve runs from (0, 0) through
    those points to (1, 1), is cut at max_fpr by linear interpolation, integrated with the
    trapezoid rule and divided by max_fpr.
    """
    scores = np.concatenate([m.ravel() for m in maps])
    defect = np.concatenate([m.ravel() for m in masks])
    region = np.zeros(scores.size, np.int64)
    start, count = 0, 0
    for m in masks:
        ids, n = ndimage.label(m, structure=np.ones((3, 3)))
        region[start : start + m.size] = np.where(ids > 0, ids + count, 0).ravel()
        start, count = start + m.size, count + n
    region_size = np.bincount(region, minlength=count + 1)[1:]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(scores)[::-1]:
        predicted = scores >= t
        fprs.append((predicted & ~defect).sum() / (~defect).sum())
        overlap = np.bincount(region[predicted], minlength=count + 1)[1:]
        pros.append(float(np.mean(overlap / region_size)))
    fprs.append(1.0)
    pros.append(1.0)
    area = 0.0
    for k in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        if x1 <= max_fpr:
            area += (x1 - x0) * (y0 + y1) / 2
            continue
        if x0 < max_fpr:
            y = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            area += (max_fpr - x0) * (y0 + y) / 2
        break
    return area / max_fpr


def bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with half-pixel centres (align_corners=False), written out in numpy."""

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, wy = axis(image.shape[0], size[0])
    x0, x1, wx = axis(image.shape[1], size[1])
    top = image[y0][:, x0] * (1 - wx) + image[y0][:, x1] * wx
    bottom = image[y1][:, x0] * (1 - wx) + image[y1][:, x1] * wx
    return top * (1 - wy[:, None]) + bottom * wy[:, None]


# ----------------------------------------------------------------------------- tests


def test_prepare_stores_every_test_mask_at_its_original_size(setup):
    _, _, prepared, _, root = setup
    masks, types, _ = _originals(prepared)
    test = read_split(prepared, "test")
    assert [m.shape for m in masks] == [tuple(s) for s in test.orig_sizes]
    assert sorted(m.shape for m in masks) == sorted((h, w) for _, h, w in TEST)
    for m, t, name in zip(masks, types, test.names, strict=True):
        gt = root / "woven" / "ground_truth" / t / f"{name}_mask.png"
        expected = np.asarray(Image.open(gt)) > 0 if t != "good" else np.zeros_like(m)
        np.testing.assert_array_equal(m, expected)
    with h5py.File(prepared) as f:
        assert f.attrs["format_version"] == 2
        assert f["test/orig_masks"].compression == "lzf"


def test_upsampling_is_bilinear_with_half_pixel_centres():
    maps = np.random.default_rng(3).random((2, 5, 7)).astype(np.float16)
    out = upsample_maps(maps, np.array([[13, 9], [5, 7]]))
    np.testing.assert_allclose(out[0], bilinear(maps[0].astype(np.float64), (13, 9)), atol=1e-6)
    np.testing.assert_array_equal(out[1], maps[1].astype(np.float32))  # same size: unchanged


def test_original_resolution_matches_sklearn_and_a_plain_au_pro(setup, capsys):
    profile, run, prepared, maps, _ = setup
    masks, types, labels = _originals(prepared)
    summary = score.run(None, run, None, None, "mvtec", run / "report")
    assert summary["resolution"] == "original"
    assert summary["pixel_sizes"] == {"height": [36, 64], "width": [37, 70]}
    assert "pixel metrics at resolution: original, 36-64 x 37-70" in capsys.readouterr().out

    up = _upsampled(maps, masks)
    scores = np.concatenate([u.ravel() for u in up])
    truth = np.concatenate([m.ravel() for m in masks])
    m = summary["metrics"]
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-6)
    assert m["pixel_auprc"] == pytest.approx(average_precision_score(truth, scores), abs=1e-6)
    precision, recall, _ = precision_recall_curve(truth, scores)
    f1 = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-300))
    assert m["pixel_f1_max"] == pytest.approx(f1, abs=1e-6)
    assert m["pixel_aupro"] == pytest.approx(
        reference_au_pro(up, masks, profile.score.pro_max_fpr), abs=1e-6
    )
    assert 0.5 < m["pixel_auroc"] < 0.999  # neither trivial nor broken

    image_scores = maps.astype(np.float32).max(axis=(1, 2))
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, image_scores), abs=1e-6)

    sel = [i for i, t in enumerate(types) if t in ("hole", "good")]  # a type with the good images
    hole = summary["per_type"]["hole"]
    assert hole["metrics"]["pixel_auroc"] == pytest.approx(
        roc_auc_score(
            np.concatenate([masks[i].ravel() for i in sel]),
            np.concatenate([up[i].ravel() for i in sel]),
        ),
        abs=1e-6,
    )
    assert hole["metrics"]["pixel_aupro"] == pytest.approx(
        reference_au_pro([up[i] for i in sel], [masks[i] for i in sel], 0.3), abs=1e-6
    )
    assert hole["counts"]["regions"] == 3 and summary["counts"]["regions"] == 9

    saved = json.loads((run / "report" / "metrics.json").read_text())
    assert saved["resolution"] == "original" and "prepared 16x16 grid" in saved["resolution_note"]
    html = (run / "report" / "index.html").read_text()
    assert "original, 36-64 x 37-70" in html


def test_ground_truth_folder_at_original_size_gives_the_same_figures(setup):
    _, run, _, _, root = setup
    from_prepared = score.run(None, run, None, None, "mvtec", run / "a")
    from_folder = score.run(None, run, None, root / "woven" / "ground_truth", "mvtec", run / "b")
    assert from_folder["resolution"] == "original"
    assert from_folder["metrics"] == from_prepared["metrics"]
    assert from_folder["per_type"] == from_prepared["per_type"]


def test_prepared_resolution_reproduces_the_grid_figures(setup):
    profile, run, prepared, maps, _ = setup
    proc = _cli("score", "--run", str(run), "--resolution", "prepared")
    assert proc.returncode == 0, proc.stderr
    assert "pixel metrics at resolution: prepared, 16 x 16" in proc.stdout
    summary = json.loads((run / "score" / "metrics.json").read_text())
    assert summary["resolution"] == "prepared"
    assert summary["pixel_sizes"] == {"height": [GRID, GRID], "width": [GRID, GRID]}

    test = read_split(prepared, "test")
    grid_masks = test.masks[:, 0] > 0
    old = metrics.compute_all(  # what score computed before --resolution existed
        maps,
        grid_masks,
        maps.astype(np.float32).max(axis=(1, 2)),
        test.labels,
        read_residuals(run / "residuals.h5").val_maps,
        **profile.score.metric_options(),
        defect_types=test.defect_types,
    )
    assert summary["metrics"] == metrics.metric_set_json(old.metrics)["metrics"]
    assert summary["metrics"]["pixel_auroc"] == pytest.approx(
        roc_auc_score(grid_masks.ravel(), maps.astype(np.float32).ravel()), abs=1e-6
    )
    # the profile key does the same, and the option overrides the key
    keyed = profiles.resolve(PROFILE, [*SETS, "score.resolution=prepared", "score.panels=false"])
    by_key = score.run(keyed, run, None, None, "mvtec", run / "keyed")
    assert by_key["resolution"] == "prepared" and by_key["metrics"] == summary["metrics"]
    over = score.run(keyed, run, None, None, "mvtec", run / "over", resolution="original")
    assert over["resolution"] == "original" and over["metrics"] != summary["metrics"]


def test_old_prepared_file_falls_back_to_the_grid_with_a_warning(setup):
    _, run, prepared, _, _ = setup
    grid = score.run(None, run, None, None, "mvtec", run / "grid", resolution="prepared")
    with h5py.File(prepared, "r+") as f:  # as format 1 wrote it
        f.attrs["format_version"] = 1
        del f["test/orig_masks"], f["test/orig_mask_offsets"]
    with h5py.File(run / "residuals.h5", "r+") as f:
        f.attrs["prepared_sha256"] = sha256_file(prepared)
    proc = _cli("--json", "score", "--run", str(run))
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "--resolution original" in line]
    assert len(warnings) == 1, proc.stderr
    assert "has no original-size masks" in warnings[0]
    assert "falling back to the prepared 16x16 grid" in warnings[0]
    summary = json.loads(proc.stdout)
    assert summary["resolution"] == "prepared"
    assert "original resolution asked" in summary["resolution_note"]
    assert summary["metrics"] == grid["metrics"]


def test_bad_resolution_exits_2_with_one_line(setup):
    _, run, _, _, _ = setup
    for args, message in (
        (["--resolution", "full"], "--resolution: 'full' is not one of original, prepared"),
        (["--profile", PROFILE, "--set", "score.resolution=full"], "score.resolution"),
    ):
        proc = _cli("score", "--run", str(run), *args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == "" and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert message in proc.stderr


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_ragged_pixel_metrics_equal_the_grid_ones_when_sizes_agree(dtype):
    rng = np.random.default_rng(5)
    maps = rng.random((5, 9, 11)).astype(dtype)
    masks = rng.random((5, 9, 11)) > 0.8
    masks[1] = False
    labels = masks.reshape(5, -1).any(axis=1)
    types = ["a" if i % 2 else "b" for i in range(5)]
    ragged = Ragged.from_arrays(list(maps)), Ragged.from_arrays(list(masks))
    scores = maps.astype(np.float32).max(axis=(1, 2))
    grid = metrics.compute_all(maps, masks, scores, labels, None, defect_types=types)
    flat = metrics.compute_all(*ragged, scores, labels, None, defect_types=types)
    assert flat.metrics == grid.metrics and flat.per_type == grid.per_type
    assert flat.counts == grid.counts
    np.testing.assert_array_equal(flat.pixel_curve.pro, grid.pixel_curve.pro)
    for i in range(5):
        np.testing.assert_array_equal(ragged[0][i], maps[i])
