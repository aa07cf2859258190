"""Training-time corruptions for denoising autoencoders (batched torch, no file I/O).

Every corruption takes a batch x (B, C, P, P) float in [0, 1] and a torch.Generator and
returns (corrupted, mask), mask (B, 1, P, P) float32. The mask is EXACTLY the set of
pixels whose value changed in at least one channel: a pixel inside a painted square that
already had the painted colour is not in the mask, so a loss weighted by the mask weights
precisely the pixels the model has to repair.

Kinds (CorruptionConfig.kind):
    dominant_square  `count` squares of side `size` filled with the patch's dominant colour
                     (the histogram mode of its uint8 colours), as in the DAE of Rádli & Czúni
    random_square    squares of a uniformly random colour, one colour per square
    noise_block      squares with added Gaussian noise of sigma `noise_std` (clipped to [0, 1])
    perlin           DRAEM-style: a Perlin-noise region (min-max scaled noise > `perlin_threshold`,
                     `perlin_scale` lattice cells per side, or per patch a power of two from
                     `perlin_min_scale` up) blended with a foreign texture from `source`
                     (`defectae.data.anomaly_sources`), opacity uniform in [0.2, 1]
"""

from __future__ import annotations

import torch

from defectae.data.anomaly_sources import check_source, minmax, perlin_noise, textures
from defectae.errors import DefectaeError
from defectae.profiles.schema import CorruptionConfig

KINDS = ("dominant_square", "random_square", "noise_block", "perlin")


def _rand(shape: tuple[int, ...], g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=device)


