"""Patch sampling from a prepared file into a patch file: planned up front, made in blocks.

Every sample is planned first (its source image and its row in the shuffled output), then
made in blocks of whole chunks, so memory stays bounded by one block and one source image
however many patches are asked for, and the result depends only on the seed. Used by
`augment` and timed by `bench`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from defectae import console
from defectae.data.augmentations import (
    SPLIT_STREAMS,
    fitting_angle,
    sample_patch,
    sample_rng,
    spread_over_images,
)
from defectae.data.intensity_report import compare_levels, level_counts
from defectae.errors import DefectaeError
from defectae.files import sha256_file
from defectae.profiles import Profile, to_dict
from defectae.profiles.schema import AugmentConfig
from defectae.stores.patches import chunk_rows, create_patches, write_attrs
from defectae.stores.prepared import open_prepared

BLOCK_BYTES = 32 << 20  # patches made and written per block


@dataclass(frozen=True)
class SamplingPlan:
    """Which image each sample comes from and which sample goes to each output row."""

    split: str
    images: np.ndarray  # (n,) source image index of sample k
    order: np.ndarray  # (n,) sample index written to output row r

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class PatchJob:
    """Both splits' plans and the patch shape, decided before any patch is made."""

    train: SamplingPlan
    validation: SamplingPlan
    channels: int
    size: int

    def __len__(self) -> int:
        return len(self.train) + len(self.validation)


def make_plan(split: str, n_samples: int, n_images: int, seed: int) -> SamplingPlan:
    """Spread `n_samples` evenly over `n_images` (remainder at random) and shuffle their order."""
    if n_samples == 0:
        empty = np.zeros(0, np.int64)
        return SamplingPlan(split, empty, empty)
    # A stream distinct from every per-sample generator ([seed, 0 or 1, index]).
    rng = np.random.default_rng([seed, 2 + SPLIT_STREAMS[split]])
    images = spread_over_images(n_samples, n_images, rng)
    return SamplingPlan(split, images, rng.permutation(n_samples))


def check_patch_size(profile: Profile, image_hw: tuple[int, int], source: Path) -> int:
    """The patch side: model.input_size, checked against the prepared image size."""
    size = profile.model.input_size
    h, w = image_hw
    if profile.augment.whole_image:
        if (h, w) != (size, size):
            raise DefectaeError(
                f"model.input_size: {size} does not match the image size {h}x{w} in {source}; "
                f"augment.whole_image needs square images of side model.input_size"
            )
    elif size > min(h, w):
        raise DefectaeError(
            f"model.input_size: patch size {size} is larger than the images ({h}x{w}) in {source}; "
            f"lower model.input_size or raise dataset.image_size"
        )
    return size


def _warn_settings(cfg: AugmentConfig, image_hw: tuple[int, int], size: int) -> None:
    rotating = cfg.rotation_prob > 0 and cfg.max_angle > 0
    if cfg.whole_image and rotating:
        console.warn(
            "augment.rotation_prob is ignored with augment.whole_image (a rotated image would need padding)"
        )
    elif rotating:
        h, w = image_hw
        angles = np.linspace(0.0, cfg.max_angle, 181)
        worst = min(angles, key=lambda a: fitting_angle(h, w, size, a) - a)
        if fitting_angle(h, w, size, worst) < worst:
            console.warn(
                f"augment.max_angle: a {size}px patch does not fit {h}x{w} images rotated by {worst:.1f} deg; "
                f"such samples are rotated less so that no padding enters a patch"
            )


def plan_patches(profile: Profile, prepared: Path) -> PatchJob:
    """Check the prepared file against the profile and plan every sample of both splits."""
    cfg = profile.augment
    with open_prepared(prepared, profile.dataset) as f:
        train_images, val_images = f["train/images"], f["validation/images"]
        _, channels, h, w = train_images.shape
        size = check_patch_size(profile, (h, w), prepared)
        if len(train_images) == 0:
            raise DefectaeError(
                f"{prepared}: the train split has no images; check dataset.root and prepare again"
            )
        n_val = cfg.n_val_patches
        if n_val > 0 and len(val_images) == 0:
            raise DefectaeError(
                f"{prepared}: the validation split has no images but augment.n_val_patches = {n_val}; "
                f"raise dataset.val_fraction and run `defectae prepare` again"
            )
        if cfg.whole_image:
            n_val = min(n_val, len(val_images))  # unaugmented whole images: each at most once
        _warn_settings(cfg, (h, w), size)
        return PatchJob(
            make_plan("train", cfg.n_patches, len(train_images), cfg.seed),
            make_plan("validation", n_val, len(val_images), cfg.seed),
            channels,
            size,
        )


