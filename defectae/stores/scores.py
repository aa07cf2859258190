"""metrics.json, written by score: the metrics, and the test-time record the product ships.

Beside the metrics it holds `tile` (the [tile] settings copied from the residuals.h5 it
scored), `residuals_sha256` (which residuals.h5) and `threshold` (the label-free pixel
threshold chosen on validation maps). export, and anything that deploys a run, reads the
settings and the threshold together from here, so they can never come from different runs.
Beside it, pixel_curve.npz holds the pixel ranking curve thinned for drawing (compare overlays it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defectae.core.metrics import Curve
from defectae.errors import DefectaeError
from defectae.files import atomic_path, write_text_atomic
from defectae.profiles import TileConfig
from defectae.profiles.load import section_from_dict

FORMAT = "defectae-metrics"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ScoredSettings:
    """The settings that turn a model into maps and scores, with the threshold chosen for them."""

    tile: TileConfig
    threshold: dict[str, Any]  # method, its parameter, value (None with a reason when undefined)
    residuals_sha256: str
    source: Path


def write_metrics(path: Path, summary: dict[str, Any]) -> None:
    """Write score's summary as metrics.json (atomically), stamped with the format."""
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, **summary}
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def read_scored_settings(path: Path) -> ScoredSettings:
    """The scored test-time settings of a metrics.json; a foreign, old or damaged file is a user error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DefectaeError(f"{path}: not found; run `defectae score` first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DefectaeError(f"{path}: not a readable metrics file ({type(e).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DefectaeError(f"{path}: not a defectae metrics file (format != '{FORMAT}')")
    if data.get("format_version") != FORMAT_VERSION:
        raise DefectaeError(
            f"{path}: metrics format version {data.get('format_version')}, expected "
            f"{FORMAT_VERSION}; run `defectae score` again"
        )
    for key in ("tile", "threshold", "residuals_sha256"):
        if key not in data:
            raise DefectaeError(f"{path}: missing key '{key}'; run `defectae score` again")
    tile = section_from_dict(TileConfig, "tile", data["tile"], f"{path} (tile)")
    return ScoredSettings(tile, dict(data["threshold"]), str(data["residuals_sha256"]), path)


CURVE_FILE = "pixel_curve.npz"


def write_curve(path: Path, curve: Curve) -> None:
    """Save a ranking curve (already thinned) as .npz, atomically."""
    arrays = {"thresholds": curve.thresholds, "tp": curve.tp, "fp": curve.fp}
    if curve.pro is not None:
        arrays["pro"] = curve.pro
    counts = np.array([curve.n_pos, curve.n_neg, curve.n_regions], np.int64)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, counts=counts, **arrays)


def read_curve(path: Path) -> Curve | None:
    """The curve saved by write_curve, or None when the file is missing or not such a curve."""
    try:
        with np.load(path) as data:
            n_pos, n_neg, n_regions = (int(v) for v in data["counts"])
            pro = data["pro"] if "pro" in data.files else None
            return Curve(
                data["thresholds"], data["tp"], data["fp"], n_pos, n_neg, pro, n_regions, "pixels"
            )
    except (OSError, KeyError, ValueError):
        return None
