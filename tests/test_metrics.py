"""Metrics against independent references: scikit-learn, straightforward loops, hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.morphology import disk, opening
from sklearn.metrics import average_precision_score, roc_auc_score

from defectae.core import metrics as M

# ----------------------------------------------------------------------------- references


def reference_au_pro(maps: np.ndarray, masks: np.ndarray, max_fpr: float) -> float:
    """Loop over unique thresholds; PRO = mean over 8-connected regions of their covered share."""
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    negative = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append((pred & negative).sum() / negative.sum())
        pros.append(np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions]))
    x, y = np.array(fprs + [1.0]), np.array(pros + [1.0])
    inside = x <= max_fpr
    area = np.trapezoid(y[inside], x[inside])
    last = np.flatnonzero(inside)[-1]
    if x[last] < max_fpr:
        y_end = np.interp(max_fpr, x[last : last + 2], y[last : last + 2])
        area += (max_fpr - x[last]) * (y[last] + y_end) / 2
    return area / max_fpr


def reference_radli(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rádli & Czúni's loop, literally: damp, threshold, skimage opening, per-image rates."""
    fprs, tprs = [], []
    for t in np.arange(0.01, 1.01, 1.01 / 50):
        f, r = [], []
        for m, g in zip(maps, masks, strict=True):
            depr = np.full(m.shape, 0.2)
            depr[5:-5, 5:-5] = 1.0
            pred = opening(((m * depr) > t).astype(float), disk(4)) > 0.5
            f.append((pred & ~g).sum() / (~g).sum())
            r.append((pred & g).sum() / g.sum())
        fprs.append(np.mean(f))
        tprs.append(np.mean(r))
    return np.array(fprs), np.array(tprs)


def random_maps(seed: int, n: int = 4, size: int = 20, levels: int | None = None):
    """Maps with blob-shaped masks whose scores are raised inside the defects."""
    rng = np.random.default_rng(seed)
    masks = ndimage.binary_dilation(
        rng.random((n, size, size)) < 0.01, structure=np.ones((1, 3, 3)), iterations=2
    )
    maps = rng.random((n, size, size)) + 0.6 * masks * rng.random((n, size, size))
    if levels is not None:  # coarse values: many ties
        maps = np.round(maps * levels) / levels
    return maps.astype(np.float32), masks


# ----------------------------------------------------------------------------- image level


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_auroc_and_auprc_equal_sklearn_with_ties(dtype):
    rng = np.random.default_rng(1)
    labels = rng.random(300) < 0.3
    for scores in (
        rng.integers(0, 7, 300) + labels * rng.integers(0, 3, 300),
        rng.random(300) + 0.3 * labels,
    ):
        scores = scores.astype(dtype)
        curve = M.rank_curve(scores, labels)
        assert M.auroc(curve).value == pytest.approx(
            roc_auc_score(labels, scores.astype(np.float64)), abs=1e-12
        )
        assert M.average_precision(curve).value == pytest.approx(
            average_precision_score(labels, scores.astype(np.float64)), abs=1e-12
        )


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_negative_scores_and_signed_zeros_rank_as_numbers(dtype):
    labels = np.array([1, 0, 1, 0, 1, 0, 0, 1, 0, 1], bool)
    scores = np.array([-0.0, 0.0, 0.0, -0.0, -2.5, -2.5, 3.0, -1.0, 1e-3, -1e-3], dtype)
    curve = M.rank_curve(scores, labels)
    assert len(curve.thresholds) == 6  # -0.0 and 0.0 are one threshold
    assert M.auroc(curve).value == pytest.approx(
        roc_auc_score(labels, scores.astype(np.float64)), abs=1e-12
    )


