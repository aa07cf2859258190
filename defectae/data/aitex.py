"""AITEX fabric database: 4096x256 strips cut into square tiles, each with its own mask and label.

The layout the three archives (Defect_images.7z, NODefect_images.7z, Mask_images.7z) unpack to:

    ROOT/NODefect_images/<roll>/NNNN_000_FF.png   defect-free strips, one folder per fabric roll
                                                  (e.g. 2306881-210020u; any sub-folder depth)
    ROOT/Defect_images/NNNN_DDD_FF.png            defective strips: DDD defect code, FF fabric code
    ROOT/Mask_images/NNNN_DDD_FF_mask.png         their masks, white on black; 0044_019_04 and
                                                  0097_030_03 have _mask1 and _mask2 (united)

Strips are grayscale PNGs, 256 high; most are 4096 wide, 0094_027_05 is narrower (3796).
The defective strip 0100_025_08 ships without a mask: listing it is a one-line error until
dataset.aitex.exclude names it (the shipped `aitex` profile does).

Tiles are image_size (H, W) at full resolution with stride dataset.aitex.tile_stride (0 = the
tile size); the last tile of a row or column is shifted to end at the border. Tiles of
defect-free strips form the training pool; every tile of a defective strip is a test tile,
defective where its mask is non-empty and good otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path

from defectae import console
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


def _check_selection(exclude: set[str], fabrics: list[str], stems: set[str], root: Path) -> None:
    """A selected fabric code must name strips in `stems` (strips and mask bases), and an
    excluded stem that names none is said: a typo would keep a strip the user meant to drop.
    The latter only warns, as a copy with the maskless strip deleted is fine."""
    for stem in sorted(exclude - stems):
        console.warn(f"dataset.aitex.exclude: '{stem}' names no strip or mask under {root}")
    found = {m.group(3) for s in stems if (m := NAME.match(s))}
    missing = [f for f in fabrics if f not in found]
    if missing:
        raise DefectaeError(
            f"dataset.aitex.fabrics: no strips of fabric '{missing[0]}' under {root}; "
            f"found fabric codes {', '.join(sorted(found)) or 'none'}"
        )


def list_aitex(root: Path, cfg: DatasetConfig) -> Listing:
    """Tiles of the selected fabrics: defect-free strips as the pool, defective strips as test."""
    opts = cfg.aitex
    require_dir(root, "the AITEX root (dataset.root)")
    good_dir = require_dir(root / "NODefect_images", "the defect-free strips (NODefect_images)")
    defect_dir = require_dir(root / "Defect_images", "the defective strips (Defect_images)")
    mask_dir = require_dir(root / "Mask_images", "the masks (Mask_images)")
    exclude = {Path(stem).stem for stem in opts.exclude}  # "NNNN_DDD_FF" or "NNNN_DDD_FF.png"
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
    good = image_files(good_dir, recursive=True)
    stems = {p.stem for p in defects}
    _check_selection(exclude, opts.fabrics, stems | {p.stem for p in good} | set(masks_of), root)
    for base, files in masks_of.items():
        if base not in stems and base not in exclude:
            raise DefectaeError(
                f"{files[0]}: mask without its image (expected {defect_dir / base}.png)"
            )

    pool: list[Sample] = []
    for path in good:
        if wanted(path):
            pool += _tiles(path, root, cfg.image_size, opts.tile_stride, None, ())
    test: list[Sample] = []
    for path in defects:
        if not wanted(path):
            continue
        if path.stem not in masks_of:
            raise DefectaeError(
                f"{path}: image without its mask (expected {mask_dir / path.stem}_mask.png); "
                f"to leave the strip out, add '{path.stem}' to dataset.aitex.exclude"
            )
        code = _codes(path)[0]
        kind = DEFECT_NAMES.get(code, f"defect_{code}")
        test += _tiles(
            path, root, cfg.image_size, opts.tile_stride, kind, tuple(masks_of[path.stem])
        )
    return Listing(pool=pool, test=test, pool_dir=str(good_dir))
