"""Detection metrics on residual maps: pure functions on numpy arrays, no file I/O.

Image level: AUROC, AUPRC (average precision, as scikit-learn), F1-max with its threshold.
Pixel level: AUROC, AUPRC, AU-PRO (MVTec AD protocol), F1-max, IoU and Dice at a threshold
chosen without test labels (from validation residuals) and at the F1-optimal threshold.
Rádli & Czúni (2021): per-image FPR/TPR over 50 thresholds after a disk opening.

Convention: a sample (image or pixel) is predicted defective when its score >= threshold.

Undefined metrics: every metric is a `Metric(value, reason)`. When a metric cannot be
computed (only one class present, no ground-truth region, no validation image) `value` is
None and `reason` says why; no number is invented. In JSON (`metric_set_json`) a set of
metrics becomes {"metrics": {NAME: value or null}, "undefined": {NAME: reason}}.

Speed: every curve comes from one ranking of the scores, and cumulative sums over it (no
per-threshold loop). Residual maps are stored as float16, so pixel scores take at most
65536 distinct values and are ranked exactly by a histogram of their bit patterns (linear
time); other scores by one sort of 64-bit keys packing the float32 score with the pixel
index (an argsort for float64 scores). Tied scores form one threshold. Per defect type
(`PixelRanking`), float16 maps are histogrammed again (cheap) and sorted ones filtered,
never sorted again.

Resolution: pixel metrics take maps and masks either on one grid (N, H, W) or ragged
(`Ragged`: each image at its own size, e.g. upsampled to the original resolution, as the
MVTec AD evaluation scores them); every pixel then counts once, whatever its image's size.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from defectae.core.ragged import Ragged

PROTOCOLS = ("mvtec", "radli")

# Rádli & Czúni (WSCG 2021), as in their published evaluation code (src/test.py of
# richardRadli/autoencoders_for_visual_defect_detection): 1-SSIM map times a "depressing"
# mask (0.2 on a 5-pixel border), binary mask = map > threshold, opening with disk(4),
# per-image confusion matrix, FPR/TPR averaged over images, thresholds
# np.arange(0.01, 1.01, 1.01 / 50) (50 values, 0.01 to 0.9998), AUC = trapezoid over the
# 50 (FPR, TPR) points sorted by FPR, without added end points.
RADLI_THRESHOLDS = np.arange(0.01, 1.01, 1.01 / 50)
RADLI_DISK_RADIUS = 4
RADLI_BORDER = 5
RADLI_BORDER_WEIGHT = 0.2


@dataclass(frozen=True)
class Metric:
    """A metric value, or None with the reason it is undefined."""

    value: float | None
    reason: str | None = None

    @classmethod
    def undefined(cls, reason: str) -> Metric:
        return cls(None, reason)

    @property
    def defined(self) -> bool:
        return self.value is not None


def _metric(value: float) -> Metric:
    return Metric(float(value))


MetricSet = dict[str, Metric]


def metric_set_json(metrics: MetricSet) -> dict[str, dict[str, float | str | None]]:
    """{"metrics": {name: value or None}, "undefined": {name: reason}} for JSON output."""
    return {
        "metrics": {name: m.value for name, m in metrics.items()},
        "undefined": {name: m.reason for name, m in metrics.items() if not m.defined},
    }


# ----------------------------------------------------------------------------- ranking


@dataclass(frozen=True)
class Curve:
    """Cumulative counts at every distinct score, highest score first.

    Entry k counts the samples with score >= thresholds[k]. For pixel curves `pro` is the
    mean over ground-truth regions of the share of the region at or above the threshold.
    """

    thresholds: np.ndarray  # (K,) float64, strictly decreasing
    tp: np.ndarray  # (K,) int64
    fp: np.ndarray  # (K,) int64
    n_pos: int
    n_neg: int
    pro: np.ndarray | None = None  # (K,) float64
    n_regions: int = 0
    unit: str = "samples"  # what is counted, for messages: "images" or "pixels"

    def counts_at(self, threshold: float) -> tuple[int, int]:
        """(tp, fp) when samples with score >= threshold are predicted positive."""
        j = int(np.searchsorted(-self.thresholds, -threshold, side="right"))  # thresholds >= t
        return (int(self.tp[j - 1]), int(self.fp[j - 1])) if j else (0, 0)


@functools.cache
def _half_order() -> tuple[np.ndarray, np.ndarray]:
    """Bit patterns of every finite float16 (-0.0 folded into 0.0) by decreasing value, and the values."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    values = bits.view(np.float16).astype(np.float64)
    keep = np.isfinite(values) & (bits != 0x8000)
    bits, values = bits[keep], values[keep]
    order = np.argsort(-values, kind="stable")
    return bits[order].astype(np.intp), values[order]


