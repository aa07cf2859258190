"""The patch HDF5 file written by `augment` and read by `train`, and `PatchDataset` over it.

Layout:
    train/patches       (N, C, P, P) uint8, chunked (chunk, C, P, P), stored in shuffled order
    validation/patches  (M, C, P, P) uint8
File attributes: format, format_version, patch_size, channels, seed, source, source_sha256,
augment (JSON), corruption (JSON, informational), intensity (JSON: the training patches'
luminance histogram against the training images', `defectae.data.intensity_report`), version.
No timestamps anywhere, so the same inputs and seed give a byte-identical file.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from defectae import __version__
from defectae.data.corruptions import check_corruption, corrupt
from defectae.errors import DefectaeError
from defectae.files import atomic_path, open_h5
from defectae.profiles.schema import CorruptionConfig

FORMAT = "defectae-patches"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
MAX_CHUNK_BYTES = 16 << 20  # a chunk is the unit of reading and decompressing; keep it modest


def chunk_rows(requested: int, n: int, patch_bytes: int) -> int:
    """Patches per chunk: as requested, but at most `n` and at most MAX_CHUNK_BYTES per chunk."""
    return max(1, min(requested, n, MAX_CHUNK_BYTES // max(patch_bytes, 1)))


@contextlib.contextmanager
def create_patches(
    path: str | Path,
    n_train: int,
    n_validation: int,
    channels: int,
    patch_size: int,
    attrs: dict[str, Any],
    chunk_patches: int = 64,
    compression: str = "none",
) -> Iterator[h5py.File]:
    """Create a patch file with preallocated datasets for the caller to fill; atomic.

    Yields the open file: write rows into f["train/patches"] and f["validation/patches"].
    The file appears at `path` only if the block completes (Ctrl-C leaves nothing).
    `attrs` are stored as file attributes (dicts and lists as JSON).
    """
    shape = (channels, patch_size, patch_size)
    patch_bytes = int(np.prod(shape))
    comp = None if compression == "none" else compression
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", track_order=True) as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["patch_size"] = patch_size
            f.attrs["channels"] = channels
            f.attrs["version"] = __version__
            write_attrs(f, attrs)
            for split, n in (("train", n_train), ("validation", n_validation)):
                group = f.create_group(split, track_order=True)
                if n == 0:
                    group.create_dataset(
                        "patches", shape=(0, *shape), dtype=np.uint8, track_times=False
                    )
                    continue
                rows = chunk_rows(chunk_patches, n, patch_bytes)
                group.create_dataset(
                    "patches",
                    shape=(n, *shape),
                    dtype=np.uint8,
                    chunks=(rows, *shape),
                    compression=comp,
                    track_times=False,
                    fillvalue=0,
                )
            yield f


def write_attrs(f: h5py.File, attrs: dict[str, Any]) -> None:
    """Store `attrs` as file attributes of an open patch file, dicts and lists as JSON."""
    for key, value in attrs.items():
        f.attrs[key] = (
            json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
        )


def write_patches(
    path: str | Path,
    train: np.ndarray,
    validation: np.ndarray,
    attrs: dict[str, Any],
    chunk_patches: int = 64,
    compression: str = "none",
) -> Path:
    """Write in-memory (N, C, P, P) uint8 arrays as a patch file (small files, tests, benchmarks)."""
    _, c, p, _ = train.shape
    with create_patches(
        path, len(train), len(validation), c, p, attrs, chunk_patches, compression
    ) as f:
        if len(train):
            f["train/patches"][...] = train
        if len(validation):
            f["validation/patches"][...] = validation
    return Path(path)


def open_patches(path: str | Path) -> h5py.File:
    """Open a patch file read-only after checking its format, version and datasets."""
    f = open_h5(path, FORMAT, FORMAT_VERSION, "augment", [f"{split}/patches" for split in SPLITS])
    try:
        size, channels = int(f.attrs["patch_size"]), int(f.attrs["channels"])
        for split in SPLITS:
            key = f"{split}/patches"
            if f[key].dtype != np.uint8 or f[key].shape[1:] != (channels, size, size):
                raise DefectaeError(
                    f"{path}: dataset '{key}' has shape {f[key].shape} {f[key].dtype}, expected "
                    f"(N, {channels}, {size}, {size}) uint8"
                )
    except BaseException:
        f.close()
        raise
    return f


def fix_malloc_threshold(threshold: int = 1 << 20) -> bool:
    """Serve allocations >= `threshold` bytes by mmap in this process (glibc only; False elsewhere).

    glibc raises its mmap threshold each time a large block is freed, after which multi-MB
    batch buffers come from the heap and are kept: a DataLoader worker then grows by the size
    of a batch every few batches (hundreds of MB per epoch). A fixed threshold stops that.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3
    return bool(libc.mallopt(m_mmap_threshold, threshold))


