"""Patch sampling and augmentation on uint8 images (pure numpy, no file I/O).

One training patch is: a crop (optionally rotated, see `rotated_crop`), then flips,
brightness/contrast jitter and Gaussian noise, each drawn with its probability from
`AugmentConfig`. Every sample has its own random generator, so a patch depends only on
(seed, split, sample index) and not on the order or blocks in which patches are made.
"""

from __future__ import annotations

import math

import numpy as np

from defectae.profiles.schema import AugmentConfig

# Sampling streams: train and validation patches never share random numbers.
SPLIT_STREAMS = {"train": 0, "validation": 1}


def spread_over_images(n_samples: int, n_images: int, rng: np.random.Generator) -> np.ndarray:
    """Source image of each sample: n_samples // n_images per image, the remainder at random.

    As in the reference pipeline of Bergmann et al., every image gives the same number of
    patches; the `n_samples % n_images` extra patches come from distinct random images.
    """
    per_image, remainder = divmod(n_samples, n_images)
    even = np.repeat(np.arange(n_images, dtype=np.int64), per_image)
    extra = np.sort(rng.choice(n_images, size=remainder, replace=False)).astype(np.int64)
    return np.concatenate([even, extra])


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of one sample, independent of every other sample."""
    return np.random.default_rng([seed, SPLIT_STREAMS[split], index])


# ----------------------------------------------------------------------------- geometry


def inscribed_rect(w: float, h: float, angle: float) -> tuple[float, float]:
    """Largest axis-aligned rectangle (width, height) inside a w x h rectangle rotated by `angle` radians.

    The standard closed form: when the short side is small against the long one the rectangle
    touches both long sides ("half-constrained"), otherwise it touches all four sides.
    Both rectangles share the same centre.
    """
    if w <= 0 or h <= 0:
        return 0.0, 0.0
    width_is_longer = w >= h
    long_side, short_side = (w, h) if width_is_longer else (h, w)
    sin_a, cos_a = abs(math.sin(angle)), abs(math.cos(angle))
    if short_side <= 2.0 * sin_a * cos_a * long_side or abs(sin_a - cos_a) < 1e-10:
        x = 0.5 * short_side
        return (x / sin_a, x / cos_a) if width_is_longer else (x / cos_a, x / sin_a)
    cos_2a = cos_a * cos_a - sin_a * sin_a
    return (w * cos_a - h * sin_a) / cos_2a, (h * cos_a - w * sin_a) / cos_2a


def _span_fits(h: int, w: int, size: int, angle: float) -> bool:
    # Pixel centres span (w-1) x (h-1); a patch spans (size-1) x (size-1) of them.
    rw, rh = inscribed_rect(w - 1, h - 1, angle)
    return size - 1 <= min(rw, rh) + 1e-9


def fitting_angle(h: int, w: int, size: int, angle_deg: float) -> float:
    """`angle_deg`, or an angle closer to 0 whose inscribed rectangle still holds a size x size patch.

    Reduced by bisection between 0 (always fits when size <= min(h, w)) and the requested
    angle, so a sample whose image is too small for its angle is rotated less, never padded.
    """
    if _span_fits(h, w, size, math.radians(angle_deg)):
        return angle_deg
    lo, hi = 0.0, angle_deg
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if _span_fits(h, w, size, math.radians(mid)):
            lo = mid
        else:
            hi = mid
    return lo


def origin_draws(n: int, size: int, sampling: str) -> range:
    """The equally likely draws for a crop's origin on an axis of n pixels; `crop_origin` maps them.

    "uniform-origin" draws the origin itself from [0, n - size]: pixel i is covered by
    min(i + 1, size, n - i, n - size + 1) draws, a corner pixel by 1, the centre by up to size.
    "even" draws the origins of all n + size - 1 windows that overlap the axis, [-(size - 1),
    n - 1], and clamps them inside. Proof of its coverage: each pixel lies in exactly `size`
    drawn windows; clamping moves a window that sticks out inwards, keeping every image pixel
    it held, so no pixel loses coverage, and pixel i < size gains the i left windows that end
    before it (pixel i >= n - size the n - 1 - i right ones). So every pixel is covered by
    size + [i < size] * i + [i >= n - size] * (n - 1 - i) draws: none by fewer than size (the
    corners by exactly size when n > size), none by more than 2 * size - 1 when n >= 2 * size.
    Exactly equal coverage by crops inside the image exists only as a fixed tiling (when size
    divides n); this is even within a factor of 2 (of 3 when n < 2 * size, where every crop
    covers the middle of the axis).
    """
    return range(-(size - 1), n) if sampling == "even" else range(0, n - size + 1)


def crop_origin(draw: int, n: int, size: int) -> int:
    """A drawn origin clamped so that the crop lies inside the axis."""
    return min(max(draw, 0), n - size)


def random_crop(
    image: np.ndarray, size: int, rng: np.random.Generator, sampling: str = "even"
) -> np.ndarray:
    """A size x size crop of a (C, H, W) image, placed per axis as `origin_draws` describes."""
    _, h, w = image.shape
    rows, cols = origin_draws(h, size, sampling), origin_draws(w, size, sampling)
    y = crop_origin(int(rng.integers(rows.start, rows.stop)), h, size)
    x = crop_origin(int(rng.integers(cols.start, cols.stop)), w, size)
    return image[:, y : y + size, x : x + size]


def rotated_crop(
    image: np.ndarray,
    size: int,
    angle_deg: float,
    rng: np.random.Generator,
    sampling: str = "even",
) -> np.ndarray:
    """A size x size crop of the image rotated by `angle_deg`, taken inside the largest inscribed rectangle.

    Equivalent to rotating the whole image about its centre and cropping at a random position
    of the inscribed rectangle, but only the patch's pixels are interpolated (bilinear).
    The position follows `origin_draws` in continuous form, within the inscribed rectangle.
    A positive angle turns the content clockwise on screen (rows grow downwards).
    Returns float32 (C, size, size) in [0, 255].
    """
    _, h, w = image.shape
    angle = math.radians(fitting_angle(h, w, size, angle_deg))
    rw, rh = inscribed_rect(w - 1, h - 1, angle)
    # Offset of the patch centre from the image centre, inside the inscribed rectangle.
    ux = _centre_offset(rw, size, rng, sampling)
    uy = _centre_offset(rh, size, rng, sampling)
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    dx = offsets[None, :] + ux  # (1, size): columns of the rotated frame
    dy = offsets[:, None] + uy  # (size, 1): rows of the rotated frame
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    sx = (w - 1) / 2 + cos_a * dx + sin_a * dy  # (size, size) source columns
    sy = (h - 1) / 2 - sin_a * dx + cos_a * dy  # (size, size) source rows
    return bilinear(image, sy, sx)


def _centre_offset(span: float, size: int, rng: np.random.Generator, sampling: str) -> float:
    # The patch centre may move +-room; "even" draws over +-(room + size - 1) and clamps.
    room = max(0.0, (span - (size - 1)) / 2)
    reach = room + (size - 1) if sampling == "even" else room
    return min(max(rng.uniform(-1.0, 1.0) * reach, -room), room)


def bilinear(image: np.ndarray, sy: np.ndarray, sx: np.ndarray) -> np.ndarray:
    """Sample a (C, H, W) image at float coordinates (rows sy, columns sx) with zero padding.

    Neighbours outside the image count as 0, so a sample that strays outside shows up as a
    darker pixel instead of a silently repeated edge (the rotation tests rely on this).
    """
    c, h, w = image.shape
    y0 = np.floor(sy).astype(np.int64)
    x0 = np.floor(sx).astype(np.int64)
    fy = (sy - y0).astype(np.float32)
    fx = (sx - x0).astype(np.float32)
    # A zero window covering every neighbour used; only its overlap with the image is copied.
    ya, yb, xa, xb = int(y0.min()), int(y0.max()) + 1, int(x0.min()), int(x0.max()) + 1
    ww = xb - xa + 1
    window = np.zeros((c, yb - ya + 1, ww), np.float32)
    iy, jy = max(ya, 0), min(yb, h - 1) + 1
    ix, jx = max(xa, 0), min(xb, w - 1) + 1
    if iy < jy and ix < jx:
        window[:, iy - ya : jy - ya, ix - xa : jx - xa] = image[:, iy:jy, ix:jx]
    flat = window.reshape(c, -1)
    top = (y0 - ya) * ww + (x0 - xa)  # flat index of each top-left neighbour
    v00, v01 = np.take(flat, top, axis=1), np.take(flat, top + 1, axis=1)
    v10, v11 = np.take(flat, top + ww, axis=1), np.take(flat, top + ww + 1, axis=1)
    upper = v00 + (v01 - v00) * fx
    lower = v10 + (v11 - v10) * fx
    return upper + (lower - upper) * fy


# ----------------------------------------------------------------------------- photometric


def jitter(
    patch: np.ndarray, brightness: float, contrast: float, rng: np.random.Generator
) -> np.ndarray:
    """Contrast factor in [1-contrast, 1+contrast] about the patch mean, plus brightness in [-b, b] (of 255)."""
    factor = rng.uniform(1.0 - contrast, 1.0 + contrast)
    shift = rng.uniform(-brightness, brightness) * 255.0
    mean = float(patch.mean())
    return (patch - mean) * factor + mean + shift


def add_noise(patch: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise of sigma `std` in [0, 1] intensity units (clipped later)."""
    return patch + rng.standard_normal(patch.shape, dtype=np.float32) * np.float32(std * 255.0)


