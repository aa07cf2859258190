"""Can the trained model reach its inputs' intensities? A check on the validation patches.

A model whose reconstructions stop short of the inputs' range (bright backgrounds come back
grey) reports every bright region as a defect: a recipe bug (an output activation, the
training patches, the loss), not something test-time settings can fix. `RangeCheck` gathers,
batch by batch, the 1st and 99th percentiles of inputs and reconstructions (from 1025-level
histograms, to within 1/2048) and the mean absolute error on nearly uniform patches, where a
model has no excuse; `check_range` runs it once over a patch file after training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defectae import console
from defectae import device as devices
from defectae.stores.patches import PatchDataset

LEVELS = 1025  # histogram levels on [0, 1]
UNIFORM_STD = 0.02  # a patch with a smaller standard deviation (in [0, 1] units) is uniform
MAX_GAP = 0.1  # the reconstructions' p1 / p99 may miss the inputs' by at most this much


class RangeCheck:
    """Percentiles of inputs and reconstructions and the error on uniform patches, batch by batch."""

    def __init__(self) -> None:
        self.inputs = torch.zeros(LEVELS, dtype=torch.int64)
        self.recons = torch.zeros(LEVELS, dtype=torch.int64)
        self.uniform_error = 0.0
        self.uniform_patches = 0

    def add(self, inputs: torch.Tensor, recons: torch.Tensor) -> None:
        """Count a batch: (B, C, P, P) inputs and reconstructions in [0, 1] (clamped here)."""
        x, r = inputs.detach().float().clamp(0, 1), recons.detach().float().clamp(0, 1)
        self.inputs += _levels(x)
        self.recons += _levels(r)
        uniform = x.flatten(1).std(dim=1) < UNIFORM_STD  # (B,)
        if uniform.any():
            error = (r[uniform] - x[uniform]).abs().flatten(1).mean(dim=1)  # (U,)
            self.uniform_error += float(error.sum())
            self.uniform_patches += int(uniform.sum())

    def result(self) -> dict[str, Any]:
        """{"recon_range": {input_p1, input_p99, recon_p1, recon_p99, reached}, "uniform_mae"
        (None without uniform patches), "uniform_patches"}."""
        p1, p99 = _percentile(self.inputs, 0.01), _percentile(self.inputs, 0.99)
        r1, r99 = _percentile(self.recons, 0.01), _percentile(self.recons, 0.99)
        return {
            "recon_range": {
                "input_p1": p1,
                "input_p99": p99,
                "recon_p1": r1,
                "recon_p99": r99,
                "reached": r99 >= p99 - MAX_GAP and r1 <= p1 + MAX_GAP,
            },
            "uniform_mae": (
                round(self.uniform_error / self.uniform_patches, 6)
                if self.uniform_patches
                else None
            ),
            "uniform_patches": self.uniform_patches,
        }


def range_warning(result: dict[str, Any]) -> str | None:
    """One line when the reconstructions miss the inputs' range (a `RangeCheck.result`), else None."""
    span = result["recon_range"]
    if span["reached"]:
        return None
    uniform = (
        f"; mean absolute error {result['uniform_mae']:.3f} on {result['uniform_patches']} "
        "uniform validation patches"
        if result["uniform_patches"]
        else ""
    )
    return (
        f"the model cannot reach its inputs' intensities: on the validation patches the 1st-99th "
        f"percentiles are {span['input_p1']:.3f}-{span['input_p99']:.3f} in, "
        f"{span['recon_p1']:.3f}-{span['recon_p99']:.3f} reconstructed (more than {MAX_GAP} short)"
        f"{uniform}; a recipe bug: check the model's output range and augment's intensity report"
    )


@torch.no_grad()
def check_range(
    model: nn.Module,
    patches: Path,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> dict[str, Any]:
    """`RangeCheck.result` of `model` (eval mode, seed 0 for stochastic models) over the
    validation patches of a patch file; warns in one line when the range is not reached.
    Feature-space models reconstruct no pixels: {} for them."""
    if getattr(devices.unwrap(model), "maps_anomalies", False):
        return {}
    check = RangeCheck()
    val = PatchDataset(patches, "validation", batch_size)
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices.rng_devices(device)):
            torch.manual_seed(0)
            for i in range(len(val)):
                x = val[i]["clean"].to(device)  # (B, C, P, P)
                with devices.autocast(device, dtype):
                    recon = model(x)["recon"]
                check.add(x, recon)
    finally:
        val.close()
        model.train()
    result = check.result()
    if (warning := range_warning(result)) is not None:
        console.warn(warning)
    return result


def _levels(x: torch.Tensor) -> torch.Tensor:
    """(LEVELS,) counts of the values of x in [0, 1], each rounded to the nearest level."""
    index = torch.round(x.flatten() * (LEVELS - 1)).long()
    return torch.bincount(index, minlength=LEVELS).cpu()


def _percentile(counts: torch.Tensor, q: float) -> float:
    """The smallest level at or below which a share q of the counted values lies."""
    total = int(counts.sum())
    if total == 0:
        return float("nan")
    target = torch.tensor(max(1, math.ceil(q * total)))
    level = int(torch.searchsorted(torch.cumsum(counts, 0), target))
    return round(level / (LEVELS - 1), 6)
