"""`defectae train`: one training loop with AMP, torch.compile, validation, early stopping,
exact resume, TensorBoard and DDP.

Choices a reader needs:
- Learning rate: a pure function of the optimizer step (LambdaLR, stepped after every
  optimizer step): a linear warm-up over `warmup_epochs`, then cosine decay to 0 at the last
  step, a decay by `gamma` every `step_size` epochs, or constant. Resume restores the step
  counter, so the schedule continues exactly.
- Data order: every epoch shuffles the *global* batch indices with a torch.Generator seeded
  by (seed, epoch); an incomplete last batch is dropped. `train.batch_size` is the global
  batch. Under DDP each rank reads a PatchDataset of batch_size / world_size patches, so global
  batch g is made of sub-batches g*W .. g*W+W-1 and rank r reads sub-batch g*W + r: together
  the ranks see exactly the single-process batch, and DDP's average of the gradients of equal
  sub-batches is the gradient of the global batch mean. (Corruptions are seeded per sub-batch,
  so denoising runs under DDP match single-process runs in distribution, not bit for bit.)
- Checkpoints: last.pt before the first epoch and after every epoch (best.pt, when improved,
  first); nothing is saved mid-epoch. After Ctrl-C or a kill, last.pt holds the last completed
  epoch with the RNG states of torch, numpy and python, and `--resume` restarts the next epoch
  from its beginning, so it ends with the same weights as an uninterrupted run.
- `--find-batch-size`: doubling then bisection over real training steps (eager; compiled
  graphs need no more memory). On a GPU an out-of-memory error ends a trial; on CPU running
  out of memory kills the process instead, so the search stops at half the free RAM divided
  by twice the autograd-saved bytes per patch, and always at `train.find_batch_max`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader

from defectae import console, profiles, workspace
from defectae import device as devices
from defectae.errors import DefectaeError
from defectae.files import write_text_atomic
from defectae.models import build_model
from defectae.profiles import Profile, TrainConfig
from defectae.stores.checkpoint import (
    check_profile,
    load_checkpoint,
    load_weights,
    profile_of,
    save_checkpoint,
)
from defectae.stores.patches import PatchDataset
from defectae.training.step import (
    Objective,
    epoch_order,
    lr_factor,
    make_optimizer,
    term_name,
    train_step,
    validate,
)

AMP_MODES = ("auto", "bf16", "fp16", "off")
COMPILE_MODES = ("on", "off")
Tensor = torch.Tensor


# ----------------------------------------------------------------------------- the command


def run(
    profile: Profile | None,
    patches: Path | None = None,
    resume: Path | None = None,
    amp: str | None = None,
    compile: str | None = None,
    find_batch_size: bool = False,
    write_batch_size: bool = False,
) -> dict[str, Any]:
    """Train a model on patches.h5 into a new run folder (or continue one with `resume`)."""
    amp = _choice("--amp", amp, AMP_MODES)
    compile = _choice("--compile", compile, COMPILE_MODES)
    if write_batch_size and not find_batch_size:
        raise DefectaeError("--write-batch-size: only together with --find-batch-size")
    state = None
    if resume is not None:
        if find_batch_size:
            raise DefectaeError(
                "--find-batch-size: not with --resume (the batch size of a run is fixed)"
            )
        state, profile = _resume_state(Path(resume), profile)
    elif profile is None:
        raise DefectaeError(
            "--profile: expected a profile name or a .toml path (or --resume RUN_DIR)"
        )
    cfg = profile.train
    patches = Path(patches or (state["patches"] if state else workspace.patches_path(profile)))
    num_train = _check_patches(patches, profile)
    rank, world, dev = _init_distributed(devices.resolve_device(cfg.device))
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = not cfg.deterministic
        dtype = devices.amp_dtype(dev, amp or cfg.amp)
        if find_batch_size:
            found = _find_batch_size(profile, dev, dtype, num_train, world)
            if not write_batch_size:
                return found
            profile = dataclasses.replace(
                profile, train=dataclasses.replace(cfg, batch_size=found["batch_size"])
            )
        compiled = cfg.compile if compile is None else compile == "on"
        return _fit(
            profile,
            patches,
            state,
            Path(resume) if resume else None,
            dev,
            dtype,
            compiled,
            rank,
            world,
        )
    finally:
        torch.use_deterministic_algorithms(deterministic)
        if world > 1:
            dist.destroy_process_group()


def _fit(
    profile: Profile,
    patches: Path,
    state: dict[str, Any] | None,
    run_dir: Path | None,
    dev: torch.device,
    dtype: torch.dtype | None,
    compile: bool,
    rank: int,
    world: int,
) -> dict[str, Any]:
    """The training loop: build, then per epoch train, validate, log and checkpoint."""
    cfg, main = profile.train, rank == 0
    if cfg.batch_size % world:
        raise DefectaeError(
            f"train.batch_size {cfg.batch_size}: expected a multiple of the {world} DDP processes"
        )
    corruption = profile.corruption if profile.corruption.kind != "none" else None
    train_set = PatchDataset(patches, "train", cfg.batch_size // world, corruption, seed=cfg.seed)
    val_set = PatchDataset(patches, "validation", cfg.batch_size // world)
    steps_per_epoch = train_set.num_patches // cfg.batch_size
    if steps_per_epoch == 0 or len(val_set) < world:
        raise DefectaeError(
            f"{patches}: {train_set.num_patches} training / {val_set.num_patches} validation patches "
            f"are too few for train.batch_size {cfg.batch_size} on {world} process(es)"
        )

    _seed_everything(cfg.seed)
    model = build_model(
        profile.model.family, profile.dataset.channels, profile.model.input_size, profile.model.args
    )
    model = devices.compile_for_training(model.to(dev), compile, val_set[0]["clean"].to(dev))
    compiled = model is not devices.unwrap(model)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(dev.type, enabled=devices.needs_grad_scaler(dtype))
    epoch, step, best_val, best_epoch, bad_epochs, stopped = 0, 0, math.inf, 0, 0, False
    if state is not None:
        load_weights(devices.unwrap(model), state, run_dir / "last.pt")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        epoch, step, best_val = state["epoch"], state["step"], state["best_val"]
        best_epoch, bad_epochs, stopped = (
            state["best_epoch"],
            state["bad_epochs"],
            state["stopped_early"],
        )
        _set_rng_state(state["rng"][rank if rank < len(state["rng"]) else 0], dev)
    else:
        torch.manual_seed(
            cfg.seed + rank
        )  # independent noise per rank; the weights come from rank 0
    objective: nn.Module = Objective(model, profile.loss)
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[dev.index] if dev.type == "cuda" else None
        )

    run_dir = _run_dir(profile, run_dir, main, world)
    writer, metrics = None, _read_metrics(run_dir / "metrics.jsonl", epoch)
    log_images = PatchDataset(patches, "validation", min(cfg.n_log_images, val_set.num_patches))[0][
        "clean"
    ]

    def save(name: str) -> None:
        rng = [_rng_state(dev)]
        if world > 1:
            rng = [None] * world
            dist.all_gather_object(rng, _rng_state(dev))
        if main:
            save_checkpoint(
                {
                    "model": devices.unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch,
                    "step": step,
                    "rng": rng,
                    "profile": profiles.to_dict(profile),
                    "family": profile.model.family,
                    "in_channels": profile.dataset.channels,
                    "best_val": best_val,
                    "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs,
                    "stopped_early": stopped,
                    "patches": str(patches.resolve()),
                    "data": {"seed": cfg.seed, "batch_size": cfg.batch_size, "world_size": world},
                },
                run_dir / name,
            )

    if main:
        from torch.utils.tensorboard import SummaryWriter

        profiles.write_profile(profile, run_dir)
        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1 if step else None)
        console.info(f"run folder: {run_dir}")
        console.info(f"tensorboard --logdir {run_dir / 'tensorboard'}")
        console.info(
            f"{profile.model.family} on {dev}, {world} process(es), batch {cfg.batch_size}, "
            f"{steps_per_epoch} steps/epoch, amp {devices.amp_name(dtype)}, {'compiled' if compiled else 'eager'}"
        )
    if state is None:
        save("last.pt")
    val: dict[str, float] = {}
    try:
        while epoch < cfg.epochs and not stopped:
            epoch += 1
            train_set.set_epoch(epoch)
            order = epoch_order(cfg.seed, epoch, steps_per_epoch, world, rank)
            loader = DataLoader(
                train_set,
                batch_size=None,
                sampler=order,
                num_workers=cfg.num_workers,
                pin_memory=dev.type == "cuda",
                generator=torch.Generator().manual_seed(epoch),
            )
            sums: dict[str, Tensor] = {}
            norms = []
            wait, start = 0.0, time.perf_counter()
            with console.progress() as bar:
                task = bar.add_task(f"epoch {epoch}/{cfg.epochs}", total=steps_per_epoch)
                batches = iter(loader)
                for i in range(steps_per_epoch):
                    t = time.perf_counter()
                    batch = next(batches)
                    wait += time.perf_counter() - t
                    try:
                        terms, loss, norm = train_step(
                            objective,
                            optimizer,
                            scaler,
                            batch,
                            epoch=epoch,
                            device=dev,
                            dtype=dtype,
                            grad_clip=cfg.grad_clip,
                            corrupted=corruption is not None,
                            world=world,
                        )
                    except FloatingPointError as e:
                        raise DefectaeError(
                            f"epoch {epoch} step {step + 1} (batch {i + 1}/{steps_per_epoch}): loss is "
                            f"{e.args[0]}; stopped, {run_dir / 'last.pt'} keeps epoch {epoch - 1}"
                        ) from None
                    step += 1
                    scheduler.step()
                    for key, value in terms.items():
                        sums[term_name(key)] = sums.get(term_name(key), 0.0) + value
                    norms.append(norm)
                    if writer is not None:
                        writer.add_scalar("step/loss", loss, step)
                    bar.update(
                        task, advance=1, description=f"epoch {epoch}/{cfg.epochs} loss {loss:.4f}"
                    )
            del batches
            seconds = time.perf_counter() - start
            train = _mean_over_ranks(sums, steps_per_epoch, world)
            val_loader = DataLoader(
                val_set,
                batch_size=None,
                sampler=range(rank, len(val_set), world),
                num_workers=cfg.num_workers,
                pin_memory=dev.type == "cuda",
            )
            val = validate(model, val_loader, profile.loss, epoch, dev, dtype, world)
            if not all(math.isfinite(v) for v in val.values()):
                raise DefectaeError(
                    f"epoch {epoch} step {step}: validation loss is {val['total']}; stopped, "
                    f"{run_dir / 'last.pt'} keeps epoch {epoch - 1}"
                )
            improved = val["total"] < best_val - cfg.min_delta
            best_val, best_epoch = (val["total"], epoch) if improved else (best_val, best_epoch)
            bad_epochs = 0 if improved else bad_epochs + 1
            stopped = cfg.patience > 0 and bad_epochs >= cfg.patience
            norm_t = torch.stack(norms)
            record = {
                "epoch": epoch,
                "step": step,
                "lr": optimizer.param_groups[0]["lr"],
                **{f"train_{k}": v for k, v in train.items()},
                **{f"val_{k}": v for k, v in val.items()},
                "grad_norm": norm_t.mean().item(),
                "grad_norm_max": norm_t.max().item(),
                "seconds": seconds,
                "patches_per_s": steps_per_epoch * cfg.batch_size / seconds,
                "data_wait_fraction": wait / seconds,
            }
            if main:
                metrics.append(record)
                write_text_atomic(
                    run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics)
                )
                _log_epoch(writer, record, model, log_images.to(dev), dtype, cfg, epoch, step)
                console.info(
                    f"epoch {epoch}/{cfg.epochs}  train {train['total']:.5f}  val {val['total']:.5f}  "
                    f"ssim {val['ssim']:.4f}  lr {record['lr']:.2e}  {record['patches_per_s']:.0f} patches/s"
                    + ("  best" if improved else "")
                )
            if improved:
                save("best.pt")
            save("last.pt")
    except KeyboardInterrupt:
        if main:
            console.warn(
                f"interrupted in epoch {epoch}; {run_dir / 'last.pt'} holds the last completed epoch; "
                f"continue with `defectae train --resume {run_dir}`"
            )
        raise
    finally:
        if writer is not None:
            writer.close()
    if stopped and main:
        console.info(
            f"early stop after epoch {epoch}: no improvement > {cfg.min_delta} for {cfg.patience} epochs"
        )
    if main:
        table = Table(title=f"train {profile.name}", show_header=False)
        for key, value in (
            ("run folder", run_dir),
            ("epochs", epoch),
            ("steps", step),
            ("best epoch", best_epoch),
            ("best validation loss", f"{best_val:.6g}"),
            ("stopped early", "yes" if stopped else "no"),
        ):
            table.add_row(key, str(value))
        console.show(table)
    if world > 1:
        dist.barrier()
    return {
        "run_dir": str(run_dir),
        "tensorboard": f"tensorboard --logdir {run_dir / 'tensorboard'}",
        "epochs": epoch,
        "best_epoch": best_epoch,
        "best_val": best_val,
        "stopped_early": stopped,
        "steps": step,
        "batch_size": cfg.batch_size,
        "device": str(dev),
        "world_size": world,
        "amp": devices.amp_name(dtype),
        "compiled": compiled,
        "val": val,
        "patches_per_s": metrics[-1]["patches_per_s"] if metrics else None,
    }


# ----------------------------------------------------------------------------- setup helpers


def _choice(flag: str, value: str | None, choices: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if value.lower() not in choices:
        raise DefectaeError(f"{flag} '{value}': expected one of {', '.join(choices)}")
    return value.lower()


def _resume_state(run_dir: Path, profile: Profile | None) -> tuple[dict[str, Any], Profile]:
    """The run's last.pt and its profile; a --profile given too must be the same profile and model."""
    if not run_dir.is_dir():
        raise DefectaeError(f"{run_dir}: run folder not found (--resume expects a run folder)")
    path = run_dir / "last.pt"
    state = load_checkpoint(path)
    if "rng" not in state or "optimizer" not in state:
        raise DefectaeError(
            f"{path}: not a training checkpoint of `defectae train` (no optimizer state)"
        )
    saved = profile_of(state, path)
    if profile is not None:
        check_profile(saved, profile, path, keys=("name",))
        if changed := _changed_keys(profiles.to_dict(saved), profiles.to_dict(profile)):
            console.warn(
                f"--profile differs from the run's profile in {', '.join(changed)}; "
                f"resuming with the run's own profile ({run_dir / 'profile.toml'})"
            )
    return state, saved


