"""Sample records listed by every layout, and their deterministic train / validation / test split.

A layout lists a `Listing`: the pool of defect-free images that may be used for training,
the test images, and a fixed validation set where the dataset ships one. `assign_splits`
turns it into three lists using the dataset profile (train_list, val_list, val_fraction,
test_fraction, seed). The unit of splitting is the source image (`group`), so tiles cut
from one image never land on both sides of a split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from defectae.errors import DefectaeError
from defectae.profiles.schema import DatasetConfig

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Sample:
    """One image (or one tile of an image) to prepare."""

    path: Path  # the image file
    masks: tuple[Path, ...]  # mask files, united; empty = no mask (all-zero)
    defect_type: str  # "good" for defect-free images
    label: int  # 0 good, 1 defective
    name: str  # image stem (tiles: stem plus the tile origin)
    file: str  # image path relative to the dataset root
    box: tuple[int, int, int, int] | None = None  # tile (top, left, height, width) in the image
    label_from_mask: bool = False  # tiles of defect images: defective only where the mask is

    @property
    def group(self) -> str:
        """The source image: the unit that is never split."""
        return self.file


@dataclass
class Listing:
    """What a layout found on disk, before splitting."""

    pool: list[Sample]  # defect-free images that may be trained on
    test: list[Sample]
    validation: list[Sample] | None = None  # a validation set shipped with the dataset
    pool_dir: str = ""  # where the pool came from, for error messages
    holdout_test_good: bool = False  # no test-good images on disk: hold some out of the pool
    notes: list[str] = field(default_factory=list)


def require_dir(path: Path, what: str) -> Path:
    """The folder, or a one-line error naming it and what it should hold."""
    if not path.is_dir():
        raise DefectaeError(f"{path}: folder not found; expected {what}")
    return path


def image_files(
    folder: Path, exts: Iterable[str] = IMAGE_EXTS, recursive: bool = False
) -> list[Path]:
    """Image files in a folder with one of `exts` (case-insensitive), sorted by name."""
    lower = {e.lower() for e in exts}
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in lower)


def subdirs(folder: Path) -> list[Path]:
    """Sub-folders sorted by name, hidden ones skipped."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def relative(path: Path, root: Path) -> str:
    """`path` relative to the dataset root, with forward slashes."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def match_masks(
    images: list[Path], mask_of: Callable[[Path], Path], candidates: list[Path], required: bool
) -> dict[Path, Path | None]:
    """Pair images with their masks; an image without its mask (when required) or a mask
    without its image is a one-line error naming the file."""
    pairs: dict[Path, Path | None] = {}
    for img in images:
        mask = mask_of(img)
        if mask.is_file():
            pairs[img] = mask
        elif required:
            raise DefectaeError(f"{img}: image without its mask (expected {mask})")
        else:
            pairs[img] = None
    used = {m.resolve() for m in pairs.values() if m is not None}
    for mask in candidates:
        if mask.resolve() not in used:
            raise DefectaeError(f"{mask}: mask without its image")
    return pairs


def read_name_list(path: str, key: str) -> list[str]:
    """Image names from a split file: one per line, blank lines and '#' comments ignored."""
    p = Path(path)
    if not p.is_file():
        raise DefectaeError(f"{p}: split file not found ({key})")
    names = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and line not in names:
            names.append(line)
    if not names:
        raise DefectaeError(f"{p}: split file names no images ({key})")
    return names


def _select(names: list[str], groups: list[str], list_path: str, where: str) -> set[str]:
    """The groups a split file names; an entry may be a file name, a stem or a relative path."""
    index: dict[str, set[str]] = {}
    for g in groups:
        p = Path(g)
        for key in {g, p.name, p.stem}:
            index.setdefault(key, set()).add(g)
    chosen: set[str] = set()
    missing = []
    for name in names:
        hits = index.get(name)
        if not hits:
            missing.append(name)
        elif len(hits) > 1:
            raise DefectaeError(
                f"{list_path}: '{name}' matches several images: {', '.join(sorted(hits))}"
            )
        else:
            chosen |= hits
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DefectaeError(
            f"{list_path}: names '{missing[0]}'{more} not found among the defect-free images in {where}"
        )
    return chosen


def _take(groups: list[str], fraction: float, rng: np.random.Generator) -> set[str]:
    """A random share of the groups: at least one when fraction > 0 and two or more exist."""
    n = int(round(len(groups) * fraction))
    if fraction > 0 and n == 0 and len(groups) >= 2:
        n = 1
    order = rng.permutation(len(groups))
    return {groups[i] for i in order[:n]}


def assign_splits(listing: Listing, cfg: DatasetConfig, layout: str) -> dict[str, list[Sample]]:
    """Split a listing into train / validation / test, deterministically from `cfg.seed`."""
    rng = np.random.default_rng(cfg.seed)
    groups = sorted({s.group for s in listing.pool})
    test = list(listing.test)
    if cfg.train_list:
        names = read_name_list(cfg.train_list, "dataset.train_list")
        trainable = _select(names, groups, cfg.train_list, listing.pool_dir)
    elif listing.holdout_test_good:
        trainable = set(groups) - _take(groups, cfg.test_fraction, rng)
    else:
        trainable = set(groups)
    test_good = [s for s in listing.pool if s.group not in trainable]
    test = test_good + test
    candidates = [g for g in groups if g in trainable]

    if listing.validation is not None:
        if cfg.val_list:
            raise DefectaeError(
                f"dataset.val_list: layout '{layout}' ships its own validation images; leave val_list empty"
            )
        val_groups: set[str] = set()
        validation = list(listing.validation)
    else:
        if cfg.val_list:
            names = read_name_list(cfg.val_list, "dataset.val_list")
            val_groups = _select(
                names, candidates, cfg.val_list, f"the training images of {listing.pool_dir}"
            )
        else:
            val_groups = _take(candidates, cfg.val_fraction, rng)
        validation = [s for s in listing.pool if s.group in val_groups]
    train = [s for s in listing.pool if s.group in trainable and s.group not in val_groups]

    where = listing.pool_dir or "the dataset"
    if not train:
        raise DefectaeError(
            f"{where}: the training split is empty; expected defect-free training images"
        )
    if not validation:
        raise DefectaeError(
            f"{where}: the validation split is empty; set dataset.val_fraction > 0 or dataset.val_list"
        )
    if not test:
        raise DefectaeError(f"{where}: the test split is empty; expected test images")
    return {"train": train, "validation": validation, "test": test}