def _bit_histogram(bits: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    # Chunked: bincount casts its input to intp, which is much faster in cache-sized pieces.
    hist = np.zeros(1 << 16, np.float64 if weights is not None else np.int64)
    step = 1 << 20
    for s in range(0, bits.size, step):
        w = None if weights is None else weights[s : s + step]
        hist += np.bincount(bits[s : s + step], weights=w, minlength=1 << 16)
    hist[0] += hist[0x8000]  # -0.0 ties with 0.0
    hist[0x8000] = 0
    return hist


def _counts_by_histogram(half: np.ndarray, payload: np.ndarray, inv_size: np.ndarray | None):
    """Cumulative counts at each distinct float16 score, highest first, without sorting."""
    bits = half.view(np.uint16)
    total = _bit_histogram(bits)
    order, values = _half_order()
    if total.sum() != total[order].sum():
        raise ValueError("scores contain NaN or infinite values")
    positive = payload > 0
    pos_bits = bits[positive]
    pos = _bit_histogram(pos_bits)
    present = order[total[order] > 0]
    thresholds = values[total[order] > 0]
    tp = np.cumsum(pos[present])
    fp = np.cumsum(total[present] - pos[present])
    mass = None
    if inv_size is not None:
        mass = np.cumsum(_bit_histogram(pos_bits, inv_size[payload[positive]])[present])
    return thresholds, tp, fp, mass


def _flip32(bits: np.ndarray) -> np.ndarray:
    # IEEE bits -> unsigned keys in the order of the values (negative values reversed).
    return bits ^ (((bits >> 31) * np.uint32(0x7FFFFFFF)) | np.uint32(0x80000000))


def _unflip32(keys: np.ndarray) -> np.ndarray:
    return keys ^ np.where(keys >> 31, np.uint32(0x80000000), np.uint32(0xFFFFFFFF)).astype(
        np.uint32
    )


def _sort_desc(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores sorted high to low, their flat indices) by one sort.

    For float32 scores the sorted scores come as uint32 rank keys (equal keys = equal
    scores) and both arrays are views into the sorted buffer; otherwise as float64.
    `_threshold_values` turns either into float64 scores.
    """
    flat = np.asarray(values).ravel()
    if not np.isfinite(flat).all():
        raise ValueError("scores contain NaN or infinite values")
    if flat.dtype != np.float32 and np.array_equal(single := flat.astype(np.float32), flat):
        flat = single
    if flat.dtype == np.float32 and flat.size <= 1 << 32:
        # One ascending sort of (~score key << 32 | index) as uint64 ranks high scores first
        # and is much faster than an argsort. Adding 0 turns -0.0 into 0.0 (one key for both).
        keys = ~_flip32((flat + np.float32(0)).view(np.uint32))
        packed = keys.astype(np.uint64)
        del keys
        packed <<= np.uint64(32)
        packed |= np.arange(flat.size, dtype=np.uint64)
        packed.sort()
        words = packed.view(np.uint32).reshape(-1, 2)  # (low, high) words on little-endian
        low, high = (0, 1) if sys.byteorder == "little" else (1, 0)
        return words[:, high], words[:, low]
    order = np.argsort(flat, kind="stable")[::-1]
    return flat[order] + 0.0, order


def _counts_by_sorting(ranked: np.ndarray, payload: np.ndarray, inv_size: np.ndarray | None):
    """Cumulative counts at each distinct score of scores sorted high to low (payload in that order)."""
    ends = np.append(np.flatnonzero(ranked[1:] != ranked[:-1]), ranked.size - 1)  # last of each tie
    positive = payload > 0
    tp = np.cumsum(positive)[ends]
    fp = ends + 1 - tp
    mass = None
    if inv_size is not None:
        mass = np.concatenate([[0.0], np.cumsum(inv_size[payload[positive]])])[tp]
    return _threshold_values(ranked[ends]), tp, fp, mass


def _threshold_values(ranked: np.ndarray) -> np.ndarray:
    if ranked.dtype == np.uint32:  # rank keys of float32 scores from `_sort_desc`
        return _unflip32(~ranked).view(np.float32).astype(np.float64)
    return ranked.astype(np.float64)


def exact_float16(values: np.ndarray) -> np.ndarray | None:
    """`values` as float16 when that loses nothing (residual maps are stored as float16), else None."""
    if values.dtype == np.float16:
        return values
    if values.dtype.kind != "f":
        return None
    head = values.ravel()[:4096]  # most float32 maps fail at once
    if not np.array_equal(head.astype(np.float16).astype(values.dtype), head):
        return None
    half = values.astype(np.float16)
    return half if np.array_equal(half.astype(values.dtype), values) else None


def _flat(values: np.ndarray | Ragged) -> np.ndarray:
    return values.flat if isinstance(values, Ragged) else np.asarray(values).ravel()


def _counts(scores: np.ndarray, payload: np.ndarray, inv_size: np.ndarray | None):
    scores = np.asarray(scores).ravel()
    payload = np.asarray(payload).ravel()
    if scores.shape != payload.shape:
        raise ValueError(f"scores {scores.shape} and labels {payload.shape} differ in size")
    if scores.size == 0:
        raise ValueError("no scores")
    half = exact_float16(scores)
    if half is not None:
        return _counts_by_histogram(half, payload, inv_size)
    ranked, order = _sort_desc(scores)
    return _counts_by_sorting(ranked, payload[order], inv_size)


def thin_curve(curve: Curve, points: int) -> Curve:
    """The curve at about `points` evenly spaced thresholds, first and last kept: enough to
    draw it (e.g. overlaid by `compare`), not to compute metrics from."""
    n = len(curve.thresholds)
    if n <= points:
        return curve
    keep = np.unique(np.linspace(0, n - 1, points).round().astype(int))
    pro = None if curve.pro is None else curve.pro[keep]
    return replace(
        curve, thresholds=curve.thresholds[keep], tp=curve.tp[keep], fp=curve.fp[keep], pro=pro
    )


def rank_curve(scores: np.ndarray, labels: np.ndarray) -> Curve:
    """The ranking curve of scores against binary labels (1 = defective)."""
    labels = np.asarray(labels).ravel().astype(bool)
    thresholds, tp, fp, _ = _counts(scores, labels.astype(np.uint8), None)
    n_pos = int(labels.sum())
    return Curve(thresholds, tp, fp, n_pos, labels.size - n_pos, unit="images")


@dataclass(frozen=True)
class Regions:
    """Ground-truth regions: 8-connected components of each mask, numbered across images."""

    ids: np.ndarray  # (N, H, W) int32, 0 outside regions; (P,) for ragged masks
    inv_size: np.ndarray  # (R + 1,) float64, 1 / region size, 0 for id 0
    per_image: np.ndarray  # (N,) int64 regions in each image


def _regions(ids: np.ndarray, n: int, masks: np.ndarray, per_image: np.ndarray) -> Regions:
    sizes = np.bincount(ids[masks], minlength=n + 1).astype(np.float64)
    inv_size = np.divide(1.0, sizes, out=np.zeros_like(sizes), where=sizes > 0)
    return Regions(ids, inv_size, per_image)


def _label_ragged(masks: Ragged) -> Regions:
    """Label each image of a ragged mask set on its own, ids numbered on across images."""
    flat = masks.flat.astype(bool, copy=False)
    ids = np.zeros(flat.size, np.int32)
    per_image = np.zeros(len(masks), np.int64)
    offsets, eight = masks.offsets, np.ones((3, 3), bool)
    n = 0
    for i, (h, w) in enumerate(masks.sizes.tolist()):
        mask = flat[offsets[i] : offsets[i + 1]].reshape(h, w)
        if not mask.any():
            continue
        labelled, count = ndimage.label(mask, structure=eight)
        ids[offsets[i] : offsets[i + 1]] = np.where(labelled > 0, labelled + n, 0).ravel()
        per_image[i], n = count, n + count
    return _regions(ids, n, flat, per_image)


def label_regions(masks: np.ndarray | Ragged) -> Regions:
    """Label 8-connected regions per image (N, H, W) in one pass; ids never span two images."""
    if isinstance(masks, Ragged):
        return _label_ragged(masks)
    masks = np.asarray(masks, dtype=bool)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 3x3 ones within an image, nothing across images
    ids, n = ndimage.label(masks, structure=structure)
    ids = ids.astype(np.int32, copy=False)
    last = (
        np.maximum.accumulate(ids.reshape(len(ids), -1).max(axis=1, initial=0))
        if len(ids)
        else np.zeros(0, int)
    )
    per_image = np.diff(np.concatenate([[0], last])).astype(np.int64)
    return _regions(ids, n, masks, per_image)


def _pixel_curve(counts, n_regions: int) -> Curve:
    thresholds, tp, fp, mass = counts
    pro = mass / n_regions if n_regions else None
    return Curve(thresholds, tp, fp, int(tp[-1]), int(fp[-1]), pro, n_regions, unit="pixels")


def pixel_curve(maps: np.ndarray | Ragged, regions: Regions) -> Curve:
    """The pixel ranking curve with the PRO (per-region overlap) at every threshold."""
    return _pixel_curve(
        _counts(_flat(maps), regions.ids, regions.inv_size), int(regions.per_image.sum())
    )


def _pixels_per_image(maps: np.ndarray | Ragged, masks: np.ndarray | Ragged) -> np.ndarray:
    """(N,) pixels of each image, after checking that maps and masks have the same shapes."""
    if isinstance(maps, Ragged) or isinstance(masks, Ragged):
        if not (isinstance(maps, Ragged) and isinstance(masks, Ragged)):
            raise ValueError("maps and masks must both be ragged or both (N, H, W) arrays")
        if not np.array_equal(maps.sizes, masks.sizes):
            raise ValueError("ragged maps and masks differ in image sizes")
        return maps.pixels
    if np.shape(maps) != np.shape(masks):
        raise ValueError(f"maps {np.shape(maps)} and masks {np.shape(masks)} differ in shape")
    return np.full(len(maps), int(np.prod(np.shape(maps)[1:])), np.int64)


class PixelRanking:
    """Pixel scores of N maps, regions labelled and scores sorted (when needed) once, so that
    any subset of images gets its curve cheaply. Maps and masks are (N, H, W), or both ragged."""

    def __init__(self, maps: np.ndarray | Ragged, masks: np.ndarray | Ragged):
        self.pixels = _pixels_per_image(maps, masks)
        self.regions = label_regions(masks)
        self.ids = self.regions.ids.reshape(-1)  # (P,)
        scores = _flat(maps)
        self.half = exact_float16(scores)
        if self.half is None:  # one global sort; subsets filter it
            self.ranked, order = _sort_desc(scores)
            self.region = self.ids[order]
            image = np.repeat(np.arange(len(self.pixels), dtype=np.int32), self.pixels)
            self.image = image[order]

    def curve(self, images: np.ndarray | None = None) -> Curve:
        """The pixel curve of all images, or of those selected by a boolean mask (N,)."""
        r = self.regions
        n_regions = int(r.per_image.sum() if images is None else r.per_image[images].sum())
        if self.half is not None:
            half, ids = self.half, self.ids
            if images is not None:
                keep = np.repeat(images, self.pixels)  # (P,)
                half, ids = half[keep], ids[keep]
            return _pixel_curve(_counts_by_histogram(half, ids, r.inv_size), n_regions)
        ranked, region = self.ranked, self.region
        if images is not None:
            keep = images[self.image]
            ranked, region = ranked[keep], region[keep]
        return _pixel_curve(_counts_by_sorting(ranked, region, r.inv_size), n_regions)


# ----------------------------------------------------------------------------- curve metrics


def _needs_both(curve: Curve) -> str | None:
    if curve.n_pos == 0:
        return f"no defective {curve.unit}"
    if curve.n_neg == 0:
        return f"no defect-free {curve.unit}"
    return None


def auroc(curve: Curve) -> Metric:
    """Area under the ROC curve (trapezoids between distinct thresholds, as scikit-learn)."""
    if reason := _needs_both(curve):
        return Metric.undefined(reason)
    tp = np.concatenate([[0], curve.tp])
    fp = np.concatenate([[0], curve.fp])
    twice_area = int(np.sum(np.diff(fp) * (tp[1:] + tp[:-1])))  # exact in int64
    return _metric(twice_area / (2.0 * curve.n_pos * curve.n_neg))


def average_precision(curve: Curve) -> Metric:
    """Average precision: sum over thresholds of (recall step) * precision, as scikit-learn."""
    if curve.n_pos == 0:
        return Metric.undefined(f"no defective {curve.unit}")
    precision = curve.tp / (curve.tp + curve.fp)
    recall_steps = np.diff(np.concatenate([[0], curve.tp])) / curve.n_pos
    return _metric(np.sum(recall_steps * precision))


@dataclass(frozen=True)
class F1Max:
    """The best F1 over all thresholds, the threshold reaching it and precision/recall there."""

    f1: Metric
    threshold: Metric
    precision: Metric
    recall: Metric


def f1_max(curve: Curve) -> F1Max:
    """Maximum F1 over thresholds (the highest threshold among equal maxima)."""
    if curve.n_pos == 0:
        missing = Metric.undefined(f"no defective {curve.unit}")
        return F1Max(missing, missing, missing, missing)
    f1 = 2 * curve.tp / (curve.tp + curve.fp + curve.n_pos)
    k = int(np.argmax(f1))
    precision = curve.tp[k] / (curve.tp[k] + curve.fp[k])
    return F1Max(
        _metric(f1[k]),
        _metric(curve.thresholds[k]),
        _metric(precision),
        _metric(curve.tp[k] / curve.n_pos),
    )


def trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) (x non-decreasing) from x[0] to x_max, interpolating at x_max."""
    j = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    area = float(np.sum(0.5 * (y[1:j] + y[: j - 1]) * np.diff(x[:j])))
    if x[j - 1] < x_max and j < len(x):
        y_max = y[j - 1] + (y[j] - y[j - 1]) * (x_max - x[j - 1]) / (x[j] - x[j - 1])
        area += 0.5 * (y_max + y[j - 1]) * (x_max - x[j - 1])
    return area


def pro_points(curve: Curve) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve (FPR, PRO) from (0, 0) to (1, 1), as the MVTec AD evaluation builds it."""
    if curve.pro is None or curve.n_neg == 0:
        raise ValueError("PRO curve needs ground-truth regions and defect-free pixels")
    fpr = np.clip(np.concatenate([[0.0], curve.fp / curve.n_neg, [1.0]]), 0.0, 1.0)
    pro = np.clip(np.concatenate([[0.0], curve.pro, [1.0]]), 0.0, 1.0)
    return fpr, pro


def au_pro(curve: Curve, max_fpr: float = 0.3) -> Metric:
    """Area under the PRO curve up to `max_fpr`, divided by `max_fpr` (MVTec AD protocol)."""
    if curve.pro is None:
        return Metric.undefined("no defect regions in the ground truth")
    if curve.n_neg == 0:
        return Metric.undefined("no defect-free pixels")
    if max_fpr <= 0:
        return Metric.undefined(f"score.pro_max_fpr = {max_fpr}: expected > 0")
    fpr, pro = pro_points(curve)
    return _metric(trapezoid_to(fpr, pro, max_fpr) / max_fpr)


@dataclass(frozen=True)
class Overlap:
    """IoU and Dice of the predicted and ground-truth defect pixels, pooled over all images."""

    iou: Metric
    dice: Metric


def overlap_at(curve: Curve, threshold: Metric) -> Overlap:
    """IoU and Dice when pixels with score >= threshold are predicted defective."""
    if not threshold.defined:
        missing = Metric.undefined(f"no threshold: {threshold.reason}")
        return Overlap(missing, missing)
    if curve.n_pos == 0:
        missing = Metric.undefined(f"no defective {curve.unit}")
        return Overlap(missing, missing)
    tp, fp = curve.counts_at(float(threshold.value))
    return Overlap(_metric(tp / (fp + curve.n_pos)), _metric(2 * tp / (tp + fp + curve.n_pos)))


# ----------------------------------------------------------------------------- thresholds


def threshold_quantile(val_maps: np.ndarray | None, quantile: float) -> Metric:
    """The `quantile` of all validation residuals (defect-free images): a label-free threshold."""
    if val_maps is None or np.size(val_maps) == 0:
        return Metric.undefined("no validation images")
    return _metric(np.quantile(np.asarray(val_maps, dtype=np.float64).ravel(), quantile))


def threshold_at_fpr(val_maps: np.ndarray | None, target_fpr: float) -> Metric:
    """The lowest threshold whose pixel FPR on the validation images is <= target_fpr.

    Every validation pixel is defect-free, so FPR = share of pixels with score >= threshold.
    The threshold is a validation score, or just above the maximum when none qualifies.
    """
    if val_maps is None or np.size(val_maps) == 0:
        return Metric.undefined("no validation images")
    values = np.sort(np.asarray(val_maps, dtype=np.float64).ravel())
    allowed = int(np.floor(target_fpr * values.size + 1e-9))  # positives allowed
    if allowed == 0:
        return _metric(np.nextafter(values[-1], np.inf))
    candidate = values[values.size - allowed]
    at_or_above = values.size - np.searchsorted(values, candidate, side="left")
    if at_or_above > allowed:  # ties push the FPR over the target: take the next value up
        j = int(np.searchsorted(values, candidate, side="right"))
        return _metric(values[j] if j < values.size else np.nextafter(values[-1], np.inf))
    return _metric(candidate)


def label_free_threshold(
    val_maps: np.ndarray | None,
    *,
    threshold: str = "val_quantile",
    quantile: float = 0.999,
    target_fpr: float = 0.01,
) -> Metric:
    """The label-free pixel threshold: a quantile of validation residuals or a target FPR on them."""
    if threshold == "val_fpr":
        return threshold_at_fpr(val_maps, target_fpr)
    return threshold_quantile(val_maps, quantile)


# ----------------------------------------------------------------------------- Rádli & Czúni


def disk(radius: int) -> np.ndarray:
    """The digital disk x^2 + y^2 <= r^2 (as skimage.morphology.disk)."""
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def disk_opening(maps: np.ndarray, radius: int = RADLI_DISK_RADIUS) -> np.ndarray:
    """Grey opening of each map (N, H, W) by a disk, borders reflected (as skimage.morphology.opening)."""
    return ndimage.grey_opening(maps, footprint=disk(radius)[None], mode="reflect")


def radli_rates(
    maps: np.ndarray, masks: np.ndarray, chunk: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (FPR, TPR), each (N, 50), at Rádli & Czúni's thresholds; NaN where undefined.

    Maps are damped to 0.2 on a 5-pixel border, thresholded with `>` and opened by disk(4).
    Opening commutes with thresholding (flat morphology), so each map is opened once.
    """
    n, h, w = maps.shape
    damp = np.full((h, w), RADLI_BORDER_WEIGHT, np.float32)
    damp[RADLI_BORDER : h - RADLI_BORDER, RADLI_BORDER : w - RADLI_BORDER] = 1.0
    steps = len(RADLI_THRESHOLDS)
    tp = np.zeros((n, steps), np.int64)
    fp = np.zeros((n, steps), np.int64)
    for start in range(0, n, chunk):
        opened = disk_opening(maps[start : start + chunk].astype(np.float32) * damp)
        above = np.searchsorted(RADLI_THRESHOLDS, opened, side="left")  # thresholds < score
        gt = np.asarray(masks[start : start + chunk], dtype=bool)
        for i in range(len(opened)):
            # count(score > t_j) = count(above > j) = reverse cumulative histogram from j + 1
            pos = np.bincount(above[i][gt[i]], minlength=steps + 1)
            neg = np.bincount(above[i][~gt[i]], minlength=steps + 1)
            tp[start + i] = np.cumsum(pos[::-1])[::-1][1:]
            fp[start + i] = np.cumsum(neg[::-1])[::-1][1:]
    n_pos = np.asarray(masks, dtype=bool).reshape(n, -1).sum(axis=1)[:, None]
    n_neg = h * w - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.where(n_pos > 0, tp / n_pos, np.nan)
        fpr = np.where(n_neg > 0, fp / n_neg, np.nan)
    return fpr, tpr


@dataclass(frozen=True)
class RadliCurve:
    """Mean per-image FPR and TPR at each threshold, and the trapezoid AUC of that curve."""

    thresholds: np.ndarray  # (50,)
    fpr: np.ndarray  # (50,)
    tpr: np.ndarray  # (50,)
    auc: Metric
    n_images: int


def radli_curve(fpr: np.ndarray, tpr: np.ndarray) -> RadliCurve:
    """Average per-image rates (images where a rate is undefined are left out of that mean)."""
    defined = ~np.isnan(fpr[:, 0]) & ~np.isnan(tpr[:, 0])  # an image's rates are all NaN or none
    fpr, tpr = fpr[defined], tpr[defined]
    if len(fpr) == 0:
        empty = np.full(len(RADLI_THRESHOLDS), np.nan)
        reason = "no defective image with both defect and defect-free pixels"
        return RadliCurve(RADLI_THRESHOLDS, empty, empty, Metric.undefined(reason), 0)
    mean_fpr, mean_tpr = fpr.mean(axis=0), tpr.mean(axis=0)
    order = np.argsort(mean_fpr, kind="stable")
    auc = float(np.sum(np.diff(mean_fpr[order]) * (mean_tpr[order][1:] + mean_tpr[order][:-1]) / 2))
    return RadliCurve(RADLI_THRESHOLDS, mean_fpr, mean_tpr, _metric(auc), len(fpr))


def radli(maps: np.ndarray, masks: np.ndarray) -> RadliCurve:
    """Rádli & Czúni's protocol on defective images' maps (N, H, W) and masks."""
    return radli_curve(*radli_rates(maps, masks))


# ----------------------------------------------------------------------------- everything


@dataclass
class ScoreResults:
    """All metrics of a test set: overall and per defect type, plus the overall curves."""

    metrics: MetricSet
    per_type: dict[str, MetricSet]
    counts: dict[str, dict[str, int]]  # "overall" and each type: images, defective, good, regions
    threshold: Metric  # the label-free pixel threshold
    image_curve: Curve
    pixel_curve: Curve
    radli: RadliCurve | None = None


def metric_set(image: Curve, pixel: Curve, threshold: Metric, pro_max_fpr: float) -> MetricSet:
    """Every image and pixel metric from the two ranking curves and the label-free threshold."""
    img_f1, pix_f1 = f1_max(image), f1_max(pixel)
    at_threshold = overlap_at(pixel, threshold)
    at_f1 = overlap_at(pixel, pix_f1.threshold)
    return {
        "image_auroc": auroc(image),
        "image_auprc": average_precision(image),
        "image_f1_max": img_f1.f1,
        "image_f1_threshold": img_f1.threshold,
        "image_f1_precision": img_f1.precision,
        "image_f1_recall": img_f1.recall,
        "pixel_auroc": auroc(pixel),
        "pixel_auprc": average_precision(pixel),
        "pixel_aupro": au_pro(pixel, pro_max_fpr),
        "pixel_f1_max": pix_f1.f1,
        "pixel_f1_threshold": pix_f1.threshold,
        "pixel_iou": at_threshold.iou,
        "pixel_dice": at_threshold.dice,
        "pixel_iou_f1": at_f1.iou,
        "pixel_dice_f1": at_f1.dice,
    }


def compute_all(
    maps: np.ndarray | Ragged,
    masks: np.ndarray | Ragged,
    image_scores: np.ndarray,
    labels: np.ndarray,
    val_maps: np.ndarray | None,
    *,
    threshold: str = "val_quantile",
    quantile: float = 0.999,
    target_fpr: float = 0.01,
    pro_max_fpr: float = 0.3,
    defect_types: Sequence[str] | None = None,
    protocol: str = "mvtec",
    grid: tuple[np.ndarray, np.ndarray] | None = None,
) -> ScoreResults:
    """Every metric for test maps (N, H, W), masks (N, H, W), image scores and labels (N,).

    Per defect type, the type's images are scored together with all good images (as in
    MVTec AD); the label-free threshold comes from `val_maps` (M, H, W) and is shared.
    Maps are best passed as stored (float16): their pixels are then ranked without sorting.
    Maps and masks may instead both be ragged (each image at its own size); the Rádli
    protocol, defined on one grid, then takes its (maps, masks) (N, H, W) from `grid`.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}")
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(image_scores, dtype=np.float64)
    if isinstance(masks, Ragged):
        masks = Ragged(masks.flat.astype(bool, copy=False), masks.sizes)
    else:
        masks = np.asarray(masks, dtype=bool)
    ranking = PixelRanking(maps, masks)
    if grid is None and protocol == "radli":
        if isinstance(maps, Ragged):
            raise ValueError("the Rádli protocol needs maps and masks on one grid: pass `grid`")
        grid = (maps, masks)
    per_image_regions = ranking.regions.per_image
    pixel_threshold = label_free_threshold(
        val_maps, threshold=threshold, quantile=quantile, target_fpr=target_fpr
    )
    types = np.asarray(
        list(defect_types)
        if defect_types is not None
        else ["defect" if x else "good" for x in labels]
    )

    rates = None
    if grid is not None and protocol == "radli":
        rates = radli_rates(np.asarray(grid[0])[labels], np.asarray(grid[1], dtype=bool)[labels])
    defective_row = np.cumsum(labels) - 1  # row of each defective image in `rates`

    def evaluate(sel: np.ndarray | None) -> tuple[MetricSet, Curve, Curve, RadliCurve | None]:
        image = rank_curve(
            scores if sel is None else scores[sel], labels if sel is None else labels[sel]
        )
        pixel = ranking.curve(sel)
        metrics = metric_set(image, pixel, pixel_threshold, pro_max_fpr)
        radli_result = None
        if rates is not None:
            rows = defective_row[labels if sel is None else sel & labels]
            radli_result = radli_curve(rates[0][rows], rates[1][rows])
            metrics["radli_auc"] = radli_result.auc
        return metrics, image, pixel, radli_result

    def counts(sel: np.ndarray) -> dict[str, int]:
        return {
            "images": int(sel.sum()),
            "defective": int((labels & sel).sum()),
            "good": int((~labels & sel).sum()),
            "regions": int(per_image_regions[sel].sum()),
        }

    metrics, image, pixel, radli_overall = evaluate(None)
    per_type: dict[str, MetricSet] = {}
    type_counts = {"overall": counts(np.ones(len(labels), bool))}
    for name in sorted(set(types[labels].tolist())):
        sel = ((types == name) & labels) | ~labels
        per_type[name] = evaluate(sel)[0]
        type_counts[name] = counts(sel)
    return ScoreResults(
        metrics, per_type, type_counts, pixel_threshold, image, pixel, radli_overall
    )