def changed_mask(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(B, 1, P, P) float32: 1 where any channel differs."""
    return (after != before).any(dim=1, keepdim=True).to(torch.float32)


def square_regions(
    batch: int, side: int, size: int, g: torch.Generator, device: torch.device
) -> torch.Tensor:
    """(B, side, side) bool: one `size` x `size` square at a uniform random position per patch."""
    size = min(size, side)
    top = (_rand((batch,), g, device) * (side - size + 1)).long().clamp_(max=side - size)
    left = (_rand((batch,), g, device) * (side - size + 1)).long().clamp_(max=side - size)
    idx = torch.arange(side, device=device)
    rows = (idx >= top[:, None]) & (idx < top[:, None] + size)  # (B, side)
    cols = (idx >= left[:, None]) & (idx < left[:, None] + size)  # (B, side)
    return rows[:, :, None] & cols[:, None, :]


def dominant_colour(x: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, 1): the most frequent uint8 colour of each patch (ties: the smallest colour code)."""
    b, c = x.shape[:2]
    q = torch.round(x.clamp(0, 1) * 255).to(torch.int32)  # (B, C, P, P)
    code = q[:, 0]
    for ch in range(1, c):
        code = code * 256 + q[:, ch]  # r*65536 + g*256 + b fits in int32
    code = code.reshape(b, -1)  # (B, P*P)
    if c == 1:
        hist = torch.zeros((b, 256), dtype=torch.int32, device=x.device)
        hist.scatter_add_(1, code.long(), torch.ones_like(code))
        mode = torch.argmax(hist, dim=1)  # first maximum = smallest grey level
    else:
        # Too many colours for a histogram: sort, then find the longest run (the first on ties).
        codes = torch.sort(code, dim=1).values
        n = codes.shape[1]
        pos = torch.arange(n, dtype=torch.int32, device=x.device).expand(b, n)
        starts = torch.ones_like(codes, dtype=torch.bool)
        starts[:, 1:] = codes[:, 1:] != codes[:, :-1]
        run_start = torch.cummax(torch.where(starts, pos, 0), dim=1).values
        best = torch.argmax(pos - run_start, dim=1)  # end of the first longest run
        mode = codes.gather(1, best[:, None])[:, 0].long()  # (B,)
    channels = []
    for _ in range(c):
        channels.append(mode % 256)
        mode = mode // 256
    colour = torch.stack(channels[::-1], dim=1).to(x.dtype) / 255.0  # (B, C)
    return colour[:, :, None, None]


def dominant_square(
    x: torch.Tensor, size: int, count: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint `count` squares of side `size` with the patch's dominant colour."""
    b, _, p, _ = x.shape
    colour = dominant_colour(x)
    region = torch.zeros((b, p, p), dtype=torch.bool, device=x.device)
    for _ in range(count):
        region |= square_regions(b, p, size, g, x.device)
    out = torch.where(region[:, None], colour, x)
    return out, changed_mask(x, out)


def random_square(
    x: torch.Tensor, size: int, count: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint `count` squares of side `size`, each with its own random uint8 colour."""
    b, c, p, _ = x.shape
    out = x
    for _ in range(count):
        region = square_regions(b, p, size, g, x.device)
        colour = torch.floor(_rand((b, c, 1, 1), g, x.device) * 256).clamp_(max=255) / 255.0
        out = torch.where(region[:, None], colour.to(x.dtype), out)
    return out, changed_mask(x, out)


def noise_block(
    x: torch.Tensor, size: int, count: int, std: float, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add Gaussian noise of sigma `std` inside `count` squares of side `size`, clipped to [0, 1]."""
    b, _, p, _ = x.shape
    region = torch.zeros((b, p, p), dtype=torch.bool, device=x.device)
    for _ in range(count):
        region |= square_regions(b, p, size, g, x.device)
    noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype) * std
    out = torch.where(region[:, None], (x + noise).clamp(0.0, 1.0), x)
    return out, changed_mask(x, out)


def scale_exponents(min_scale: int, scale: int) -> range:
    """The powers of two (as exponents) in [min_scale, scale]: DRAEM's per-patch lattice sizes."""
    return range((min_scale - 1).bit_length(), scale.bit_length())


def perlin_region(
    batch: int, side: int, cfg: CorruptionConfig, g: torch.Generator, device: torch.device
) -> torch.Tensor:
    """(B, side, side) bool: min-max scaled Perlin noise > `perlin_threshold`; with
    `perlin_min_scale` each patch draws its cells per axis as a power of two, so the regions range
    from large blobs to small specks."""
    if not cfg.perlin_min_scale:
        noise = perlin_noise(batch, side, min(cfg.perlin_scale, side), g, device)
    else:
        exps = scale_exponents(cfg.perlin_min_scale, cfg.perlin_scale)
        draws = torch.randint(exps.start, exps.stop, (batch, 2), generator=g, device=device)
        noise = torch.cat(
            [
                perlin_noise(1, side, min(2**ey, side), g, device, cells_x=min(2**ex, side))
                for ey, ex in draws.tolist()
            ]
        )
    return minmax(noise) > cfg.perlin_threshold


def perlin(
    x: torch.Tensor, cfg: CorruptionConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """DRAEM-style anomaly: blend a foreign texture (`cfg.source`) into a thresholded Perlin region."""
    b, _, p, _ = x.shape
    region = perlin_region(b, p, cfg, g, x.device)  # (B, P, P)
    texture = textures(x, cfg, g)
    beta = _rand((b, 1, 1, 1), g, x.device).to(x.dtype) * 0.8  # share of the original kept
    blended = (beta * x + (1 - beta) * texture).clamp(0.0, 1.0)
    out = torch.where(region[:, None], blended, x)
    return out, changed_mask(x, out)


def check_corruption(cfg: CorruptionConfig | None) -> None:
    """Raise a one-line DefectaeError for settings `corrupt` cannot use, before training starts
    rather than inside a DataLoader worker."""
    if cfg is None or cfg.kind != "perlin":
        return
    if cfg.perlin_min_scale and not scale_exponents(cfg.perlin_min_scale, cfg.perlin_scale):
        raise DefectaeError(
            f"key 'corruption.perlin_min_scale': expected 0 or a value <= corruption.perlin_scale "
            f"({cfg.perlin_scale}) with a power of two between them, got {cfg.perlin_min_scale}"
        )
    check_source(cfg)


def corrupt(
    x: torch.Tensor, cfg: CorruptionConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply `cfg.kind` to each patch with probability `cfg.prob`; returns (input, mask (B, 1, P, P))."""
    if cfg.kind == "none" or cfg.prob <= 0:
        return x, torch.zeros((x.shape[0], 1, *x.shape[2:]), dtype=torch.float32, device=x.device)
    if cfg.kind == "dominant_square":
        out, mask = dominant_square(x, cfg.size, cfg.count, g)
    elif cfg.kind == "random_square":
        out, mask = random_square(x, cfg.size, cfg.count, g)
    elif cfg.kind == "noise_block":
        out, mask = noise_block(x, cfg.size, cfg.count, cfg.noise_std, g)
    elif cfg.kind == "perlin":
        out, mask = perlin(x, cfg, g)
    else:
        raise ValueError(f"unknown corruption kind {cfg.kind!r}")
    keep = _rand((x.shape[0],), g, x.device) < cfg.prob  # (B,) patches that are corrupted
    sel = keep[:, None, None, None]
    return torch.where(sel, out, x), mask * sel