def make_patches(
    profile: Profile,
    job: PatchJob,
    prepared: Path,
    out: Path,
    advance: Callable[[int], None] = lambda n: None,
) -> dict[str, Any]:
    """Make the planned patches into the patch file `out` (atomic); `advance(n)` after each n.

    Returns how the training patches' intensities compare with the training images'
    (`compare_levels`), also stored as the file attribute "intensity".
    """
    cfg = profile.augment
    reflect_pad = 0 if cfg.whole_image else cfg.reflect_pad
    patch_bytes = job.channels * job.size * job.size
    chunk = chunk_rows(cfg.chunk_patches, max(cfg.n_patches, 1), patch_bytes)
    block = chunk * max(1, BLOCK_BYTES // (patch_bytes * chunk))
    sections = to_dict(profile)
    attrs = {
        "seed": cfg.seed,
        "source": str(prepared),
        "source_sha256": sha256_file(prepared),
        "augment": sections["augment"],
        "corruption": sections["corruption"],
        "profile": profile.name,
    }
    with (
        open_prepared(prepared, profile.dataset) as f,
        create_patches(
            out,
            len(job.train),
            len(job.validation),
            job.channels,
            job.size,
            attrs,
            cfg.chunk_patches,
            cfg.compression,
        ) as pf,
    ):
        patches = write_split(
            f["train/images"],
            pf["train/patches"],
            job.train,
            cfg,
            cfg.seed,
            block,
            advance,
            cfg.sampling,
            reflect_pad,
        )
        write_split(
            f["validation/images"],
            pf["validation/patches"],
            job.validation,
            None,
            cfg.seed,
            block,
            advance,
            cfg.sampling,
            reflect_pad,
        )
        report = compare_levels(patches, image_levels(f["train/images"]))
        write_attrs(pf, {"intensity": report})
    return report


def write_split(
    images: h5py.Dataset,
    out: h5py.Dataset,
    plan: SamplingPlan,
    cfg: AugmentConfig | None,
    seed: int,
    block: int,
    advance: Callable[[int], None],
    sampling: str = "even",
    reflect_pad: int = 0,
) -> np.ndarray:
    """Make the planned patches block by block; each source image is read once per block.

    With `reflect_pad` each image is reflect-padded first (at most to one less than its side,
    as numpy allows). Returns the `level_counts` of all the patches written.
    """
    _, c, size, _ = out.shape
    counts = np.zeros(256, np.int64)
    for start in range(0, len(plan), block):
        samples = plan.order[start : start + block]  # sample index of each row in this block
        sources = plan.images[samples]
        buf = np.empty((len(samples), c, size, size), np.uint8)  # (block, C, P, P)
        by_image = np.argsort(sources, kind="stable")
        bounds = np.flatnonzero(np.diff(sources[by_image])) + 1
        for rows in np.split(by_image, bounds):
            image = images[int(sources[rows[0]])]  # (C, H, W), one chunk read
            if reflect_pad > 0:
                pad = min(reflect_pad, image.shape[1] - 1, image.shape[2] - 1)
                image = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
            for row in rows:
                buf[row] = sample_patch(
                    image, size, cfg, sample_rng(seed, plan.split, int(samples[row])), sampling
                )
            advance(len(rows))
        out[start : start + len(samples)] = buf
        counts += level_counts(buf)
    return counts


def image_levels(images: h5py.Dataset) -> np.ndarray:
    """The `level_counts` of every pixel of a (N, C, H, W) image dataset, read in blocks."""
    counts = np.zeros(256, np.int64)
    rows = max(1, BLOCK_BYTES // max(int(np.prod(images.shape[1:])), 1))
    for start in range(0, len(images), rows):
        counts += level_counts(images[start : start + rows])
    return counts
