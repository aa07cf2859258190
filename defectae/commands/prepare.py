"""`defectae prepare`: read a dataset in any layout and write one prepared HDF5 file.

Images are resized to dataset.image_size (bilinear) in the profile's colour mode, masks
with nearest neighbour and stored as {0, 1}. With dataset.resize = "short-side" the short side
goes to min(image_size) and the aspect ratio is kept (every image must then reach one size);
dataset.intensity then matches each image's mean (and std) to the training images', after
resizing. The output defaults to work/DATASET/prepared.h5; the resolved profile is written
beside it as `<stem>.profile.toml` (prepared.profile.toml), so it never clashes with the
profile.toml of another output in the same folder.
`--synthetic NAME` needs no --profile: it uses the dataset profile `synthetic-NAME` if one
exists, else `synthetic`, with the `ae` model. A synthetic dataset's relative root lies under
the workspace ($DEFECTAE_HOME), like every other generated output.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import typing
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from defectae import console, profiles, workspace
from defectae.data.download import download as fetch_dataset
from defectae.data.folders import list_folders
from defectae.data.images import (
    image_size,
    read_image,
    read_mask,
    resize_image,
    resize_mask,
    short_side_size,
)
from defectae.data.lighting import intensity_targets, normalise_intensity
from defectae.data.manifest import list_manifest
from defectae.data.mvtec import list_mvtec, list_mvtec3d
from defectae.data.patterns import list_patterns
from defectae.data.split import Listing, Sample, SplitPlan, assign_splits, survey
from defectae.errors import DefectaeError
from defectae.files import output_file, write_text_atomic
from defectae.profiles import DatasetConfig, Profile
from defectae.profiles.schema import SyntheticOptions
from defectae.stores.prepared import SPLITS, PreparedSplit, write_prepared

DEFAULT_MODEL = "ae"


def resolve_profile(
    profile: str | None, sets: list[str], root: str | None, synthetic: str | None
) -> Profile:
    """The profile to prepare; `--synthetic NAME` alone picks the synthetic dataset profile."""
    if synthetic is None:
        if profile is None:
            raise DefectaeError(
                "--profile: expected a profile name or .toml path, or --synthetic woven|grid"
            )
        return profiles.resolve(profile, sets, root)
    textures = typing.get_args(typing.get_type_hints(SyntheticOptions)["texture"])
    if synthetic not in textures:
        raise DefectaeError(f"--synthetic '{synthetic}': expected one of {', '.join(textures)}")
    if profile is None:
        dataset = f"synthetic-{synthetic}"
        dataset = dataset if dataset in profiles.available("datasets") else "synthetic"
        profile = f"{dataset}-{DEFAULT_MODEL}"
    prof = profiles.resolve(profile, [*sets, f"dataset.synthetic.texture={synthetic}"], root)
    if prof.dataset.layout != "synthetic":
        raise DefectaeError(
            f"--synthetic: profile '{prof.name}' has dataset.layout = '{prof.dataset.layout}'; "
            "expected a synthetic dataset profile"
        )
    return prof


def _with_dataset(prof: Profile, **changes: Any) -> Profile:
    return dataclasses.replace(prof, dataset=dataclasses.replace(prof.dataset, **changes))


def list_dataset(ds: DatasetConfig, root: Path) -> Listing:
    """List the samples of the profile's layout (a synthetic dataset is generated first)."""
    if ds.layout == "synthetic":
        from defectae.data.synthetic import generate

        category = generate(root, ds.synthetic, ds.seed)
        return list_mvtec(category.parent, category.name)
    if ds.layout == "mvtec":
        return list_mvtec(root, ds.category)
    if ds.layout == "mvtec3d":
        return list_mvtec3d(root, ds.category)
    if ds.layout == "aitex":
        from defectae.data.aitex import list_aitex  # needs torch (the shared tiling): import on use

        return list_aitex(root, ds)
    if ds.layout == "manifest":
        return list_manifest(root, ds.manifest)
    if ds.layout == "patterns":
        return list_patterns(root, ds.patterns)
    return list_folders(root, ds.folders)