def _changed_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict) and key != "args":
            keys += _changed_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            keys.append(prefix + key)
    return keys


def _check_patches(path: Path, profile: Profile) -> int:
    """Number of training patches, after checking the file fits the profile."""
    if not path.is_file():
        raise DefectaeError(
            f"{path}: patch file not found; run `defectae augment --profile {profile.name}` first"
        )
    ds = PatchDataset(path, "train", 1)
    if ds.patch_size != profile.model.input_size:
        raise DefectaeError(
            f"{path}: patches are {ds.patch_size} px, model.input_size is {profile.model.input_size}"
        )
    if ds.channels != profile.dataset.channels:
        raise DefectaeError(
            f"{path}: patches have {ds.channels} channel(s), dataset.color "
            f"'{profile.dataset.color}' needs {profile.dataset.channels}"
        )
    return ds.num_patches


def _init_distributed(dev: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, dev
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if rank != 0:  # only rank 0 prints and writes
        console.mode.quiet, console.mode.json = True, False
    return rank, world, dev


def _run_dir(profile: Profile, resumed: Path | None, main: bool, world: int) -> Path:
    """The resumed folder, or a new one made by rank 0 and shared with the other ranks."""
    if resumed is not None:
        return resumed
    name = [str(workspace.new_run_dir(profile)) if main else None]
    if world > 1:
        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def _read_metrics(path: Path, upto: int) -> list[dict[str, Any]]:
    """Earlier metrics of a resumed run, without the epochs it is about to redo."""
    if not path.is_file():
        return []
    return [
        m
        for m in (json.loads(line) for line in path.read_text().splitlines() if line)
        if m["epoch"] <= upto
    ]


def _mean_over_ranks(sums: dict[str, Tensor], steps: int, world: int) -> dict[str, float]:
    keys = sorted(sums)
    packed = torch.stack([sums[k] for k in keys]).double()
    if world > 1:
        dist.all_reduce(packed)
    return {k: v / (steps * world) for k, v in zip(keys, packed.tolist(), strict=True)}


@torch.no_grad()
def _log_epoch(
    writer: Any,
    record: dict[str, Any],
    model: nn.Module,
    images: Tensor,
    dtype: torch.dtype | None,
    cfg: TrainConfig,
    epoch: int,
    step: int,
) -> None:
    """Epoch scalars, input|reconstruction grids every log_images_every epochs, optional histograms."""
    from torchvision.utils import make_grid

    for key, value in record.items():
        if key.startswith(("train_", "val_")):
            writer.add_scalar(key.replace("_", "/", 1), value, step)
    writer.add_scalar("lr", record["lr"], step)
    writer.add_scalar("grad_norm/mean", record["grad_norm"], step)
    writer.add_scalar("grad_norm/max", record["grad_norm_max"], step)
    writer.add_scalar("throughput/patches_per_s", record["patches_per_s"], step)
    writer.add_scalar("throughput/data_wait_fraction", record["data_wait_fraction"], step)
    if cfg.log_images_every and (epoch == 1 or epoch % cfg.log_images_every == 0):
        model.eval()
        with devices.autocast(images.device, dtype):
            recon = model(images)["recon"].float().clamp(0, 1)
        model.train()
        grid = make_grid(
            torch.cat([images, recon]).cpu(), nrow=images.shape[0], padding=2, pad_value=1.0
        )
        writer.add_image(
            "val/reconstructions", grid, step
        )  # top row input, bottom row reconstruction
    if cfg.histograms:
        for name, param in devices.unwrap(model).named_parameters():
            writer.add_histogram(f"weights/{name}", param.detach().float().cpu(), step)
    writer.flush()


# ----------------------------------------------------------------------------- RNG states


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state(dev: torch.device) -> dict[str, Any]:
    """torch, numpy and python RNG states as weights_only-loadable values."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if dev.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev)
    return state


def _set_rng_state(state: dict[str, Any], dev: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    random.setstate(state["python"])
    if dev.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], dev)


# ----------------------------------------------------------------------------- batch size and throughput


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


def _find_batch_size(
    profile: Profile, dev: torch.device, dtype: torch.dtype | None, num_train: int, world: int
) -> dict[str, Any]:
    """Search the largest batch that trains on `dev` (a copy of the model, real steps)."""
    if world > 1:
        raise DefectaeError("--find-batch-size: run it in a single process (without torchrun)")
    cfg, size, channels = profile.train, profile.model.input_size, profile.dataset.channels
    model = build_model(profile.model.family, channels, size, profile.model.args).to(dev)
    objective = Objective(model, profile.loss)
    optimizer, scaler = (
        make_optimizer(model, cfg),
        torch.amp.GradScaler(dev.type, enabled=devices.needs_grad_scaler(dtype)),
    )
    cap, why = min(cfg.find_batch_max, num_train), "train.find_batch_max / training patches"
    if dev.type == "cpu" and (ram := _free_ram()) is not None:
        per_patch = 2 * _saved_bytes_per_patch(objective, channels, size, dtype)
        if ram // 2 // per_patch < cap:
            cap, why = (
                max(1, ram // 2 // per_patch),
                f"half the free RAM at ~{per_patch / 2**20:.1f} MiB/patch",
            )

    def fits(b: int) -> bool:
        x = torch.rand(b, channels, size, size, device=dev)
        batch = {"clean": x, "input": x, "mask": torch.zeros_like(x[:, :1])}
        failed = False
        try:
            train_step(objective, optimizer, scaler, batch, epoch=1, device=dev, dtype=dtype)
        except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
            if (
                "out of memory" not in str(e).lower()
                and "can't allocate memory" not in str(e).lower()
            ):
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
