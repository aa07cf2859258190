"""MVTec AD and MVTec 3D-AD (RGB) folder layouts listed as sample records.

MVTec AD:     CATEGORY/train/good/*.png, CATEGORY/test/TYPE/*.png,
              CATEGORY/ground_truth/TYPE/NAME_mask.png (test/good has no masks).
MVTec 3D-AD:  CATEGORY/SPLIT/TYPE/rgb/NAME.png with masks CATEGORY/SPLIT/TYPE/gt/NAME.png
              (non-zero = defect); SPLIT is train, validation or test, and validation/good is
              the validation split. The point clouds (xyz/) are not used.
The Bergmann woven textures and the synthetic generator's output use the MVTec AD layout.
"""

from __future__ import annotations

from pathlib import Path

from defectae.data.split import (
    Listing,
    Sample,
    image_files,
    match_masks,
    relative,
    require_dir,
    subdirs,
)
from defectae.errors import DefectaeError

GOOD = "good"


def category_dir(root: Path, category: str) -> Path:
    """The category folder: root/category, or root itself when no category is set or when
    root already is the category folder (`--root .../tire`)."""
    require_dir(root, "the dataset root (dataset.root)")
    if not category or (root.name == category and not (root / category).is_dir()):
        return root
    return require_dir(root / category, f"the category '{category}' (dataset.category)")


def _good(paths: list[Path], root: Path) -> list[Sample]:
    return [Sample(p, (), GOOD, 0, p.stem, relative(p, root)) for p in paths]


def list_mvtec(root: Path, category: str) -> Listing:
    """MVTec AD: train/good is the training pool, test/TYPE the test images."""
    base = category_dir(root, category)
    train_dir = require_dir(base / "train" / GOOD, "the defect-free training images (train/good)")
    test_dir = require_dir(base / "test", "the test images (test/TYPE)")
    pool = _good(image_files(train_dir), root)
    test: list[Sample] = []
    for type_dir in subdirs(test_dir):
        images = image_files(type_dir)
        if type_dir.name == GOOD:
            test += _good(images, root)
            continue
        mask_dir = require_dir(base / "ground_truth" / type_dir.name, f"the masks of {type_dir}")
        pairs = match_masks(
            images,
            lambda p, d=mask_dir: d / f"{p.stem}_mask.png",
            image_files(mask_dir),
            required=True,
        )
        test += [
            Sample(p, (m,), type_dir.name, 1, p.stem, relative(p, root))
            for p, m in pairs.items()
            if m is not None
        ]
    return Listing(pool=pool, test=test, pool_dir=str(train_dir))


def _mvtec3d_split(base: Path, split: str, root: Path) -> list[Sample]:
    split_dir = require_dir(base / split, f"the MVTec 3D-AD '{split}' split")
    samples: list[Sample] = []
    for type_dir in subdirs(split_dir):
        rgb = require_dir(type_dir / "rgb", f"the RGB images of {type_dir}")
        gt = type_dir / "gt"
        defective = type_dir.name != GOOD
        if defective:
            require_dir(gt, f"the masks of {type_dir}")
        masks = image_files(gt) if gt.is_dir() else []
        pairs = match_masks(
            image_files(rgb), lambda p, d=gt: d / f"{p.stem}.png", masks, required=defective
        )
        samples += [
            Sample(p, (m,) if m else (), type_dir.name, int(defective), p.stem, relative(p, root))
            for p, m in pairs.items()
        ]
    return samples


def list_mvtec3d(root: Path, category: str) -> Listing:
    """MVTec 3D-AD RGB: train/good trains, validation/good validates, test/TYPE tests."""
    base = category_dir(root, category)
    pool = _mvtec3d_split(base, "train", root)
    validation = _mvtec3d_split(base, "validation", root)
    for split, samples in (("train", pool), ("validation", validation)):
        for s in samples:
            if s.label:
                raise DefectaeError(
                    f"{s.path}: defective image in the '{split}' split; expected only {split}/good"
                )
    return Listing(
        pool=pool,
        test=_mvtec3d_split(base, "test", root),
        validation=validation,
        pool_dir=str(base / "train" / GOOD),
    )
