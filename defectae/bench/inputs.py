"""The synthetic inputs bench measures on: random batches, residual-like maps, prepared and
patch files, so no dataset is needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from defectae.profiles import Profile
from defectae.stores.patches import create_patches
from defectae.stores.prepared import PreparedSplit, write_prepared


def random_batch(
    n: int, channels: int, height: int, width: int | None = None, device: Any = "cpu"
) -> torch.Tensor:
    """Uniform random inputs in [0, 1], (n, channels, height, width or height): what models see."""
    return torch.rand(n, channels, height, width or height, device=device)


def random_maps(
    n: int, side: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Residual-like float16 maps (N, side, side), masks with 1-3 elliptic regions on half of them,
    labels and defect types."""
    yy, xx = np.mgrid[0:side, 0:side]
    maps = (rng.random((n, side, side), dtype=np.float32) * 0.3).astype(np.float32)
    masks = np.zeros((n, side, side), bool)
    labels = np.arange(n) % 2 == 1
    types = []
    for i in range(n):
        types.append(("scratch", "hole")[i // 2 % 2] if labels[i] else "good")
        if not labels[i]:
            continue
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(side // 8, side - side // 8, 2)
            ry, rx = rng.integers(max(2, side // 64), max(3, side // 10), 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        maps[i][masks[i]] += rng.random(int(masks[i].sum()), dtype=np.float32) * 0.6
    return maps.astype(np.float16), masks, labels, types


def prepared_images(path: Path, profile: Profile, n_train: int, rng: np.random.Generator) -> Path:
    """A prepared.h5 of smooth random images at the profile's image size (nothing to read from disk)."""
    c, (h, w) = profile.dataset.channels, profile.dataset.image_size

    def split(n: int) -> PreparedSplit:
        small = rng.integers(0, 256, (n, c, max(1, h // 8), max(1, w // 8))).astype(np.float32)
        images = torch.nn.functional.interpolate(
            torch.from_numpy(small), size=(h, w), mode="bilinear"
        )
        images = images.add_(torch.from_numpy(rng.normal(0, 8, (n, c, h, w)).astype(np.float32)))
        return PreparedSplit(
            images.clamp_(0, 255).to(torch.uint8).numpy(),
            np.zeros((n, 1, h, w), np.uint8),
            np.zeros(n, np.uint8),
            ["good"] * n,
            [f"{i:03d}" for i in range(n)],
            [f"{i:03d}.png" for i in range(n)],
            np.full((n, 2), (h, w), np.int32),
        )

    return write_prepared(
        path,
        {"train": split(n_train), "validation": split(2), "test": PreparedSplit.empty(c, (h, w))},
        {
            "layout": "synthetic",
            "source": "bench",
            "category": "bench",
            "image_size": [h, w],
            "color": profile.dataset.color,
            "channels": c,
            "dataset": {"name": "bench"},
        },
    )


def random_patch_file(path: Path, n: int, side: int, block: int = 4096) -> Path:
    """A one-channel patch file of `n` random side x side training patches, written in blocks."""
    shape = (1, side, side)
    rng = np.random.default_rng(0)
    with create_patches(path, n, 1, 1, side, {"seed": 0, "source": "bench"}) as f:
        for start in range(0, n, block):
            stop = min(n, start + block)
            f["train/patches"][start:stop] = rng.integers(
                0, 256, (stop - start, *shape), dtype=np.uint8
            )
        f["validation/patches"][:] = rng.integers(0, 256, (1, *shape), dtype=np.uint8)
    return path
