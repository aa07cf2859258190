"""The one image reader: files to uint8 arrays, masks to booleans, and the resize helpers.

Every layout reads through here so that colour conversion, 16-bit handling and the
errors for unreadable or truncated files are the same everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from defectae.errors import DefectaeError

Color = Literal["gray", "rgb"]
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _open(path: Path) -> Image.Image:
    """Open and fully decode an image so truncated files fail here, not later."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy() if img.mode != "P" else img.convert("RGBA")
    except FileNotFoundError:
        raise DefectaeError(f"{path}: image file not found") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DefectaeError(f"{path}: unreadable or truncated image ({e})") from None


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit integer and float images scaled to 8 bits (PIL's convert would clip instead)."""
    if img.mode in _SIXTEEN_BIT:
        arr = np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0  # [0, 1] floats or 8-bit range
        arr = np.clip(np.nan_to_num(arr) * scale, 0, 255).round()
    else:
        return img
    return Image.fromarray(arr.astype(np.uint8))


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file read from its header only (for tiling plans)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
    except FileNotFoundError:
        raise DefectaeError(f"{path}: image file not found") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DefectaeError(f"{path}: unreadable image ({e})") from None
    return h, w


def read_image(path: str | Path, color: Color) -> np.ndarray:
    """Read an image as uint8 (H, W, C), C = 1 for "gray" and 3 for "rgb"."""
    path = Path(path)
    img = _to_8bit(_open(path))
    img = img.convert("L" if color == "gray" else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def read_mask(path: str | Path) -> np.ndarray:
    """Read a defect mask as bool (H, W): any non-zero pixel (in any colour channel) is defect."""
    path = Path(path)
    img = _open(path)
    arr = np.asarray(img)
    if arr.ndim == 3:
        if img.mode in ("RGBA", "LA"):
            arr = arr[:, :, :-1]  # alpha is not a defect
        arr = arr.max(axis=2)
    return arr > 0


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 (H, W, C) to `size` = (H, W), bilinear (antialiased when shrinking)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    channels = [
        np.asarray(Image.fromarray(image[:, :, c]).resize((w, h), Image.Resampling.BILINEAR))
        for c in range(image.shape[2])
    ]
    return np.stack(channels, axis=2)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a bool (H, W) mask to `size` = (H, W) with nearest neighbour, so it stays binary."""
    h, w = size
    if mask.shape == (h, w):
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((w, h), Image.Resampling.NEAREST)) > 0


def short_side_size(hw: tuple[int, int], short: int) -> tuple[int, int]:
    """(H, W) with the short side of `hw` at `short` and the aspect ratio kept: the long side is
    the nearest multiple of 8 (or `short` itself when nearer), so that images whose ratios differ
    by a pixel or two still share one size."""
    h, w = hw
    exact = short * max(h, w) / min(h, w)
    long = max(8, int(exact / 8 + 0.5) * 8)
    if abs(short - exact) <= abs(long - exact) or long < short:
        long = short
    return (short, long) if h <= w else (long, short)
