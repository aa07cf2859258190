"""Predictions on disk (`defectae predict`): per image the float anomaly map, the binary mask and
an outlined overlay, and predictions.csv; every file written atomically."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from defectae.files import atomic_path, write_text_atomic

CSV_COLUMNS = ("path", "score", "verdict", "defective_share", "map", "mask", "overlay", "error")
OUTLINE_COLOR = (255, 40, 40)


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The pixels of `mask` within `width` pixels of its edge (the image border counts as edge)."""
    inner = mask
    for _ in range(width):
        p = np.pad(inner, 1)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def overlay_image(original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image as RGB (H, W, 3) with the predicted region outlined, a line readable at any size."""
    rgb = np.repeat(original, 3, axis=2) if original.shape[2] == 1 else original[:, :, :3].copy()
    rgb[_outline(mask, max(1, round(max(mask.shape) / 300)))] = OUTLINE_COLOR
    return rgb


def _save(path: Path, image: Image.Image, fmt: str) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)


def write_prediction(
    stem: Path, original: np.ndarray, anomaly: np.ndarray, threshold: float
) -> tuple[dict[str, Path], float]:
    """STEM_map.tiff (float32 `anomaly`), STEM_mask.png (anomaly >= threshold) and
    STEM_overlay.png for an (H, W, C) uint8 image; returns the files and the defective share."""
    mask = anomaly >= threshold
    files = {
        kind: stem.with_name(f"{stem.name}_{kind}{ext}")
        for kind, ext in (("map", ".tiff"), ("mask", ".png"), ("overlay", ".png"))
    }
    _save(files["map"], Image.fromarray(anomaly), "TIFF")
    _save(files["mask"], Image.fromarray(mask.astype(np.uint8) * 255), "PNG")
    _save(files["overlay"], Image.fromarray(overlay_image(original, mask)), "PNG")
    return files, float(mask.mean())


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    """predictions.csv: one row per image, written atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({**r, "score": f"{r['score']:.9g}" if "score" in r else ""})
    write_text_atomic(path, text.getvalue())