@dataclasses.dataclass
class _Item:
    image: np.ndarray  # (C, H, W) uint8
    mask: np.ndarray  # (1, H, W) uint8
    label: int
    defect_type: str
    orig_size: tuple[int, int]
    empty_defect_mask: bool
    orig_mask: np.ndarray  # (H, W) bool at the original size


class _Reader:
    """Reads samples at the profile's size; tiles of one strip share a single decode."""

    def __init__(self, ds: DatasetConfig, size: tuple[int, int]) -> None:
        self.ds = ds
        self.size = size
        self._key: tuple[Path, tuple[Path, ...]] | None = None
        self._cached: tuple[np.ndarray, np.ndarray] | None = None

    def _load(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        key = (sample.path, sample.masks)
        if key != self._key or self._cached is None:
            image = read_image(sample.path, self.ds.color)  # (H, W, C)
            h, w = image.shape[:2]
            mask = np.zeros((h, w), bool)
            for path in sample.masks:
                m = read_mask(path)
                if m.shape != (h, w):
                    raise DefectaeError(
                        f"{path}: mask is {m.shape[0]}x{m.shape[1]} but its image {sample.path} is {h}x{w}"
                    )
                mask |= m
            self._key, self._cached = key, (image, mask)
        return self._cached

    def read(self, sample: Sample) -> _Item:
        image, mask = self._load(sample)
        if sample.box is not None:
            top, left, th, tw = sample.box
            image, mask = (
                image[top : top + th, left : left + tw],
                mask[top : top + th, left : left + tw],
            )
        defective = bool(mask.any())
        label, kind = sample.label, sample.defect_type
        if sample.label_from_mask:
            label, kind = int(defective), sample.defect_type if defective else "good"
        elif label == 0 and defective:
            raise DefectaeError(
                f"{sample.masks[0]}: the mask of a defect-free image is not all-zero"
            )
        out_image = resize_image(image, self.size).transpose(2, 0, 1)
        out_mask = resize_mask(mask, self.size)[None].astype(np.uint8)
        return _Item(
            out_image, out_mask, label, kind, image.shape[:2], label == 1 and not defective, mask
        )


def _read_split(
    samples: list[Sample], reader: _Reader, bar: Any, task: Any, original_masks: bool = False
) -> tuple[PreparedSplit, list[str], list[str]]:
    """The split's arrays, the defective images with an all-zero mask, and the images whose
    tiles are labelled by their mask but none of which is defective (an all-zero mask there)."""
    ds = reader.ds
    h, w = reader.size
    split = PreparedSplit(
        images=np.empty((len(samples), ds.channels, h, w), np.uint8),
        masks=np.empty((len(samples), 1, h, w), np.uint8),
        labels=np.empty((len(samples),), np.uint8),
        defect_types=[],
        names=[],
        files=[],
        orig_sizes=np.empty((len(samples), 2), np.int32),
        orig_masks=[] if original_masks else None,
    )
    empty_masks = []
    tiled_defect: dict[str, bool] = {}
    for i, sample in enumerate(samples):
        item = reader.read(sample)
        split.images[i], split.masks[i], split.labels[i] = item.image, item.mask, item.label
        split.orig_sizes[i] = item.orig_size
        if split.orig_masks is not None:  # score's original-resolution ground truth
            split.orig_masks.append(item.orig_mask.astype(np.uint8))
        split.defect_types.append(item.defect_type)
        split.names.append(sample.name)
        split.files.append(sample.file)
        if item.empty_defect_mask:
            empty_masks.append(sample.file)
        if sample.label_from_mask:
            tiled_defect[sample.file] = tiled_defect.get(sample.file, False) or bool(item.label)
        bar.advance(task)
    return split, empty_masks, [f for f, defective in tiled_defect.items() if not defective]


def _prepared_size(samples: dict[str, list[Sample]], ds: DatasetConfig) -> tuple[int, int]:
    """The one (H, W) of the stored arrays: dataset.image_size, or with resize = "short-side"
    each image's aspect-preserving size (read from the file headers), which must agree."""
    size = (int(ds.image_size[0]), int(ds.image_size[1]))
    if ds.resize == "stretch":
        return size
    first: tuple[str, tuple[int, int], tuple[int, int]] | None = None
    for sample in (s for name in SPLITS for s in samples[name]):
        orig = sample.box[2:] if sample.box is not None else image_size(sample.path)
        resized = short_side_size(orig, min(size))
        if first is None:
            first = (sample.file, orig, resized)
        elif resized != first[2]:
            f0, o0, r0 = first
            raise DefectaeError(
                f'dataset.resize = "short-side": {f0} ({o0[0]}x{o0[1]}) becomes {r0[0]}x{r0[1]} '
                f"but {sample.file} ({orig[0]}x{orig[1]}) becomes {resized[0]}x{resized[1]}; "
                'one prepared file holds one size: use dataset.resize = "stretch"'
            )
    return first[2] if first is not None else size


def _normalise_splits(splits: dict[str, PreparedSplit], mode: str) -> dict[str, Any]:
    """Apply dataset.intensity in place to every split, with targets from the training images
    only; return the attributes that record it (the targets, for new images later)."""
    if mode == "none":
        return {"intensity": mode}
    mean, std = intensity_targets(splits["train"].images)
    for split in splits.values():
        for i, image in enumerate(split.images):
            split.images[i] = normalise_intensity(image, mode, mean, std)
    return {"intensity": mode, "intensity_mean": mean, "intensity_std": std}


def _size_range(sizes: np.ndarray) -> str:
    lo, hi = sizes.min(axis=0), sizes.max(axis=0)
    span = [f"{a}" if a == b else f"{a}-{b}" for a, b in zip(lo, hi, strict=True)]
    return f"{span[0]} x {span[1]}"


def _show(summary: dict[str, Any], splits: dict[str, PreparedSplit]) -> None:
    h, w = summary["image_size"]
    table = Table(title=f"prepared {summary['out']}  ({h}x{w} {summary['color']})")
    for col in ("split", "images", "good", "defective", "original sizes (H x W)"):
        table.add_column(
            col, justify="left" if col in ("split", "original sizes (H x W)") else "right"
        )
    for name in SPLITS:
        s = splits[name]
        bad = int(s.labels.sum())
        table.add_row(name, str(len(s)), str(len(s) - bad), str(bad), _size_range(s.orig_sizes))
    console.show(table)
    types = Table(title="test images by defect type")
    types.add_column("defect type")
    types.add_column("images", justify="right")
    types.add_row("good", str(summary["splits"]["test_good"]))
    for kind, n in summary["defect_types"].items():
        types.add_row(kind, str(n))
    console.show(types)


def _warn_sizes(splits: dict[str, PreparedSplit], size: tuple[int, int], resize: str) -> None:
    """Say when images were enlarged or squashed to the prepared size: both change what a
    defect looks like, and the user should know which images and by how much."""
    h, w = size
    target_name = "dataset.image_size" if resize == "stretch" else "the prepared size"
    names = [
        (n, f, tuple(o))
        for n, s in splits.items()
        for f, o in zip(s.files, s.orig_sizes, strict=True)
    ]
    small = [(f, o) for _, f, o in names if o[0] < h or o[1] < w]
    if small:
        f, o = min(small, key=lambda x: x[1][0] * x[1][1])
        console.warn(
            f"{len(small)} image(s) are smaller than {target_name} {h}x{w} and were enlarged "
            f"(smallest: {f}, {o[0]}x{o[1]})"
        )
    target = w / h
    squashed = [(f, o) for _, f, o in names if abs((o[1] / o[0]) / target - 1) > 0.05]
    if squashed:
        f, o = squashed[0]
        hint = (
            '; dataset.resize = "short-side" keeps the aspect ratio' if resize == "stretch" else ""
        )
        console.warn(
            f"{len(squashed)} image(s) have another aspect ratio than {target_name} {h}x{w} "
            f"and were squashed to it (e.g. {f}, {o[0]}x{o[1]} -> {h}x{w}){hint}"
        )


def _downloaded(prof: Profile, url: str, sha256: str | None, synthetic: str | None) -> Profile:
    """Fetch and unpack the dataset archive; the profile then points at the unpacked folder."""
    ds = prof.dataset
    if synthetic is not None or ds.layout == "synthetic":
        raise DefectaeError("--download: a synthetic dataset is generated, not downloaded")
    expected = sha256 or ds.download_sha256
    if not expected:
        raise DefectaeError(
            "--sha256: expected the archive's SHA-256 (or dataset.download_sha256 in the profile)"
        )
    unpacked = fetch_dataset(url, expected, ds.category)
    return _with_dataset(
        prof, root=str(unpacked), download_url=url, download_sha256=expected.lower()
    )


def run(
    profile: str | None,
    sets: list[str],
    root: str | None,
    out: Path | None,
    synthetic: str | None,
    download: str | None,
    sha256: str | None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Prepare the profile's dataset into one HDF5 file and return the --json summary;
    with `dry_run`, list and split only, write nothing, and report what was found."""
    prof = resolve_profile(profile, sets, root, synthetic)
    if dry_run and (download is not None or prof.dataset.layout == "synthetic"):
        raise DefectaeError(
            "--dry-run: lists a dataset on disk; a synthetic or downloaded one is written first"
        )
    if sha256 is not None and download is None:
        raise DefectaeError("--sha256: only used with --download URL")
    if download is not None:
        prof = _downloaded(prof, download, sha256, synthetic)
    ds = prof.dataset
    if not ds.root:
        raise DefectaeError(
            f"dataset.root: profile '{prof.name}' names no dataset folder; pass --root PATH"
        )
    data_root = Path(ds.root)
    if ds.layout == "synthetic" and root is None and not data_root.is_absolute():
        data_root = workspace.home() / data_root
        prof = _with_dataset(prof, root=str(data_root))
        ds = prof.dataset

    if dry_run:
        return dry_run_report(prof, data_root)
    out = output_file(out if out is not None else workspace.prepared_path(prof))
    listing = list_dataset(ds, data_root)
    plan = assign_splits(listing, ds, ds.layout)
    problems = listing.problems + survey(plan.splits).problems
    if problems:
        more = (
            f" (and {len(problems) - 1} more: see prepare --dry-run)" if len(problems) > 1 else ""
        )
        raise DefectaeError(problems[0] + more)
    samples = plan.splits
    size = _prepared_size(samples, ds)
    reader = _Reader(ds, size)
    splits: dict[str, PreparedSplit] = {}
    empty_masks: list[str] = []
    unmasked_defects: list[str] = []  # tiled defect images whose mask is all-zero
    with console.progress() as bar:
        task = bar.add_task("reading images", total=sum(len(v) for v in samples.values()))
        for name in SPLITS:
            bar.update(task, description=f"reading {name}")
            splits[name], empty, unmasked = _read_split(
                samples[name], reader, bar, task, original_masks=name == "test"
            )
            empty_masks += empty
            unmasked_defects += unmasked
    intensity = _normalise_splits(splits, ds.intensity)

    test = splits["test"]
    counts = {
        "train": len(splits["train"]),
        "validation": len(splits["validation"]),
        "test_good": int((test.labels == 0).sum()),
        "test_defect": int((test.labels == 1).sum()),
    }
    defect_types = dict(
        sorted(
            Counter(t for t, lab in zip(test.defect_types, test.labels, strict=True) if lab).items()
        )
    )
    attrs = {
        "layout": ds.layout,
        "source": ds.root,
        "category": ds.category,
        "image_size": list(size),
        "resize": ds.resize,
        **intensity,
        "color": ds.color,
        "channels": ds.channels,
        "dataset": profiles.to_dict(prof)["dataset"],
        "splits": counts,
    }
    write_prepared(out, splits, attrs)
    profile_path = out.with_name(f"{out.stem}.profile.toml")
    write_text_atomic(profile_path, profiles.to_toml(prof))
    splits_path = out.with_name(f"{out.stem}.splits.csv")
    write_text_atomic(splits_path, splits_csv(plan))
    if plan.left_out:
        console.warn(
            f"{len(plan.left_out)} defective image(s) of train/validation groups were left out "
            f'(dataset.defective_groups = "split"); see {splits_path}'
        )
    if unmasked_defects:
        console.warn(
            f"{len(unmasked_defects)} defective image(s) have an all-zero mask, so all their "
            "tiles are labelled good: "
            + ", ".join(unmasked_defects[:5])
            + (" ..." if len(unmasked_defects) > 5 else "")
        )
    if not counts["test_defect"]:
        console.warn(
            "the test split holds no defective image: image AUROC and every pixel metric will be "
            'undefined (with defective_groups = "split", try another dataset.seed or fewer '
            "validation groups)"
        )
    _warn_sizes(splits, size, ds.resize)
    if empty_masks:
        console.warn(
            f"{len(empty_masks)} defective image(s) have an all-zero mask and stay labelled defective: "
            + ", ".join(empty_masks[:5])
            + (" ..." if len(empty_masks) > 5 else "")
        )
    summary = {
        "out": str(out),
        "profile": prof.name,
        "profile_file": str(profile_path),
        "splits_file": str(splits_path),
        "layout": ds.layout,
        "source": ds.root,
        "image_size": list(size),
        "color": ds.color,
        "splits": counts,
        "defect_types": defect_types,
        "empty_defect_masks": len(empty_masks),
        "groups": plan.groups,
        "left_out": len(plan.left_out),
    }
    _show(summary, splits)
    return summary


def splits_csv(plan: SplitPlan) -> str:
    """The split file: one row per image (file, split, group, label, defect_type)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "split", "group", "label", "defect_type"])
    placed = [(name, s) for name in SPLITS for s in plan.splits[name]]
    placed += [("left_out", s) for s in plan.left_out]
    rows = {(s.file, name, s.group, s.label, s.defect_type): None for name, s in placed}
    writer.writerows(rows)
    return buf.getvalue()


