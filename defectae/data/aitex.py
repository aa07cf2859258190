"""AITEX fabric database: 4096x256 strips cut into square tiles, each with its own mask and label.

    ROOT/NODefect_images/<roll>/NNNN_000_FF.png   defect-free strips (any sub-folder depth)
    ROOT/Defect_images/NNNN_DDD_FF.png            defective strips: DDD defect code, FF fabric code
    ROOT/Mask_images/NNNN_DDD_FF_mask.png         their masks (a few strips have _mask1, _mask2: united)

Tiles are image_size (H, W) at full resolution with stride dataset.aitex.tile_stride (0 = the
tile size); the last tile of a row or column is shifted to end at the border. Tiles of
defect-free strips form the training pool; every tile of a defective strip is a test tile,
defective where its mask is non-empty and good otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path

from defectae.core.tiling import tile_origins
from defectae.data.images import image_size
from defectae.data.split import Listing, Sample, image_files, relative, require_dir
from defectae.errors import DefectaeError
from defectae.profiles.schema import DatasetConfig

NAME = re.compile(r"^(\d+)_(\d+)_(\d+)$")
MASK = re.compile(r"^(.+)_mask\d*$")
# Defect codes of the AITEX database (Silvestre-Blanes et al., 2019).
DEFECT_NAMES = {
    "002": "broken_end",
    "006": "broken_yarn",
    "010": "broken_pick",
    "016": "weft_curling",
    "019": "fuzzyball",
    "022": "cut_selvage",
    "023": "crease",
    "025": "warp_ball",
    "027": "knots",
    "029": "contamination",
    "030": "nep",
    "036": "weft_crack",
}


def _codes(path: Path) -> tuple[str, str]:
    """(defect code, fabric code) from an AITEX file name NNNN_DDD_FF."""
    m = NAME.match(path.stem)
    if not m:
        raise DefectaeError(
            f"{path}: expected an AITEX file name NNNN_DDD_FF (image, defect and fabric codes)"
        )
    return m.group(2), m.group(3)


def _tiles(
    path: Path,
    root: Path,
    size: tuple[int, int],
    stride: int,
    defect: str | None,
    masks: tuple[Path, ...],
) -> list[Sample]:
    h, w = image_size(path)
    th, tw = size
    if h < th or w < tw:
        raise DefectaeError(
            f"{path}: {h}x{w} image is smaller than the {th}x{tw} tile (dataset.image_size)"
        )
    tiles = []
    for top in tile_origins(h, th, stride or th):
        for left in tile_origins(w, tw, stride or tw):
            name = f"{path.stem}_y{top}_x{left}"
            tiles.append(
                Sample(
                    path,
                    masks,
                    defect or "good",
                    int(defect is not None),
                    name,
                    relative(path, root),
                    box=(top, left, th, tw),
                    label_from_mask=defect is not None,
                )
            )
    return tiles


def list_aitex(root: Path, cfg: DatasetConfig) -> Listing:
    """Tiles of the selected fabrics: defect-free strips as the pool, defective strips as test."""
    opts = cfg.aitex
    require_dir(root, "the AITEX root (dataset.root)")
    good_dir = require_dir(root / "NODefect_images", "the defect-free strips (NODefect_images)")
    defect_dir = require_dir(root / "Defect_images", "the defective strips (Defect_images)")
    mask_dir = require_dir(root / "Mask_images", "the masks (Mask_images)")
    exclude = set(opts.exclude)
    th, tw = cfg.image_size
    if opts.tile_stride > min(th, tw):
        raise DefectaeError(
            f"dataset.aitex.tile_stride {opts.tile_stride}: larger than the {th}x{tw} tile "
            "(dataset.image_size), which would skip pixels"
        )

    def wanted(path: Path) -> bool:
        return path.stem not in exclude and (not opts.fabrics or _codes(path)[1] in opts.fabrics)

    masks_of: dict[str, list[Path]] = {}
    for m in image_files(mask_dir):
        match = MASK.match(m.stem)
        if not match:
            raise DefectaeError(f"{m}: expected a mask named NNNN_DDD_FF_mask.png")
        masks_of.setdefault(match.group(1), []).append(m)
    defects = image_files(defect_dir)
    stems = {p.stem for p in defects}
    for base, files in masks_of.items():
        if base not in stems and base not in exclude:
            raise DefectaeError(
                f"{files[0]}: mask without its image (expected {defect_dir / base}.png)"
            )

    pool: list[Sample] = []
    for path in image_files(good_dir, recursive=True):
        if wanted(path):
            pool += _tiles(path, root, cfg.image_size, opts.tile_stride, None, ())
    test: list[Sample] = []
    for path in defects:
        if not wanted(path):
            continue
        if path.stem not in masks_of:
            raise DefectaeError(
                f"{path}: image without its mask (expected {mask_dir / path.stem}_mask.png)"
            )
        code = _codes(path)[0]
        kind = DEFECT_NAMES.get(code, f"defect_{code}")
        test += _tiles(
            path, root, cfg.image_size, opts.tile_stride, kind, tuple(masks_of[path.stem])
        )
    if opts.fabrics and not pool and not test:
        raise DefectaeError(
            f"dataset.aitex.fabrics: no images of fabrics {opts.fabrics} under {root}"
        )
    return Listing(pool=pool, test=test, pool_dir=str(good_dir))
