"""residuals.h5, written by tile-test: the maps, and the test-time settings that made them.

Per group "test" and "validation" (validation is computed first: with tile.normalize, its
maps give the statistics, group "normalization" with mean and std, that every map is
normalised with):
    residuals (N, 1, H, W) float16, recon (N, C, H, W) uint8 (tile.save_reconstructions),
    scores (N,) float32, names, defect_types, labels, files, orig_sizes (copied from prepared.h5)
VAE families (registry `is_vae`) add group "latent" (see core.latent):
    test (N, D) float32, the latent mean of each test image (in the order of test/), and
    train (K, D) float32, of at most LATENT_FIT_IMAGES good training images of prepared.h5,
    which score fits its Gaussian on; prior_samples (S, C, P, P) uint8, decoded from S
    fixed-seed prior samples (absent when the decoder needs encoder skips); attributes
    latent_shape (the encoder's mu per tile, without the batch axis) and per_image ("whole
    image" or "mean over tiles").
File attributes: format, format_version, checkpoint, checkpoint_sha256, prepared,
prepared_sha256, dataset, category, profile, version, and tile: the JSON of the [tile]
section tile-test used. That record is the one source of the test-time settings: score
copies it into its metrics.json and export builds its inspector from it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from defectae import __version__
from defectae.errors import DefectaeError
from defectae.files import atomic_path, open_h5
from defectae.profiles import TileConfig, to_dict
from defectae.profiles.load import section_from_dict
from defectae.stores.prepared import read_strings

FORMAT = "defectae-residuals"
FORMAT_VERSION = 1
SPLITS = ("test", "validation")
COPIED = ("names", "defect_types", "labels", "files", "orig_sizes")
_FIELDS = ("residuals", "scores", "names", "defect_types", "labels")


@dataclass
class SplitWriter:
    """The preallocated datasets of one split, filled a few images at a time."""

    residuals: h5py.Dataset  # (N, 1, H, W) float16
    scores: h5py.Dataset  # (N,) float32
    recon: h5py.Dataset | None  # (N, C, H, W) uint8

    def write(self, start: int, residual: np.ndarray, score: np.ndarray, recon: np.ndarray) -> None:
        stop = start + len(score)
        self.residuals[start:stop] = residual.astype(np.float16)
        self.scores[start:stop] = score
        if self.recon is not None:
            self.recon[start:stop] = recon


@contextlib.contextmanager
def create_residuals(path: Path, tile: TileConfig, **attrs: str) -> Iterator[h5py.File]:
    """Open a new residuals.h5 for writing (atomically: renamed into place when the block ends).

    `tile` is recorded as the test-time settings; `attrs` are the provenance attributes.
    """
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["tile"] = json.dumps(to_dict(tile))
        f.attrs["version"] = __version__
        yield f


def create_split(dst: h5py.File, src: h5py.File, split: str, save_recon: bool) -> SplitWriter:
    """Copy a prepared split's labels and names into `dst` and preallocate its maps."""
    n, c, h, w = src[f"{split}/images"].shape
    g = dst.create_group(split)
    for key in COPIED:
        src.copy(src[f"{split}/{key}"], g, name=key)
    chunks = n > 0
    residuals = g.create_dataset(
        "residuals", (n, 1, h, w), np.float16, chunks=(1, 1, h, w) if chunks else None
    )
    scores = g.create_dataset("scores", (n,), np.float32)
    recon = None
    if save_recon:
        recon = g.create_dataset(
            "recon", (n, c, h, w), np.uint8, chunks=(1, c, h, w) if chunks else None
        )
    return SplitWriter(residuals, scores, recon)


