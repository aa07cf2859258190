"""The prepared HDF5 file: train / validation / test images, masks and labels at one size.

Layout (each of the groups "train", "validation", "test"):
    images (N, C, H, W) uint8, masks (N, 1, H, W) uint8 in {0, 1}, labels (N,) uint8,
    defect_types (N,) str ("good" for good images), names (N,) str, files (N,) str,
    orig_sizes (N, 2) int32 (H, W before resizing).
The "test" group (written by prepare) also holds each mask at its image's original size
(format 2), ragged:
    orig_masks (P,) uint8 in {0, 1}, image after image, row by row (P = sum of H * W over
    orig_sizes), lzf-compressed; orig_mask_offsets (N + 1,) int64, where each image starts.
Format 1 files (without them) are still read; `read_original_masks` then returns None.
File attributes: format, format_version, layout, source, category, image_size (the stored
H, W), resize, intensity with intensity_mean / intensity_std (its targets, when not "none"),
color, channels, dataset (JSON of the dataset profile), version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from defectae import __version__
from defectae.core.ragged import Ragged
from defectae.errors import DefectaeError
from defectae.files import atomic_path, open_h5
from defectae.profiles.schema import DatasetConfig

FORMAT = "defectae-prepared"
FORMAT_VERSION = 2
OLDER_VERSIONS = (1,)  # read, without original-resolution masks
SPLITS = ("train", "validation", "test")
FIELDS = ("images", "masks", "labels", "defect_types", "names", "files", "orig_sizes")
PIXEL_SETTINGS = ("image_size", "resize", "intensity", "color")  # dataset keys the pixels depend on


@dataclass
class PreparedSplit:
    """One split held in memory (used for writing, and for reading small files)."""

    images: np.ndarray  # (N, C, H, W) uint8
    masks: np.ndarray  # (N, 1, H, W) uint8 in {0, 1}
    labels: np.ndarray  # (N,) uint8
    defect_types: list[str]
    names: list[str]
    files: list[str]
    orig_sizes: np.ndarray  # (N, 2) int32
    orig_masks: list[np.ndarray] | None = None  # (H, W) {0, 1} at orig_sizes (prepare: test)

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def empty(cls, channels: int, size: tuple[int, int]) -> PreparedSplit:
        h, w = size
        return cls(
            np.zeros((0, channels, h, w), np.uint8),
            np.zeros((0, 1, h, w), np.uint8),
            np.zeros((0,), np.uint8),
            [],
            [],
            [],
            np.zeros((0, 2), np.int32),
        )


def write_prepared(
    path: str | Path, splits: dict[str, PreparedSplit], attrs: dict[str, Any]
) -> Path:
    """Write all splits atomically; `attrs` are stored as file attributes (dicts as JSON)."""
    path = Path(path)
    strings = h5py.string_dtype()
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", track_order=True) as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["version"] = __version__
            for key, value in attrs.items():
                f.attrs[key] = (
                    json.dumps(value)
                    if isinstance(value, (dict, list)) and key != "image_size"
                    else value
                )
            for name in SPLITS:
                split = splits[name]
                g = f.create_group(name)
                n = len(split)
                chunks = (1, *split.images.shape[1:]) if n else None
                g.create_dataset("images", data=split.images, chunks=chunks, track_times=False)
                g.create_dataset(
                    "masks",
                    data=split.masks,
                    chunks=(1, *split.masks.shape[1:]) if n else None,
                    compression="lzf" if n else None,
                    track_times=False,
                )
                g.create_dataset(
                    "labels", data=np.asarray(split.labels, np.uint8), track_times=False
                )
                for key in ("defect_types", "names", "files"):
                    g.create_dataset(
                        key,
                        data=np.array(getattr(split, key), dtype=object),
                        dtype=strings,
                        track_times=False,
                    )
                g.create_dataset(
                    "orig_sizes",
                    data=np.asarray(split.orig_sizes, np.int32).reshape(-1, 2),
                    track_times=False,
                )
                if split.orig_masks is not None:
                    _write_original_masks(g, split)
    return path


def _write_original_masks(g: h5py.Group, split: PreparedSplit) -> None:
    masks = split.orig_masks or []
    sizes = np.asarray(split.orig_sizes, np.int64).reshape(-1, 2)
    if len(masks) != len(sizes) or any(
        m.shape != tuple(hw) for m, hw in zip(masks, sizes.tolist(), strict=True)
    ):
        raise ValueError("orig_masks must have one mask per image, of its orig_sizes")
    packed = Ragged.from_arrays(masks, np.uint8) if masks else Ragged(np.zeros(0, np.uint8), sizes)
    total = packed.flat.size
    g.create_dataset(
        "orig_masks",
        data=packed.flat,
        chunks=(min(total, 1 << 18),) if total else None,
        compression="lzf" if total else None,
        track_times=False,
    )
    g.create_dataset("orig_mask_offsets", data=packed.offsets, track_times=False)


def open_prepared(path: str | Path, made_as: DatasetConfig | None = None) -> h5py.File:
    """Open a prepared file read-only after checking its format, version and groups; given the
    dataset settings a model trains or tests with (`made_as`), also that its pixels were made so."""
    required = [f"{split}/{key}" for split in SPLITS for key in FIELDS]
    f = open_h5(path, FORMAT, FORMAT_VERSION, "prepare", required, OLDER_VERSIONS)
    if made_as is not None:
        try:
            _check_pixels(f, path, made_as)
        except DefectaeError:
            f.close()
            raise
    return f


def _check_pixels(f: h5py.File, path: str | Path, dataset: DatasetConfig) -> None:
    """Refuse pixels prepared with other PIXEL_SETTINGS than `dataset`: every profile of a dataset
    shares one prepared.h5, so preparing for one recipe can silently change another's images.
    Root, lists and split fractions are not compared: only `prepare` reads them."""
    if int(f.attrs["channels"]) != dataset.channels:
        raise DefectaeError(
            f"{path}: images have {int(f.attrs['channels'])} channel(s), the profile expects "
            f"{dataset.channels} (dataset.color); prepare again with this profile"
        )
    recorded = json.loads(f.attrs["dataset"]) if "dataset" in f.attrs else {}
    differ = [
        key
        for key in PIXEL_SETTINGS
        if key in recorded and _plain(recorded[key]) != _plain(getattr(dataset, key))
    ]
    if differ:
        made = ", ".join(f"dataset.{k} = {_plain(recorded[k])!r}" for k in differ)
        wanted = ", ".join(f"{_plain(getattr(dataset, k))!r}" for k in differ)
        raise DefectaeError(
            f"{path}: prepared with {made}, where this profile asks for {wanted}; profiles of "
            "one dataset share its prepared.h5, so run `defectae prepare` with this profile "
            "again, or pass the file prepared for it (--prepared)"
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _strings(ds: h5py.Dataset) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in ds[()]]


def read_split(source: str | Path | h5py.File, split: str) -> PreparedSplit:
    """Load one split fully into memory (for small files and tests)."""
    own = not isinstance(source, h5py.File)
    f = open_prepared(source) if own else source
    try:
        g = f[split]
        orig = read_original_masks(f, np.arange(len(g["names"]))) if split == "test" else None
        return PreparedSplit(
            images=g["images"][()],
            masks=g["masks"][()],
            labels=g["labels"][()],
            defect_types=_strings(g["defect_types"]),
            names=_strings(g["names"]),
            files=_strings(g["files"]),
            orig_sizes=g["orig_sizes"][()],
            orig_masks=[orig[i] for i in range(len(orig))] if orig is not None else None,
        )
    finally:
        if own:
            f.close()


def read_original_masks(f: h5py.File, rows: np.ndarray) -> Ragged | None:
    """The test masks of `rows` (in that order) at their original size, {0, 1} uint8; None for
    a file written before they were stored (format 1)."""
    g = f["test"]
    if "orig_masks" not in g or "orig_mask_offsets" not in g:
        return None
    sizes = g["orig_sizes"][()].astype(np.int64).reshape(-1, 2)
    offsets = g["orig_mask_offsets"][()]
    flat = g["orig_masks"]
    expected = np.concatenate([[0], np.cumsum(sizes.prod(axis=1))])
    if not np.array_equal(offsets, expected) or flat.shape != (int(expected[-1]),):
        raise DefectaeError(
            f"{f.filename}: test/orig_masks and test/orig_mask_offsets do not match "
            "test/orig_sizes; prepare the dataset again"
        )
    return Ragged(flat[()].astype(np.uint8, copy=False), sizes).take(rows)


def intensity_targets(path: Path) -> tuple[float, float] | None:
    """The training images' (mean, std) that dataset.intensity moved every image to, as prepare
    recorded them; None for a file prepared without intensity normalisation."""
    with open_prepared(path) as f:
        if "intensity_mean" not in f.attrs:
            return None
        return float(f.attrs["intensity_mean"]), float(f.attrs["intensity_std"])


def read_strings(f: h5py.File, key: str) -> list[str]:
    """A string dataset (e.g. 'test/names') as a list of str."""
    return _strings(f[key])


def file_attr_json(f: h5py.File, key: str) -> Any:
    """A JSON-encoded file attribute (e.g. 'dataset')."""
    return json.loads(f.attrs[key])
