"""Per-image 2-D arrays of different sizes (test images at their original resolution), kept flat.

One flat array holds image 0's pixels row by row, then image 1's, and so on; `sizes` gives
each image's (H, W). Pixel metrics rank all pixels at once, so a flat layout costs no copy
where a list of arrays would need one concatenation per curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class Ragged:
    """N 2-D arrays of different sizes stored one after another in one flat array."""

    flat: np.ndarray  # (P,) P = sum of H * W
    sizes: np.ndarray  # (N, 2) int64 (H, W)

    def __post_init__(self) -> None:
        sizes = np.asarray(self.sizes, np.int64).reshape(-1, 2)
        object.__setattr__(self, "sizes", sizes)
        if self.flat.ndim != 1 or self.flat.size != int(sizes.prod(axis=1).sum()):
            raise ValueError(
                f"flat array of shape {self.flat.shape} does not hold {len(sizes)} images "
                f"of {int(sizes.prod(axis=1).sum())} pixels in all"
            )

    @classmethod
    def from_arrays(
        cls, arrays: Sequence[np.ndarray], dtype: np.dtype | type | None = None
    ) -> Ragged:
        """Pack 2-D arrays (one copy)."""
        sizes = np.array([a.shape for a in arrays], np.int64).reshape(-1, 2)
        if arrays and any(a.ndim != 2 for a in arrays):
            raise ValueError("expected 2-D arrays")
        flat = np.empty(
            int(sizes.prod(axis=1).sum()), dtype or (arrays[0].dtype if arrays else np.float32)
        )
        out = cls(flat, sizes)
        for i, a in enumerate(arrays):
            out[i][...] = a
        return out

    @cached_property
    def pixels(self) -> np.ndarray:
        """(N,) pixels per image."""
        return self.sizes.prod(axis=1)

    @cached_property
    def offsets(self) -> np.ndarray:
        """(N + 1,) start of each image in `flat`, and the total."""
        return np.concatenate([[0], np.cumsum(self.pixels)])

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        """Image i as a (H, W) view into `flat`."""
        start = int(self.offsets[i])
        h, w = (int(v) for v in self.sizes[i])
        return self.flat[start : start + h * w].reshape(h, w)

    def take(self, rows: np.ndarray) -> Ragged:
        """The images at `rows`, in that order (a copy, unless rows are 0..N-1)."""
        rows = np.asarray(rows, np.int64)
        if np.array_equal(rows, np.arange(len(self))):
            return self
        offsets = self.offsets
        parts = [self.flat[offsets[r] : offsets[r + 1]] for r in rows]
        flat = np.concatenate(parts) if parts else self.flat[:0].copy()
        return Ragged(flat, self.sizes[rows])

    def size_range(self) -> dict[str, list[int]]:
        """The smallest and largest height and width: {"height": [lo, hi], "width": [lo, hi]}."""
        if not len(self):
            return {"height": [0, 0], "width": [0, 0]}
        lo, hi = self.sizes.min(axis=0), self.sizes.max(axis=0)
        return {"height": [int(lo[0]), int(hi[0])], "width": [int(lo[1]), int(hi[1])]}
