"""Sample records listed by every layout, and their deterministic train / validation / test split.

A layout lists a `Listing`: the pool of defect-free images that may be used for training,
the test images, and a fixed validation set where the dataset ships one. `assign_splits`
turns it into three lists using the dataset profile (train_list, val_list, val_fraction,
test_fraction, seed, defective_groups). The unit of splitting is the group: the source image
by default, so tiles cut from one image never land on both sides of a split, or a set of
images a layout names (the views of one part, one folder).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from defectae.data.images import read_mask
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
    group_key: str = ""  # images sharing a key are never split apart; empty = the file alone

    @property
    def group(self) -> str:
        """The unit that is never split: the layout's group, else the source image."""
        return self.group_key or self.file


@dataclass
class Listing:
    """What a layout found on disk, before splitting."""

    pool: list[Sample]  # defect-free images that may be trained on
    test: list[Sample]
    validation: list[Sample] | None = None  # a validation set shipped with the dataset
    pool_dir: str = ""  # where the pool came from, for error messages
    holdout_test_good: bool = False  # no test-good images on disk: hold some out of the pool
    notes: list[str] = field(default_factory=list)
    fixed: dict[str, str] = field(default_factory=dict)  # group -> split the dataset names
    problems: list[str] = field(default_factory=list)  # one line per file that cannot be used


@dataclass
class SplitPlan:
    """The three splits, and the defective images that grouping left out of all of them."""

    splits: dict[str, list[Sample]]
    left_out: list[Sample]
    groups: int  # groups that were split


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


def mask_is_defective(path: Path | None) -> bool:
    """Whether an image is defective by its mask: absent or all-zero = good."""
    return path is not None and bool(read_mask(path).any())


def type_pattern(pattern: str, key: str) -> re.Pattern[str] | None:
    """The compiled defect-type regex of `key`; it must have a named group 'type'."""
    if not pattern:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise DefectaeError(f"{key} '{pattern}': not a regular expression ({e})") from None
    if "type" not in compiled.groupindex:
        raise DefectaeError(f"{key} '{pattern}': expected a named group (?P<type>...)")
    return compiled


def defect_type_of(path: Path, pattern: re.Pattern[str] | None, fallback: str, key: str) -> str:
    """A defective image's type: the regex's group 'type' in its file name, else `fallback`."""
    if pattern is None:
        return fallback
    m = pattern.search(path.name)
    if m is None or not m.group("type"):
        raise DefectaeError(f"{path}: file name does not match {key} '{pattern.pattern}'")
    return m.group("type").lower()


def sample_name(file: str) -> str:
    """A stored name unique within the dataset: the relative path without suffix, '/' as '_'."""
    return Path(file).with_suffix("").as_posix().replace("/", "_")


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


def _fixed_defects(listing: Listing, where: str) -> None:
    """A group the dataset puts in train or validation may not hold a defective image."""
    for s in listing.test:
        split = listing.fixed.get(s.group, "test")
        if split != "test":
            raise DefectaeError(
                f"{where}: group '{s.group}' is in the {split} split but holds the defective "
                f'image {s.file}; expected test, or dataset.defective_groups = "split"'
            )


def _place(
    free: list[str], listing: Listing, cfg: DatasetConfig, layout: str, rng: np.random.Generator
) -> dict[str, str]:
    """The split of each group the dataset does not place itself: held-out test-good first
    (train_list or test_fraction), then validation (val_list or val_fraction), the rest train."""
    where = listing.pool_dir
    if cfg.train_list:
        names = read_name_list(cfg.train_list, "dataset.train_list")
        held = set(free) - _select(names, free, cfg.train_list, where)
    elif listing.holdout_test_good:
        held = _take(free, cfg.test_fraction, rng)
    else:
        held = set()
    candidates = [g for g in free if g not in held]
    if listing.validation is not None:
        if cfg.val_list:
            raise DefectaeError(
                f"dataset.val_list: layout '{layout}' ships its own validation images; leave val_list empty"
            )
        val: set[str] = set()
    elif cfg.val_list:
        names = read_name_list(cfg.val_list, "dataset.val_list")
        val = _select(names, candidates, cfg.val_list, f"the training images of {where}")
    else:
        val = _take(candidates, cfg.val_fraction, rng)
    return {g: "test" if g in held else "validation" if g in val else "train" for g in free}


