"""`defectae tile-test`: reconstruct every test and validation image and write residuals.h5.

The run folder is --run, else the profile's latest run. The model comes from the run's
checkpoint. tile-test decides the test-time settings ([tile]: stride, residual, smoothing,
image score): from --profile when given (so they can change without retraining), else from the
profile the run was trained with (RUN/profile.toml). It records them in residuals.h5 (see
`stores.residuals`), where score and export read them, and writes its resolved profile as
residuals.profile.toml beside it; the run's own profile.toml is never touched. Images are
streamed from prepared.h5 a few at a time, so memory does not grow with the test set.
--export-maps writes every test map as a float32 TIFF at the original resolution in the
MVTec AD evaluator's layout.
For VAE families it also stores the latent means of the test images and of good training
images, and images decoded from fixed-seed prior samples (group "latent"), for score's
latent diagnostics.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from PIL import Image

from defectae import console, profiles, workspace
from defectae import device as devices
from defectae.core import latent
from defectae.core.inspector import Inspector, inspect_uint8
from defectae.core.normalize import MapStatistics, normalize_maps
from defectae.core.residuals import BorderExcess, image_scores, resize_map
from defectae.core.tiling import tile_origins
from defectae.device import amp_dtype, compile_or_eager, resolve_device
from defectae.errors import DefectaeError
from defectae.files import atomic_path, output_dir, output_file, sha256_file
from defectae.models import get_family
from defectae.profiles import Profile, TileConfig, write_profile
from defectae.profiles.load import PROFILE_FILE
from defectae.stores.checkpoint import checkpoint_in, load_model, require_trained
from defectae.stores.prepared import open_prepared, read_strings
from defectae.stores.residuals import (
    LATENT_FIT_IMAGES,
    SPLITS,
    create_residuals,
    create_split,
    write_latent,
    write_normalization,
)

MIN_VALIDATION = 10  # good validation images below which map statistics are unreliable
MIN_BORDER_MAPS = 5  # good validation maps needed before their border excess is a warning
PRIOR_SAMPLES, PRIOR_SEED = 16, 0  # the decoded prior grid of VAE runs


def _images_per_step(
    tile: TileConfig, image_hw: tuple[int, int], patch: int, whole_image: bool
) -> int:
    """Images per forward step: enough to fill about one batch of patches, at least one."""
    if whole_image:
        return tile.batch_size
    per_image = len(tile_origins(image_hw[0], patch, tile.stride)) * len(
        tile_origins(image_hw[1], patch, tile.stride)
    )
    return max(1, tile.batch_size // per_image)


def _export_map(
    directory: Path,
    category: str,
    defect_type: str,
    name: str,
    residual: torch.Tensor,
    orig_hw: tuple[int, int],
) -> None:
    """One (1, H, W) map as a float32 TIFF at the original size: DIR/CATEGORY/test/TYPE/NAME.tiff."""
    m = resize_map(residual[None], orig_hw)  # (1, 1, H, W), as score's original resolution
    with atomic_path(directory / category / "test" / defect_type / f"{name}.tiff") as tmp:
        Image.fromarray(np.ascontiguousarray(m[0, 0].numpy(), dtype=np.float32)).save(
            tmp, format="TIFF"
        )


Batch = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]  # start, residual, score, recon


def _inspect_split(
    src: h5py.File, split: str, inspector: Inspector, step: int, device: torch.device
) -> Iterator[Batch]:
    """The split's images through the inspector, a few at a time: (start, residual, score, recon)."""
    images = src[f"{split}/images"]
    n = images.shape[0]
    for start in range(0, n, step):
        yield (start, *inspect_uint8(inspector, images[start : min(n, start + step)], device))


def _normalized(
    batches: list[Batch], mean: torch.Tensor, std: torch.Tensor, tile: TileConfig
) -> list[Batch]:
    """Validation batches with their maps as z-scores, and the image scores of those maps."""
    out = []
    for start, residual, _, recon in batches:
        z = normalize_maps(residual, mean, std)
        out.append((start, z, image_scores(z, **tile.score_options()), recon))
    return out


def _write_split(
    src: h5py.File,
    dst: h5py.File,
    split: str,
    batches: Iterable[Batch],
    save_recon: bool,
    export: tuple[Path, str] | None,
    advance: Callable[[int], None],
) -> None:
    """Write one split's batches into preallocated datasets of `dst` (and its maps as TIFFs)."""
    writer = create_split(dst, src, split, save_recon)
    if export is not None:
        types, names = (
            read_strings(src, f"{split}/defect_types"),
            read_strings(src, f"{split}/names"),
        )
        orig = src[f"{split}/orig_sizes"][()]
    for start, residual, score, recon in batches:
        writer.write(start, residual.numpy(), score.numpy(), recon.numpy())
        if export is not None:
            for j in range(start, start + len(score)):
                orig_hw = (int(orig[j, 0]), int(orig[j, 1]))
                _export_map(*export, types[j], names[j], residual[j - start], orig_hw)
        advance(len(score))


