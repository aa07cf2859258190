"""`defectae export`: verified TorchScript and ONNX models a production line can run alone.

Two artefacts per format, both from the run's checkpoint and both on the CPU:
    model.{pt,onnx}      (B, C, P, P) patch in [0, 1] -> "recon" (B, C, P, P), or "map" (B, 1, P, P)
                         for the feature-space families (rd, dfr), which reconstruct no pixels
    inspector.{pt,onnx}  (B, C, H, W) image in [0, 1] -> "residual" (B, 1, H, W), "score" (B,),
                         "recon" (B, C, H, W): `defectae.core.inspector.Inspector`, so tiling, fusion
                         and the residual are the same code as tile-test, traced for H x W =
                         dataset.image_size, or with dataset.resize = "short-side" the one
                         size the run's prepared.h5 stores its images at.
The batch axis is dynamic. Each file carries "defectae.json" (TorchScript: an extra file;
ONNX: metadata_props) with the preprocessing (size, resizing, colour, scaling, and the
dataset.intensity normalisation with its training targets, which stays outside the graph)
and the validation-derived pixel threshold (from RUN/score/metrics.json, else from
RUN/residuals.h5's validation maps).
`--int8` adds model_int8.pt and inspector_int8.pt: PyTorch's quantized CPU kernels, static
(calibrated on validation patches) where the model's layers allow it, else dynamic for Linear
layers; its accuracy cost is the change in image and pixel AUROC on the test images.

Verification: every artefact is serialised, loaded back (TorchScript in torch, ONNX in
onnxruntime on the CPU), run on validation patches and images at another batch size than the
trace, and compared with the eager model computed afterwards. Nothing is written unless every
artefact is within the tolerance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from defectae import __version__, console, workspace
from defectae.core.inspector import Inspector
from defectae.core.metrics import label_free_threshold
from defectae.core.tiling import extract_patches
from defectae.errors import DefectaeError, first_line
from defectae.export import converters
from defectae.export.converters import OPSET, Reconstruction, batch_of, max_abs_diff, outputs
from defectae.export.quantize import AUROCS, int8_accuracy_cost, quantize_int8
from defectae.files import atomic_path, output_dir, sha256_file, write_text_atomic
from defectae.models import get_family
from defectae.profiles import Profile, TileConfig, to_dict, write_profile
from defectae.stores.checkpoint import checkpoint_in, load_model, require_trained
from defectae.stores.patches import open_patches
from defectae.stores.prepared import intensity_targets, open_prepared
from defectae.stores.residuals import (
    read_tile,
    read_validation_maps,
    run_normalization,
)
from defectae.stores.scores import read_scored_settings

FORMATS = ("torchscript", "onnx")
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}
TOLERANCE = 1e-4  # largest max-abs difference an fp32 export may have from the eager model
N_PATCHES = 8  # validation patches the exports are checked on
N_IMAGES = 3  # validation images the inspector exports are checked on
N_CALIBRATION = 64  # validation patches that calibrate the int8 activation ranges
TRACE_BATCH = 2  # trace at this batch, verify at another one: the batch axis must be dynamic


@dataclass
class Artefact:
    """One verified export, held in memory until every artefact has passed."""

    file: str
    kind: str  # "reconstruction" or "inspector"
    format: str
    precision: str
    data: bytes
    max_abs_diff: float
    exporter: str


@dataclass
class ReferenceData:
    """Inputs the exports are checked on and int8 is calibrated on, and where they came from."""

    patches: torch.Tensor  # (N, C, P, P) float32 in [0, 1]
    images: torch.Tensor  # (M, C, H, W) float32 in [0, 1]
    calibration: torch.Tensor  # (K, C, P, P)
    source: str
    prepared: Path | None  # the prepared file, for the int8 AUROC on its test images


@dataclass(frozen=True)
class ImageInput:
    """The images the inspector takes: prepared as `defectae prepare` prepared the run's."""

    size: tuple[int, int]  # (H, W) the inspector is traced and checked at
    resize: str  # how to bring an image to `size`, for a user on the line
    intensity: dict[str, Any]  # dataset.intensity and its training targets, applied outside


@dataclass(frozen=True)
class Job:
    """What every artefact of one export shares."""

    profile: Profile  # with the [tile] settings the threshold was chosen for
    ckpt: Path
    family: str
    whole_image: bool
    threshold: dict[str, Any]
    tolerance: float
    image: ImageInput
    normalization: tuple[torch.Tensor, torch.Tensor] | None = None  # tile.normalize statistics


# ----------------------------------------------------------------------------- inputs and threshold


