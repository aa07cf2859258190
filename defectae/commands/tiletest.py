"""`defectae tile-test`: reconstruct every test and validation image and write residuals.h5.

The run folder is --run, else the profile's latest run. The model and its profile come from the
run's checkpoint; with --profile, that profile's [tile] section replaces the checkpoint's (so
stride, residual and score settings can change without retraining). Images are streamed from
prepared.h5 a few at a time into preallocated HDF5 datasets, so memory does not grow with the
test set. residuals.h5, per group "test" and "validation":
    residuals (N, 1, H, W) float16, recon (N, C, H, W) uint8 (tile.save_reconstructions),
    scores (N,) float32, names, defect_types, labels, files, orig_sizes (copied from prepared.h5)
with attributes format, format_version, checkpoint, checkpoint_sha256, prepared, prepared_sha256,
dataset, category, tile (JSON), profile, version. --export-maps writes every test map as a
float32 TIFF at the original resolution in the MVTec AD evaluator's layout.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from defectae import __version__, console, workspace
from defectae import device as devices
from defectae.core.inspector import Inspector, inspect_uint8
from defectae.core.tiling import tile_origins
from defectae.device import amp_dtype, compile_or_eager, resolve_device
from defectae.errors import DefectaeError
from defectae.files import atomic_path, sha256_file
from defectae.models import get_family
from defectae.profiles import Profile, TileConfig, to_dict, write_profile
from defectae.stores.checkpoint import checkpoint_in, load_model
from defectae.stores.prepared import open_prepared, read_strings

FORMAT = "defectae-residuals"
FORMAT_VERSION = 1
SPLITS = ("test", "validation")
COPIED = ("names", "defect_types", "labels", "files", "orig_sizes")


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
    m = residual[None].float()  # (1, 1, H, W)
    if tuple(m.shape[-2:]) != orig_hw:
        m = F.interpolate(m, size=orig_hw, mode="bilinear", align_corners=False)
    with atomic_path(directory / category / "test" / defect_type / f"{name}.tiff") as tmp:
        Image.fromarray(np.ascontiguousarray(m[0, 0].numpy(), dtype=np.float32)).save(
            tmp, format="TIFF"
        )


def _write_split(
    src: h5py.File,
    dst: h5py.File,
    split: str,
    inspector: Inspector,
    step: int,
    device: torch.device,
    save_recon: bool,
    export: tuple[Path, str] | None,
    bar: Any,
    task: Any,
) -> None:
    """Stream one split through the inspector into preallocated datasets of `dst`."""
    images = src[f"{split}/images"]
    n, c, h, w = images.shape
    g = dst.create_group(split)
    for key in COPIED:
        src.copy(src[f"{split}/{key}"], g, name=key)
    residuals = g.create_dataset(
        "residuals", (n, 1, h, w), np.float16, chunks=(1, 1, h, w) if n else None
    )
    scores = g.create_dataset("scores", (n,), np.float32)
    recons = None
    if save_recon:
        recons = g.create_dataset(
            "recon", (n, c, h, w), np.uint8, chunks=(1, c, h, w) if n else None
        )
    if export is not None:
        types, names = (
            read_strings(src, f"{split}/defect_types"),
            read_strings(src, f"{split}/names"),
        )
        orig = src[f"{split}/orig_sizes"][()]
    for start in range(0, n, step):
        stop = min(n, start + step)
        residual, score, recon = inspect_uint8(inspector, images[start:stop], device)
        residuals[start:stop] = residual.half().numpy()
        scores[start:stop] = score.numpy()
        if recons is not None:
            recons[start:stop] = recon.numpy()
        if export is not None:
            for j in range(start, stop):
                _export_map(
                    export[0],
                    export[1],
                    types[j],
                    names[j],
                    residual[j - start],
                    (int(orig[j, 0]), int(orig[j, 1])),
                )
        bar.advance(task, stop - start)


def run(
    profile: Profile | None,
    run: Path | None,
    prepared: Path | None,
    out: Path | None,
    export_maps: Path | None,
) -> dict[str, Any]:
    """Tile-test a run's checkpoint on prepared.h5 and write residuals.h5 (plus profile.toml)."""
    started = time.perf_counter()
    if run is None:
        if profile is None:
            raise DefectaeError("--run: expected a run folder, or --profile to use its latest run")
        run = workspace.latest_run(profile)
    ckpt = checkpoint_in(run)
    model, trained, _ = load_model(ckpt, "cpu", expect=profile)
    eff = trained if profile is None else dataclasses.replace(trained, tile=profile.tile)
    tile = eff.tile
    device = resolve_device(tile.device)
    dtype = amp_dtype(device, tile.amp)
    patch = eff.model.input_size
    whole_image = get_family(eff.model.family).whole_image
    channels = eff.dataset.channels

    prepared = Path(prepared) if prepared is not None else workspace.prepared_path(eff)
    out = Path(out) if out is not None else Path(run) / "residuals.h5"
    with open_prepared(prepared, channels) as src:
        h, w = src["test/images"].shape[2:]
        if not whole_image and patch > min(h, w):
            raise DefectaeError(
                f"model.input_size {patch}: larger than the prepared images ({h}x{w}) in {prepared}"
            )
        category = str(src.attrs.get("category", "") or eff.dataset.category or eff.dataset.name)
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
        with atomic_path(out) as tmp, h5py.File(tmp, "w", track_order=True) as dst:
            dst.attrs["format"] = FORMAT
            dst.attrs["format_version"] = FORMAT_VERSION
            dst.attrs["checkpoint"] = str(ckpt)
            dst.attrs["checkpoint_sha256"] = sha256_file(ckpt)
            dst.attrs["prepared"] = str(prepared)
            dst.attrs["prepared_sha256"] = sha256_file(prepared)
            dst.attrs["dataset"] = eff.dataset.name
            dst.attrs["category"] = category
            dst.attrs["tile"] = json.dumps(to_dict(eff)["tile"])
            dst.attrs["profile"] = eff.name
            dst.attrs["version"] = __version__
            export = (Path(export_maps), category) if export_maps is not None else None
            loop_start = time.perf_counter()
            with torch.inference_mode(), console.progress() as bar:
                task = bar.add_task("tile-test", total=total)
                for split in SPLITS:
                    _write_split(
                        src,
                        dst,
                        split,
                        inspector,
                        step,
                        device,
                        tile.save_reconstructions,
                        export if split == "test" else None,
                        bar,
                        task,
                    )
            loop_seconds = time.perf_counter() - loop_start
    write_profile(eff, out.parent)

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
        "export_maps": str(export_maps) if export_maps is not None else None,
    }
