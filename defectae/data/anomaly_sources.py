"""Foreign textures for DRAEM-style anomalies (batched torch, everything drawn from a torch.Generator).

`textures(x, cfg, g)` gives one (B, C, P, P) texture in [0, 1] per patch of x, from `cfg.source`
(CorruptionConfig.source):
    fractal     fractal Perlin noise between two random colours, nothing else (the default,
                the texture of earlier versions)
    procedural  per patch one of PATTERNS (fractal Perlin, oriented stripes, a rotated checker,
                speckles, a flat colour) between two random colours
    images      another patch of the same batch, rotated by k * 90 degrees, maybe mirrored,
                colour-jittered
    folder      a random image of `cfg.anomaly_source_dir` (e.g. DTD), random-resized-cropped
    mixed       per patch one of procedural, images and (when anomaly_source_dir is set) folder
Every source but fractal then gets DRAEM's source augmentation: 3 of AUGMENTS per patch.
The Perlin noise that both the fractal texture and the anomaly regions are made of lives here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from defectae.data.images import read_image
from defectae.data.split import IMAGE_EXTS, image_files
from defectae.errors import DefectaeError
from defectae.profiles.schema import CorruptionConfig

SOURCES = ("fractal", "procedural", "images", "folder", "mixed")
PATTERNS = ("fractal", "stripes", "checker", "speckles", "flat")
AUGMENTS = ("gamma", "multiply", "add", "invert", "solarize", "posterize", "contrast", "rotate90")
AUGMENTS_PER_TEXTURE = 3
DIR_KEY = "corruption.anomaly_source_dir"

Pattern = Callable[[int, int, torch.Generator, torch.device], torch.Tensor]


def _rand(shape: tuple[int, ...], g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=device)


def _uniform(
    shape: tuple[int, ...], lo: float, hi: float, g: torch.Generator, device: torch.device
) -> torch.Tensor:
    return lo + (hi - lo) * _rand(shape, g, device)


def _randint(
    lo: int, hi: int, shape: tuple[int, ...], g: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Integers uniform in [lo, hi)."""
    return torch.randint(lo, hi, shape, generator=g, device=device)


# ----------------------------------------------------------------------------- Perlin noise


def _lattice_weights(
    side: int, cells: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(side, cells+1) interpolation weights of each pixel on its two lattice lines, and the same
    weights times the pixel's offset from each line (Perlin's dot product, one axis at a time)."""
    coord = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) * (cells / side)
    cell = coord.floor().long().clamp_(max=cells - 1)
    frac = coord - cell  # (side,) position inside the cell
    fade = frac * frac * frac * (frac * (frac * 6 - 15) + 10)
    near = torch.nn.functional.one_hot(cell, cells + 1).to(torch.float32)
    far = torch.nn.functional.one_hot(cell + 1, cells + 1).to(torch.float32)
    weight = near * (1 - fade)[:, None] + far * fade[:, None]
    offset = near * ((1 - fade) * frac)[:, None] + far * (fade * (frac - 1))[:, None]
    return weight, offset


def perlin_noise(
    batch: int,
    side: int,
    cells: int,
    g: torch.Generator,
    device: torch.device,
    cells_x: int | None = None,
) -> torch.Tensor:
    """(B, side, side) gradient (Perlin) noise with `cells` lattice cells per side, values about [-1, 1].

    `cells_x`: other cells along x (columns) than along y (rows); None = `cells`.
    Interpolation is separable, so the noise is two small matrix products per patch:
    rows(weight) @ grad_x @ cols(offset)^T + rows(offset) @ grad_y @ cols(weight)^T.
    """
    cells_x = cells if cells_x is None else cells_x
    angles = _rand((batch, cells + 1, cells_x + 1), g, device) * (2 * math.pi)
    grad_x, grad_y = torch.cos(angles), torch.sin(angles)  # (B, cells+1, cells_x+1) gradients
    weight_y, offset_y = _lattice_weights(side, cells, device)  # (side, cells+1) each
    weight_x, offset_x = (
        (weight_y, offset_y) if cells_x == cells else _lattice_weights(side, cells_x, device)
    )
    noise = weight_y @ grad_x @ offset_x.T + offset_y @ grad_y @ weight_x.T  # (B, side, side)
    return noise * math.sqrt(2)


def minmax(t: torch.Tensor) -> torch.Tensor:
    """Each (side, side) map of a (B, side, side) batch scaled to [0, 1]."""
    flat = t.flatten(1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    return (t - lo[:, None, None]) / (hi - lo).clamp_min(1e-12)[:, None, None]


# ----------------------------------------------------------------------------- procedural


def _grid(side: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, side, side) pixel-centre row and column coordinates."""
    idx = torch.arange(side, device=device, dtype=torch.float32) + 0.5
    return idx[None, None, :, None], idx[None, None, None, :]


