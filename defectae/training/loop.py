"""The training loop of `defectae train`: per epoch train, validate, log and checkpoint.
Read `fit` top to bottom; `TrainState.build` makes (and compiles) what it trains.

Choices a reader needs:
- Learning rate: a pure function of the optimizer step (LambdaLR, stepped after every
  optimizer step): a linear warm-up over `warmup_epochs`, then cosine decay to 0 at the last
  step, a decay by `gamma` every `step_size` epochs, or constant. Resume restores the step
  counter, so the schedule continues exactly; a run resumed with more epochs continues on the
  schedule over its new total (`TrainState.restore` sets the learning rate of that step).
- Data order: every epoch shuffles the *global* batch indices with a torch.Generator seeded
  by (seed, epoch); an incomplete last batch is dropped. `train.batch_size` is the global
  batch. Under DDP each rank reads a PatchDataset of batch_size / world_size patches, so global
  batch g is made of sub-batches g*W .. g*W+W-1 and rank r reads sub-batch g*W + r: together
  the ranks see exactly the single-process batch, and DDP's average of the gradients of equal
  sub-batches is the gradient of the global batch mean. (Corruptions are seeded per sub-batch,
  so denoising runs under DDP match single-process runs in distribution, not bit for bit.)
- Checkpoints: last.pt before the first epoch and after every epoch (best.pt, when improved,
  first); nothing is saved mid-epoch but by a time-limit stop (below). After Ctrl-C or a
  kill, last.pt holds the last completed epoch with the RNG states of torch, numpy and python,
  and `--resume` restarts the next epoch from its beginning, so it ends with the same weights
  as an uninterrupted run.
- Status: last.pt says how the run ended: "finished", "stopped_early", "nan" (a non-finite
  loss; last.pt is rewritten with only its status changed), "interrupted" (Ctrl-C),
  "time-limit" (train.max_minutes spent), or "running" while it trains and after a kill.
- Time (`defectae.training.clock`): the first steps of a call are timed as its warm-up and
  give the estimate line; the progress display and the epoch lines show elapsed time and the
  ETA. The budget is checked after every step: spent mid-epoch, last.pt saves the exact state
  at that step (`epoch_step` steps into the next epoch, RNG included) and `--resume` continues
  with the next batch of that epoch's order, so the weights are again those of an uninterrupted
  run (the resumed epoch's train means cover only its remaining steps); spent at an epoch's
  last step, the epoch is validated and saved first. best.pt stays the best validated epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from rich.progress import Progress, TaskID
from torch import nn
from torch.utils.data import DataLoader

from defectae import console
from defectae import device as devices
from defectae.errors import DefectaeError
from defectae.profiles import Profile
from defectae.stores.checkpoint import record_status, save_checkpoint
from defectae.stores.patches import PatchDataset
from defectae.training.clock import Clock, duration, hms, validation_seconds
from defectae.training.rng import rng_state
from defectae.training.state import TrainState
from defectae.training.step import Objective, epoch_order, train_step, validate
from defectae.training.tensorboard import RunLog

Tensor = torch.Tensor


@dataclasses.dataclass(frozen=True)
class Run:
    """What stays fixed while a run trains: its profile, data, folder, device and DDP place."""

    profile: Profile
    patches: Path
    run_dir: Path
    device: torch.device
    dtype: torch.dtype | None  # the autocast dtype; None = full precision
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints and writes."""
        return self.rank == 0


@dataclasses.dataclass(frozen=True)
class Display:
    """The progress bars of a call: the whole run's (with its ETA), above the epoch's."""

    bar: Progress
    run: TaskID