def test_pixel_auroc_equals_sklearn_for_every_ranking_path():
    maps, masks = random_maps(2, levels=50)
    for values in (
        maps.astype(np.float16),
        maps + np.float32(1e-4) * np.random.default_rng(0).random(maps.shape, np.float32),
        maps.astype(np.float64) + 1e-9,
    ):
        curve = M.pixel_curve(values, M.label_regions(masks))
        assert M.auroc(curve).value == pytest.approx(
            roc_auc_score(masks.ravel(), values.ravel()), abs=1e-9
        )
        assert M.average_precision(curve).value == pytest.approx(
            average_precision_score(masks.ravel(), values.ravel()), abs=1e-9
        )


def test_f1_max_equals_brute_force():
    rng = np.random.default_rng(3)
    labels = rng.random(200) < 0.4
    scores = (rng.integers(0, 20, 200) + 5 * labels).astype(np.float32)
    best = (-1.0, None, None, None)
    for t in np.unique(scores)[::-1]:
        pred = scores >= t
        tp = (pred & labels).sum()
        f1 = 2 * tp / (pred.sum() + labels.sum())
        if f1 > best[0]:
            best = (f1, t, tp / pred.sum(), tp / labels.sum())
    result = M.f1_max(M.rank_curve(scores, labels))
    assert (
        result.f1.value,
        result.threshold.value,
        result.precision.value,
        result.recall.value,
    ) == pytest.approx(best)


# ----------------------------------------------------------------------------- AU-PRO


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("levels", [None, 20])
def test_au_pro_equals_reference_on_random_maps(seed, levels):
    maps, masks = random_maps(seed, levels=levels)
    curve = M.pixel_curve(maps, M.label_regions(masks))
    assert curve.n_regions > 1
    for max_fpr in (0.3, 0.05, 1.0):
        assert M.au_pro(curve, max_fpr).value == pytest.approx(
            reference_au_pro(maps, masks, max_fpr), abs=1e-6
        )


def test_au_pro_single_region_by_hand():
    # One region (2 px) in a 1x4 image: curve (0,0) (0,.5) (.5,.5) (.5,1) (1,1).
    maps = np.array([[[0.9, 0.2, 0.5, 0.1]]], np.float32)
    masks = np.array([[[1, 1, 0, 0]]], bool)
    curve = M.pixel_curve(maps, M.label_regions(masks))
    assert M.au_pro(curve, 0.3).value == pytest.approx(0.5)
    assert M.au_pro(curve, 0.75).value == pytest.approx((0.25 + 0.25) / 0.75)
    assert M.au_pro(curve, 1.0).value == pytest.approx(0.75)


def test_au_pro_two_regions_of_different_size_by_hand():
    # Region A = 1 px scored 0.9; region B = 3 px scored 0.8, 0.4, 0.4; 11 negatives, one at 0.6.
    maps = np.full((1, 3, 5), 0.1, np.float32)
    masks = np.zeros((1, 3, 5), bool)
    masks[0, 0, 0] = True
    masks[0, 2, 2:5] = True
    maps[0, 0, 0], maps[0, 2, 2:5], maps[0, 0, 3] = 0.9, [0.8, 0.4, 0.4], 0.6
    curve = M.pixel_curve(maps, M.label_regions(masks))
    assert curve.n_regions == 2
    # curve (0,0) (0,1/2) (0,2/3) (1/11,2/3) (1/11,1) (1,1): area to 0.3 = 2/33 + (0.3 - 1/11)
    assert M.au_pro(curve, 0.3).value == pytest.approx(89 / 99)


def test_au_pro_counts_eight_connected_regions_once():
    # Two diagonal pixels form ONE 8-connected region: covering one of them gives PRO 0.5.
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True
    maps = np.zeros((1, 4, 4), np.float32)
    maps[0, 1, 1] = 1.0
    curve = M.pixel_curve(maps, M.label_regions(masks))
    assert curve.n_regions == 1
    assert curve.pro[0] == pytest.approx(0.5)


