"""Plain folders: one folder of good images, one folder per defect type, masks by name.

    ROOT/GOOD_DIR[/IMAGE_SUBDIR]/*.jpg           defect-free images
    ROOT/DEFECT_DIR[/IMAGE_SUBDIR]/*.jpg         defective images; type = folder name without
                                                 type_prefix, lower-cased (MT_Crack -> crack)
    mask of NAME.jpg: NAME + mask_suffix + mask_ext, next to the image, or under
                      ROOT/MASK_DIR/<folder>/ when mask_dir is set.

Defective images need a mask; good images may have one (then it must be all-zero).
The Magnetic Tile set is this layout: MT_Free/Imgs, MT_<Type>/Imgs, mask = same stem .png.

With label_from_mask the masks decide instead, in every folder: an image without a mask or with
an all-zero one is good, any other is defective, its type from type_pattern (a regex on the
file name), default_type, or the folder name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from defectae.data.split import (
    Listing,
    Sample,
    defect_type_of,
    image_files,
    mask_is_defective,
    match_masks,
    relative,
    require_dir,
    sample_name,
    subdirs,
    type_pattern,
)
from defectae.errors import DefectaeError
from defectae.profiles.schema import FoldersOptions

GOOD = "good"


def defect_type(folder: str, prefix: str) -> str:
    """The defect type named by a folder: its last part, prefix stripped, lower-cased."""
    name = Path(folder).name
    if prefix and name.startswith(prefix):
        name = name[len(prefix) :]
    return name.lower()


def _folder(root: Path, opts: FoldersOptions, folder: str) -> tuple[list[Path], list[Path], Path]:
    """(images, mask files, mask folder) of one folder of the layout."""
    image_dir = require_dir(
        root / folder / opts.image_subdir, f"images of '{folder}' (dataset.folders)"
    )
    mask_tail = f"{opts.mask_suffix}{opts.mask_ext}".lower()
    exts = [e.lower() for e in opts.image_exts]
    if opts.mask_dir:
        mask_dir = root / opts.mask_dir / folder
        images = image_files(image_dir, exts)
    else:
        mask_dir = image_dir
        if opts.mask_ext.lower() in exts and not opts.mask_suffix:
            raise DefectaeError(
                f"dataset.folders: mask_suffix '' with mask_ext '{opts.mask_ext}' in image_exts makes every "
                "image its own mask; set a mask_suffix, a mask_dir or other image_exts"
            )
        # files ending in the mask suffix are masks, not images
        images = [p for p in image_files(image_dir, exts) if not p.name.lower().endswith(mask_tail)]
    masks = []
    if mask_dir.is_dir():
        masks = [
            p
            for p in sorted(mask_dir.iterdir())
            if p.is_file() and p.name.lower().endswith(mask_tail)
        ]
    return images, masks, mask_dir


def list_folders(root: Path, opts: FoldersOptions) -> Listing:
    """List good and defective images with their masks."""
    require_dir(root, "the dataset root (dataset.root)")
    if opts.mask_dir:
        require_dir(root / opts.mask_dir, "the mask folder (dataset.folders.mask_dir)")
    reserved = {opts.good_dir, Path(opts.mask_dir).parts[0] if opts.mask_dir else ""}
    defect_dirs = opts.defect_dirs or [d.name for d in subdirs(root) if d.name not in reserved]

    def suffix(p: Path) -> str:
        return f"{p.stem}{opts.mask_suffix}{opts.mask_ext}"

    if opts.label_from_mask:
        return _by_mask(root, opts, defect_dirs, suffix)
    pool: list[Sample] = []
    images, masks, mask_dir = _folder(root, opts, opts.good_dir)
    for img, mask in match_masks(
        images, lambda p: mask_dir / suffix(p), masks, required=False
    ).items():
        pool.append(Sample(img, (mask,) if mask else (), GOOD, 0, img.stem, relative(img, root)))

    test: list[Sample] = []
    seen: dict[str, str] = {}
    pattern = type_pattern(opts.type_pattern, "dataset.folders.type_pattern")

    def type_of(img: Path, fallback: str) -> str:
        return defect_type_of(img, pattern, fallback, "dataset.folders.type_pattern")

    for folder in defect_dirs:
        kind = defect_type(folder, opts.type_prefix)
        if kind == GOOD or kind in seen:
            other = opts.good_dir if kind == GOOD else seen[kind]
            raise DefectaeError(
                f"dataset.folders.defect_dirs: '{folder}' gives defect type '{kind}', as does '{other}'"
            )
        seen[kind] = folder
        images, masks, mask_dir = _folder(root, opts, folder)
        pairs = match_masks(images, lambda p, d=mask_dir: d / suffix(p), masks, required=True)
        test += [
            Sample(
                img, (m,), type_of(img, opts.default_type or kind), 1, img.stem, relative(img, root)
            )
            for img, m in pairs.items()
            if m
        ]
    pool_dir = str(root / opts.good_dir / opts.image_subdir)
    return Listing(pool=pool, test=test, pool_dir=pool_dir, holdout_test_good=True)


def _by_mask(
    root: Path, opts: FoldersOptions, defect_dirs: list[str], suffix: Callable[[Path], str]
) -> Listing:
    """Every folder's images labelled by their masks (label_from_mask)."""
    pattern = type_pattern(opts.type_pattern, "dataset.folders.type_pattern")
    folders = [opts.good_dir] if (root / opts.good_dir).is_dir() else []
    pool: list[Sample] = []
    test: list[Sample] = []
    for folder in folders + [d for d in defect_dirs if d != opts.good_dir]:
        kind = defect_type(folder, opts.type_prefix)
        fallback = opts.default_type or (kind if kind != GOOD else "defect")
        images, masks, mask_dir = _folder(root, opts, folder)
        pairs = match_masks(images, lambda p, d=mask_dir: d / suffix(p), masks, required=False)
        for img, mask in pairs.items():
            file, masks_of = relative(img, root), (mask,) if mask else ()
            if mask_is_defective(mask):
                kind_of = defect_type_of(img, pattern, fallback, "dataset.folders.type_pattern")
                test.append(Sample(img, masks_of, kind_of, 1, sample_name(file), file))
            else:
                pool.append(Sample(img, masks_of, GOOD, 0, sample_name(file), file))
    return Listing(pool=pool, test=test, pool_dir=str(root), holdout_test_good=True)