def _validation_first(
    src: h5py.File,
    dst: h5py.File,
    inspector: Inspector,
    step: int,
    device: torch.device,
    tile: TileConfig,
    advance: Callable[[int], None],
) -> dict[str, Any] | None:
    """Validation maps, then (with tile.normalize) their statistics, which normalise every map.

    Returns the validation maps' `BorderExcess` as the image score sees them (None without maps).
    """
    batches = list(_inspect_split(src, "validation", inspector, step, device))
    if tile.normalize != "none":
        stats = MapStatistics()
        for _, residual, _, _ in batches:
            stats.add(residual.numpy())
        mean, std = stats.mean_std(tile.normalize, tile.normalize_floor)
        if stats.count < MIN_VALIDATION:
            console.warn(
                f"tile.normalize '{tile.normalize}': statistics of only {stats.count} good "
                f"validation image(s); {MIN_VALIDATION} or more make them reliable "
                "(dataset.val_fraction)"
            )
        write_normalization(dst, mean, std)
        inspector.normalize_with(mean, std)
        batches = _normalized(batches, mean, std, tile)
    _write_split(src, dst, "validation", batches, tile.save_reconstructions, None, advance)
    if not batches:
        return None
    excess = BorderExcess(tile.score_margin)
    for batch in batches:
        excess.add(batch[1])
    border = excess.result()
    if tile.normalize != "none":
        border["ratio"] = None  # z-scores average near zero: a ratio of their means says nothing
    if border["maps"] >= MIN_BORDER_MAPS and border["maxima_share"] >= 0.5:
        higher = f" (maps {border['ratio']:.2f}x higher there)" if border["ratio"] else ""
        console.warn(
            f"the highest value of {border['maxima_share']:.0%} of the {border['maps']} good "
            f"validation maps lies within {border['band']} px of the image border{higher}, so "
            "the border decides their image scores; see tile.score_margin, tile.border_pad "
            "and augment.reflect_pad"
        )
    return border


