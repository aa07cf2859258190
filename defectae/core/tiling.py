"""Sliding-window tiling: cut images into overlapping square patches and fuse patches back.

Tile origins along an axis are 0, stride, 2*stride, ... plus a final origin length - size, so the
right and bottom borders are covered. The patches of one image are ordered row-major over the
(rows, columns) grid of origins. Origins come from Python ints taken from shapes, so both
functions trace (TorchScript) and export (ONNX, dynamo exporter) for a fixed image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from defectae.errors import DefectaeError


def tile_origins(length: int, size: int, stride: int) -> list[int]:
    """Start positions of the tiles along one axis; the last one is always length - size."""
    if size < 1:
        raise DefectaeError(f"model.input_size {size}: expected a positive patch size")
    if stride < 1:
        raise DefectaeError(f"tile.stride {stride}: expected a positive stride")
    if size > length:
        raise DefectaeError(
            f"model.input_size {size}: the patch is larger than the image side {length}"
        )
    if stride > size:
        raise DefectaeError(
            f"tile.stride {stride}: larger than the patch size {size}, which leaves pixels uncovered"
        )
    origins = list(range(0, length - size + 1, stride))
    if origins[-1] != length - size:
        origins.append(length - size)
    return origins


def _regular(length: int, size: int, stride: int) -> int:
    """How many origins form the regular grid 0, stride, ... (the rest is the border tile)."""
    return (length - size) // stride + 1


def _tiles(img: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """All tiles as (B, C, rows, cols, size, size): unfold views of the regular grid plus the border."""
    h, w = int(img.shape[2]), int(img.shape[3])
    nh, nw = len(tile_origins(h, size, stride)), len(tile_origins(w, size, stride))
    rows = img.unfold(2, size, stride)  # (B, C, regular rows, W, size)
    if nh > _regular(h, size, stride):
        rows = torch.cat([rows, img[:, :, -size:].unfold(2, size, size)], 2)
    tiles = rows.unfold(3, size, stride)  # (B, C, rows, regular cols, size, size)
    if nw > _regular(w, size, stride):
        tiles = torch.cat([tiles, rows[:, :, :, -size:].unfold(3, size, size)], 3)
    return tiles


def extract_patches(img: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """All tiles of a batch of images: (B, C, H, W) -> (B * N, C, size, size), image-major."""
    c = int(img.shape[1])
    return _tiles(img, size, stride).permute(0, 2, 3, 1, 4, 5).reshape(-1, c, size, size)


def _axis_index(
    length: int, size: int, stride: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel along one axis: one tile covering it, and the pixel's offset inside that tile.

    Tile i answers for [origin[i], origin[i + 1]); the last tile for the rest (it ends at length).
    """
    start = torch.tensor(tile_origins(length, size, stride), device=device)
    pixel = torch.arange(length, device=device)
    tile = (pixel[:, None] >= start[None, :]).sum(
        1
    ) - 1  # (length,) last tile starting at or before
    return tile, pixel - start[tile]


def _axis_count(length: int, size: int, stride: int, device: torch.device) -> torch.Tensor:
    """How many tiles cover each pixel along one axis: (length,) float."""
    start = torch.tensor(tile_origins(length, size, stride), device=device)
    pixel = torch.arange(length, device=device)[:, None]
    return ((pixel >= start[None, :]) & (pixel < start[None, :] + size)).sum(1).float()