def _rotated(
    n: int, side: int, max_angle: float, g: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, side, side) pixel coordinates along and across a random direction in [0, max_angle)."""
    theta = _uniform((n, 1, 1, 1), 0.0, max_angle, g, device)
    rows, cols = _grid(side, device)
    cos, sin = torch.cos(theta), torch.sin(theta)
    return cols * cos + rows * sin, rows * cos - cols * sin


def _log_uniform(
    shape: tuple[int, ...], lo: float, hi: float, g: torch.Generator, device: torch.device
) -> torch.Tensor:
    return torch.exp(_uniform(shape, math.log(lo), math.log(hi), g, device))


def fractal_pattern(n: int, side: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n, 1, side, side) fractal Perlin noise (3 octaves) scaled to [0, 1]."""
    field = torch.zeros((n, side, side), device=device)
    for octave in range(3):
        cells = min(side, 2 ** (octave + 2))
        field += perlin_noise(n, side, cells, g, device) / 2**octave
    return minmax(field)[:, None]


def stripes_pattern(n: int, side: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n, 1, side, side) stripes: a sinusoid (or its sign) at a random angle, frequency and phase."""
    along, _ = _rotated(n, side, math.pi, g, device)
    cycles = _log_uniform((n, 1, 1, 1), 1.5, max(2.0, side / 4), g, device)
    phase = _uniform((n, 1, 1, 1), 0.0, 2 * math.pi, g, device)
    wave = torch.sin(along * (2 * math.pi / side) * cycles + phase)
    hard = _rand((n, 1, 1, 1), g, device) < 0.5
    return torch.where(hard, (wave > 0).to(wave.dtype), 0.5 + 0.5 * wave)


def checker_pattern(n: int, side: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n, 1, side, side) a checkerboard of random cell size, angle and offset."""
    along, across = _rotated(n, side, math.pi / 2, g, device)
    cell = _log_uniform((n, 1, 1, 1), 2.0, max(3.0, side / 3), g, device)
    shift = _uniform((n, 2, 1, 1), 0.0, 1.0, g, device) * cell
    parity = torch.floor((along + shift[:, :1]) / cell) + torch.floor(
        (across + shift[:, 1:]) / cell
    )
    return torch.remainder(parity, 2)


def speckles_pattern(n: int, side: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n, 1, side, side) sparse dots of radius 0 to 2 pixels on a flat background."""
    density = _log_uniform((n, 1, 1, 1), 0.003, 0.05, g, device)
    seeds = (_rand((n, 1, side, side), g, device) < density).to(torch.float32)
    radius = _randint(0, 3, (n,), g, device)
    out = seeds.clone()
    for r in (1, 2):
        rows = (radius == r).nonzero(as_tuple=True)[0]
        if len(rows):
            out[rows] = F.max_pool2d(seeds[rows], 2 * r + 1, stride=1, padding=r)
    return out


def flat_pattern(n: int, side: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n, 1, side, side) zeros: the texture is the first of its two colours."""
    return torch.zeros((n, 1, side, side), device=device)


_PATTERNS: dict[str, Pattern] = {
    "fractal": fractal_pattern,
    "stripes": stripes_pattern,
    "checker": checker_pattern,
    "speckles": speckles_pattern,
    "flat": flat_pattern,
}


def _two_colours(t: torch.Tensor, channels: int, g: torch.Generator) -> torch.Tensor:
    """(n, C, side, side): a (n, 1, side, side) pattern in [0, 1] mapped between two random colours."""
    a = _rand((t.shape[0], channels, 1, 1), g, t.device)
    b = _rand((t.shape[0], channels, 1, 1), g, t.device)
    return a + (b - a) * t


def fractal_texture(
    batch: int, channels: int, side: int, g: torch.Generator, device: torch.device
) -> torch.Tensor:
    """(B, C, side, side) in [0, 1]: fractal Perlin noise (3 octaves) between two random colours."""
    return _two_colours(fractal_pattern(batch, side, g, device), channels, g)


def procedural_textures(
    n: int, channels: int, side: int, g: torch.Generator, device: torch.device
) -> torch.Tensor:
    """(n, C, side, side) in [0, 1]: per patch one of PATTERNS, drawn uniformly, in two colours."""
    kind = _randint(0, len(PATTERNS), (n,), g, device)
    out = torch.empty((n, channels, side, side), device=device)
    for k, name in enumerate(PATTERNS):
        rows = (kind == k).nonzero(as_tuple=True)[0]
        if len(rows):
            out[rows] = _two_colours(_PATTERNS[name](len(rows), side, g, device), channels, g)
    return out