@dataclasses.dataclass(frozen=True)
class LatentPass:
    """A VAE's encoder means over images of prepared.h5, tiled as the inspector tiles them."""

    model: torch.nn.Module
    device: torch.device
    patch: int
    stride: int
    whole_image: bool
    step: int  # images per forward step

    def codes(self, images: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
        """Latent means (len(rows), D) of the images at `rows` (increasing)."""
        out = []
        for i in range(0, len(rows), self.step):
            x = torch.from_numpy(images[rows[i : i + self.step]]).to(self.device).float() / 255.0
            codes = latent.image_codes(self.model, x, self.patch, self.stride, self.whole_image)
            out.append(codes.cpu().numpy())
        if not out:
            return np.zeros((0, int(np.prod(self.shape(images.shape[1])))), np.float32)
        return np.concatenate(out)

    def shape(self, channels: int) -> tuple[int, ...]:
        """The shape of mu for one model input (a tile, or the resized whole image)."""
        probe = torch.zeros(1, channels, self.patch, self.patch, device=self.device)
        return tuple(self.model(probe)["mu"].shape[1:])


def _write_latent(src: h5py.File, dst: h5py.File, vae: LatentPass) -> None:
    """A VAE's codes of the test images and of (at most LATENT_FIT_IMAGES) good training images,
    and a decoded fixed-seed grid of prior samples, into dst's group "latent"."""
    n_test, n_train = src["test/images"].shape[0], src["train/images"].shape[0]
    test = vae.codes(src["test/images"], np.arange(n_test))
    keep = min(n_train, LATENT_FIT_IMAGES)
    train = vae.codes(
        src["train/images"], np.unique(np.linspace(0, n_train - 1, keep).round().astype(int))
    )
    shape = vae.shape(src["test/images"].shape[1])
    prior = latent.prior_samples(vae.model, shape, PRIOR_SAMPLES, PRIOR_SEED, vae.device)
    if prior is None:
        console.info("no prior samples: this VAE's decoder needs the encoder's skip features")
    prior8 = None if prior is None else prior.mul(255.0).round().to(torch.uint8).numpy()
    per_image = "whole image" if vae.whole_image else "mean over tiles"
    write_latent(dst, test, train, prior8, shape, per_image)


def _root_name(profile: Profile) -> str:
    """The category an MVTec evaluator expects when the root is the category folder itself."""
    return Path(profile.dataset.root).name or profile.dataset.name


def _test_settings(run_dir: Path, trained: Profile, profile: Profile | None) -> Profile:
    """The run's training profile with the [tile] section tile-test uses (see the module doc)."""
    if profile is not None:
        return dataclasses.replace(trained, tile=profile.tile)
    recorded = run_dir / PROFILE_FILE
    if recorded.is_file():
        return dataclasses.replace(trained, tile=profiles.load_written(recorded).tile)
    return trained


def run(
    profile: Profile | None,
    run: Path | None,
    prepared: Path | None,
    out: Path | None,
    export_maps: Path | None,
    allow_unfinished: bool = False,
) -> dict[str, Any]:
    """Tile-test a run's checkpoint on prepared.h5; write residuals.h5 and its profile beside it."""
    started = time.perf_counter()
    if export_maps is not None:
        export_maps = output_dir(export_maps)
    if run is None:
        if profile is None:
            raise DefectaeError("--run: expected a run folder, or --profile to use its latest run")
        run = workspace.latest_run(profile)
    ckpt = checkpoint_in(run)
    require_trained(ckpt, allow_unfinished)
    model, trained, _ = load_model(ckpt, "cpu", expect=profile)
    eff = _test_settings(Path(run), trained, profile)
    tile = eff.tile
    device = resolve_device(tile.device)
    dtype = amp_dtype(device, tile.amp)
    patch = eff.model.input_size
    whole_image = get_family(eff.model.family).whole_image
    channels = eff.dataset.channels

    prepared = Path(prepared) if prepared is not None else workspace.prepared_path(eff)
    out = output_file(out if out is not None else Path(run) / "residuals.h5")
    with open_prepared(prepared, eff.dataset) as src:
        h, w = src["test/images"].shape[2:]
        if not whole_image and patch > min(h, w):
            raise DefectaeError(
                f"model.input_size {patch}: larger than the prepared images ({h}x{w}) in {prepared}"
            )
        category = str(src.attrs.get("category", "") or eff.dataset.category or _root_name(eff))
        model = compile_or_eager(
            model.to(device),
            tile.compile,
            torch.zeros(min(tile.batch_size, 8), channels, patch, patch, device=device),
        )
        timed = devices.TimedModel(model, device, dtype)
        inspector = Inspector(
            timed,
            patch_size=patch,
            whole_image=whole_image,
            batch_size=tile.batch_size,
            **tile.inspector_options(),
        )
        step = _images_per_step(tile, (h, w), patch, whole_image)
        total = sum(src[f"{s}/images"].shape[0] for s in SPLITS)
        console.info(
            f"tile-test {eff.name}: {ckpt} on {total} images of {prepared} ({device}, "
            f"{'whole image' if whole_image else f'patch {patch}, stride {tile.stride}'})"
        )
        provenance = {
            "checkpoint": str(ckpt),
            "checkpoint_sha256": sha256_file(ckpt),
            "prepared": str(prepared),
            "prepared_sha256": sha256_file(prepared),
            "dataset": eff.dataset.name,
            "category": category,
            "profile": eff.name,
        }
        with create_residuals(out, tile, **provenance) as dst:
            export = (Path(export_maps), category) if export_maps is not None else None
            loop_start = time.perf_counter()
            with torch.inference_mode(), console.progress() as bar:
                task = bar.add_task("tile-test", total=total)
                advance = functools.partial(bar.advance, task)
                border = _validation_first(src, dst, inspector, step, device, tile, advance)
                batches = _inspect_split(src, "test", inspector, step, device)
                _write_split(src, dst, "test", batches, tile.save_reconstructions, export, advance)
            loop_seconds = time.perf_counter() - loop_start
            if get_family(eff.model.family).is_vae:
                vae = LatentPass(
                    devices.unwrap(model), device, patch, tile.stride, whole_image, step
                )
                with torch.inference_mode():
                    _write_latent(src, dst, vae)
    write_profile(eff, out.parent, f"{out.stem}.profile.toml")

    model_share = timed.seconds / loop_seconds if loop_seconds > 0 else 0.0
    rate = total / loop_seconds if loop_seconds > 0 else 0.0
    console.info(
        f"{total} images, {rate:.2f} images/s, {1 - model_share:.0%} of the time outside the model "
        f"forward -> {out}" + (f"; maps in {export_maps}" if export_maps is not None else "")
    )
    return {
        "residuals": str(out),
        "images": total,
        "seconds": round(time.perf_counter() - started, 3),
        "images_per_s": rate,
        "model_share": model_share,
        "validation_border": border,
        "export_maps": str(export_maps) if export_maps is not None else None,
    }
