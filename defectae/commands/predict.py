"""`defectae predict`: anomaly maps, masks and verdicts for new images, as a deployed run makes them.

Inputs are image files, folders (searched recursively for the image extensions prepare reads)
and glob patterns. Each image is read in the run's colour mode, resized as prepare resized the
run's images (dataset.image_size, dataset.resize, dataset.intensity with the training targets
from prepared.h5) and goes through the run's inspector: the checkpoint (best.pt, or
--checkpoint) with the [tile] settings of the run's last `score`, as tile-test builds it, or
an exported inspector.pt / inspector.onnx (--from-export). The threshold is the label-free
one `score` chose on validation maps (RUN/score/metrics.json), or --threshold: a pixel is
defective when its map value reaches it, an image when its score does (as export documents).

Outputs in --out (default RUN/predict/), mirroring the inputs' folders below their common
parent: NAME_map.tiff (float32 anomaly map at the image's original size, upsampled
bilinearly), NAME_mask.png (map >= threshold), NAME_overlay.png (the image with the predicted
region outlined), and predictions.csv, written at the end. Images stream through a few at a
time; an unreadable image is reported on one line and the others are still processed.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.table import Table

from defectae import console, profiles, workspace
from defectae import device as devices
from defectae.core.inspector import Inspector, inspect_uint8
from defectae.core.residuals import resize_map
from defectae.core.tiling import tile_origins
from defectae.data.images import read_image, resize_image, short_side_size
from defectae.data.lighting import normalise_intensity
from defectae.data.split import IMAGE_EXTS, image_files
from defectae.errors import DefectaeError, first_line
from defectae.export import converters
from defectae.files import output_dir, sha256_file
from defectae.models import get_family
from defectae.profiles import Profile, TileConfig, to_dict
from defectae.profiles.load import PROFILE_FILE
from defectae.stores.checkpoint import (
    check_profile,
    checkpoint_in,
    load_checkpoint,
    load_model,
    profile_of,
    require_trained,
)
from defectae.stores.predictions import write_csv, write_prediction
from defectae.stores.prepared import intensity_targets
from defectae.stores.residuals import read_tile, run_normalization
from defectae.stores.scores import read_scored_settings

MAX_STEP = 16  # images per forward step at most: maps at the original size stay small in memory
GLOB_CHARS = frozenset("*?[")

# (N, C, H, W) uint8 images at the inspector's size -> residual (N, 1, H, W), score (N,) on the CPU
Engine = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Setup:
    """What every image of one predict call shares."""

    profile: Profile  # the run's, with the [tile] settings its threshold was chosen for
    engine: Engine
    source: str  # the checkpoint or export that makes the maps
    threshold: dict[str, Any]  # value, and where it came from
    intensity: tuple[str, float, float]  # dataset.intensity and its training targets
    step: int  # images per forward step
    fixed_size: tuple[int, int] | None = None  # an export's traced (H, W); None: any size


@dataclass
class Loaded:
    """One image read: at its original size, and as the inspector takes it."""

    path: Path
    name: Path  # output name stem, relative to the output folder
    original: np.ndarray  # (H, W, C) uint8
    pixels: np.ndarray  # (C, h, w) uint8, resized (and intensity-normalised) as prepare does


@dataclass
class Failed:
    """One image that could not be read, and why."""

    path: Path
    error: str


# ----------------------------------------------------------------------------- inputs


def find_images(paths: list[str], exclude: Path | None = None) -> list[Path]:
    """Image files named, found in folders (recursively) or matched by glob patterns, in order;
    none from inside `exclude` (the output folder: its masks and overlays are no inputs)."""
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found += image_files(path, IMAGE_EXTS, recursive=True)
        elif path.is_file():
            found.append(path)
        elif GLOB_CHARS & set(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            matches = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
            if not matches:
                console.warn(f"{item}: the pattern matches no image file")
            found += matches
        else:
            raise DefectaeError(f"{item}: no such image file, folder or matching glob pattern")
    unique = list(dict.fromkeys(found))
    if exclude is not None:
        skip = Path(os.path.abspath(exclude))
        unique = [p for p in unique if not Path(os.path.abspath(p)).is_relative_to(skip)]
    if not unique:
        raise DefectaeError(
            f"{', '.join(paths)}: no images found (extensions {', '.join(IMAGE_EXTS)})"
        )
    return unique


def output_names(images: list[Path]) -> list[Path]:
    """Each image's output stem: its path below the images' common folder, without the
    extension (kept where two images would otherwise share a stem)."""
    parents = [os.path.abspath(p.parent) for p in images]
    common = os.path.commonpath(parents)
    names = [
        Path(os.path.relpath(parent, common)) / p.stem
        for p, parent in zip(images, parents, strict=True)
    ]
    counts: dict[Path, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return [
        n.with_name(f"{n.name}_{p.suffix.lstrip('.').lower()}") if counts[n] > 1 else n
        for n, p in zip(names, images, strict=True)
    ]


def _source_channels(path: Path) -> tuple[int, str] | None:
    """The channel count and mode of an image file, from its header (None when unreadable)."""
    try:
        with Image.open(path) as img:
            if img.mode == "P":
                return (4 if "transparency" in img.info else 3), img.mode
            return len(img.getbands()), img.mode
    except (OSError, SyntaxError, ValueError):
        return None


def _inspector_size(orig_hw: tuple[int, int], profile: Profile) -> tuple[int, int]:
    """The size prepare gives an image of `orig_hw`: dataset.image_size, or with resize =
    "short-side" its aspect-preserving size."""
    ds = profile.dataset
    size = (int(ds.image_size[0]), int(ds.image_size[1]))
    return size if ds.resize == "stretch" else short_side_size(orig_hw, min(size))


def read_one(path: Path, name: Path, setup: Setup) -> Loaded:
    """Read one image in the run's colour mode and prepare it as `prepare` prepared the run's."""
    ds = setup.profile.dataset
    image = read_image(path, ds.color)
    found = _source_channels(path)
    if found is not None and found[0] != ds.channels:
        console.warn(
            f"{path}: {found[0]}-channel {found[1]} image converted to {ds.color} "
            f"({ds.channels} channel{'s' if ds.channels > 1 else ''}), the run's colour mode"
        )
    size = _inspector_size(image.shape[:2], setup.profile)
    if setup.fixed_size is not None and size != setup.fixed_size:
        raise DefectaeError(
            f"{path}: {image.shape[0]}x{image.shape[1]} becomes {size[0]}x{size[1]} "
            f"(dataset.resize = 'short-side'), but {setup.source} takes only "
            f"{setup.fixed_size[0]}x{setup.fixed_size[1]}; predict with the checkpoint instead"
        )
    pixels = resize_image(image, size).transpose(2, 0, 1)
    mode, mean, std = setup.intensity
    if mode != "none":
        pixels = normalise_intensity(pixels, mode, mean, std)
    return Loaded(path, name, image, np.ascontiguousarray(pixels))


def read_batches(
    images: list[Path], names: list[Path], setup: Setup
) -> Iterator[list[Loaded | Failed]]:
    """The images read `setup.step` at a time; an unreadable one becomes a Failed entry."""
    for start in range(0, len(images), setup.step):
        batch: list[Loaded | Failed] = []
        for path, name in zip(
            images[start : start + setup.step], names[start : start + setup.step], strict=True
        ):
            try:
                batch.append(read_one(path, name, setup))
            except DefectaeError as e:
                batch.append(Failed(path, str(e)))
        yield batch


# ----------------------------------------------------------------------------- run settings


def _unscored_tile(run: Path, trained: Profile) -> TileConfig:
    """The [tile] settings tile-test used (RUN/residuals.h5), else those it would use."""
    residuals, recorded = run / "residuals.h5", run / PROFILE_FILE
    if residuals.is_file():
        return read_tile(residuals)
    return profiles.load_written(recorded).tile if recorded.is_file() else trained.tile


def run_settings(
    run: Path, trained: Profile, threshold: float | None
) -> tuple[TileConfig, dict[str, Any]]:
    """The [tile] settings the maps are made with and the threshold chosen for them: those of
    the run's last `score` (RUN/score/metrics.json), or --threshold with tile-test's settings."""
    metrics_file, residuals = run / "score" / "metrics.json", run / "residuals.h5"
    scored = read_scored_settings(metrics_file) if metrics_file.is_file() else None
    stale = (
        scored is not None
        and residuals.is_file()
        and sha256_file(residuals) != scored.residuals_sha256
    )
    tile = scored.tile if scored is not None and not stale else _unscored_tile(run, trained)
    if threshold is not None:
        return tile, {"method": "--threshold", "value": float(threshold), "source": "--threshold"}
    if scored is None:
        raise DefectaeError(
            f"{run}: never scored, so it has no threshold; run `defectae score --run {run}` "
            "or pass --threshold VALUE"
        )
    if stale:
        raise DefectaeError(
            f"{metrics_file}: its threshold was chosen on other maps than {residuals} "
            f"(tile-test ran again after score); run `defectae score --run {run}` again "
            "or pass --threshold VALUE"
        )
    if not isinstance(scored.threshold.get("value"), (int, float)):
        raise DefectaeError(
            f"{metrics_file}: no label-free threshold "
            f"({scored.threshold.get('reason', 'undefined')}); pass --threshold VALUE"
        )
    chosen = {k: v for k, v in scored.threshold.items() if k != "reason"}
    return tile, {**chosen, "source": str(metrics_file)}


def _intensity(run: Path, profile: Profile) -> tuple[str, float, float]:
    """dataset.intensity and the training images' targets prepare recorded in prepared.h5."""
    mode = profile.dataset.intensity
    if mode == "none":
        return mode, 0.0, 0.0
    candidates = workspace.run_prepared_candidates(run, profile)
    for path in (c for c in candidates if c.is_file()):
        if (targets := intensity_targets(path)) is not None:
            return mode, *targets
    raise DefectaeError(
        f"dataset.intensity '{mode}': its training targets are recorded in the run's prepared.h5, "
        f"not found ({', '.join(str(c) for c in candidates)})"
    )