def assign_splits(listing: Listing, cfg: DatasetConfig, layout: str) -> SplitPlan:
    """Split a listing into train / validation / test by groups, deterministically from `cfg.seed`.

    A group holding a defective image goes to test (dataset.defective_groups = "test"), or is
    split like the others with its defective images left out of train and validation ("split").
    """
    rng = np.random.default_rng(cfg.seed)
    where = listing.pool_dir or "the dataset"
    keep_apart = cfg.defective_groups == "split"
    if not keep_apart:
        _fixed_defects(listing, where)
    defective = {s.group for s in listing.test}
    pool = [s for s in listing.pool if keep_apart or s.group not in defective]
    test_good = [s for s in listing.pool if not keep_apart and s.group in defective]
    groups = sorted({s.group for s in pool})
    split_of = {g: listing.fixed[g] for g in groups if g in listing.fixed}
    split_of |= _place([g for g in groups if g not in listing.fixed], listing, cfg, layout, rng)

    splits: dict[str, list[Sample]] = {"train": [], "validation": [], "test": test_good}
    splits["validation"] += listing.validation or []
    for s in pool:
        splits[split_of[s.group]].append(s)
    left_out = []
    for s in listing.test:
        if split_of.get(s.group, "test") == "test":
            splits["test"].append(s)
        else:
            left_out.append(s)

    n = len(groups)
    if not splits["train"]:
        raise DefectaeError(
            f"{where}: the training split is empty after splitting {n} group(s); "
            "expected defect-free training images"
        )
    if not splits["validation"]:
        raise DefectaeError(
            f"{where}: the validation split is empty after splitting {n} group(s); "
            "set dataset.val_fraction > 0 or dataset.val_list, or give more groups"
        )
    if not splits["test"]:
        raise DefectaeError(
            f"{where}: the test split is empty after splitting {n} group(s); expected test images"
        )
    return SplitPlan(splits, left_out, n)


@dataclass
class Survey:
    """What the file headers say: one problem line per file, and the sizes and modes found."""

    problems: list[str]
    sizes: dict[str, int]  # "HxW MODE" -> images


def _header(path: Path) -> tuple[int, int, str]:
    """(H, W, mode) from an image file's header, without decoding its pixels."""
    with Image.open(path) as img:
        w, h = img.size
        return h, w, img.mode


def survey(splits: dict[str, list[Sample]]) -> Survey:
    """Check every sample from the file headers: unreadable files, masks whose size is not
    their image's, and two images of one split stored under one name and type."""
    problems: list[str] = []
    headers: dict[Path, tuple[int, int, str] | None] = {}

    def header(path: Path) -> tuple[int, int, str] | None:
        if path not in headers:
            try:
                headers[path] = _header(path)
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
                headers[path] = None
                problems.append(f"{path}: unreadable or truncated image ({e})")
        return headers[path]

    sizes: Counter[str] = Counter()
    checked: set[tuple[Path, tuple[Path, ...]]] = set()
    for split, samples in splits.items():
        names: dict[tuple[str, str], str] = {}
        for s in samples:
            other = names.setdefault((s.defect_type, s.name), s.file)
            if other != s.file:
                problems.append(
                    f"{s.file}: same name '{s.name}' ({s.defect_type}) as {other} in the {split} split"
                )
            if (s.path, s.masks) in checked:
                continue
            checked.add((s.path, s.masks))
            found = header(s.path)
            if found is None:
                continue
            h, w, mode = found
            sizes[f"{h}x{w} {mode}"] += 1
            for mask in s.masks:
                m = header(mask)
                if m is not None and m[:2] != (h, w):
                    problems.append(
                        f"{mask}: mask is {m[0]}x{m[1]} but its image {s.path} is {h}x{w}"
                    )
    return Survey(problems, dict(sorted(sizes.items())))
