"""Per-image intensity normalisation, for datasets whose lighting varies from image to image.

Each image is shifted (and with "mean-std" scaled) so that its mean (and standard deviation),
taken over all its pixels and channels at once, equal targets computed from the training images.
`prepare` applies it after resizing and stores the targets in prepared.h5, so that a new image,
resized the same way, can be normalised identically with `normalise_intensity`.
"""

from __future__ import annotations

from typing import get_args, get_type_hints

import numpy as np

from defectae.errors import DefectaeError
from defectae.profiles.schema import DatasetConfig

INTENSITY_MODES: tuple[str, ...] = get_args(get_type_hints(DatasetConfig)["intensity"])


def intensity_targets(images: np.ndarray) -> tuple[float, float]:
    """(mean of the images' means, mean of their standard deviations) of uint8 (N, ...) images."""
    if len(images) == 0:
        raise DefectaeError(
            "dataset.intensity: no training images to take the target mean and std from"
        )
    stats = np.array([(x.mean(dtype=np.float64), x.std(dtype=np.float64)) for x in images])
    return float(stats[:, 0].mean()), float(stats[:, 1].mean())


def normalise_intensity(
    image: np.ndarray, mode: str, target_mean: float, target_std: float
) -> np.ndarray:
    """A uint8 image of any layout with its mean (and std) moved to the targets, computed in float,
    rounded and clipped to [0, 255]. A constant image under "mean-std" is only shifted."""
    if mode not in INTENSITY_MODES:
        raise DefectaeError(
            f"dataset.intensity '{mode}': expected one of {', '.join(INTENSITY_MODES)}"
        )
    if mode == "none":
        return image
    x = image.astype(np.float64)
    mean = x.mean()
    if mode == "mean":
        x += target_mean - mean
    else:
        std = x.std()
        scale = target_std / std if std > 0 else 1.0
        x = (x - mean) * scale + target_mean
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
