"""Images found by glob patterns in nested folders, each with a mask named by a template.

    dataset.patterns.images = ["kos*/Part*.jpg"]   glob patterns relative to root
    dataset.patterns.mask = "{stem}_label.bmp"     relative to the image's folder: {stem} the image
                                                   name without suffix, {name} with it, {parent}
                                                   its folder's name, {dir} its folder under root
A file that is the mask of a matched image is never an image itself. With label_from_mask an
image is defective when its mask has a non-zero pixel (no mask file: good); otherwise its folder
name says good or the defect type. KolektorSDD as distributed is this layout: ROOT/kosNN/PartK.jpg
with PartK_label.bmp beside it; group = "folder" keeps the views of one part together.
"""

from __future__ import annotations

import re
from pathlib import Path

from defectae.data.split import (
    Listing,
    Sample,
    defect_type_of,
    mask_is_defective,
    relative,
    require_dir,
    sample_name,
    type_pattern,
)
from defectae.errors import DefectaeError
from defectae.profiles.schema import PatternsOptions

GOOD = "good"
FIELDS = "{stem} {name} {parent} {dir}"


def mask_path(image: Path, root: Path, template: str) -> Path | None:
    """The mask file the template names for `image` (it may not exist); None without a template."""
    if not template:
        return None
    try:
        name = template.format(
            stem=image.stem,
            name=image.name,
            parent=image.parent.name,
            dir=relative(image.parent, root),
        )
    except (KeyError, IndexError, ValueError) as e:
        raise DefectaeError(
            f"dataset.patterns.mask '{template}': expected a path with {FIELDS} ({e!r})"
        ) from None
    return image.parent / name


def group_rule(rule: str) -> re.Pattern[str] | str:
    """'folder', 'none', or the compiled regex of dataset.patterns.group."""
    if rule in ("folder", "none"):
        return rule
    try:
        return re.compile(rule)
    except re.error as e:
        raise DefectaeError(
            f"dataset.patterns.group '{rule}': expected folder, none or a regular expression ({e})"
        ) from None


def group_of(file: str, rule: re.Pattern[str] | str) -> str:
    """The group key of an image path relative to root ('' = the image alone)."""
    if rule == "none":
        return ""
    if rule == "folder":
        return Path(file).parent.as_posix()
    assert isinstance(rule, re.Pattern)
    m = rule.search(file)
    if m is None:
        raise DefectaeError(f"{file}: path does not match dataset.patterns.group '{rule.pattern}'")
    return m.group("group") if "group" in rule.groupindex else m.group(0)


def find_images(root: Path, opts: PatternsOptions) -> list[Path]:
    """Files the patterns match with an image extension, less the masks of matched images."""
    if not opts.images:
        raise DefectaeError(
            "dataset.patterns.images: expected glob patterns relative to root (e.g. ['kos*/Part*.jpg'])"
        )
    exts = {e.lower() for e in opts.image_exts}
    found: set[Path] = set()
    for pattern in opts.images:
        if not pattern or Path(pattern).is_absolute():
            raise DefectaeError(
                f"dataset.patterns.images '{pattern}': expected a glob pattern relative to root"
            )
        try:
            hits = {p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in exts}
        except ValueError as e:  # e.g. '**' not a whole path component
            raise DefectaeError(f"dataset.patterns.images '{pattern}': {e}") from None
        if not hits:
            raise DefectaeError(f"dataset.patterns.images '{pattern}': matches no image in {root}")
        found |= hits
    masks = {m.resolve() for p in found if (m := mask_path(p, root, opts.mask)) is not None}
    return sorted(p for p in found if p.resolve() not in masks)


def list_patterns(root: Path, opts: PatternsOptions) -> Listing:
    """List the matched images, labelled by their masks or folders, grouped by the group rule."""
    require_dir(root, "the dataset root (dataset.root)")
    pattern = type_pattern(opts.type_pattern, "dataset.patterns.type_pattern")
    rule = group_rule(opts.group)
    pool: list[Sample] = []
    test: list[Sample] = []
    problems: list[str] = []
    for image in find_images(root, opts):
        file = relative(image, root)
        mask = mask_path(image, root, opts.mask)
        found = mask if mask is not None and mask.is_file() else None
        if opts.label_from_mask:
            defective = mask_is_defective(found)
            fallback = opts.default_type
        else:
            fallback = image.parent.name.lower()
            defective = fallback != GOOD
            if defective and mask is not None and found is None:
                problems.append(f"{image}: defective image without its mask (expected {mask})")
                continue
        masks = (found,) if found is not None else ()
        group = group_of(file, rule)
        if defective:
            kind = defect_type_of(image, pattern, fallback, "dataset.patterns.type_pattern")
            test.append(Sample(image, masks, kind, 1, sample_name(file), file, group_key=group))
        else:
            pool.append(Sample(image, masks, GOOD, 0, sample_name(file), file, group_key=group))
    return Listing(
        pool=pool, test=test, pool_dir=str(root), holdout_test_good=True, problems=problems
    )