def fit(run: Run, state: TrainState, save_first: bool) -> tuple[dict[str, float], float | None]:
    """Train a built (or restored) state on to the last epoch, an early stop or the time budget
    (train.max_minutes); `save_first`: save last.pt before the first epoch (a new run, or a
    resumed one whose profile changed).

    Returns the last validation means and the last epoch's patches/s; `state` holds the rest.
    """
    cfg, dev = run.profile.train, run.device
    sub_batch = cfg.batch_size // run.world
    train_set = PatchDataset(run.patches, "train", sub_batch, run.profile.corruption, seed=cfg.seed)
    val_set = PatchDataset(run.patches, "validation", sub_batch)
    steps = train_set.num_patches // cfg.batch_size
    objective: nn.Module = Objective(state.model, run.profile.loss)
    if run.world > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    val_loader = DataLoader(
        val_set,
        batch_size=None,
        sampler=range(run.rank, len(val_set), run.world),
        num_workers=cfg.num_workers,
        pin_memory=dev.type == "cuda",
    )
    log = None
    if run.main:
        n_images = min(cfg.n_log_images, val_set.num_patches)
        learns = getattr(devices.unwrap(state.model), "learns_from_corruptions", False)
        corruption = run.profile.corruption if learns else None
        shown = PatchDataset(run.patches, "validation", n_images, corruption, seed=cfg.seed)[0]
        masks = shown["mask"].to(dev) if learns else None
        log = RunLog(run.run_dir, state.epoch, state.step, cfg, shown["input"].to(dev), masks)
        console.info(
            f"{run.profile.model.family} on {dev}, {run.world} process(es), batch {cfg.batch_size}, "
            f"{steps} steps/epoch, amp {devices.amp_name(run.dtype)}, "
            f"{'compiled' if state.compiled else 'eager'}"
        )
    val: dict[str, float] = {}
    if not state.stopped:  # a resumed run trains on (or stays finished)
        state.status = "running" if state.epoch < cfg.epochs else "finished"
    clock = Clock(dev, 60 * cfg.max_minutes, run.world)
    state.timing.append(clock.record(state.status))
    if save_first:
        save(run, state, "last.pt", clock)
    if state.status == "running":
        val_batches = len(range(run.rank, len(val_set), run.world))
        clock.val_s = validation_seconds(
            state.model, val_set[run.rank], val_batches, run.profile.loss, dev, run.dtype
        )
    try:
        with console.progress() as bar, remembered_interrupts():
            done = state.epoch * steps + state.epoch_step
            display = Display(bar, bar.add_task("run", total=cfg.epochs * steps, completed=done))
            val = _epochs(run, state, objective, train_set, val_loader, steps, log, clock, display)
    except KeyboardInterrupt:
        state.status = "interrupted"
        if run.main:
            record_status(run.run_dir / "last.pt", state.status)
            console.warn(
                f"interrupted in epoch {state.epoch}; {run.run_dir / 'last.pt'} holds the last "
                f"completed epoch; continue with `defectae train --resume {run.run_dir}`"
            )
        raise
    finally:
        state.timing[-1] = clock.record(state.status)
        if log is not None:
            log.close()
    if state.stopped and run.main:
        console.info(
            f"early stop after epoch {state.epoch}: no improvement > {cfg.min_delta} "
            f"for {cfg.patience} epochs"
        )
    if state.status == "time-limit" and run.main:
        console.info(_time_limit_message(run, state, steps))
    rate = log.metrics[-1]["patches_per_s"] if log is not None and log.metrics else None
    return val, rate


INTERRUPTED = threading.Event()