def _has_checkpoint(run: Path) -> bool:
    return any((run / name).is_file() for name in ("best.pt", "last.pt"))


def _run_profile(
    run: Path, checkpoint: Path | None, allow_unfinished: bool
) -> tuple[Path, Profile]:
    """The checkpoint to use and its profile; --checkpoint must fit the run's own checkpoint."""
    own = checkpoint_in(run) if _has_checkpoint(run) else None
    ckpt = checkpoint if checkpoint is not None else checkpoint_in(run)  # RUN without one: error
    require_trained(ckpt, allow_unfinished)
    profile = profile_of(load_checkpoint(ckpt), ckpt)
    if own is not None and own.resolve() != ckpt.resolve():
        expect = profile_of(load_checkpoint(own), own)
        check_profile(profile, expect, ckpt)
        if profile.dataset.image_size != expect.dataset.image_size:
            raise DefectaeError(
                f"{ckpt}: checkpoint has dataset.image_size = {list(profile.dataset.image_size)}, "
                f"the run's {own} {list(expect.dataset.image_size)}"
            )
    return ckpt, profile


def _step(profile: Profile, whole_image: bool) -> int:
    """Images per forward step: about one batch of patches, as tile-test takes them, at most MAX_STEP."""
    tile, patch = profile.tile, profile.model.input_size
    if whole_image:
        return max(1, min(MAX_STEP, tile.batch_size))
    h, w = (int(s) for s in profile.dataset.image_size)
    per_image = len(tile_origins(max(h, patch), patch, tile.stride)) * len(
        tile_origins(max(w, patch), patch, tile.stride)
    )
    return max(1, min(MAX_STEP, tile.batch_size // per_image))


# ----------------------------------------------------------------------------- engines


def checkpoint_engine(model: torch.nn.Module, profile: Profile, run: Path) -> Engine:
    """The checkpoint's model in the Inspector, built exactly as tile-test builds it."""
    tile, patch = profile.tile, profile.model.input_size
    whole_image = get_family(profile.model.family).whole_image
    device = devices.resolve_device(tile.device)
    channels = profile.dataset.channels
    model = devices.compile_or_eager(
        model.to(device),
        tile.compile,
        torch.zeros(min(tile.batch_size, 8), channels, patch, patch, device=device),
    )
    inspector = Inspector(
        devices.TimedModel(model, device, devices.amp_dtype(device, tile.amp)),
        patch_size=patch,
        whole_image=whole_image,
        batch_size=tile.batch_size,
        normalization=run_normalization(run, tile),
        **tile.inspector_options(),
    )

    def engine(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        residual, score, _ = inspect_uint8(inspector, images, device)
        return residual, score

    return engine


def _load_export(path: Path) -> tuple[Engine, dict[str, Any]]:
    """An exported inspector (TorchScript or ONNX, on the CPU) and its defectae.json metadata."""
    kinds = {".pt": "torchscript", ".onnx": "onnx"}
    if path.suffix.lower() not in kinds:
        raise DefectaeError(
            f"--from-export {path}: expected an inspector.pt or inspector.onnx file"
        )
    if not path.is_file():
        raise DefectaeError(f"--from-export {path}: file not found; run `defectae export` first")
    data = path.read_bytes()
    try:
        if kinds[path.suffix.lower()] == "torchscript":
            module, meta = converters.load_torchscript(data)
            module.eval()

            def run_export(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
                return converters.outputs(module(x))
        else:
            session = converters.onnx_session(data)
            meta = converters.onnx_metadata(data)

            def run_export(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
                return converters.run_onnx(session, x)
    except DefectaeError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure means a foreign or damaged file
        raise DefectaeError(
            f"--from-export {path}: not a loadable export ({first_line(e)})"
        ) from None

    def engine(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        residual, score, *_ = run_export(torch.from_numpy(images).float().div_(255.0))
        return residual.float().cpu(), score.float().cpu()

    return engine, meta


def _check_export(path: Path, meta: dict[str, Any], profile: Profile, ckpt: Path) -> None:
    """Refuse an export made for other images than the run's; warn when it may score otherwise."""
    if meta.get("format") != "defectae-export":
        raise DefectaeError(
            f"--from-export {path}: no defectae.json metadata; not a file written by `defectae export`"
        )
    if meta.get("artefact") != "inspector":
        raise DefectaeError(
            f"--from-export {path}: a {meta.get('artefact')} export; pass the inspector "
            "(inspector.pt or inspector.onnx), which makes whole-image maps"
        )
    ds, given = profile.dataset, meta.get("input", {})
    want: dict[str, Any] = {"channels": ds.channels, "color": ds.color}
    if ds.resize == "stretch":
        want["image_size"] = list(ds.image_size)
    else:
        size = given.get("image_size")
        if not (isinstance(size, list) and len(size) == 2 and min(size) == min(ds.image_size)):
            raise DefectaeError(
                f"--from-export {path}: made for input image_size {size}, the run's images "
                f"have a short side of {min(ds.image_size)} (dataset.resize = 'short-side')"
            )
    for key, value in want.items():
        if given.get(key) != value:
            raise DefectaeError(
                f"--from-export {path}: made for input {key} {given.get(key)}, "
                f"the run's images have {value}"
            )
    if meta.get("checkpoint_sha256") != sha256_file(ckpt):
        console.warn(f"{path}: exported from another checkpoint than {ckpt}")
    if json.loads(json.dumps(meta.get("tile"))) != json.loads(json.dumps(to_dict(profile.tile))):
        console.warn(
            f"{path}: exported with other [tile] settings than the run's last score; "
            "its maps may not match the threshold (export again)"
        )


def write_outputs(
    item: Loaded, residual: torch.Tensor, score: float, threshold: float, out: Path
) -> dict[str, Any]:
    """The map (original size), mask and overlay of one image; its record for JSON and CSV."""
    h, w = item.original.shape[:2]
    anomaly = np.ascontiguousarray(resize_map(residual[None], (h, w))[0, 0].numpy(), np.float32)
    files, share = write_prediction(out / str(item.name), item.original, anomaly, threshold)
    return {
        "path": str(item.path),
        "score": score,
        "verdict": "defective" if score >= threshold else "good",
        "defective_share": share,
        "size": [h, w],
        **{kind: str(path) for kind, path in files.items()},
    }


def emit_line(record: dict[str, Any]) -> None:
    """One JSON line on stdout (with --json): a processed image, or the final summary."""
    if console.mode.json:
        print(json.dumps(console.jsonable(record)), flush=True)


def _predict_batch(
    batch: list[Loaded | Failed], setup: Setup, out: Path
) -> Iterator[dict[str, Any]]:
    """Records of one batch in input order; images of one inspector size go through together."""
    results: dict[int, tuple[torch.Tensor, float]] = {}
    loaded = {i: b for i, b in enumerate(batch) if isinstance(b, Loaded)}
    for shape in dict.fromkeys(b.pixels.shape for b in loaded.values()):
        group = [i for i, b in loaded.items() if b.pixels.shape == shape]
        with torch.inference_mode():
            residual, score = setup.engine(np.stack([loaded[i].pixels for i in group]))
        results.update({i: (residual[j], float(score[j])) for j, i in enumerate(group)})
    value = float(setup.threshold["value"])
    for i, b in enumerate(batch):
        if isinstance(b, Failed):
            console.error(b.error)
            yield {"path": str(b.path), "verdict": "error", "error": b.error}
        else:
            yield write_outputs(b, *results[i], value, out)


def predictions(images: list[Path], setup: Setup, out: Path) -> Iterator[dict[str, Any]]:
    """Each image's record, in input order, its map, mask and overlay written to `out`."""
    for batch in read_batches(images, output_names(images), setup):
        yield from _predict_batch(batch, setup, out)


# ----------------------------------------------------------------------------- the command


def make_setup(
    run: Path,
    checkpoint: Path | None,
    from_export: Path | None,
    threshold: float | None,
    allow_unfinished: bool,
) -> Setup:
    """The engine, settings and threshold every image of this call shares."""
    if checkpoint is not None and from_export is not None:
        raise DefectaeError("--checkpoint and --from-export: pass one of them, not both")
    if not run.is_dir():
        raise DefectaeError(f"{run}: run folder not found")
    ckpt, trained = _run_profile(run, checkpoint, allow_unfinished)
    tile, chosen = run_settings(run, trained, threshold)
    profile = dataclasses.replace(trained, tile=tile)
    whole_image = get_family(profile.model.family).whole_image
    fixed_size = None
    if from_export is not None:
        engine, meta = _load_export(from_export)
        _check_export(from_export, meta, profile, ckpt)
        source = str(from_export)
        if profile.dataset.resize != "stretch":
            fixed_size = (int(meta["input"]["image_size"][0]), int(meta["input"]["image_size"][1]))
    else:
        model, _, _ = load_model(ckpt, "cpu")
        engine, source = checkpoint_engine(model, profile, run), str(ckpt)
    return Setup(
        profile,
        engine,
        source,
        chosen,
        _intensity(run, profile),
        _step(profile, whole_image),
        fixed_size,
    )


def run(
    run: Path,
    paths: list[str],
    out: Path | None = None,
    checkpoint: Path | None = None,
    from_export: Path | None = None,
    threshold: float | None = None,
    allow_unfinished: bool = False,
) -> dict[str, Any]:
    """Predict maps, masks and verdicts for images with a run; writes RUN/predict/ by default."""
    started = time.perf_counter()
    run = Path(run)
    if threshold is not None and not math.isfinite(threshold):
        raise DefectaeError(f"--threshold {threshold}: expected a finite number")
    out = output_dir(out if out is not None else run / "predict")
    images = find_images(paths, exclude=out)
    setup = make_setup(run, checkpoint, from_export, threshold, allow_unfinished)
    value = float(setup.threshold["value"])
    console.info(
        f"predict {setup.profile.name}: {setup.source} on {len(images)} image(s), "
        f"threshold {value:.6g} ({setup.threshold['source']})"
    )
    records: list[dict[str, Any]] = []
    with console.progress() as bar:
        task = bar.add_task("predict", total=len(images))
        for record in predictions(images, setup, out):
            emit_line(record)
            records.append(record)
            bar.advance(task)
    csv_path = out / "predictions.csv"
    write_csv(csv_path, records)
    summary = _summary(records, setup, run, out, csv_path, started)
    console.show(summary_table(summary))
    console.info(f"maps, masks and overlays in {out}; summary: {csv_path}")
    return summary


def _summary(
    records: list[dict[str, Any]],
    setup: Setup,
    run: Path,
    out: Path,
    csv_path: Path,
    started: float,
) -> dict[str, Any]:
    verdicts = [r["verdict"] for r in records]
    return {
        "summary": True,
        "run": str(run),
        "source": setup.source,
        "threshold": setup.threshold,
        "images": len(records),
        "defective": verdicts.count("defective"),
        "good": verdicts.count("good"),
        "failed": verdicts.count("error"),
        "failed_paths": [r["path"] for r in records if r["verdict"] == "error"],
        "out": str(out),
        "predictions_csv": str(csv_path),
        "seconds": round(time.perf_counter() - started, 3),
    }


def summary_table(summary: dict[str, Any]) -> Table:
    """Images per verdict, under the threshold that decided them."""
    table = Table(title=f"predict (threshold {summary['threshold']['value']:.6g})")
    table.add_column("verdict")
    table.add_column("images", justify="right")
    for verdict in ("defective", "good", "failed"):
        table.add_row(verdict, str(summary[verdict]))
    return table
