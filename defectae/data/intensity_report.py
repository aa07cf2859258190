"""How the intensities of sampled patches compare with those of the images they come from.

A model only learns to reconstruct the intensities it is trained on: patches that rarely hold
an image's bright border teach it nothing about bright pixels. `augment` counts the luminance
levels of all training patch pixels and of all training image pixels and reports their
32-bin histograms, the total-variation distance between them and the shares of near-white and
near-black pixels in both (pure numpy; the counting is exact).
"""

from __future__ import annotations

from typing import Any

import numpy as np

BINS = 32
NEAR_WHITE = 240  # luminance >= this
NEAR_BLACK = 15  # luminance <= this
WARN_DISTANCE = 0.1  # total-variation distance above which augment warns
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def level_counts(pixels: np.ndarray) -> np.ndarray:
    """How many pixels of a (N, C, H, W) uint8 batch have each luminance level: (256,) int64.

    One channel is its own luminance; three are weighted by BT.601 and rounded.
    """
    if pixels.shape[1] == 3:
        weights = np.asarray(LUMA, np.float32).reshape(1, 3, 1, 1)
        pixels = np.rint((pixels * weights).sum(axis=1)).astype(np.uint8)  # (N, H, W)
    return np.bincount(pixels.reshape(-1), minlength=256).astype(np.int64)


def compare_levels(patches: np.ndarray, images: np.ndarray) -> dict[str, Any]:
    """Patch against image intensities, from their `level_counts`: histograms and shares.

    Returns {"bins", "patch_histogram", "image_histogram" (fractions per bin of 256 / BINS
    levels), "tv_distance" (half the L1 distance of the histograms, in [0, 1]), "near_white"
    and "near_black" ({"patches", "images"}: share of pixels), "warn_above"}.
    """
    p = patches.reshape(BINS, -1).sum(1) / max(int(patches.sum()), 1)
    q = images.reshape(BINS, -1).sum(1) / max(int(images.sum()), 1)

    def share(counts: np.ndarray, levels: slice) -> float:
        return round(float(counts[levels].sum() / max(int(counts.sum()), 1)), 6)

    return {
        "bins": BINS,
        "tv_distance": round(float(0.5 * np.abs(p - q).sum()), 6),
        "near_white": {
            "patches": share(patches, slice(NEAR_WHITE, None)),
            "images": share(images, slice(NEAR_WHITE, None)),
        },
        "near_black": {
            "patches": share(patches, slice(0, NEAR_BLACK + 1)),
            "images": share(images, slice(0, NEAR_BLACK + 1)),
        },
        "warn_above": WARN_DISTANCE,
        "patch_histogram": [round(float(v), 6) for v in p],
        "image_histogram": [round(float(v), 6) for v in q],
    }


def describe(report: dict[str, Any]) -> str:
    """One line: the distance and both shares, patches against images."""
    white, black = report["near_white"], report["near_black"]
    return (
        f"patch vs image intensities: total variation {report['tv_distance']:.3f} "
        f"({report['bins']} luminance bins); near-white (>= {NEAR_WHITE}) "
        f"{white['patches']:.1%} vs {white['images']:.1%}, near-black (<= {NEAR_BLACK}) "
        f"{black['patches']:.1%} vs {black['images']:.1%}"
    )


def warning(report: dict[str, Any]) -> str | None:
    """The warning when the patches misrepresent the images' intensities, else None."""
    if report["tv_distance"] <= report["warn_above"]:
        return None
    white, black = report["near_white"], report["near_black"]
    return (
        f"training patches do not represent the training images' intensities: total variation "
        f"{report['tv_distance']:.3f} > {report['warn_above']}; near-white pixels "
        f"{white['patches']:.1%} of patches vs {white['images']:.1%} of images, near-black "
        f"{black['patches']:.1%} vs {black['images']:.1%}; the model may not learn to "
        f'reconstruct what is missing (augment.sampling = "even" covers image borders; '
        f"strong jitter or noise also shifts intensities)"
    )