@contextlib.contextmanager
def remembered_interrupts() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered: one that lands in a
    finalizer (`__del__`), where Python prints and drops it, still stops training after the step."""
    INTERRUPTED.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        INTERRUPTED.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _epochs(
    run: Run,
    state: TrainState,
    objective: nn.Module,
    train_set: PatchDataset,
    val_loader: DataLoader,
    steps: int,
    log: RunLog | None,
    clock: Clock,
    display: Display,
) -> dict[str, float]:
    """The epochs of a call, each trained, validated, logged and saved; the last validation."""
    cfg, dev = run.profile.train, run.device
    val: dict[str, float] = {}
    while state.status == "running":
        state.epoch += 1
        started, first = time.perf_counter(), state.epoch_step
        train, timing = train_epoch(run, state, objective, train_set, steps, log, clock, display)
        if state.status == "time-limit":  # mid-epoch: last.pt keeps the exact state
            state.epoch -= 1
            save(run, state, "last.pt", clock)
            return val
        val = validate(
            state.model,
            val_loader,
            run.profile.loss,
            state.epoch,
            dev,
            run.dtype,
            run.world,
            objective=devices.unwrap(objective),
        )
        if not all(math.isfinite(v) for v in val.values()):
            where = f"epoch {state.epoch} step {state.step}: validation loss is {val['total']}"
            raise _stop_on_nan(run, state, where)
        improved = state.end_epoch(val["total"], cfg)
        if state.status == "running" and clock.out_of_time():
            state.status = "time-limit"
        record = {
            "epoch": state.epoch,
            "step": state.step,
            "lr": state.optimizer.param_groups[0]["lr"],
            **{f"train_{k}": v for k, v in train.items()},
            **{f"val_{k}": v for k, v in val.items()},
            **timing,
        }
        if log is not None:
            log.epoch(record, state.model, run.dtype)
            epochs_after = cfg.epochs - state.epoch if state.status == "running" else 0
            left = _left(clock, clock.remaining(0, epochs_after, steps, validated=True))
            ssim = f"  ssim {val['ssim']:.4f}" if "ssim" in val else ""
            console.info(
                f"epoch {state.epoch}/{cfg.epochs}  train {train['total']:.5f}  "
                f"val {val['total']:.5f}{ssim}  lr {record['lr']:.2e}  "
                f"{record['patches_per_s']:.0f} patches/s  {hms(clock.elapsed())} elapsed, "
                f"~{hms(left)} left" + ("  best" if improved else "")
            )
        if improved:
            save(run, state, "best.pt", clock)
        save(run, state, "last.pt", clock)
        clock.epoch_done(timing["seconds"], time.perf_counter() - started, steps - first)
    return val


def train_epoch(
    run: Run,
    state: TrainState,
    objective: nn.Module,
    train_set: PatchDataset,
    steps: int,
    log: RunLog | None,
    clock: Clock,
    display: Display,
) -> tuple[dict[str, float], dict[str, float]]:
    """The optimizer steps of epoch `state.epoch` (from `state.epoch_step`, where a time-limit
    stop left it, until its end or the budget): the mean loss terms over all ranks, and timings."""
    cfg, dev = run.profile.train, run.device
    first = state.epoch_step
    train_set.set_epoch(state.epoch)
    loader = DataLoader(
        train_set,
        batch_size=None,
        sampler=epoch_order(cfg.seed, state.epoch, steps, run.world, run.rank)[first:],
        num_workers=cfg.num_workers,
        pin_memory=dev.type == "cuda",
        generator=torch.Generator().manual_seed(state.epoch),
    )
    if clock.steps == 0:
        clock.plan(steps - first)
    sums: dict[str, Tensor] = {}
    norms = []
    wait, start, done = 0.0, time.perf_counter(), first
    title = f"epoch {state.epoch}/{cfg.epochs}"
    task = display.bar.add_task(title, total=steps, completed=first)
    batches = iter(loader)
    for i in range(first, steps):
        t = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t
        try:
            terms, loss, norm = train_step(
                objective,
                state.optimizer,
                state.scaler,
                batch,
                epoch=state.epoch,
                device=dev,
                dtype=run.dtype,
                grad_clip=cfg.grad_clip,
                corrupted=train_set.corruption is not None,
                world=run.world,
            )
        except FloatingPointError as e:
            where = f"epoch {state.epoch} step {state.step + 1} (batch {i + 1}/{steps})"
            raise _stop_on_nan(run, state, f"{where}: loss is {e.args[0]}") from None
        if INTERRUPTED.is_set():  # a Ctrl-C that a finalizer swallowed
            raise KeyboardInterrupt
        state.step += 1
        state.scheduler.step()
        done = i + 1
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + value
        norms.append(norm)
        if log is not None:
            log.step(loss, state.step)
        if clock.step_done():
            line = _estimate(run, state, clock, steps, steps - done)
            if run.main:
                console.info(line)
        eta = _left(clock, clock.remaining(steps - done, cfg.epochs - state.epoch, steps))
        display.bar.update(task, advance=1, description=f"{title} loss {loss:.4f}")
        display.bar.update(display.run, advance=1, eta=eta)
        if done < steps and clock.out_of_time():
            state.status = "time-limit"
            break
    display.bar.remove_task(task)
    del batches
    state.epoch_step = done if done < steps else 0
    seconds = time.perf_counter() - start
    norm_t = torch.stack(norms)
    timing = {
        "grad_norm": norm_t.mean().item(),
        "grad_norm_max": norm_t.max().item(),
        "seconds": seconds,
        "patches_per_s": (done - first) * cfg.batch_size / seconds,
        "data_wait_fraction": wait / seconds,
    }
    return _mean_over_ranks(sums, done - first, run.world), timing


def save(run: Run, state: TrainState, name: str, clock: Clock | None = None) -> None:
    """RUN/name from rank 0, holding every rank's RNG state (under DDP all ranks must call it)
    and, with `clock`, this call's timing so far."""
    if clock is not None:
        state.timing[-1] = clock.record(state.status)
    rng = [rng_state(run.device)]
    if run.world > 1:
        rng = [None] * run.world
        dist.all_gather_object(rng, rng_state(run.device))
    if run.main:
        checkpoint = state.checkpoint(run.profile, run.patches, rng, run.world)
        save_checkpoint(checkpoint, run.run_dir / name)


