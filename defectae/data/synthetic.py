"""Procedural textures with realistic defects and exact masks, written in the MVTec AD layout.

The embedded dataset of `make demo` and the tests: a woven fabric or a wire-mesh grid, each
image drawn from its own seed stream, so the same (options, seed) always gives the same bytes.
A mask pixel is 255 exactly where the defect changed the 8-bit image.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from defectae import console
from defectae.errors import DefectaeError
from defectae.profiles.schema import SyntheticOptions

TEXTURES = ("woven", "grid")
DEFECT_TYPES = ("scratch", "hole", "stain", "broken_thread", "contamination")
GENERATOR_VERSION = 1
_SPLITS = {"train": 0, "test_good": 1, "test_defect": 2}  # part of every image's seed key
_QUANTUM = 1.0 / 255.0


# ----------------------------------------------------------------------------- textures


@dataclass(frozen=True)
class _Style:
    """The look of a texture family; lengths are fractions of the thread pitch unless noted."""

    threads: float  # threads across the image
    pitch_jitter: float  # relative per-image change of the pitch
    max_angle: float  # degrees of random rotation
    width: tuple[float, float]  # mean, std of the thread width
    warp_bright: tuple[float, float]
    weft_bright: tuple[float, float]
    background: float  # what shows through the gaps
    arch: float  # darkening where a thread dips under its neighbour
    gap_sag: float  # brightness factor inside a missing thread's channel
    specular: float  # highlight along the thread centre (metal wire)
    streak: float  # fibre streaks along each thread
    noise: float  # sensor noise sigma
    blur: float  # optical blur sigma in pixels at 256 px
    light: float  # illumination gradient across the image
    wobble: float  # waviness of the threads in pixels at 256 px


# fmt: off
_STYLES = {
    "woven": _Style(
        threads=24, pitch_jitter=0.015, max_angle=0.0, width=(0.86, 0.04),
        warp_bright=(0.80, 0.035), weft_bright=(0.64, 0.035), background=0.10, arch=0.4,
        gap_sag=0.6, specular=0.0, streak=0.12, noise=0.018, blur=0.6, light=0.06, wobble=0.6,
    ),
    "grid": _Style(
        threads=9, pitch_jitter=0.02, max_angle=3.0, width=(0.30, 0.012),
        warp_bright=(0.72, 0.02), weft_bright=(0.70, 0.02), background=0.16, arch=0.45,
        gap_sag=1.0, specular=0.25, streak=0.0, noise=0.012, blur=1.0, light=0.15, wobble=0.0,
    ),
}
# fmt: on


@dataclass(frozen=True)
class Gap:
    """A missing stretch of one thread: axis 0 = warp (vertical), 1 = weft (horizontal).

    `index` is the thread's cell index and [start, stop) the stretch along it, in pitches.
    """

    axis: int
    index: int
    start: float
    stop: float


@dataclass(frozen=True, eq=False)
class TextureSpec:
    """Everything random about one texture image, so it can be re-rendered with a defect."""

    kind: str
    size: int
    pitch: float  # pixels between thread centres
    angle: float  # radians
    offset: tuple[float, float]  # (x, y) phase in pixels
    wobble: tuple[float, float, float]  # amplitude (px), wavelength (px), phase
    widths: tuple[np.ndarray, np.ndarray]  # per warp / weft thread, fraction of the pitch
    brights: tuple[np.ndarray, np.ndarray]
    streaks: tuple[np.ndarray, np.ndarray] | None  # (H, W) each, unit std
    light: np.ndarray  # (H, W) multiplicative illumination
    noise: np.ndarray  # (H, W) additive sensor noise
    gaps: tuple[Gap, ...] = ()

    @property
    def style(self) -> _Style:
        return _STYLES[self.kind]

    def texture_coords(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates -> (u, v) in pitches: u runs across the warp threads, v across the weft."""
        c = (self.size - 1) / 2
        cos, sin = float(np.cos(self.angle)), float(np.sin(self.angle))
        if self.angle:
            xr = cos * (x - c) + sin * (y - c) + c
            yr = -sin * (x - c) + cos * (y - c) + c
        else:
            xr, yr = x, y
        amp, wavelength, phase = self.wobble
        if amp:
            xr = xr + np.float32(amp) * np.sin(
                yr * np.float32(2 * np.pi / wavelength) + np.float32(phase)
            )
        return (xr + self.offset[0]) / self.pitch, (yr + self.offset[1]) / self.pitch

    def pixel_coords(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(u, v) in pitches -> pixel (x, y), ignoring the sub-pixel wobble."""
        c = (self.size - 1) / 2
        xr, yr = u * self.pitch - self.offset[0] - c, v * self.pitch - self.offset[1] - c
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        return cos * xr - sin * yr + c, sin * xr + cos * yr + c


def sample_texture(kind: str, size: int, rng: np.random.Generator) -> TextureSpec:
    """Draw the random parameters of one texture image (pitch, phase, per-thread jitter, noise)."""
    _require_texture(kind)
    st = _STYLES[kind]
    scale = size / 256
    pitch = max(4.0, size / st.threads) * (1 + st.pitch_jitter * rng.uniform(-1, 1))
    n = int(np.ceil(size * 1.5 / pitch)) + 8  # thread tables are indexed modulo n
    widths = tuple(np.clip(rng.normal(st.width[0], st.width[1], n), 0.2, 0.97) for _ in range(2))
    brights = (
        np.clip(rng.normal(*st.warp_bright, n), 0.05, 1.0),
        np.clip(rng.normal(*st.weft_bright, n), 0.05, 1.0),
    )
    streaks = None
    if st.streak:
        # fibres: noise stretched along each thread direction
        warp = _smooth_noise(rng, size, max(2, round(8 * scale)))
        streaks = (warp, _smooth_noise(rng, size, max(2, round(8 * scale))).T.copy())
    yy, xx = _grid(size) / max(size - 1, 1) - 0.5
    gx, gy = rng.uniform(-st.light, st.light, 2)
    vignette = rng.uniform(0, st.light)
    light = (1 + gx * xx + gy * yy - vignette * (xx**2 + yy**2)).astype(np.float32)
    return TextureSpec(
        kind=kind,
        size=size,
        pitch=pitch,
        angle=float(np.deg2rad(rng.uniform(-st.max_angle, st.max_angle))),
        offset=(rng.uniform(0, 2 * pitch), rng.uniform(0, 2 * pitch)),
        wobble=(
            st.wobble * scale * rng.uniform(0.5, 1.0),
            size * rng.uniform(0.5, 1.0),
            rng.uniform(0, 2 * np.pi),
        ),
        widths=widths,
        brights=brights,
        streaks=streaks,
        light=light,
        noise=rng.normal(0, st.noise, (size, size)).astype(np.float32),
    )


def _smooth_noise(rng: np.random.Generator, size: int, step: int) -> np.ndarray:
    """Unit noise, smooth along y over `step` pixels and independent across x. (size, size) float32."""
    coarse = rng.standard_normal((size // step + 2, size)).astype(np.float32)
    pos = np.arange(size, dtype=np.float32) / step
    i = pos.astype(np.int64)
    w = (pos - i.astype(np.float32))[:, None]
    smooth = coarse[i] * (1 - w) + coarse[i + 1] * w
    return smooth * np.float32(1.25)  # linear interpolation lowers the std to ~0.8


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> np.ndarray:
    """Pixel coordinates (2, H, W) as (y, x), float32, read-only (shared between images)."""
    grid = np.mgrid[0:size, 0:size].astype(np.float32)
    grid.flags.writeable = False
    return grid


def render(spec: TextureSpec) -> np.ndarray:
    """The image of a texture spec: a plain weave of two thread layers. (H, W) float32 in [0, 1]."""
    st, size = spec.style, spec.size
    y, x = _grid(size)
    u, v = spec.texture_coords(x, y)
    iu, iv = np.floor(u).astype(np.int32), np.floor(v).astype(np.int32)
    n = len(spec.widths[0])

    def thread(axis: int, index: np.ndarray, across: np.ndarray, along: np.ndarray):
        """Coverage, brightness and height (+1 over a crossing, -1 under) of the warp or weft."""
        k = index % n
        half_width = spec.widths[axis].astype(np.float32)[k] / 2
        d = (across - index.astype(np.float32) - np.float32(0.5)) / half_width  # -1..1 over it
        covered = np.abs(d) < 1
        # plain weave: warp u is over weft v where u + v is even; sin(pi*along) flips sign per cell
        sign = np.where(index % 2 == 0, np.float32(1), np.float32(-1)) * (1 if axis == 0 else -1)
        height = sign * np.sin(np.float32(np.pi) * along)
        profile = np.sqrt(np.clip(1 - d * d, 0, 1))
        if st.specular:
            profile = profile * (1 - st.specular) + st.specular * np.exp(
                -((d / np.float32(0.3)) ** 2)
            )
        value = (
            spec.brights[axis].astype(np.float32)[k] * profile * (1 - st.arch * (1 - height) / 2)
        )
        if spec.streaks is not None:
            value = value * (1 + st.streak * spec.streaks[axis])
        return covered, value, height

    warp_cov, warp_val, warp_h = thread(0, iu, u, v)
    weft_cov, weft_val, weft_h = thread(1, iv, v, u)
    sag = np.ones_like(u)
    for gap in spec.gaps:
        cov, along, index = (warp_cov, v, iu) if gap.axis == 0 else (weft_cov, u, iv)
        missing = (index == gap.index) & (along >= gap.start) & (along < gap.stop)
        cov &= ~missing
        sag[missing] = st.gap_sag  # the crossing threads float loose and sink into the gap

    warp_over = warp_cov & (~weft_cov | (warp_h >= weft_h))
    img = np.where(warp_over, warp_val, np.where(weft_cov, weft_val, np.float32(st.background)))
    img = ndimage.gaussian_filter(img * sag * spec.light, st.blur * size / 256)
    return np.clip(img + spec.noise, 0.0, 1.0)


def texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A defect-free texture image: (size, size) float32 in [0, 1]."""
    return render(sample_texture(kind, size, rng))


def quantize(img: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint8, the way it is written to PNG."""
    return np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- shapes


def _blob_depth(
    size: int, center: np.ndarray, radius: float, rng: np.random.Generator, rough: float
) -> np.ndarray:
    """Approximate signed distance in pixels to an irregular closed outline (> 0 inside, -size far away)."""
    harmonics = [(k, rng.uniform(0, rough / k * 2), rng.uniform(0, 2 * np.pi)) for k in range(2, 6)]
    reach = radius * (1 + sum(a for _, a, _ in harmonics)) + 4
    lo = np.clip(np.floor(center - reach), 0, size).astype(int)
    hi = np.clip(np.ceil(center + reach) + 1, 0, size).astype(int)
    depth = np.full((size, size), -float(size))
    y, x = np.mgrid[lo[1] : hi[1], lo[0] : hi[0]].astype(np.float64)
    dy, dx = y - center[1], x - center[0]
    theta = np.arctan2(dy, dx)
    r = np.ones_like(theta)
    for k, amplitude, phase in harmonics:
        r += amplitude * np.cos(k * theta + phase)
    depth[lo[1] : hi[1], lo[0] : hi[0]] = radius * r - np.hypot(dx, dy)
    return depth


def _curve(
    p0: np.ndarray, p3: np.ndarray, bend: float, rng: np.random.Generator, n: int = 32
) -> np.ndarray:
    """A cubic Bezier from p0 to p3 whose control points stray `bend` x length sideways. (n+1, 2) as (x, y)."""
    d = p3 - p0
    normal = np.array([-d[1], d[0]])
    c1 = p0 + d / 3 + normal * rng.uniform(-bend, bend)
    c2 = p0 + 2 * d / 3 + normal * rng.uniform(-bend, bend)
    t = np.linspace(0, 1, n + 1)[:, None]
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * c1 + 3 * (1 - t) * t**2 * c2 + t**3 * p3


def _stroke(size: int, points: np.ndarray, width: float, taper: float = 0.0) -> np.ndarray:
    """Anti-aliased coverage (0..1) of a polyline of `width` pixels; ends thin out over `taper` of its length."""
    alpha = np.zeros((size, size), np.float32)
    lo = np.maximum(np.floor(points.min(0) - width - 2), 0).astype(int)
    hi = np.minimum(np.ceil(points.max(0) + width + 3), size).astype(int)
    if np.any(hi <= lo):
        return alpha
    y, x = np.mgrid[lo[1] : hi[1], lo[0] : hi[0]].astype(np.float32)
    pts = points.astype(np.float32)
    a, ab = pts[:-1], np.diff(pts, axis=0)  # (S, 2) segment starts and directions
    px, py = x.reshape(-1, 1), y.reshape(-1, 1)  # (M, 1)
    t = ((px - a[:, 0]) * ab[:, 0] + (py - a[:, 1]) * ab[:, 1]) / np.maximum((ab**2).sum(1), 1e-6)
    t = np.clip(t, 0, 1)  # (M, S)
    dist2 = (px - a[:, 0] - t * ab[:, 0]) ** 2 + (py - a[:, 1] - t * ab[:, 1]) ** 2
    seg = dist2.argmin(1)
    rows = np.arange(len(seg))
    dist = np.sqrt(dist2[rows, seg])
    half = np.full(len(seg), width / 2, np.float32)
    if taper:
        along = (seg + t[rows, seg]) / len(ab)
        half *= np.clip(np.minimum(along, 1 - along) / taper, 0.15, 1) ** 0.5
    alpha[lo[1] : hi[1], lo[0] : hi[0]] = np.clip(half + 0.5 - dist, 0, 1).reshape(x.shape)
    return alpha


def _blend(
    img: np.ndarray, alpha: np.ndarray, target: np.ndarray | float, cover: np.ndarray
) -> np.ndarray:
    """Paint `target` over `img` with coverage `alpha`, ignoring faint coverage; marks `cover` in place."""
    alpha = np.where(alpha >= 0.1, alpha, 0.0)
    cover |= alpha > 0
    return img + alpha * (target - img)


def _exact(img: np.ndarray, out: np.ndarray, cover: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Make the 8-bit change set equal `cover`: untouched outside, at least one grey level inside."""
    out = np.where(cover, np.clip(out, 0.0, 1.0), img).astype(np.result_type(img.dtype, np.float32))
    q_in, q_out = quantize(img).astype(np.int16), quantize(out).astype(np.int16)
    same = cover & (q_in == q_out)
    up = ((out >= img) & (q_in < 255)) | (q_in == 0)
    out[same] = (q_in + np.where(up, 1, -1))[same] / np.float32(255)
    return out, cover.copy()


def _center(size: int, rng: np.random.Generator, margin: float = 0.15) -> np.ndarray:
    return rng.uniform(margin * size, (1 - margin) * size, 2)


def _fibre_width(spec: TextureSpec | None, size: int) -> float:
    if spec is None:
        return 1.2 * max(size / 256, 0.75)
    return float(np.clip(0.3 * spec.widths[0].mean() * spec.pitch, 1.0, 6.0 * size / 256 + 1))


# ----------------------------------------------------------------------------- defects


def _scratch(img, rng, spec):
    size = img.shape[0]
    length = rng.uniform(0.2, 0.45) * size
    p0 = _center(size, rng, 0.2)
    angle = rng.uniform(0, np.pi)
    p3 = np.clip(p0 + length * np.array([np.cos(angle), np.sin(angle)]), 2, size - 3)
    points = _curve(p0, p3, 0.2, rng)
    width = rng.uniform(1.0, 2.2) * max(size / 256, 0.75)
    alpha = _stroke(size, points, width, taper=0.15) * rng.uniform(0.8, 1.0)
    target = rng.uniform(0.9, 1.0) if rng.random() < 0.6 else rng.uniform(0.0, 0.08)
    cover = np.zeros(img.shape, bool)
    return _blend(img, alpha, target, cover), cover


def _hole(img, rng, spec):
    size = img.shape[0]
    radius = rng.uniform(0.035, 0.07) * size
    center = _center(size, rng)
    depth = _blob_depth(size, center, radius, rng, rough=0.25)
    dark = rng.random() < 0.75
    # soft-ish interior: darkest (or brightest, when backlit) in the middle
    ramp = np.exp(-np.clip(depth, 0, None) / (0.35 * radius))
    inside = 0.03 + 0.12 * ramp if dark else 0.97 - 0.15 * ramp
    inside = inside + rng.normal(0, 0.01, img.shape)
    cover = np.zeros(img.shape, bool)
    out = _blend(img, np.clip(depth / 1.2 + 0.5, 0, 1), inside, cover)
    # frayed ends: short strands from the rim reaching into the hole
    thread = 0.7 if dark else 0.2
    width = _fibre_width(spec, size)
    for _ in range(rng.integers(2, 6)):
        phi = rng.uniform(0, 2 * np.pi)
        direction = np.array([np.cos(phi), np.sin(phi)])
        start = center + direction * radius * 1.05
        end = start - direction * radius * rng.uniform(0.25, 0.6) + rng.normal(0, 0.15 * radius, 2)
        strand = _stroke(size, _curve(start, end, 0.3, rng, n=12), width, taper=0.3)
        out = _blend(out, strand * rng.uniform(0.7, 1.0), thread * rng.uniform(0.85, 1.15), cover)
    return out, cover


def _stain(img, rng, spec):
    size = img.shape[0]
    radius = rng.uniform(0.05, 0.1) * size
    depth = _blob_depth(size, _center(size, rng), radius, rng, rough=0.35)
    body = np.clip(depth / (0.35 * radius), 0, 1)
    body = body * body * (3 - 2 * body)  # smoothstep
    rim = 1.5 * size / 256
    ring = np.exp(-(((depth - rim) / (rim + 0.5)) ** 2))  # tide line at the rim
    alpha = np.clip(0.85 * body + 0.5 * ring, 0, 1) * (depth > -3)
    alpha = alpha * rng.uniform(0.65, 0.9)
    level = rng.uniform(0.05, 0.2) if rng.random() < 0.7 else rng.uniform(0.85, 0.95)
    cover = np.zeros(img.shape, bool)
    return _blend(img, alpha, level, cover), cover


def _contamination(img, rng, spec):
    size = img.shape[0]
    scale = max(size / 256, 0.75)
    center = _center(size, rng)
    dark = rng.random() < 0.7
    cover = np.zeros(img.shape, bool)
    out = img
    for _ in range(rng.integers(2, 6)):
        at = np.clip(center + rng.normal(0, 0.04 * size, 2), 3, size - 4)
        tone = rng.uniform(0.02, 0.15) if dark else rng.uniform(0.9, 1.0)
        if rng.random() < 0.55:  # a fibre
            phi = rng.uniform(0, 2 * np.pi)
            end = np.clip(
                at + rng.uniform(0.05, 0.14) * size * np.array([np.cos(phi), np.sin(phi)]),
                2,
                size - 3,
            )
            alpha = _stroke(
                size, _curve(at, end, 0.45, rng), rng.uniform(0.8, 1.6) * scale, taper=0.2
            )
        else:  # a particle
            depth = _blob_depth(size, at, rng.uniform(1.5, 4.0) * scale, rng, rough=0.4)
            alpha = np.clip(depth + 0.5, 0, 1)
        out = _blend(out, alpha * rng.uniform(0.85, 1.0), tone, cover)
    return out, cover


def _broken_thread(img, rng, spec):
    if spec is None:
        raise ValueError("broken_thread needs the TextureSpec the image was rendered from")
    size = img.shape[0]
    axis = int(rng.integers(2))
    x, y = _center(size, rng, 0.25)
    u, v = spec.texture_coords(np.array(x), np.array(y))
    index, along = (int(np.floor(u)), float(v)) if axis == 0 else (int(np.floor(v)), float(u))
    if spec.kind == "grid":  # one wire broken between two crossings, stubs left at both ends
        cell = np.floor(along - 0.5) + 0.5
        gap = Gap(axis, index, cell + rng.uniform(0.15, 0.35), cell + 1 - rng.uniform(0.15, 0.35))
    else:
        length = rng.uniform(2.5, 6.0)
        gap = Gap(axis, index, along - length / 2, along + length / 2)
    damaged = render(replace(spec, gaps=(*spec.gaps, gap)))
    delta = damaged - render(spec)
    cover = np.abs(delta) >= 0.5 * _QUANTUM
    out = img + np.where(cover, delta, 0.0)
    if spec.kind == "woven":  # the loose end of the cut thread curls out of the weave
        end = gap.start if rng.random() < 0.5 else gap.stop
        sign = 1.0 if end == gap.start else -1.0
        centre = index + 0.5
        tip_along = end + sign * rng.uniform(1.5, 3.5)
        tip_across = centre + rng.uniform(-1.5, 1.5)
        uv = (np.array([centre, tip_across]), np.array([end, tip_along]))
        if axis == 1:
            uv = uv[::-1]
        xs, ys = spec.pixel_coords(*uv)
        points = _curve(np.array([xs[0], ys[0]]), np.array([xs[1], ys[1]]), 0.4, rng, n=24)
        tone = spec.brights[axis][index % len(spec.brights[axis])] * rng.uniform(1.0, 1.15)
        out = _blend(out, _stroke(size, points, _fibre_width(spec, size), taper=0.25), tone, cover)
    return out, cover


_DEFECTS = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "broken_thread": _broken_thread,
    "contamination": _contamination,
}


def apply_defect(
    img: np.ndarray, kind: str, rng: np.random.Generator, spec: TextureSpec | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Add one defect to a (H, W) float image in [0, 1]; returns (image, mask (H, W) bool).

    The mask is exactly the set of pixels whose 8-bit value (see `quantize`) changed.
    `broken_thread` re-renders the texture, so it needs the `spec` the image came from.
    """
    _require_defect(kind)
    out, cover = _DEFECTS[kind](img, rng, spec)
    return _exact(img, out, cover)


# ----------------------------------------------------------------------------- dataset


def _image_rng(seed: int, split: str, defect: str | None, index: int) -> np.random.Generator:
    """One independent stream per image: image k does not depend on how many come before it."""
    kind = 0 if defect is None else 1 + DEFECT_TYPES.index(defect)
    return np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=(_SPLITS[split], kind, index))
    )


def _require_texture(kind: str) -> None:
    if kind not in TEXTURES:
        raise DefectaeError(
            f"dataset.synthetic.texture: {kind!r} is not one of {', '.join(TEXTURES)}"
        )


def _require_defect(kind: str) -> None:
    if kind not in DEFECT_TYPES:
        raise DefectaeError(
            f"dataset.synthetic.defect_types: {kind!r} is not one of {', '.join(DEFECT_TYPES)}"
        )


def _check(options: SyntheticOptions) -> None:
    _require_texture(options.texture)
    for kind in options.defect_types:
        _require_defect(kind)
    if options.n_test_defect and not options.defect_types:
        raise DefectaeError(
            "dataset.synthetic.defect_types: empty, but n_test_defect > 0 needs at least one type"
        )
    if len(set(options.defect_types)) != len(options.defect_types):
        raise DefectaeError(
            f"dataset.synthetic.defect_types: {options.defect_types} names a type twice"
        )


def _jobs(options: SyntheticOptions) -> list[tuple[str, str | None, int, str]]:
    """(split, defect or None, index, relative path) for every image, defects spread evenly over types."""
    digits = lambda n: max(3, len(str(n - 1)))  # noqa: E731
    jobs = [
        ("train", None, i, f"train/good/{i:0{digits(options.n_train)}d}")
        for i in range(options.n_train)
    ]
    jobs += [
        ("test_good", None, i, f"test/good/{i:0{digits(options.n_test_good)}d}")
        for i in range(options.n_test_good)
    ]
    types = list(options.defect_types)
    for t, kind in enumerate(types):
        count = options.n_test_defect // len(types) + (t < options.n_test_defect % len(types))
        jobs += [
            ("test_defect", kind, i, f"test/{kind}/{i:0{digits(count)}d}") for i in range(count)
        ]
    return jobs


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG", compress_level=1)


def generate(root: Path, options: SyntheticOptions, seed: int) -> Path:
    """Write a synthetic dataset in the MVTec AD layout under `root` (replaced as a whole); returns root.

    root/train/good/NNN.png, root/test/{good,TYPE}/NNN.png, root/ground_truth/TYPE/NNN_mask.png
    and root/synthetic.json recording the options and seed. Built in a temporary sibling folder
    and renamed at the end, so an interrupted run never leaves a complete-looking dataset.
    """
    _check(options)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DefectaeError(
            f"{root}: exists and is not a folder; expected a synthetic dataset folder"
        )
    if root.is_dir() and any(root.iterdir()) and not (root / "synthetic.json").is_file():
        raise DefectaeError(
            f"{root}: not empty and has no synthetic.json; refusing to replace it with synthetic data"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".part", dir=root.parent))
    try:
        for split, defect, index, rel in console.track(
            _jobs(options), f"synthetic {options.texture}"
        ):
            rng = _image_rng(seed, split, defect, index)
            spec = sample_texture(options.texture, options.size, rng)
            img = render(spec)
            if defect is not None:
                img, mask = apply_defect(img, defect, rng, spec)
                _write_png(
                    tmp / "ground_truth" / defect / f"{Path(rel).name}_mask.png",
                    mask.astype(np.uint8) * 255,
                )
            _write_png(tmp / f"{rel}.png", quantize(img))
        record = {
            "generator": "defectae.data.synthetic",
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "options": asdict(options),
        }
        (tmp / "synthetic.json").write_text(
            json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        _swap_in(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _swap_in(tmp: Path, root: Path) -> None:
    """Move the finished folder onto `root`, removing an earlier dataset there."""
    if root.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
        old.rmdir()
        root.rename(old)
        tmp.rename(root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(root)