def corruption_seed(seed: int, epoch: int, index: int) -> int:
    """The torch seed of batch `index` in `epoch`: reproducible and independent per batch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0])


def clean_batch(clean: torch.Tensor) -> dict[str, torch.Tensor]:
    """An uncorrupted batch as `PatchDataset` gives it: "input" is "clean", "mask" all zeros."""
    mask = torch.zeros(
        (clean.shape[0], 1, *clean.shape[2:]), dtype=torch.float32, device=clean.device
    )
    return {"clean": clean, "input": clean, "mask": mask}


class PatchDataset(Dataset):
    """Item i is the i-th batch of a split: rows [i*B, (i+1)*B) read as one slice (the last one short).

    Returns {"clean": (B, C, P, P) float32 in [0, 1], "input": corrupted or the same tensor as
    "clean", "mask": (B, 1, P, P) float32, 1 where corrupted}. Use with
    DataLoader(ds, batch_size=None, shuffle=True, num_workers=k). The file is opened lazily in
    each process (h5py handles are not picklable) and only the requested rows are read.
    Corruption is seeded by (seed, epoch, i): call set_epoch before creating an epoch's
    iterator (with non-persistent workers each epoch's workers get the new epoch).
    """

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        batch_size: int = 128,
        corruption: CorruptionConfig | None = None,
        seed: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if batch_size < 1:
            raise DefectaeError(f"train.batch_size: expected >= 1, got {batch_size}")
        check_corruption(corruption)
        self.path = Path(path)
        self.split = split
        self.batch_size = batch_size
        self.corruption = (
            corruption if corruption is not None and corruption.kind != "none" else None
        )
        self.seed = seed
        self.epoch = 0
        with open_patches(self.path) as f:
            self.patch_size = int(f.attrs["patch_size"])
            self.channels = int(f.attrs["channels"])
            patches = f[f"{split}/patches"]
            self.num_patches = int(patches.shape[0])
            chunk = patches.chunks or patches.shape
            # Room for the two chunks a batch boundary may share; batches are contiguous row slices.
            self._cache_bytes = max(1 << 20, 2 * int(np.prod(chunk)))
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return (self.num_patches + self.batch_size - 1) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Reseed the corruptions for `epoch` (call before iterating over the epoch)."""
        self.epoch = epoch

    def _patches(self) -> h5py.Dataset:
        # Open once per process; a handle inherited through fork is not safe to use.
        if self._file is None or self._pid != os.getpid():
            if get_worker_info() is not None:
                fix_malloc_threshold()
            self._file = h5py.File(self.path, "r", rdcc_nbytes=self._cache_bytes)
            self._pid = os.getpid()
        return self._file[f"{self.split}/patches"]

    def read(self, index: int) -> np.ndarray:
        """The uint8 rows of batch `index`, (B, C, P, P)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.batch_size
        return self._patches()[start : min(start + self.batch_size, self.num_patches)]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        clean = torch.from_numpy(self.read(index)).to(torch.float32).div_(255.0)
        if self.corruption is None:
            return clean_batch(clean)
        g = torch.Generator().manual_seed(corruption_seed(self.seed, self.epoch, index))
        corrupted, mask = corrupt(clean, self.corruption, g)
        return {"clean": clean, "input": corrupted, "mask": mask}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state

    def close(self) -> None:
        """Close this process's file handle (reopened on the next read)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