def _estimate(run: Run, state: TrainState, clock: Clock, steps: int, steps_left: int) -> str:
    """The warm-up's line: this call's training time as steps x step time + validation, and
    the epoch where the time budget stops the run; sets `clock.estimate_s`."""
    cfg = run.profile.train
    epochs_after = cfg.epochs - state.epoch
    call_steps = clock.steps + steps_left + epochs_after * steps
    clock.estimate_s = call_steps * clock.step_s + (epochs_after + 1) * clock.val_s
    if call_steps == cfg.epochs * steps:
        how = f"{steps:,} steps/epoch x {cfg.epochs} epochs"
    else:
        how = f"{call_steps:,} of {cfg.epochs * steps:,} steps left"
    ms = 1000 * clock.step_s
    line = (
        f"estimated training time: {duration(clock.estimate_s)} ({how} x "
        f"{f'{ms:.0f}' if ms >= 10 else f'{ms:.2g}'} ms/step + {clock.val_s:.2g} s "
        f"validation/epoch, measured on {clock.timed} warm-up step"
        f"{'s' if clock.timed > 1 else ''}{'' if clock.skip else ', the first included'})"
    )
    if clock.budget_s:
        budget = f"the {cfg.max_minutes:g} min budget"
        stop = clock.stop_epoch(steps_left, state.epoch, cfg.epochs, steps)
        line += (
            f"; {budget} stops it in epoch {stop} of {cfg.epochs}"
            if stop
            else f"; {budget} is enough"
        )
    return line


def _left(clock: Clock, remaining: float) -> float:
    """The ETA in seconds: the time the run needs, or what the budget leaves when it is less."""
    if clock.budget_s:
        remaining = min(remaining, max(0.0, clock.budget_s - clock.elapsed()))
    return remaining


def _time_limit_message(run: Run, state: TrainState, steps: int) -> str:
    """Where the time budget stopped the run, which weights it kept, and how to continue."""
    cfg = run.profile.train
    budget = f"the {cfg.max_minutes:g} min time budget"
    if state.epoch_step:
        where = (
            f"stopped the run in epoch {state.epoch + 1} of {cfg.epochs} at step "
            f"{state.step:,} ({state.epoch_step} of {steps} in the epoch)"
        )
    else:
        where = f"stopped the run after epoch {state.epoch} of {cfg.epochs} (step {state.step:,})"
    if state.best_epoch:
        kept = f"best.pt holds the best validation weights (epoch {state.best_epoch})"
    else:
        kept = f"no epoch is validated yet, last.pt holds the weights of step {state.step:,}"
    return (
        f"time limit: {budget} {where}; {kept}; continue with "
        f"`defectae train --resume {run.run_dir}`"
    )


def _stop_on_nan(run: Run, state: TrainState, where: str) -> DefectaeError:
    """The error that stops a run on a non-finite loss, after marking last.pt (which keeps the
    last completed epoch) as stopped on NaN."""
    state.status = "nan"
    last = run.run_dir / "last.pt"
    if run.main:
        record_status(last, state.status)
    return DefectaeError(f"{where}; stopped, {last} keeps epoch {state.epoch - 1}")


def _mean_over_ranks(sums: dict[str, Tensor], steps: int, world: int) -> dict[str, float]:
    keys = sorted(sums)
    packed = torch.stack([sums[k] for k in keys]).double()
    if world > 1:
        dist.all_reduce(packed)
    return {k: v / (steps * world) for k, v in zip(keys, packed.tolist(), strict=True)}
