"""`defectae score` on datasets with image-level labels only: the tiny synthetic dataset,
prepared through the CLI, with its test masks rewritten to zero (all of them, or one image's),
tile-tested with an untrained checkpoint and scored through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from builders import TINY_SYNTHETIC, defectae, untrained_checkpoint
from sklearn.metrics import roc_auc_score

from defectae import profiles
from defectae.commands.score import NO_MASKS
from defectae.stores.prepared import SPLITS, read_split, write_prepared

SETS = [
    *TINY_SYNTHETIC,
    "model.input_size=32",
    "model.args.latent_dim=8",
    "tile.stride=16",
    "tile.batch_size=16",
    "tile.amp=off",
    "tile.device=cpu",
]
PROFILE = ["--profile", "synthetic-ae", *(a for s in SETS for a in ("--set", s))]
PIXEL_METRICS = [
    "pixel_auroc",
    "pixel_auprc",
    "pixel_aupro",
    "pixel_f1_max",
    "pixel_f1_threshold",
    "pixel_iou",
    "pixel_dice",
    "pixel_iou_f1",
    "pixel_dice_f1",
]


def _no_nan(constant: str) -> None:
    raise AssertionError(f"metrics.json holds {constant}")


def _clear_masks(prepared: Path, which: str) -> int:
    """Zero the test masks of every defective image ("all") or of the first one ("one"),
    stored and at the original size; the number of defective test images."""
    with h5py.File(prepared, "r") as f:
        attrs = {
            k: v for k, v in f.attrs.items() if k not in ("format", "format_version", "version")
        }
    splits = {name: read_split(prepared, name) for name in SPLITS}
    test = splits["test"]
    defective = np.flatnonzero(test.labels)
    assert all(test.masks[i].any() for i in defective)  # the generator draws every defect
    for i in defective if which == "all" else defective[:1]:
        test.masks[i] = 0
        test.orig_masks[i][...] = 0
    write_prepared(prepared, splits, attrs)
    return len(defective)


def _score(home: Path, which: str) -> tuple[dict, dict, str, Path]:
    """Prepare, clear masks, tile-test an untrained model, score: (summary, metrics.json,
    stderr with whitespace collapsed, residuals.h5)."""
    prepared = Path(json.loads(defectae(home, "prepare", *PROFILE).stdout)["out"])
    n_defective = _clear_masks(prepared, which)
    profile = profiles.resolve("synthetic-ae", SETS)
    run = home / "runs" / profile.name / "20250101-000000"
    untrained_checkpoint(run, profile)
    profiles.write_profile(profile, run)
    defectae(home, "tile-test", "--run", str(run), "--prepared", str(prepared))
    proc = defectae(home, "score", "--run", str(run))
    summary = json.loads(proc.stdout)
    saved = json.loads(Path(summary["metrics_json"]).read_text(), parse_constant=_no_nan)
    assert saved["ground_truth_masks"]["defective_images"] == n_defective
    return summary, saved, " ".join(proc.stderr.split()), run / "residuals.h5"


@pytest.fixture(scope="module")
def maskless(tmp_path_factory) -> tuple[dict, dict, str, Path]:
    return _score(tmp_path_factory.mktemp("maskless"), "all")


def test_image_metrics_stay_and_match_sklearn(maskless):
    _, saved, _, residuals = maskless
    with h5py.File(residuals) as f:
        labels, scores = f["test/labels"][()], f["test/scores"][()]
    assert 0 < labels.sum() < len(labels)
    expected = roc_auc_score(labels, scores.astype(np.float64))
    assert saved["metrics"]["image_auroc"] == pytest.approx(expected, abs=1e-12)
    assert saved["metrics"]["image_auprc"] is not None
    assert saved["undefined"].keys().isdisjoint({"image_auroc", "image_auprc", "image_f1_max"})


def test_every_pixel_metric_is_undefined_with_the_reason(maskless):
    summary, saved, err, _ = maskless
    assert saved["ground_truth_masks"]["without_mask"] == summary["counts"]["defective"]
    for column in [saved, *saved["per_type"].values()]:
        for name in PIXEL_METRICS:
            assert column["metrics"][name] is None, name
            assert column["undefined"][name] == NO_MASKS, name
    assert saved["threshold"]["value"] is not None  # label-free: from validation maps
    assert not any(isinstance(v, float) and math.isnan(v) for v in saved["metrics"].values())
    assert f"pixel metrics undefined (—): {NO_MASKS}" in err  # the table's caption
    assert err.count(NO_MASKS) == 2  # caption and one warning, not one line per metric
    assert "pixel AUROC: undefined" not in err


def test_report_gives_the_reason_and_draws_every_panel(maskless):
    summary, saved, _, _ = maskless
    out = Path(summary["out"])
    index = (out / "index.html").read_text()
    assert NO_MASKS in index
    panels = sorted((out / "panels").glob("*.png"))
    assert len(panels) == summary["counts"]["images"] and panels
    assert all((out / f).is_file() for f in saved["figures"].values())
    assert not (out / "pixel_curve.npz").exists()  # nothing for compare to overlay


def test_some_images_without_masks_keep_pixel_metrics_and_are_counted(tmp_path):
    summary, saved, err, _ = _score(tmp_path, "one")
    coverage = saved["ground_truth_masks"]
    assert coverage["without_mask"] == 1 and coverage["defective_images"] > 1
    assert saved["metrics"]["pixel_auroc"] is not None
    assert NO_MASKS not in json.dumps(saved)
    message = (
        f"1 of {coverage['defective_images']} defective test images have no mask pixel; "
        "their pixels count as defect-free in the pixel metrics"
    )
    assert coverage["note"] == message and message in err
    assert summary["ground_truth_masks"] == coverage
