"""Training throughput of real steps, measured by `make bench` through the same step the loop runs."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from defectae import device as devices
from defectae.profiles import LossConfig
from defectae.training.step import Objective, train_step

Tensor = torch.Tensor


def train_throughput(
    model: nn.Module,
    data: Tensor | Iterable[dict[str, Tensor]],
    steps: int = 20,
    amp: str = "off",
    compile_model: bool = False,
    device: str = "cpu",
    loss: LossConfig | None = None,
    warmup: int = 3,
) -> dict[str, Any]:
    """Training throughput of real steps (forward, loss, backward, Adam) for `make bench`.

    `data` is one (B, C, P, P) batch reused every step, or an iterable of PatchDataset
    batches (e.g. a DataLoader), cycled; returns patches/s, the fraction of time spent
    waiting for data, and peak memory. Trains `model` in place.
    """
    dev = devices.resolve_device(device)
    dtype = devices.amp_dtype(dev, amp)
    model = model.to(dev).train()
    batches = _cycle(data)
    first = next(batches)
    model = devices.compile_for_training(model, compile_model, first["clean"].to(dev))
    objective = Objective(model, loss or LossConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=devices.needs_grad_scaler(dtype))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    batch, patches, wait = first, 0, 0.0
    for i in range(warmup + steps):
        if i == warmup:
            devices.synchronize(dev)
            start, patches, wait = time.perf_counter(), 0, 0.0
        train_step(objective, optimizer, scaler, batch, epoch=1, device=dev, dtype=dtype)
        patches += batch["clean"].shape[0]
        t = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t
    devices.synchronize(dev)
    seconds = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated(dev)
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "patches_per_s": patches / seconds,
        "data_wait_fraction": wait / seconds,
        "peak_memory_mb": peak / 2**20,
        "compiled": model is not devices.unwrap(model),
        "amp": devices.amp_name(dtype),
    }


def _cycle(data: Tensor | Iterable[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
    if isinstance(data, Tensor):
        while True:
            yield {"clean": data, "input": data, "mask": torch.zeros_like(data[:, :1])}
    while True:
        yield from data