def dry_run_report(prof: Profile, data_root: Path) -> dict[str, Any]:
    """List and split without writing: counts per split and type, example pairs, the sizes
    and modes in the file headers, and one line per problem found."""
    ds = prof.dataset
    listing = list_dataset(ds, data_root)
    plan = assign_splits(listing, ds, ds.layout)
    found = survey(plan.splits)
    counts = {
        name: dict(sorted(Counter(s.defect_type for s in plan.splits[name]).items()))
        for name in SPLITS
    }
    with_masks = sorted(
        (s for name in SPLITS for s in plan.splits[name] if s.masks), key=lambda s: -s.label
    )
    examples = [
        {"image": str(s.path), "mask": str(s.masks[0]), "defect_type": s.defect_type}
        for s in with_masks[:3]
    ]
    problems = listing.problems + found.problems
    summary = {
        "dry_run": True,
        "profile": prof.name,
        "layout": ds.layout,
        "source": ds.root,
        "counts": counts,
        "groups": plan.groups,
        "left_out": len(plan.left_out),
        "examples": examples,
        "sizes": found.sizes,
        "problems": problems,
    }
    _show_dry_run(summary)
    return summary


def _show_dry_run(summary: dict[str, Any]) -> None:
    table = Table(
        title=f"dry run: {summary['source']} ({summary['layout']}, {summary['groups']} groups)"
    )
    table.add_column("split")
    table.add_column("images", justify="right")
    table.add_column("by defect type")
    for name, kinds in summary["counts"].items():
        detail = ", ".join(f"{k} {n}" for k, n in kinds.items())
        table.add_row(name, str(sum(kinds.values())), detail)
    console.show(table)
    for ex in summary["examples"]:
        console.info(f"  {ex['image']} -> {ex['mask']} ({ex['defect_type']})")
    console.info("sizes and modes: " + ", ".join(f"{k} ({n})" for k, n in summary["sizes"].items()))
    if summary["left_out"]:
        console.warn(
            f"{summary['left_out']} defective image(s) would be left out of train/validation"
        )
    for line in summary["problems"]:
        console.error(line)
    if not summary["problems"]:
        console.info("no problems found; nothing was written")