def test_au_pro_ties_between_defect_and_good_pixels_by_hand():
    # Region pixel and one negative share 0.5: one threshold, the curve jumps to (1/3, 1).
    maps = np.array([[[0.5, 0.5, 0.2, 0.1]]], np.float32)
    masks = np.array([[[1, 0, 0, 0]]], bool)
    curve = M.pixel_curve(maps, M.label_regions(masks))
    assert M.au_pro(curve, 0.3).value == pytest.approx(0.5 * 0.9 * 0.3 / 0.3)


# ----------------------------------------------------------------------------- overlap and thresholds


def test_iou_and_dice_by_hand():
    maps = np.array([[[0.9, 0.1], [0.6, 0.2]]], np.float32)
    masks = np.array([[[1, 0], [0, 0]]], bool)
    curve = M.pixel_curve(maps, M.label_regions(masks))
    at_half = M.overlap_at(curve, M.Metric(0.5))
    assert (at_half.iou.value, at_half.dice.value) == pytest.approx((1 / 2, 2 / 3))
    at_top = M.overlap_at(curve, M.Metric(float(np.float32(0.9))))  # >= threshold: just the defect
    assert (at_top.iou.value, at_top.dice.value) == (1.0, 1.0)
    assert M.overlap_at(curve, M.Metric(0.95)).iou.value == 0.0


def test_threshold_quantile_and_target_fpr():
    val = np.arange(100, dtype=np.float32).reshape(1, 10, 10)
    assert M.threshold_quantile(val, 0.9).value == pytest.approx(np.quantile(np.arange(100), 0.9))
    assert M.threshold_at_fpr(val, 0.05).value == 95.0  # 95..99: 5 of 100 pixels
    assert M.threshold_at_fpr(val, 0.0).value > 99.0
    ties = np.array([0.0] * 90 + [1.0] * 10).reshape(1, 10, 10)
    assert M.threshold_at_fpr(ties, 0.05).value > 1.0  # the tie at 1 would give FPR 0.1
    assert M.threshold_at_fpr(ties, 0.1).value == 1.0
    rng = np.random.default_rng(4)
    for target in (0.001, 0.013, 0.2):
        noisy = np.round(rng.random((3, 20, 20)) * 30)
        t = M.threshold_at_fpr(noisy, target).value
        assert (noisy >= t).mean() <= target
        lower = noisy[noisy < t]
        assert (
            lower.size == 0 or (noisy >= lower.max()).mean() > target
        )  # the lowest such threshold


def test_label_free_threshold_follows_the_config():
    val = np.arange(1000, dtype=np.float32)
    assert M.label_free_threshold(val, threshold="val_fpr", target_fpr=0.01).value == 990.0
    assert M.label_free_threshold(val, quantile=0.5).value == pytest.approx(499.5)


# ----------------------------------------------------------------------------- undefined metrics


def test_undefined_metrics_carry_a_reason():
    maps = np.random.default_rng(5).random((3, 8, 8)).astype(np.float32)
    no_defects = M.compute_all(
        maps, np.zeros((3, 8, 8), bool), np.array([0.1, 0.2, 0.3]), np.zeros(3), None
    )
    for name in (
        "image_auroc",
        "image_auprc",
        "image_f1_max",
        "pixel_auroc",
        "pixel_aupro",
        "pixel_iou",
    ):
        metric = no_defects.metrics[name]
        assert metric.value is None and metric.reason, name
    assert "defective images" in no_defects.metrics["image_auroc"].reason
    assert "regions" in no_defects.metrics["pixel_aupro"].reason
    assert "validation" in no_defects.metrics["pixel_iou"].reason
    assert no_defects.per_type == {}

    all_defect = M.compute_all(
        maps, np.ones((3, 8, 8), bool), np.array([0.1, 0.2, 0.3]), np.ones(3), maps
    )
    assert all_defect.metrics["pixel_auroc"].reason == "no defect-free pixels"
    assert all_defect.metrics["pixel_aupro"].reason == "no defect-free pixels"
    assert all_defect.metrics["image_auroc"].reason == "no defect-free images"
    assert all_defect.metrics["pixel_iou"].defined  # IoU needs no defect-free pixel

    js = M.metric_set_json(no_defects.metrics)
    assert js["metrics"]["pixel_aupro"] is None
    assert js["undefined"]["pixel_aupro"] == no_defects.metrics["pixel_aupro"].reason