def to_uint8(patch: np.ndarray) -> np.ndarray:
    """Round and clip a float patch to uint8 [0, 255]."""
    return np.clip(np.rint(patch), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- one sample


def sample_patch(
    image: np.ndarray,
    size: int,
    cfg: AugmentConfig | None,
    rng: np.random.Generator,
    sampling: str = "even",
) -> np.ndarray:
    """One (C, size, size) uint8 patch of a (C, H, W) uint8 image; `cfg=None` means crop only.

    `sampling` places the crop (`origin_draws`). With `cfg.whole_image` the patch is the whole
    image (no crop, no rotation); flips, jitter and noise still apply.
    """
    whole = cfg is not None and cfg.whole_image
    # Draw every decision up front so each uses the same random numbers whatever is enabled.
    u = rng.random(5) if cfg is not None else np.ones(5)
    rotate = cfg is not None and not whole and cfg.max_angle > 0 and u[0] < cfg.rotation_prob
    if whole:
        patch = image
    elif rotate:
        angle = rng.uniform(-cfg.max_angle, cfg.max_angle)
        patch = rotated_crop(image, size, angle, rng, sampling)
    else:
        patch = random_crop(image, size, rng, sampling)
    if cfg is None:
        return np.ascontiguousarray(patch, dtype=np.uint8)
    if u[1] < cfg.hflip_prob:
        patch = patch[:, :, ::-1]
    if u[2] < cfg.vflip_prob:
        patch = patch[:, ::-1, :]
    photometric = False
    if u[3] < cfg.jitter_prob and (cfg.brightness > 0 or cfg.contrast > 0):
        patch = jitter(patch.astype(np.float32), cfg.brightness, cfg.contrast, rng)
        photometric = True
    if u[4] < cfg.noise_prob and cfg.noise_std > 0:
        patch = add_noise(patch.astype(np.float32), cfg.noise_std, rng)
        photometric = True
    if rotate or photometric:
        return to_uint8(patch)
    return np.ascontiguousarray(patch, dtype=np.uint8)
