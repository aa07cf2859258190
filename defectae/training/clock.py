"""Training time: the warm-up estimate of a `train` call, its ETA and its time budget.

The warm-up steps are the first real steps of the call (so timing them changes nothing): the
first `skip` are left out of the timing (torch.compile, cuDNN autotuning and allocator growth
happen there), the next `timed` give the seconds per step. Validation is timed before training
on one batch, after an untimed pass that absorbs the eval-mode compile. After each epoch the
measured epoch replaces the warm-up figures, so the ETA gets better as the run goes.
The budget counts from the start of the loop (`fit`), after the model is built.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from defectae import device as devices
from defectae.profiles import LossConfig
from defectae.training.step import validate

Tensor = torch.Tensor

WARMUP_SKIP = 2  # steps of a call left out of the timing
WARMUP_STEPS = 5  # steps of a call timed for the estimate


def warmup_plan(available: int) -> tuple[int, int]:
    """(steps skipped, steps timed) of a warm-up inside `available` steps of the first epoch:
    at least one timed step, the skipped ones only where the epoch leaves room for them."""
    timed = max(1, min(WARMUP_STEPS, available - 1))
    return min(WARMUP_SKIP, max(0, available - timed)), timed


@dataclasses.dataclass
class Clock:
    """The time of one `train` call: step and validation timings, the ETA, and the budget."""

    device: torch.device
    budget_s: float = 0.0  # 0 = no limit
    world: int = 1
    start: float = dataclasses.field(default_factory=time.perf_counter)
    step_s: float | None = None  # seconds per optimizer step, once measured
    val_s: float = 0.0  # seconds an epoch spends beyond its steps (validation, logging, saving)
    epochs: int = 0  # epochs completed in this call
    skip: int = 0
    timed: int = 0
    steps: int = 0  # optimizer steps of this call
    estimate_s: float | None = None  # the warm-up's estimate of this call's training time
    _mark: float = 0.0

    def elapsed(self) -> float:
        """Seconds since the loop started."""
        return time.perf_counter() - self.start

    def plan(self, available: int) -> None:
        """Set the warm-up for a first epoch of this call with `available` steps to go."""
        self.skip, self.timed = warmup_plan(available)
        self._mark = time.perf_counter()

    def step_done(self) -> bool:
        """Count an optimizer step; True right after the last timed warm-up step."""
        self.steps += 1
        if self.steps == self.skip:
            devices.synchronize(self.device)
            self._mark = time.perf_counter()
        if self.steps != self.skip + self.timed:
            return False
        devices.synchronize(self.device)
        self.step_s = (time.perf_counter() - self._mark) / self.timed
        return True

    def epoch_done(self, step_seconds: float, epoch_seconds: float, steps: int) -> None:
        """Take an epoch's measured step time (after the first epoch of the call, which holds
        the warm-up) and its time beyond the steps."""
        if self.epochs or self.step_s is None:
            self.step_s = step_seconds / steps
        self.val_s = max(0.0, epoch_seconds - step_seconds)
        self.epochs += 1

    def remaining(
        self, steps_left: int, epochs_after: int, steps_per_epoch: int, validated: bool = False
    ) -> float:
        """Seconds to go: the steps left in this epoch and (unless `validated`) its validation,
        then whole epochs."""
        step = self.step_s or 0.0
        this = steps_left * step + (0.0 if validated else self.val_s)
        return this + epochs_after * (steps_per_epoch * step + self.val_s)

    def stop_epoch(
        self, steps_left: int, epoch: int, epochs: int, steps_per_epoch: int
    ) -> int | None:
        """The epoch in which the budget stops the run (None: it fits, or no budget)."""
        if not self.budget_s or self.step_s is None:
            return None
        t = self.elapsed() + steps_left * self.step_s
        for e in range(epoch, epochs + 1):
            if e > epoch:
                t += steps_per_epoch * self.step_s
            if t >= self.budget_s:
                return e
            t += self.val_s
        return None

    def out_of_time(self) -> bool:
        """The budget is spent (all DDP ranks agree, on rank 0's clock)."""
        if not self.budget_s:
            return False
        over = self.elapsed() >= self.budget_s
        if self.world == 1:
            return over
        flag = torch.tensor([float(over)], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def record(self, status: str) -> dict[str, Any]:
        """This call's entry of the checkpoint's `timing` list (step_ms: the latest measure)."""
        return {
            "estimate_s": self.estimate_s,
            "elapsed_s": self.elapsed(),
            "step_ms": None if self.step_s is None else 1000 * self.step_s,
            "warmup_steps": self.timed if self.estimate_s is not None else 0,
            "steps": self.steps,
            "max_minutes": self.budget_s / 60,
            "status": status,
        }


def validation_seconds(
    model: nn.Module,
    batch: dict[str, Tensor],
    batches: int,
    loss: LossConfig,
    dev: torch.device,
    dtype: torch.dtype | None,
) -> float:
    """Seconds of a validation pass over `batches` batches like `batch`, timed on one batch
    after an untimed pass (eval-mode compile); no trace on the weights or the RNG streams."""
    validate(model, [batch], loss, 1, dev, dtype)
    devices.synchronize(dev)
    start = time.perf_counter()
    validate(model, [batch], loss, 1, dev, dtype)
    devices.synchronize(dev)
    return (time.perf_counter() - start) * batches


def duration(seconds: float) -> str:
    """A duration for people: 45 s, 14 min, 2 h 05 min."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min"


def hms(seconds: float) -> str:
    """A duration as H:MM:SS, like the progress bar's."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