# ----------------------------------------------------------------------------- images


def _rotate_flip(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each square patch rotated by a random multiple of 90 degrees and mirrored with p = 0.5."""
    n = t.shape[0]
    mirror = (_rand((n,), g, t.device) < 0.5)[:, None, None, None]
    t = torch.where(mirror, t.flip(-1), t)
    return _turned(t, _randint(0, 4, (n,), g, t.device))


def _turned(t: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Each square patch t[i] rotated by turns[i] * 90 degrees."""
    out = t.clone()
    for k in (1, 2, 3):
        rows = (turns == k).nonzero(as_tuple=True)[0]
        if len(rows):
            out[rows] = torch.rot90(t[rows], k, dims=(-2, -1))
    return out


def _jitter(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random saturation (colour only), contrast, brightness and per-channel gain, in [0, 1]."""
    n, c = t.shape[:2]
    if c > 1:
        grey = t.mean(dim=1, keepdim=True)
        t = grey + (t - grey) * _uniform((n, 1, 1, 1), 0.5, 1.5, g, t.device)
    mean = t.mean(dim=(1, 2, 3), keepdim=True)
    t = mean + (t - mean) * _uniform((n, 1, 1, 1), 0.7, 1.3, g, t.device)
    gain = _uniform((n, 1, 1, 1), 0.7, 1.3, g, t.device) * _uniform(
        (n, c, 1, 1), 0.9, 1.1, g, t.device
    )
    return (t * gain).clamp(0.0, 1.0)


def image_textures(
    x: torch.Tensor, g: torch.Generator, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Other patches of the batch x (rolled by 1..B-1, so no patch gets itself unless B = 1),
    rotated, mirrored and colour-jittered; `rows`: only for these patches of x."""
    b = x.shape[0]
    shift = int(_randint(1, b, (1,), g, x.device)) if b > 1 else 0
    donors = x.roll(shift, dims=0)
    donors = donors if rows is None else donors[rows]
    return _jitter(_rotate_flip(donors.to(torch.float32), g), g)


# ----------------------------------------------------------------------------- folder


@functools.lru_cache(maxsize=8)
def source_files(folder: str) -> tuple[Path, ...]:
    """The images under `folder` (recursive, sorted), listed once per process."""
    path = Path(folder)
    if not path.is_dir():
        raise DefectaeError(
            f"key '{DIR_KEY}': expected a folder of images, got '{folder}' (not found)"
        )
    files = tuple(image_files(path, IMAGE_EXTS, recursive=True))
    if not files:
        exts = ", ".join(e.lstrip(".") for e in IMAGE_EXTS)
        raise DefectaeError(
            f"key '{DIR_KEY}': expected a folder of images ({exts}), got '{folder}' (none in it)"
        )
    return files


def _random_resized_crop(img: torch.Tensor, side: int, draws: list[float]) -> torch.Tensor:
    """(C, side, side) in [0, 1] from a crop of a (C, H, W) uint8 image; `draws`: 4 numbers in
    [0, 1) for the area (10-100 %), the aspect ratio (3:4 to 4:3) and the top and left offsets."""
    _, h, w = img.shape
    area = (0.1 + 0.9 * draws[0]) * h * w
    ratio = math.exp(math.log(3 / 4) + draws[1] * math.log(16 / 9))
    ch = min(h, max(1, round(math.sqrt(area / ratio))))
    cw = min(w, max(1, round(math.sqrt(area * ratio))))
    top = min(h - ch, int(draws[2] * (h - ch + 1)))
    left = min(w - cw, int(draws[3] * (w - cw + 1)))
    crop = img[None, :, top : top + ch, left : left + cw].to(torch.float32) / 255.0
    out = F.interpolate(
        crop, size=(side, side), mode="bilinear", antialias=True, align_corners=False
    )
    return out[0].clamp(0.0, 1.0)


def folder_textures(
    n: int, channels: int, side: int, folder: str, g: torch.Generator, device: torch.device
) -> torch.Tensor:
    """(n, C, side, side) in [0, 1]: random images of `folder` read as grey (C = 1) or RGB and
    random-resized-cropped to side x side."""
    files = source_files(folder)
    picks = _randint(0, len(files), (n,), g, device).tolist()
    draws = _rand((n, 4), g, device).tolist()
    out = torch.empty((n, channels, side, side))
    for i, (j, d) in enumerate(zip(picks, draws, strict=True)):
        arr = read_image(files[j], "gray" if channels == 1 else "rgb")
        out[i] = _random_resized_crop(torch.from_numpy(arr.copy()).permute(2, 0, 1), side, d)
    return out.to(device)


# ----------------------------------------------------------------------------- augmentation


def _gamma(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return t ** _uniform((t.shape[0], t.shape[1], 1, 1), 0.5, 2.0, g, t.device)


def _multiply(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return t * _uniform((t.shape[0], 1, 1, 1), 0.8, 1.2, g, t.device)


def _add(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return t + _uniform((t.shape[0], 1, 1, 1), -30 / 255, 30 / 255, g, t.device)


def _invert(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return 1.0 - t


def _solarize(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    threshold = _uniform((t.shape[0], 1, 1, 1), 32 / 255, 128 / 255, g, t.device)
    return torch.where(t >= threshold, 1.0 - t, t)


def _posterize(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    bits = _randint(1, 8, (t.shape[0], 1, 1, 1), g, t.device)
    step = (2 ** (8 - bits)).to(t.dtype)  # keep the `bits` high bits of the uint8 value
    return torch.floor(torch.round(t * 255) / step) * step / 255.0


def _contrast(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    mean = t.mean(dim=(1, 2, 3), keepdim=True)
    return mean + (t - mean) * _uniform((t.shape[0], 1, 1, 1), 0.5, 1.5, g, t.device)


def _rotate90(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return _turned(t, _randint(1, 4, (t.shape[0],), g, t.device))


_AUGMENTS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "gamma": _gamma,
    "multiply": _multiply,
    "add": _add,
    "invert": _invert,
    "solarize": _solarize,
    "posterize": _posterize,
    "contrast": _contrast,
    "rotate90": _rotate90,
}


def augment(t: torch.Tensor, g: torch.Generator, k: int = AUGMENTS_PER_TEXTURE) -> torch.Tensor:
    """DRAEM's source augmentation: per texture `k` distinct AUGMENTS at random (applied in
    AUGMENTS order), values kept in [0, 1]; returns a new tensor."""
    n = t.shape[0]
    chosen = _rand((n, len(AUGMENTS)), g, t.device).argsort(dim=1)[:, :k]
    on = torch.zeros((n, len(AUGMENTS)), dtype=torch.bool, device=t.device)
    on.scatter_(1, chosen, True)
    out = t.clone()
    for i, name in enumerate(AUGMENTS):
        rows = on[:, i].nonzero(as_tuple=True)[0]
        if len(rows):
            out[rows] = _AUGMENTS[name](out[rows], g).clamp(0.0, 1.0)
    return out


# ----------------------------------------------------------------------------- sources


def check_source(cfg: CorruptionConfig) -> None:
    """Raise a one-line DefectaeError when `cfg.source` needs a folder that is unset, missing or
    holds no images (lists it, so the workers find the list cached)."""
    if cfg.source == "folder" and not cfg.anomaly_source_dir:
        raise DefectaeError(
            f"key '{DIR_KEY}': expected a folder of images for corruption.source = 'folder', got ''"
        )
    if cfg.anomaly_source_dir and cfg.source in ("folder", "mixed"):
        source_files(cfg.anomaly_source_dir)


def mixed_sources(cfg: CorruptionConfig) -> tuple[str, ...]:
    """The sources `mixed` draws from: procedural, images, and folder when a folder is set."""
    return (
        ("procedural", "images", "folder") if cfg.anomaly_source_dir else ("procedural", "images")
    )


def textures(x: torch.Tensor, cfg: CorruptionConfig, g: torch.Generator) -> torch.Tensor:
    """(B, C, P, P) foreign textures in [0, 1], x's dtype, one per patch of x from `cfg.source`."""
    b, c, p, _ = x.shape
    if cfg.source == "fractal":
        return fractal_texture(b, c, p, g, x.device).to(x.dtype)
    sources = mixed_sources(cfg) if cfg.source == "mixed" else (cfg.source,)
    pick = _randint(0, len(sources), (b,), g, x.device)
    out = torch.empty((b, c, p, p), device=x.device)
    for k, name in enumerate(sources):
        rows = (pick == k).nonzero(as_tuple=True)[0]
        if not len(rows):
            continue
        if name == "procedural":
            out[rows] = procedural_textures(len(rows), c, p, g, x.device)
        elif name == "images":
            out[rows] = image_textures(x, g, rows)
        elif name == "folder":
            out[rows] = folder_textures(len(rows), c, p, cfg.anomaly_source_dir, g, x.device)
        else:
            raise ValueError(f"unknown anomaly source {name!r}")
    return augment(out, g).to(x.dtype)