def _overlap_add(
    patches: torch.Tensor, image_hw: tuple[int, int], size: int, stride: int
) -> torch.Tensor:
    """Sum (B * N, C, size, size) tiles onto (B, C, H, W) with one fold per regular sub-grid.

    The border row/column of tiles breaks the regular grid, so the regular block, the border
    column, the border row and the corner are folded separately and padded into place.
    """
    h, w = image_hw
    c = int(patches.shape[1])
    nh, nw = len(tile_origins(h, size, stride)), len(tile_origins(w, size, stride))
    rh, rw = _regular(h, size, stride), _regular(w, size, stride)
    tiles = patches.reshape(-1, nh, nw, c, size, size)
    total = None
    for r0, nr, sr in ((0, rh, stride), (rh, nh - rh, 1)):
        for c0, nc, sc in ((0, rw, stride), (rw, nw - rw, 1)):
            if nr == 0 or nc == 0:
                continue
            block = tiles[:, r0 : r0 + nr, c0 : c0 + nc]  # (B, nr, nc, C, size, size)
            block = block.permute(0, 3, 4, 5, 1, 2).reshape(-1, c * size * size, nr * nc)
            oh, ow = (nr - 1) * sr + size, (nc - 1) * sc + size
            y0, x0 = (0 if r0 == 0 else h - size), (0 if c0 == 0 else w - size)
            summed = F.fold(block, (oh, ow), size, stride=(sr, sc))  # (B, C, oh, ow)
            summed = F.pad(summed, (x0, w - x0 - ow, y0, h - y0 - oh))
            total = summed if total is None else total + summed
    assert total is not None
    return total


FUSIONS = ("gaussian", "uniform")


def fusion_window(
    size: int, fusion: str = "gaussian", device: torch.device | None = None
) -> torch.Tensor:
    """The (size, size) weight of each tile pixel in the fusion: 1 everywhere ("uniform"), or a
    Gaussian of sigma size/8 around the tile centre ("gaussian", as MONAI's sliding-window
    inference), so that a model's patch-edge errors count less where a more central tile
    covers the same pixel. Border pixels covered by edge tiles only still get their value."""
    if fusion == "uniform":
        return torch.ones(size, size, device=device)
    if fusion != "gaussian":
        raise DefectaeError(f"tile.fusion '{fusion}': expected one of {', '.join(FUSIONS)}")
    centre = (size - 1) / 2.0
    axis = torch.exp(-0.5 * ((torch.arange(size, device=device) - centre) / (size / 8.0)) ** 2)
    return axis[:, None] * axis[None, :]


def fuse_patches(
    patches: torch.Tensor,
    image_hw: tuple[int, int],
    size: int,
    stride: int,
    window: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of `extract_patches`: (B * N, C, size, size) -> (B, C, H, W), overlaps averaged,
    each tile pixel weighted by `window` (size, size) (None: all equal).

    Averages the deviations from one covering tile (reference + fold(w * deviation) / fold(w)):
    the weighted mean, better conditioned, and identical overlapping tiles come back exactly
    (a float32 sum of k copies divided by k is not always the copy).
    """
    h, w = image_hw
    c, dev = int(patches.shape[1]), patches.device
    nh, nw = len(tile_origins(h, size, stride)), len(tile_origins(w, size, stride))
    th, oy = _axis_index(h, size, stride, dev)
    tw, ox = _axis_index(w, size, stride, dev)
    tile = (th[:, None] * nw + tw[None, :]).reshape(-1)  # (H * W,) tile answering for each pixel
    offset = (oy[:, None] * size + ox[None, :]).reshape(-1)  # (H * W,) position inside that tile
    flat = patches.reshape(-1, nh * nw, c, size * size)
    ref = flat[:, tile, :, offset].permute(1, 2, 0).reshape(-1, c, h, w)  # (B, C, H, W)
    deviation = patches - extract_patches(ref, size, stride)
    if window is None:
        count = (
            _axis_count(h, size, stride, dev)[:, None] * _axis_count(w, size, stride, dev)[None, :]
        )
        return ref + _overlap_add(deviation, (h, w), size, stride) / count.to(patches.dtype)
    weight = window.to(patches.dtype)[None, None]  # (1, 1, size, size)
    total = _overlap_add(
        weight.expand(nh * nw, 1, size, size), (h, w), size, stride
    )  # (1, 1, H, W)
    return ref + _overlap_add(deviation * weight, (h, w), size, stride) / total
