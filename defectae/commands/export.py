"""`defectae export`: verified TorchScript and ONNX models a production line can run alone.

Two artefacts per format, both from the run's checkpoint and both on the CPU:
    model.{pt,onnx}      (B, C, P, P) patch in [0, 1] -> "recon" (B, C, P, P)
    inspector.{pt,onnx}  (B, C, H, W) image in [0, 1] -> "residual" (B, 1, H, W), "score" (B,),
                         "recon" (B, C, H, W): `defectae.core.inspector.Inspector`, so tiling, fusion
                         and the residual are the same code as tile-test, traced for H x W =
                         dataset.image_size.
The batch axis is dynamic. Each file carries "defectae.json" (TorchScript: an extra file;
ONNX: metadata_props) with the preprocessing (size, colour, scaling) and the validation-derived
pixel threshold (from RUN/score/metrics.json, else from RUN/residuals.h5's validation maps).
`--int8` adds model_int8.pt and inspector_int8.pt: PyTorch's quantized CPU kernels, static
(calibrated on validation patches) where the model's layers allow it, else dynamic for Linear
layers; its accuracy cost is the change in image and pixel AUROC on the test images.

Verification: every artefact is serialised, loaded back (TorchScript in torch, ONNX in
onnxruntime on the CPU), run on validation patches and images at another batch size than the
trace, and compared with the eager model computed afterwards. Nothing is written unless every
artefact is within the tolerance.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table
from torch import nn

from defectae import __version__, console, workspace
from defectae.core.inspector import Inspector
from defectae.core.metrics import compute_all, label_free_threshold
from defectae.core.tiling import extract_patches
from defectae.errors import DefectaeError
from defectae.files import atomic_path, sha256_file, write_text_atomic
from defectae.models import get_family
from defectae.profiles import Profile, TileConfig, to_dict, write_profile
from defectae.stores.checkpoint import checkpoint_in, load_model
from defectae.stores.patches import open_patches
from defectae.stores.prepared import open_prepared, read_strings
from defectae.stores.residuals import open_residuals, read_tile, read_validation_maps
from defectae.stores.scores import read_scored_settings

FORMATS = ("torchscript", "onnx")
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}
TOLERANCE = 1e-4  # largest max-abs difference an fp32 export may have from the eager model
# Opset 17 or newer as asked; 18 is the first with Col2Im (F.fold), which the inspector's fusion uses.
OPSET = 18
METADATA = "defectae.json"
EXTRA = "pip install 'defectae[export]'"
N_PATCHES = 8  # validation patches the exports are checked on
N_IMAGES = 3  # validation images the inspector exports are checked on
N_CALIBRATION = 64  # validation patches that calibrate the int8 activation ranges
TRACE_BATCH = 2  # trace at this batch, verify at another one: the batch axis must be dynamic


class Reconstruction(nn.Module):
    """The model with the "recon" tensor as its only output: (B, C, P, P) -> (B, C, P, P)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["recon"]


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


