"""`--find-batch-size`: doubling then bisection over real training steps.

Eager steps (compiled graphs need no more memory). On a GPU an out-of-memory error ends a
trial; on CPU running out of memory kills the process instead, so the search stops at half the
free RAM divided by twice the autograd-saved bytes per patch, and always at
`train.find_batch_max`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from defectae import console
from defectae import device as devices
from defectae.errors import DefectaeError
from defectae.models import build_model
from defectae.profiles import Profile
from defectae.training.step import Objective, make_optimizer, train_step

Tensor = torch.Tensor


def largest_batch(fits: Callable[[int], bool], cap: int) -> int:
    """The largest batch in [1, cap] for which `fits` holds, by doubling then bisection."""
    if not fits(1):
        raise DefectaeError("--find-batch-size: not even a batch of 1 fits on this device")
    good = 1
    while good < cap:
        trial = min(2 * good, cap)
        if not fits(trial):
            bad = trial
            break
        good = trial
    else:
        return good
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def find_batch_size(
    profile: Profile, dev: torch.device, dtype: torch.dtype | None, num_train: int, world: int
) -> dict[str, Any]:
    """Search the largest batch that trains on `dev` (a copy of the model, real steps)."""
    if world > 1:
        raise DefectaeError("--find-batch-size: run it in a single process (without torchrun)")
    cfg, size, channels = profile.train, profile.model.input_size, profile.dataset.channels
    model = build_model(profile.model.family, channels, size, profile.model.args).to(dev)
    objective = Objective(model, profile.loss)
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(dev.type, enabled=devices.needs_grad_scaler(dtype))
    cap, why = min(cfg.find_batch_max, num_train), "train.find_batch_max / training patches"
    if dev.type == "cpu" and (ram := _free_ram()) is not None:
        per_patch = 2 * _saved_bytes_per_patch(objective, channels, size, dtype)
        if ram // 2 // per_patch < cap:
            cap = max(1, ram // 2 // per_patch)
            why = f"half the free RAM at ~{per_patch / 2**20:.1f} MiB/patch"

    def fits(b: int) -> bool:
        x = torch.rand(b, channels, size, size, device=dev)
        batch = {"clean": x, "input": x, "mask": torch.zeros_like(x[:, :1])}
        failed = False
        try:
            train_step(objective, optimizer, scaler, batch, epoch=1, device=dev, dtype=dtype)
        except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
            message = str(e).lower()
            if "out of memory" not in message and "can't allocate memory" not in message:
                raise
            failed = True
        model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        console.debug(f"batch {b}: {'out of memory' if failed else 'fits'}")
        return not failed

    found = largest_batch(fits, cap)
    console.info(
        f"largest batch that trains {profile.model.family} on {dev}: {found} (searched up to {cap}: {why})"
    )
    return {
        "batch_size": found,
        "cap": cap,
        "cap_reason": why,
        "device": str(dev),
        "amp": devices.amp_name(dtype),
    }


def _free_ram() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _saved_bytes_per_patch(
    objective: nn.Module, channels: int, size: int, dtype: torch.dtype | None
) -> int:
    """Bytes autograd keeps for backward per patch (measured on a batch of 2)."""
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = torch.rand(2, channels, size, size)
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        devices.autocast(x.device, dtype),
    ):
        objective(x, x, None, 0)["total"]
    return max(1, total // 2 + 2 * x[0].numel() * 4)