# ----------------------------------------------------------------------------- compute_all


@pytest.mark.parametrize("dtype", [np.float16, np.float32])  # histogram and sort ranking
def test_compute_all_scores_each_type_with_the_good_images(dtype):
    maps, masks = random_maps(6, n=6)
    maps = maps.astype(dtype)
    masks[:2] = False  # two good images
    labels = masks.reshape(6, -1).any(axis=1)
    scores = maps.reshape(6, -1).max(axis=1)
    types = ["good", "good", "hole", "hole", "scratch", "scratch"]
    labels[:2] = False
    result = M.compute_all(maps, masks, scores, labels, maps[:2], defect_types=types)
    assert set(result.per_type) == {"hole", "scratch"}
    sel = [0, 1, 4, 5]
    assert result.per_type["scratch"]["pixel_auroc"].value == pytest.approx(
        roc_auc_score(masks[sel].ravel(), maps[sel].ravel()), abs=1e-9
    )
    assert result.per_type["scratch"]["pixel_aupro"].value == pytest.approx(
        reference_au_pro(maps[sel], masks[sel], 0.3), abs=1e-6
    )
    assert result.counts["scratch"] == {
        "images": 4,
        "defective": 2,
        "good": 2,
        "regions": M.label_regions(masks[sel]).per_image.sum(),
    }
    assert result.metrics["pixel_aupro"].value == pytest.approx(
        reference_au_pro(maps, masks, 0.3), abs=1e-6
    )


# ----------------------------------------------------------------------------- Rádli & Czúni


def test_radli_thresholds_and_disk_are_the_papers():
    assert np.array_equal(M.disk(4), disk(4).astype(bool))
    assert len(M.RADLI_THRESHOLDS) == 50
    assert M.RADLI_THRESHOLDS[0] == pytest.approx(0.01)
    assert M.RADLI_THRESHOLDS[-1] == pytest.approx(0.9998)


def test_radli_by_hand():
    # Residual 1 everywhere, defect = left half of a 40x40 image. Thresholds < 0.2 (the damped
    # border's value) select the whole image: TPR = FPR = 1 (10 thresholds). The other 40 select the
    # 30x30 interior, whose 4 corners lose 8 px each to the disk(4) opening: 434 of 800 px per half.
    maps = np.ones((1, 40, 40), np.float32)
    masks = np.zeros((1, 40, 40), bool)
    masks[0, :, :20] = True
    curve = M.radli(maps, masks)
    rate = 434 / 800
    assert curve.tpr == pytest.approx([1.0] * 10 + [rate] * 40)
    assert curve.fpr == pytest.approx([1.0] * 10 + [rate] * 40)
    assert curve.auc.value == pytest.approx((1 - rate) * (1 + rate) / 2)


def test_radli_equals_the_literal_loop_with_skimage():
    rng = np.random.default_rng(7)
    masks = np.zeros((2, 32, 32), bool)
    masks[0, 8:20, 6:18] = True
    masks[1, 14:30, 12:22] = True
    maps = ndimage.gaussian_filter(rng.random((2, 32, 32)), (0, 1.5, 1.5)) * 2 * 0.6 + 0.5 * masks
    fpr, tpr = reference_radli(maps.astype(np.float32).astype(np.float64), masks)
    curve = M.radli(maps.astype(np.float32), masks)
    assert curve.fpr == pytest.approx(fpr, abs=1e-12)
    assert curve.tpr == pytest.approx(tpr, abs=1e-12)


def test_radli_without_defective_images_is_undefined():
    curve = M.radli_curve(np.zeros((0, 50)), np.zeros((0, 50)))
    assert curve.auc.value is None and curve.auc.reason