# ----------------------------------------------------------------------------- exporters


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence exporter chatter: warnings, and prints to stdout (also C++ ones), which is --json's."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(null.fileno(), 1)
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def batch_of(x: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` samples of x, repeated when x has fewer."""
    reps = -(-n // x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:n].contiguous()


def to_torchscript(module: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace `module` on `example`; every size but the batch is fixed by the trace."""
    with quiet(), torch.no_grad():
        return torch.jit.trace(module.eval(), example, check_trace=False)


def torchscript_bytes(traced: torch.jit.ScriptModule, metadata: dict[str, Any]) -> bytes:
    """The TorchScript file, with `metadata` as the extra file defectae.json."""
    buffer = io.BytesIO()
    with quiet():
        torch.jit.save(traced, buffer, _extra_files={METADATA: json.dumps(metadata, indent=2)})
    return buffer.getvalue()


def load_torchscript(data: bytes) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """A TorchScript file's module and its defectae.json metadata."""
    extra = {METADATA: ""}
    with quiet():
        module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[METADATA]) if extra[METADATA] else {}


def require_onnx() -> None:
    """ONNX export needs onnx and onnxruntime (and onnxscript for the dynamo exporter)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise DefectaeError(
            f"--format onnx: the ONNX packages are not installed ({e.name or e}); run {EXTRA}"
        ) from None


def to_onnx(
    module: nn.Module,
    example: torch.Tensor,
    input_name: str,
    output_names: list[str],
    prefer_dynamo: bool = False,
) -> tuple[bytes, str]:
    """ONNX bytes (opset OPSET, dynamic batch axis) and the name of the exporter that made them.

    The TorchScript-based exporter is tried first (robust and fast for convnets), then the
    dynamo one; `prefer_dynamo` reverses the order (the inspector's fusion needs dynamo's
    shape tracking to keep the batch dynamic).
    """
    require_onnx()
    attempts = (
        [_onnx_dynamo, _onnx_torchscript] if prefer_dynamo else [_onnx_torchscript, _onnx_dynamo]
    )
    errors = []
    for attempt in attempts:
        try:
            with quiet(), torch.no_grad():
                return attempt(module.eval(), example, input_name, output_names)
        except Exception as e:  # noqa: BLE001 - an exporter that cannot handle the model: try the next
            errors.append(f"{attempt.__doc__}: {_first_line(e)}")
    raise RuntimeError("; ".join(errors))


def _onnx_torchscript(
    module: nn.Module, example: torch.Tensor, input_name: str, outputs: list[str]
) -> tuple[bytes, str]:
    """torchscript exporter"""
    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in [input_name, *outputs]}
    torch.onnx.export(
        module,
        (example,),
        buffer,
        dynamo=False,
        opset_version=OPSET,
        input_names=[input_name],
        output_names=outputs,
        dynamic_axes=axes,
    )
    return buffer.getvalue(), "torch.onnx (TorchScript)"


def _onnx_dynamo(
    module: nn.Module, example: torch.Tensor, input_name: str, outputs: list[str]
) -> tuple[bytes, str]:
    """dynamo exporter"""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        opset_version=OPSET,
        input_names=[input_name],
        output_names=outputs,
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    return program.model_proto.SerializeToString(), "torch.onnx (dynamo)"


def with_onnx_metadata(data: bytes, metadata: dict[str, Any]) -> bytes:
    """The ONNX model with `metadata` as the metadata_props entry defectae.json."""
    import onnx

    proto = onnx.load_from_string(data)
    for prop in [p for p in proto.metadata_props if p.key == METADATA]:
        proto.metadata_props.remove(prop)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA, json.dumps(metadata, indent=2)
    return proto.SerializeToString()


def onnx_metadata(data: bytes) -> dict[str, Any]:
    """The defectae.json metadata of an ONNX model."""
    import onnx

    props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    return json.loads(props[METADATA]) if METADATA in props else {}


def onnx_session(data: bytes, providers: list[str] | None = None) -> Any:
    """An onnxruntime session on the CPU (or the given providers)."""
    require_onnx()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(data, options, providers=providers or ["CPUExecutionProvider"])


def run_onnx(session: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run an onnxruntime session on one input tensor; outputs as CPU tensors."""
    name = session.get_inputs()[0].name
    return tuple(
        torch.from_numpy(np.asarray(o)) for o in session.run(None, {name: x.cpu().numpy()})
    )


def _outputs(result: Any) -> tuple[torch.Tensor, ...]:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def max_abs_diff(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> float:
    """The largest absolute difference over all outputs (inf for a shape mismatch or NaN)."""
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        a, b = a.detach().float().cpu(), b.detach().float().cpu()
        if a.shape != b.shape:
            return float("inf")
        diff = (a - b).abs().max().item() if a.numel() else 0.0
        worst = max(worst, diff if diff == diff else float("inf"))
    return worst


# ----------------------------------------------------------------------------- int8


def quantize_int8(
    model: nn.Module, calibration: torch.Tensor, batch: int = 16, family: str = "?"
) -> tuple[nn.Module, str]:
    """An int8 copy of `model` for the CPU and how it was made.

    Static quantization (FX graph mode, activation ranges calibrated on `calibration`) covers
    convolutions; where the graph cannot be quantized statically, Linear layers are quantized
    dynamically. A model with neither is a user error naming the family.
    """
    from torch.ao.quantization import get_default_qconfig_mapping, quantize_dynamic
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    engine = torch.backends.quantized.engine
    float_model = copy.deepcopy(model).cpu().eval()
    for m in float_model.modules():  # quantized kernels have no in-place activations
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    calibration = calibration.cpu()
    try:
        with quiet(), torch.no_grad():
            prepared = prepare_fx(
                float_model, get_default_qconfig_mapping(engine), (calibration[:2],)
            )
            for i in range(0, len(calibration), batch):
                prepared(calibration[i : i + batch])
            quantized = convert_fx(prepared)
            quantized(calibration[:2])
        return (
            quantized,
            f"static ({engine}, FX graph mode, calibrated on {len(calibration)} patches)",
        )
    except Exception as e:  # noqa: BLE001 - the graph is not statically quantizable: try dynamic
        static_error = _first_line(e)
    if any(isinstance(m, nn.Linear) for m in model.modules()):
        with quiet():
            quantized = quantize_dynamic(
                copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8
            )
        return quantized, "dynamic (Linear layers; static failed: " + static_error + ")"
    raise DefectaeError(
        f"model family '{family}': cannot be quantized to int8 (static: {static_error}; "
        f"no Linear layers to quantize dynamically)"
    )


AUROCS = ("image_auroc", "pixel_auroc")


def _no_auroc(images: int, reason: str) -> dict[str, Any]:
    return {
        "test_images": images,
        **{f"{n}_{k}": None for n in AUROCS for k in ("fp32", "int8", "delta")},
        "reason": reason,
    }


def int8_accuracy_cost(
    fp32: nn.Module, int8: nn.Module, profile: Profile, prepared: Path | None, whole_image: bool
) -> dict[str, Any]:
    """Image and pixel AUROC of the test images with the fp32 and the int8 model, and the change."""
    if prepared is None:
        return _no_auroc(0, "no prepared file with test images")
    tile, patch = profile.tile, profile.model.input_size
    inspectors = {
        key: Inspector(
            m,
            patch_size=patch,
            whole_image=whole_image,
            batch_size=tile.batch_size,
            **tile.inspector_options(),
        ).eval()
        for key, m in (("fp32", fp32), ("int8", int8))
    }
    maps: dict[str, list[np.ndarray]] = {"fp32": [], "int8": []}
    scores: dict[str, list[np.ndarray]] = {"fp32": [], "int8": []}
    with open_prepared(prepared, profile.dataset.channels) as f:
        images, n = f["test/images"], f["test/images"].shape[0]
        if n == 0:
            return _no_auroc(0, f"{prepared}: no test images")
        masks = f["test/masks"][()][:, 0].astype(bool)  # (N, H, W)
        labels = f["test/labels"][()].astype(bool)
        types = read_strings(f, "test/defect_types")
        with torch.inference_mode():
            for start in console.track(range(0, n, 4), "int8 AUROC", total=-(-n // 4)):
                x = torch.from_numpy(images[start : start + 4]).float().div_(255.0)
                for key, inspector in inspectors.items():
                    residual, score, _ = inspector(x)
                    maps[key].append(
                        residual[:, 0].half().numpy()
                    )  # float16, as tile-test stores them
                    scores[key].append(score.float().numpy())
    summary: dict[str, Any] = {"test_images": n}
    reasons = []
    for key in maps:
        metrics = compute_all(
            np.concatenate(maps[key]),
            masks,
            np.concatenate(scores[key]),
            labels,
            None,
            **profile.score.metric_options(),
            defect_types=types,
        ).metrics
        for name in AUROCS:
            summary[f"{name}_{key}"] = metrics[name].value
            if key == "fp32" and not metrics[name].defined:
                reasons.append(f"{name}: {metrics[name].reason}")
    for name in AUROCS:
        a, b = summary[f"{name}_fp32"], summary[f"{name}_int8"]
        summary[f"{name}_delta"] = b - a if a is not None and b is not None else None
    summary["reason"] = "; ".join(reasons) or None
    return summary


# ----------------------------------------------------------------------------- inputs and threshold


def reference_data(
    run: Path, profile: Profile, state: dict[str, Any], seed: int = 0
) -> ReferenceData:
    """Validation patches (the run's patches.h5) and images (prepared.h5), else random inputs."""
    c, p = profile.dataset.channels, profile.model.input_size
    h, w = profile.dataset.image_size
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
        with open_prepared(prepared, c) as f:
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
    """The prepared file tile-test used (recorded in residuals.h5), else the workspace default."""
    candidates = []
    residuals = run / "residuals.h5"
    if residuals.is_file():
        with contextlib.suppress(DefectaeError, KeyError), open_residuals(residuals) as f:
            candidates.append(Path(str(f.attrs["prepared"])))
    candidates.append(workspace.prepared_path(profile))
    return next((c for c in candidates if c.is_file()), None)


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


def _formats(format: str) -> tuple[str, ...]:
    choice = format.lower()
    if choice == "all":
        return FORMATS
    if choice not in FORMATS:
        raise DefectaeError(f"--format '{format}': expected torchscript, onnx or all")
    return (choice,)


def _metadata(
    kind: str,
    precision: str,
    profile: Profile,
    ckpt: Path,
    threshold: dict[str, Any],
    whole_image: bool,
) -> dict[str, Any]:
    c, p = profile.dataset.channels, profile.model.input_size
    h, w = profile.dataset.image_size
    size = [p, p] if kind == "reconstruction" else [h, w]
    meta: dict[str, Any] = {
        "format": "defectae-export",
        "format_version": 1,
        "version": __version__,
        "artefact": kind,
        "precision": precision,
        "family": profile.model.family,
        "profile": profile.name,
        "checkpoint": ckpt.name,
        "checkpoint_sha256": sha256_file(ckpt),
        "input": {
            "name": "patch" if kind == "reconstruction" else "image",
            "layout": "NCHW",
            "dtype": "float32",
            "shape": ["batch", c, *size],
            "color": profile.dataset.color,
            "channels": c,
            "image_size": size,
            "resize": "bilinear to image_size (as `defectae prepare`)",
            "scaling": "float32(pixel) / 255: uint8 [0, 255] -> [0, 1]",
        },
    }
    if kind == "reconstruction":
        meta["outputs"] = {"recon": ["batch", c, p, p]}
    else:
        meta["outputs"] = {
            "residual": ["batch", 1, h, w],
            "score": ["batch"],
            "recon": ["batch", c, h, w],
        }
        meta["tile"] = to_dict(profile)["tile"]
        meta["patch_size"], meta["whole_image"] = p, whole_image
        meta["threshold"] = threshold
        meta["decision"] = (
            "a pixel is defective when residual >= threshold.value; an image when score >= it"
        )
    return meta


def export_artefact(
    file: str,
    kind: str,
    fmt: str,
    precision: str,
    module: nn.Module,
    inputs: torch.Tensor,
    metadata: dict[str, Any],
    family: str,
    tolerance: float,
) -> Artefact:
    """Export `module` to `fmt`, load the bytes back, run them on `inputs` and compare with eager."""
    example = batch_of(inputs, TRACE_BATCH)
    check = inputs if len(inputs) != TRACE_BATCH else batch_of(inputs, TRACE_BATCH + 1)
    what = "reconstruction model" if kind == "reconstruction" else "inspector"
    try:
        if fmt == "torchscript":
            data, exporter = (
                torchscript_bytes(to_torchscript(module, example), metadata),
                "torch.jit.trace",
            )
        else:
            outputs = ["recon"] if kind == "reconstruction" else ["residual", "score", "recon"]
            data, exporter = to_onnx(
                module,
                example,
                "patch" if kind == "reconstruction" else "image",
                outputs,
                prefer_dynamo=kind == "inspector",
            )
            data = with_onnx_metadata(data, metadata)
    except DefectaeError:
        raise
    except Exception as e:  # noqa: BLE001 - any exporter failure is a property of the model
        raise DefectaeError(
            f"model family '{family}': its {what} cannot be exported to {fmt} ({_first_line(e)})"
        ) from None
    try:
        with quiet(), torch.inference_mode():
            if fmt == "torchscript":
                got = _outputs(load_torchscript(data)[0](check))
            else:
                got = run_onnx(onnx_session(data), check)
    except Exception as e:  # noqa: BLE001
        raise DefectaeError(
            f"{file}: the exported {what} does not run ({_first_line(e)}); nothing was written"
        ) from None
    with torch.inference_mode():
        want = _outputs(
            module.eval()(check)
        )  # computed after the export: a model changed since is caught
    diff = max_abs_diff(got, want)
    if not diff <= tolerance:
        raise DefectaeError(
            f"{file}: the {fmt} {what} differs from the eager model by {diff:.3g} "
            f"(tolerance {tolerance:g}); nothing was written"
        )
    return Artefact(file, kind, fmt, precision, data, diff, exporter)


def run(
    run: Path,
    format: str = "all",
    int8: bool = False,
    out: Path | None = None,
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    """Export a run's model and inspector, verified against the eager model; writes RUN/export/ by default."""
    started = time.perf_counter()
    formats = _formats(format)
    if "onnx" in formats:
        require_onnx()
    run = Path(run)
    ckpt = checkpoint_in(run)
    model, profile, state = load_model(ckpt, "cpu")
    family = get_family(profile.model.family)
    out = Path(out) if out is not None else run / "export"
    data = reference_data(run, profile, state)
    tile, threshold = test_settings(run, profile)
    profile = dataclasses.replace(profile, tile=tile)
    if threshold["value"] is None:
        console.warn(f"no validation threshold stored in the exports: {threshold['reason']}")
    console.info(f"export {profile.name} ({family.name}) from {ckpt}: checking on {data.source}")

    patch, tile = profile.model.input_size, profile.tile
    recon = Reconstruction(model).eval()
    inspector = Inspector(
        model, patch_size=patch, whole_image=family.whole_image, **tile.inspector_options()
    ).eval()
    jobs = [(f"model{SUFFIX[f]}", "reconstruction", f, recon, data.patches) for f in formats]
    jobs += [(f"inspector{SUFFIX[f]}", "inspector", f, inspector, data.images) for f in formats]
    artefacts = []
    for file, kind, fmt, module, inputs in console.track(jobs, "export"):
        meta = _metadata(kind, "fp32", profile, ckpt, threshold, family.whole_image)
        artefacts.append(
            export_artefact(file, kind, fmt, "fp32", module, inputs, meta, family.name, tolerance)
        )

    int8_summary = None
    if int8:
        qmodel, how = quantize_int8(model, data.calibration, family=family.name)
        qrecon = Reconstruction(qmodel).eval()
        qinspector = Inspector(
            qmodel, patch_size=patch, whole_image=family.whole_image, **tile.inspector_options()
        ).eval()
        for file, kind, module, inputs in (
            ("model_int8.pt", "reconstruction", qrecon, data.patches),
            ("inspector_int8.pt", "inspector", qinspector, data.images),
        ):
            meta = _metadata(kind, "int8", profile, ckpt, threshold, family.whole_image)
            meta["quantization"] = how
            artefacts.append(
                export_artefact(
                    file, kind, "torchscript", "int8", module, inputs, meta, family.name, tolerance
                )
            )
        with torch.inference_mode():
            vs_fp32 = max_abs_diff(_outputs(qrecon(data.patches)), _outputs(recon(data.patches)))
        int8_summary = {
            "quantization": how,
            "recon_max_abs_diff_vs_fp32": vs_fp32,
            **int8_accuracy_cost(model, qmodel, profile, data.prepared, family.whole_image),
        }

    files = []
    for a in artefacts:
        with atomic_path(out / a.file) as tmp:
            tmp.write_bytes(a.data)
        files.append(str(out / a.file))
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
        "artefacts": [
            {
                "file": a.file,
                "kind": a.kind,
                "format": a.format,
                "precision": a.precision,
                "exporter": a.exporter,
                "max_abs_diff": a.max_abs_diff,
                "bytes": len(a.data),
                "sha256": hashlib.sha256(a.data).hexdigest(),
            }
            for a in artefacts
        ],
        "max_abs_diff": {a.file: a.max_abs_diff for a in artefacts},
        "int8": int8_summary,
        "files": files + [str(out / "profile.toml"), str(out / "export.json")],
    }
    write_text_atomic(out / "export.json", json.dumps(summary, indent=2) + "\n")
    summary["seconds"] = round(time.perf_counter() - started, 3)
    _show(summary)
    return summary


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
