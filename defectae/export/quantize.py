"""int8 quantization for PyTorch's CPU kernels, and its accuracy cost on the test images."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from defectae import console
from defectae.core.inspector import Inspector
from defectae.core.metrics import compute_all
from defectae.errors import DefectaeError, first_line
from defectae.export.converters import quiet
from defectae.profiles import Profile
from defectae.stores.prepared import open_prepared, read_strings

AUROCS = ("image_auroc", "pixel_auroc")
PRECISIONS = ("fp32", "int8")


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
        static_error = first_line(e)
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


def _no_auroc(images: int, reason: str) -> dict[str, Any]:
    return {
        "test_images": images,
        **{f"{n}_{k}": None for n in AUROCS for k in ("fp32", "int8", "delta")},
        "reason": reason,
    }


def int8_accuracy_cost(
    fp32: nn.Module,
    int8: nn.Module,
    profile: Profile,
    prepared: Path | None,
    whole_image: bool,
    normalization: tuple[torch.Tensor, torch.Tensor] | None = None,
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
            normalization=normalization,
            **tile.inspector_options(),
        ).eval()
        for key, m in zip(PRECISIONS, (fp32, int8), strict=True)
    }
    with open_prepared(prepared, profile.dataset) as f:
        n = f["test/images"].shape[0]
        if n == 0:
            return _no_auroc(0, f"{prepared}: no test images")
        masks = f["test/masks"][()][:, 0].astype(bool)  # (N, H, W)
        labels = f["test/labels"][()].astype(bool)
        types = read_strings(f, "test/defect_types")
        maps, scores = _inspect(inspectors, f["test/images"])
    summary: dict[str, Any] = {"test_images": n}
    reasons = []
    for key in PRECISIONS:
        metrics = compute_all(
            maps[key],
            masks,
            scores[key],
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


def _inspect(
    inspectors: dict[str, Inspector], images: Any, batch: int = 4
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Residual maps (N, H, W) float16, as tile-test stores them, and image scores (N,) per inspector."""
    maps: dict[str, list[np.ndarray]] = {key: [] for key in inspectors}
    scores: dict[str, list[np.ndarray]] = {key: [] for key in inspectors}
    n = images.shape[0]
    with torch.inference_mode():
        for start in console.track(range(0, n, batch), "int8 AUROC", total=-(-n // batch)):
            x = torch.from_numpy(images[start : start + batch]).float().div_(255.0)
            for key, inspector in inspectors.items():
                residual, score, _ = inspector(x)
                maps[key].append(residual[:, 0].half().numpy())
                scores[key].append(score.float().numpy())
    return (
        {k: np.concatenate(v) for k, v in maps.items()},
        {k: np.concatenate(v) for k, v in scores.items()},
    )
