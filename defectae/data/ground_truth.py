"""The test masks, in the order of a residuals file's images: from prepared.h5 or from a
ground-truth folder in MVTec layout (DIR/TYPE/NAME_mask.png), on the maps' grid or at the
original resolution.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from defectae.core.ragged import Ragged
from defectae.data.images import read_mask, resize_mask
from defectae.errors import DefectaeError
from defectae.stores.prepared import open_prepared, read_original_masks, read_strings
from defectae.stores.residuals import Residuals


def _hw(maps: np.ndarray) -> str:
    return f"{maps.shape[-2]}x{maps.shape[-1]}"


def prepared_rows(f: h5py.File, res: Residuals, prepared: Path) -> np.ndarray:
    """Row of each residual image in prepared test, matched by (defect type, name)."""
    keys = zip(read_strings(f, "test/defect_types"), read_strings(f, "test/names"), strict=True)
    rows = {key: i for i, key in enumerate(keys)}
    index = []
    for t, n in zip(res.types, res.names, strict=True):
        if (t, n) not in rows:
            raise DefectaeError(
                f"{res.path}: test image '{t}/{n}' is not in {prepared}; its mask is unknown"
            )
        index.append(rows[(t, n)])
    return np.asarray(index)


def masks_from_prepared(prepared: Path, res: Residuals) -> np.ndarray:
    """Test masks (N, H, W) bool from prepared.h5, in the order of the residuals."""
    with open_prepared(prepared) as f:
        rows = prepared_rows(f, res, prepared)
        masks = f["test/masks"]
        if masks.shape[2:] != res.maps.shape[1:]:
            raise DefectaeError(
                f"{prepared}: test masks are {masks.shape[2]}x{masks.shape[3]}, "
                f"the residual maps of {res.path} are {_hw(res.maps)}"
            )
        return masks[()][rows, 0] > 0


def read_folder_masks(gt: Path, res: Residuals) -> list[np.ndarray | None]:
    """Masks (H, W) bool at their own size from an MVTec ground-truth folder
    (DIR/TYPE/NAME_mask.png), in the order of the residuals; None for a good image without one."""
    if not gt.is_dir():
        raise DefectaeError(f"{gt}: ground-truth folder not found")
    found: list[np.ndarray | None] = []
    for t, name, label in zip(res.types, res.names, res.labels, strict=True):
        path = gt / t / f"{name}_mask.png"
        if not path.is_file():
            if label:
                raise DefectaeError(
                    f"{path}: no ground-truth mask for defective test image '{t}/{name}'"
                )
            found.append(None)
            continue
        found.append(read_mask(path))
    return found


def masks_on_grid(found: list[np.ndarray | None], res: Residuals) -> np.ndarray:
    """Folder masks resized nearest to the maps' grid: (N, H, W) bool."""
    n, h, w = res.maps.shape
    masks = np.zeros((n, h, w), bool)
    for i, mask in enumerate(found):
        if mask is not None:
            masks[i] = resize_mask(mask, (h, w))
    return masks


def original_masks_from_folder(
    gt: Path, found: list[np.ndarray | None], res: Residuals
) -> Ragged | None:
    """Folder masks at their own size, good images without one all-zero at the size recorded
    in residuals.h5 (orig_sizes); None when it records none."""
    if res.orig_sizes is None:
        return None
    for mask, size, t, name in zip(found, res.orig_sizes, res.types, res.names, strict=True):
        if mask is not None and mask.shape != tuple(size):
            raise DefectaeError(
                f"{gt / t / f'{name}_mask.png'}: mask is {mask.shape[0]}x{mask.shape[1]}, but "
                f"test image '{t}/{name}' was {size[0]}x{size[1]} before prepare resized it"
            )
    out = Ragged(np.zeros(int(res.orig_sizes.prod(axis=1).sum()), bool), res.orig_sizes)
    for i, mask in enumerate(found):
        if mask is not None:
            out[i][...] = mask
    return out


def original_masks_from_prepared(prepared: Path, res: Residuals) -> Ragged | None:
    """Test masks at the original resolution from prepared.h5, in the order of the residuals;
    None for a file prepared before they were stored."""
    with open_prepared(prepared) as f:
        return read_original_masks(f, prepared_rows(f, res, prepared))