def write_normalization(f: h5py.File, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Record the good-image statistics the maps were normalised with (tile.normalize)."""
    g = f.create_group("normalization")
    g["mean"] = mean.numpy().astype(np.float32)
    g["std"] = std.numpy().astype(np.float32)


LATENT_FIT_IMAGES = 500  # good training images whose codes are stored (evenly spaced)


@dataclass
class LatentCodes:
    """The latent means tile-test stored for a VAE run (group "latent")."""

    test: np.ndarray  # (N, D) float32
    train: np.ndarray  # (K, D) float32
    prior: np.ndarray | None  # (S, C, P, P) uint8
    per_image: str


def write_latent(
    f: h5py.File,
    test: np.ndarray,
    train: np.ndarray,
    prior: np.ndarray | None,
    latent_shape: tuple[int, ...],
    per_image: str,
) -> None:
    """Record a VAE's image codes (test, train) and its decoded prior samples."""
    g = f.create_group("latent")
    g["test"] = test.astype(np.float32)
    g["train"] = train.astype(np.float32)
    if prior is not None:
        g["prior_samples"] = prior.astype(np.uint8)
    g.attrs["latent_shape"] = list(latent_shape)
    g.attrs["per_image"] = per_image


def read_latent(path: str | Path, n_test: int) -> LatentCodes | None:
    """The latent codes of a residuals.h5 (None for a family that is not a VAE), checked
    against its `n_test` test images."""
    with open_residuals(path) as f:
        if "latent" not in f:
            return None
        g = f["latent"]
        test, train = g["test"][()], g["train"][()]
        if (
            test.ndim != 2
            or len(test) != n_test
            or train.ndim != 2
            or train.shape[1:] != test.shape[1:]
        ):
            raise DefectaeError(
                f"{path}: latent/test {test.shape} and latent/train {train.shape}: expected "
                f"({n_test}, D) and (K, D); run tile-test again"
            )
        if not (np.isfinite(test).all() and np.isfinite(train).all()):
            raise DefectaeError(f"{path}: latent codes contain NaN or infinite values")
        prior = g["prior_samples"][()] if "prior_samples" in g else None
        return LatentCodes(test, train, prior, str(g.attrs.get("per_image", "")))


def read_normalization(path: str | Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (mean, std) the maps of a residuals.h5 were normalised with, or None."""
    with open_residuals(path) as f:
        if "normalization" not in f:
            return None
        mean, std = f["normalization/mean"][()], f["normalization/std"][()]
        return torch.from_numpy(mean), torch.from_numpy(std)


def run_normalization(run: Path, tile: TileConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The good-image statistics tile-test normalised a run's maps with (RUN/residuals.h5), which
    an inspector built outside tile-test (export, predict) must reuse; None without normalisation."""
    if tile.normalize == "none":
        return None
    residuals = run / "residuals.h5"
    stats = read_normalization(residuals) if residuals.is_file() else None
    if stats is None:
        raise DefectaeError(
            f"{residuals}: tile.normalize is '{tile.normalize}' but no normalisation statistics "
            f"are recorded; run `defectae tile-test --run {run}` again"
        )
    return stats


@dataclass
class Residuals:
    """The test and validation maps of one tile-test run, held in memory."""

    path: Path
    attrs: dict[str, Any]
    tile: TileConfig  # the test-time settings that made the maps
    maps: np.ndarray  # (N, H, W) float16
    scores: np.ndarray  # (N,) float32
    names: list[str]
    types: list[str]
    labels: np.ndarray  # (N,) uint8
    val_maps: np.ndarray | None  # (M, H, W) float16
    has_recon: bool
    orig_sizes: np.ndarray | None = None  # (N, 2) int64 (H, W) of each test image before prepare


def open_residuals(path: str | Path) -> h5py.File:
    """residuals.h5 opened read-only after checking its format, version and datasets."""
    return open_h5(path, FORMAT, FORMAT_VERSION, "tile-test", [f"test/{k}" for k in _FIELDS])


def recorded_prepared(path: Path) -> Path | None:
    """The prepared.h5 a residuals file was made from, as tile-test recorded it; None when the
    file is missing, unreadable or records none."""
    if not path.is_file():
        return None
    with contextlib.suppress(DefectaeError, KeyError, OSError), open_residuals(path) as f:
        recorded = str(f.attrs["prepared"])
        return Path(recorded) if recorded else None
    return None


def _tile_of(f: h5py.File, path: Path) -> TileConfig:
    try:
        data = json.loads(str(f.attrs["tile"]))
    except (KeyError, json.JSONDecodeError):
        raise DefectaeError(
            f"{path}: attribute 'tile' (the test-time settings) is missing"
        ) from None
    return section_from_dict(TileConfig, "tile", data, f"{path} (tile)")


def read_tile(path: str | Path) -> TileConfig:
    """The test-time settings recorded in a residuals.h5."""
    with open_residuals(path) as f:
        return _tile_of(f, Path(path))


def read_residuals(path: str | Path) -> Residuals:
    """Read and check residuals.h5 (format, version, fields, shapes, finite values)."""
    path = Path(path)
    with open_residuals(path) as f:
        maps = f["test/residuals"]
        if maps.ndim != 4 or maps.shape[1] != 1:
            raise DefectaeError(
                f"{path}: test/residuals has shape {maps.shape}, expected (N, 1, H, W)"
            )
        n = maps.shape[0]
        if n == 0:
            raise DefectaeError(f"{path}: the test split is empty")
        for key in _FIELDS[1:]:
            if len(f[f"test/{key}"]) != n:
                raise DefectaeError(
                    f"{path}: test/{key} has {len(f[f'test/{key}'])} entries, test/residuals {n}"
                )
        test = maps[()][:, 0].astype(np.float16, copy=False)
        val = None
        if "validation/residuals" in f and len(f["validation/residuals"]):
            val = f["validation/residuals"][()][:, 0].astype(np.float16, copy=False)
            if val.shape[1:] != test.shape[1:]:
                raise DefectaeError(
                    f"{path}: validation maps are {_hw(val)}, test maps {_hw(test)}"
                )
        for key, array in (("test/residuals", test), ("validation/residuals", val)):
            if array is not None and not np.isfinite(array).all():
                raise DefectaeError(f"{path}: {key} contains NaN or infinite values")
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        return Residuals(
            path=path,
            attrs=attrs,
            tile=_tile_of(f, path),
            maps=test,
            scores=f["test/scores"][()].astype(np.float32),
            names=read_strings(f, "test/names"),
            types=read_strings(f, "test/defect_types"),
            labels=f["test/labels"][()].astype(np.uint8),
            val_maps=val,
            has_recon="test/recon" in f,
            orig_sizes=_orig_sizes(f, path, n),
        )


def _orig_sizes(f: h5py.File, path: Path, n: int) -> np.ndarray | None:
    if "test/orig_sizes" not in f:
        return None
    sizes = f["test/orig_sizes"][()].astype(np.int64)
    if sizes.shape != (n, 2) or (sizes < 1).any():
        raise DefectaeError(
            f"{path}: test/orig_sizes has shape {sizes.shape} or a size below 1, "
            f"expected ({n}, 2) heights and widths"
        )
    return sizes


def read_validation_maps(path: str | Path) -> np.ndarray | None:
    """The validation maps (M, 1, H, W) float16 of a residuals.h5, or None when it has none."""
    with open_residuals(path) as f:
        if "validation/residuals" not in f or not len(f["validation/residuals"]):
            return None
        return f["validation/residuals"][()]


def _hw(maps: np.ndarray) -> str:
    return f"{maps.shape[-2]}x{maps.shape[-1]}"