def reference_data(
    run: Path, profile: Profile, state: dict[str, Any], size: tuple[int, int], seed: int = 0
) -> ReferenceData:
    """Validation patches (the run's patches.h5) and (H, W) = size images (prepared.h5), else
    random inputs."""
    c, p = profile.dataset.channels, profile.model.input_size
    h, w = size
    sources: list[str] = []
    patches = calibration = images = None
    if state.get("patches") and Path(state["patches"]).is_file():
        try:
            with open_patches(state["patches"]) as f:
                val = f["validation/patches"]
                if val.shape[0] and val.shape[1:] == (c, p, p):
                    calibration = (
                        torch.from_numpy(val[: max(N_PATCHES, N_CALIBRATION)]).float().div_(255.0)
                    )
                    patches = calibration[:N_PATCHES]
                    sources.append(f"{len(patches)} validation patches of {state['patches']}")
        except DefectaeError:
            pass
    prepared = _prepared_file(run, profile)
    if prepared is not None:
        with open_prepared(prepared, profile.dataset) as f:
            split = "validation" if f["validation/images"].shape[0] else "train"
            stored = f[f"{split}/images"]
            if stored.shape[0] and tuple(stored.shape[2:]) == (h, w):
                images = torch.from_numpy(stored[:N_IMAGES]).float().div_(255.0)
                sources.append(f"{len(images)} {split} images of {prepared}")
                if patches is None and p <= min(h, w):
                    cut = extract_patches(images, p, max(1, p // 2))
                    calibration = cut[:N_CALIBRATION]
                    patches = calibration[:N_PATCHES]
                    sources.append(f"{len(patches)} patches cut from them")
            else:
                prepared = None
    g = torch.Generator().manual_seed(seed)
    if patches is None:
        calibration = torch.rand(N_CALIBRATION, c, p, p, generator=g)
        patches = calibration[:N_PATCHES]
        sources.append(f"{N_PATCHES} random patches (no validation patches found)")
    if images is None:
        images = torch.rand(N_IMAGES, c, h, w, generator=g)
        sources.append(f"{N_IMAGES} random images (no prepared file with {h}x{w} images found)")
    return ReferenceData(patches, images, calibration, "; ".join(sources), prepared)


def _prepared_file(run: Path, profile: Profile) -> Path | None:
    """The first of `workspace.run_prepared_candidates` that exists."""
    return next((c for c in workspace.run_prepared_candidates(run, profile) if c.is_file()), None)


def image_input(run: Path, profile: Profile, ckpt: Path) -> ImageInput:
    """The inspector's input size, resizing and intensity normalisation, as prepare made them.

    A "stretch" run's size is dataset.image_size; a "short-side" run's, and any run's
    dataset.intensity targets, are recorded only in the run's prepared.h5, which must then exist.
    """
    ds = profile.dataset
    prepared = _prepared_file(run, profile)

    def need(what: str) -> Path:
        if prepared is None:
            looked = " or ".join(str(c) for c in workspace.run_prepared_candidates(run, profile))
            raise DefectaeError(
                f"{ckpt}: {what} is recorded only in the run's prepared.h5, not found ({looked})"
            )
        return prepared

    size = (int(ds.image_size[0]), int(ds.image_size[1]))
    resize = "bilinear to image_size (as `defectae prepare`)"
    if ds.resize == "short-side":
        path = need("dataset.resize = 'short-side': the exported inspector's input size")
        with open_prepared(path, ds) as f:
            stored = tuple(int(s) for s in f.attrs["image_size"])
            made = str(f.attrs.get("resize", "stretch"))
        if made != "short-side" or min(stored) != min(size):
            raise DefectaeError(
                f"{path}: prepared with resize = '{made}' at {stored[0]}x{stored[1]}, not as "
                f"{ckpt} was trained (short side {min(size)}); run `defectae prepare` again"
            )
        size = (stored[0], stored[1])
        resize = (
            f"short side to {min(size)}, long side to the nearest multiple of 8, bilinear "
            f"(as `defectae prepare`); this export expects {size[0]}x{size[1]}"
        )
    intensity: dict[str, Any] = {"mode": ds.intensity}
    if ds.intensity != "none":
        path = need(f"dataset.intensity = '{ds.intensity}': the training images' targets")
        targets = intensity_targets(path)
        if targets is None:
            raise DefectaeError(
                f"{path}: no intensity_mean / intensity_std attributes, so not prepared with "
                f"{ckpt}'s dataset.intensity = '{ds.intensity}'; run `defectae prepare` again"
            )
        mean, std = targets
        scaled = " and standard deviation" if ds.intensity == "mean-std" else ""
        intensity.update(
            mean=mean,
            std=std,
            how=(
                f"after resizing, move each uint8 image's mean{scaled} over all its pixels and "
                "channels to these targets with defectae.data.lighting.normalise_intensity"
                f"(image, '{ds.intensity}', mean, std), before scaling to [0, 1]"
            ),
        )
    return ImageInput(size, resize, intensity)


def test_settings(run: Path, profile: Profile) -> tuple[TileConfig, dict[str, Any]]:
    """The [tile] settings the inspector is built from, and the threshold chosen for exactly them.

    score's RUN/score/metrics.json when present (it must have scored RUN/residuals.h5 as it is
    now), else RUN/residuals.h5's settings with a threshold from its validation maps, else the
    run's training profile and no threshold.
    """
    cfg = profile.score
    method: dict[str, Any] = {"method": cfg.threshold}
    method.update(
        {"quantile": cfg.quantile}
        if cfg.threshold == "val_quantile"
        else {"target_fpr": cfg.target_fpr}
    )
    metrics_file, residuals = run / "score" / "metrics.json", run / "residuals.h5"
    if metrics_file.is_file():
        scored = read_scored_settings(metrics_file)
        if residuals.is_file() and sha256_file(residuals) != scored.residuals_sha256:
            raise DefectaeError(
                f"{metrics_file}: its threshold was chosen on other maps than {residuals} "
                f"(tile-test ran again after score); run `defectae score --run {run}` again"
            )
        saved = {k: v for k, v in scored.threshold.items() if k != "reason"}
        if isinstance(saved.get("value"), (int, float)):
            return scored.tile, {**saved, "source": str(metrics_file)}
        reason = scored.threshold.get("reason", "undefined")
        return scored.tile, {
            **saved,
            "value": None,
            "source": None,
            "reason": f"{metrics_file}: {reason}",
        }
    if not residuals.is_file():
        return profile.tile, {
            **method,
            "value": None,
            "source": None,
            "reason": f"no {metrics_file} and no {residuals}; run tile-test and score first",
        }
    tile, val_maps = read_tile(residuals), read_validation_maps(residuals)
    if val_maps is None:
        reason = f"{residuals}: no validation maps"
        return tile, {**method, "value": None, "source": None, "reason": reason}
    value = label_free_threshold(val_maps, **cfg.threshold_options())
    if not value.defined:
        return tile, {
            **method,
            "value": None,
            "source": None,
            "reason": f"{residuals}: {value.reason}",
        }
    return tile, {**method, "value": value.value, "source": f"{residuals} (validation maps)"}


# ----------------------------------------------------------------------------- the command


def _formats(requested: str) -> tuple[str, ...]:
    choice = requested.lower()
    if choice == "all":
        return FORMATS
    if choice not in FORMATS:
        raise DefectaeError(f"--format '{requested}': expected torchscript, onnx or all")
    return (choice,)


def _metadata(job: Job, kind: str, precision: str, output: str = "recon") -> dict[str, Any]:
    profile = job.profile
    c, p = profile.dataset.channels, profile.model.input_size
    h, w = job.image.size
    size = [p, p] if kind == "reconstruction" else [h, w]
    meta: dict[str, Any] = {
        "format": "defectae-export",
        "format_version": 1,
        "version": __version__,
        "artefact": kind,
        "precision": precision,
        "family": profile.model.family,
        "profile": profile.name,
        "checkpoint": job.ckpt.name,
        "checkpoint_sha256": sha256_file(job.ckpt),
        "input": {
            "name": "patch" if kind == "reconstruction" else "image",
            "layout": "NCHW",
            "dtype": "float32",
            "shape": ["batch", c, *size],
            "color": profile.dataset.color,
            "channels": c,
            "image_size": size,
            "resize": job.image.resize,
            "intensity": job.image.intensity,  # per whole image, before any patch is cut
            "scaling": "float32(pixel) / 255: uint8 [0, 255] -> [0, 1]",
        },
    }
    if kind == "reconstruction":
        meta["outputs"] = {output: ["batch", 1 if output == "map" else c, p, p]}
    else:
        meta["outputs"] = {
            "residual": ["batch", 1, h, w],
            "score": ["batch"],
            "recon": ["batch", c, h, w],
        }
        meta["tile"] = to_dict(profile)["tile"]
        meta["patch_size"], meta["whole_image"] = p, job.whole_image
        meta["threshold"] = job.threshold
        meta["decision"] = (
            "a pixel is defective when residual >= threshold.value; an image when score >= it"
        )
    return meta


def _convert(
    kind: str, fmt: str, module: nn.Module, example: torch.Tensor, metadata: dict[str, Any]
) -> tuple[bytes, str]:
    """The artefact's bytes, with its metadata, and the exporter that made them."""
    if fmt == "torchscript":
        traced = converters.to_torchscript(module, example)
        return converters.torchscript_bytes(traced, metadata), "torch.jit.trace"
    names = [module.key] if kind == "reconstruction" else ["residual", "score", "recon"]
    data, exporter = converters.to_onnx(
        module,
        example,
        "patch" if kind == "reconstruction" else "image",
        names,
        prefer_dynamo=kind == "inspector",
    )
    return converters.with_onnx_metadata(data, metadata), exporter


def _run_back(fmt: str, data: bytes, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The serialised artefact loaded back (TorchScript in torch, ONNX in onnxruntime) and run on x."""
    with converters.quiet(), torch.inference_mode():
        if fmt == "torchscript":
            return outputs(converters.load_torchscript(data)[0](x))
        return converters.run_onnx(converters.onnx_session(data), x)


def export_artefact(
    job: Job,
    file: str,
    kind: str,
    fmt: str,
    precision: str,
    module: nn.Module,
    inputs: torch.Tensor,
    extra: dict[str, Any] | None = None,
) -> Artefact:
    """Export `module` to `fmt`, load the bytes back, run them on `inputs` and compare with eager."""
    example = batch_of(inputs, TRACE_BATCH)
    check = inputs if len(inputs) != TRACE_BATCH else batch_of(inputs, TRACE_BATCH + 1)
    what = "reconstruction model" if kind == "reconstruction" else "inspector"
    output = getattr(module, "key", "recon")  # feature-space models output their "map"
    metadata = {**_metadata(job, kind, precision, output), **(extra or {})}
    try:
        data, exporter = _convert(kind, fmt, module, example, metadata)
    except DefectaeError:
        raise
    except Exception as e:  # noqa: BLE001 - any exporter failure is a property of the model
        raise DefectaeError(
            f"model family '{job.family}': its {what} cannot be exported to {fmt} ({first_line(e)})"
        ) from None
    try:
        got = _run_back(fmt, data, check)
    except Exception as e:  # noqa: BLE001
        raise DefectaeError(
            f"{file}: the exported {what} does not run ({first_line(e)}); nothing was written"
        ) from None
    with torch.inference_mode():  # computed after the export: a model changed since is caught
        want = outputs(module.eval()(check))
    diff = max_abs_diff(got, want)
    if not diff <= job.tolerance:
        raise DefectaeError(
            f"{file}: the {fmt} {what} differs from the eager model by {diff:.3g} "
            f"(tolerance {job.tolerance:g}); nothing was written"
        )
    return Artefact(file, kind, fmt, precision, data, diff, exporter)


def _inspector(job: Job, model: nn.Module) -> Inspector:
    """The inspector as tile-test builds it, from the settings the threshold was chosen for."""
    tile = job.profile.tile
    return Inspector(
        model,
        patch_size=job.profile.model.input_size,
        whole_image=job.whole_image,
        normalization=job.normalization,
        **tile.inspector_options(),
    ).eval()


def _fp32_artefacts(
    job: Job, model: nn.Module, formats: tuple[str, ...], data: ReferenceData
) -> list[Artefact]:
    """model.* and inspector.* in each format, verified."""
    recon, inspector = Reconstruction(model).eval(), _inspector(job, model)
    jobs = [(f"model{SUFFIX[f]}", "reconstruction", f, recon, data.patches) for f in formats]
    jobs += [(f"inspector{SUFFIX[f]}", "inspector", f, inspector, data.images) for f in formats]
    return [
        export_artefact(job, file, kind, fmt, "fp32", module, inputs)
        for file, kind, fmt, module, inputs in console.track(jobs, "export")
    ]


def _int8_artefacts(
    job: Job, model: nn.Module, data: ReferenceData
) -> tuple[list[Artefact], dict[str, Any]]:
    """model_int8.pt and inspector_int8.pt, verified, and the int8 summary with its AUROC cost."""
    qmodel, how = quantize_int8(model, data.calibration, family=job.family)
    qrecon = Reconstruction(qmodel).eval()
    extra = {"quantization": how}
    artefacts = [
        export_artefact(
            job,
            "model_int8.pt",
            "reconstruction",
            "torchscript",
            "int8",
            qrecon,
            data.patches,
            extra,
        ),
        export_artefact(
            job,
            "inspector_int8.pt",
            "inspector",
            "torchscript",
            "int8",
            _inspector(job, qmodel),
            data.images,
            extra,
        ),
    ]
    recon = Reconstruction(model).eval()
    with torch.inference_mode():
        vs_fp32 = max_abs_diff(outputs(qrecon(data.patches)), outputs(recon(data.patches)))
    summary = {
        "quantization": how,
        "recon_max_abs_diff_vs_fp32": vs_fp32,
        **int8_accuracy_cost(
            model, qmodel, job.profile, data.prepared, job.whole_image, job.normalization
        ),
    }
    return artefacts, summary


def run(
    run: Path,
    fmt: str = "all",
    int8: bool = False,
    out: Path | None = None,
    tolerance: float = TOLERANCE,
    allow_unfinished: bool = False,
) -> dict[str, Any]:
    """Export a run's model and inspector, verified against the eager model; writes RUN/export/ by default."""
    started = time.perf_counter()
    formats = _formats(fmt)
    if "onnx" in formats:
        converters.require_onnx()
    run = Path(run)
    ckpt = checkpoint_in(run)
    require_trained(ckpt, allow_unfinished)
    model, profile, state = load_model(ckpt, "cpu")
    family = get_family(profile.model.family)
    image = image_input(run, profile, ckpt)
    out = output_dir(out if out is not None else run / "export")
    data = reference_data(run, profile, state, image.size)
    tile, threshold = test_settings(run, profile)
    profile = dataclasses.replace(profile, tile=tile)
    if threshold["value"] is None:
        console.warn(f"no validation threshold stored in the exports: {threshold['reason']}")
    console.info(f"export {profile.name} ({family.name}) from {ckpt}: checking on {data.source}")
    normalization = run_normalization(run, tile)
    job = Job(
        profile, ckpt, family.name, family.whole_image, threshold, tolerance, image, normalization
    )

    artefacts = _fp32_artefacts(job, model, formats, data)
    int8_summary = None
    if int8:
        quantized, int8_summary = _int8_artefacts(job, model, data)
        artefacts += quantized

    for a in artefacts:
        with atomic_path(out / a.file) as tmp:
            tmp.write_bytes(a.data)
    write_profile(profile, out)
    summary = {
        "run": str(run),
        "checkpoint": str(ckpt),
        "out": str(out),
        "family": family.name,
        "formats": list(formats),
        "tolerance": tolerance,
        "opset": OPSET if "onnx" in formats else None,
        "verified_on": data.source,
        "threshold": threshold,
        "artefacts": [_listing(a) for a in artefacts],
        "max_abs_diff": {a.file: a.max_abs_diff for a in artefacts},
        "int8": int8_summary,
        "files": [str(out / a.file) for a in artefacts]
        + [str(out / "profile.toml"), str(out / "export.json")],
    }
    write_text_atomic(out / "export.json", json.dumps(summary, indent=2) + "\n")
    summary["seconds"] = round(time.perf_counter() - started, 3)
    _show(summary)
    return summary


def _listing(a: Artefact) -> dict[str, Any]:
    """An artefact as export.json lists it."""
    return {
        "file": a.file,
        "kind": a.kind,
        "format": a.format,
        "precision": a.precision,
        "exporter": a.exporter,
        "max_abs_diff": a.max_abs_diff,
        "bytes": len(a.data),
        "sha256": hashlib.sha256(a.data).hexdigest(),
    }


def _show(summary: dict[str, Any]) -> None:
    table = Table(title=f"export -> {summary['out']}")
    for column in ("file", "kind", "format", "precision", "exporter", "max abs diff", "MB"):
        table.add_column(column, justify="right" if column in ("max abs diff", "MB") else "left")
    for a in summary["artefacts"]:
        table.add_row(
            a["file"],
            a["kind"],
            a["format"],
            a["precision"],
            a["exporter"],
            f"{a['max_abs_diff']:.2e}",
            f"{a['bytes'] / 2**20:.1f}",
        )
    console.show(table)
    t = summary["threshold"]
    console.info(
        f"threshold: {t['value']:.6g} ({t['source']})"
        if t["value"] is not None
        else f"threshold: none ({t['reason']})"
    )
    if summary["int8"] is not None:
        q = summary["int8"]
        deltas = ", ".join(
            f"{n} {q[f'{n}_delta']:+.4f}" for n in AUROCS if q[f"{n}_delta"] is not None
        )
        console.info(
            f"int8: {q['quantization']}; "
            + (f"AUROC change {deltas}" if deltas else f"no AUROC ({q['reason']})")
        )
