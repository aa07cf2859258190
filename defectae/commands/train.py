"""`defectae train`: check the arguments and the patches, make (or resume) the run folder, run
the training loop (`defectae.training.loop`, where its choices are explained) and report.

AMP, torch.compile, validation, early stopping, exact resume, TensorBoard and DDP (under
torchrun) all live in the loop; `--find-batch-size` in `defectae.training.batch_size`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.table import Table

from defectae import console, profiles, workspace
from defectae import device as devices
from defectae.errors import DefectaeError
from defectae.profiles import Profile
from defectae.stores.checkpoint import check_profile, load_checkpoint, profile_of, trained_sections
from defectae.stores.patches import PatchDataset
from defectae.training.batch_size import find_batch_size as search_batch_size
from defectae.training.loop import Run, fit
from defectae.training.state import TrainState

AMP_MODES = ("auto", "bf16", "fp16", "off")
COMPILE_MODES = ("on", "off")


def run(
    profile: Profile | None,
    patches: Path | None = None,
    resume: Path | None = None,
    amp: str | None = None,
    compile_model: str | None = None,
    find_batch_size: bool = False,
    write_batch_size: bool = False,
) -> dict[str, Any]:
    """Train a model on patches.h5 into a new run folder (or continue one with `resume`)."""
    amp = _choice("--amp", amp, AMP_MODES)
    compile_model = _choice("--compile", compile_model, COMPILE_MODES)
    if write_batch_size and not find_batch_size:
        raise DefectaeError("--write-batch-size: only together with --find-batch-size")
    resumed = None
    if resume is not None:
        if find_batch_size:
            raise DefectaeError(
                "--find-batch-size: not with --resume (the batch size of a run is fixed)"
            )
        resumed, profile = _resume_state(Path(resume), profile)
    elif profile is None:
        raise DefectaeError(
            "--profile: expected a profile name or a .toml path (or --resume RUN_DIR)"
        )
    cfg = profile.train
    patches = Path(patches or (resumed["patches"] if resumed else workspace.patches_path(profile)))
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
            found = search_batch_size(profile, dev, dtype, num_train, world)
            if not write_batch_size:
                return found
            profile = dataclasses.replace(
                profile, train=dataclasses.replace(cfg, batch_size=found["batch_size"])
            )
        compiled = cfg.compile if compile_model is None else compile_model == "on"
        run_dir = Path(resume) if resume else None
        return _train(profile, patches, resumed, run_dir, dev, dtype, compiled, rank, world)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        if world > 1:
            dist.destroy_process_group()


def _train(
    profile: Profile,
    patches: Path,
    resumed: dict[str, Any] | None,
    run_dir: Path | None,
    dev: torch.device,
    dtype: torch.dtype | None,
    compile_model: bool,
    rank: int,
    world: int,
) -> dict[str, Any]:
    """Build (or restore) the model, make the run folder, run the loop and sum it up."""
    steps, example = _check_batches(patches, profile.train.batch_size, world)
    state = TrainState.build(profile, dev, dtype, compile_model, steps, example.to(dev))
    if resumed is not None:
        state.restore(resumed, run_dir / "last.pt", rank, dev)
    else:
        # independent noise per rank; the weights are rank 0's (DDP broadcasts them)
        torch.manual_seed(profile.train.seed + rank)
    run_dir = _run_dir(profile, run_dir, rank == 0, world)
    job = Run(profile, patches, run_dir, dev, dtype, rank, world)
    if job.main:
        if resumed is None:
            profiles.write_profile(profile, run_dir)
        console.info(f"run folder: {run_dir}")
        console.info(f"tensorboard --logdir {run_dir / 'tensorboard'}")
    val, rate = fit(job, state, fresh=resumed is None)
    summary = {
        "run_dir": str(run_dir),
        "tensorboard": f"tensorboard --logdir {run_dir / 'tensorboard'}",
        "epochs": state.epoch,
        "best_epoch": state.best_epoch,
        "best_val": state.best_val,
        "stopped_early": state.stopped,
        "steps": state.step,
        "batch_size": profile.train.batch_size,
        "device": str(dev),
        "world_size": world,
        "amp": devices.amp_name(dtype),
        "compiled": state.compiled,
        "val": val,
        "patches_per_s": rate,
    }
    if job.main:
        _show(profile.name, summary)
    if world > 1:
        dist.barrier()
    return summary


def _show(name: str, summary: dict[str, Any]) -> None:
    table = Table(title=f"train {name}", show_header=False)
    for key, value in (
        ("run folder", summary["run_dir"]),
        ("epochs", summary["epochs"]),
        ("steps", summary["steps"]),
        ("best epoch", summary["best_epoch"]),
        ("best validation loss", f"{summary['best_val']:.6g}"),
        ("stopped early", "yes" if summary["stopped_early"] else "no"),
    ):
        table.add_row(key, str(value))
    console.show(table)


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
        if changed := _changed_keys(trained_sections(saved), trained_sections(profile)):
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


def _check_batches(path: Path, batch_size: int, world: int) -> tuple[int, torch.Tensor]:
    """Steps per epoch and the first validation sub-batch (the compile example), after checking
    that every process gets an equal sub-batch and at least one training and validation batch."""
    if batch_size % world:
        raise DefectaeError(
            f"train.batch_size {batch_size}: expected a multiple of the {world} DDP processes"
        )
    train = PatchDataset(path, "train", batch_size // world)
    val = PatchDataset(path, "validation", batch_size // world)
    if train.num_patches // batch_size == 0 or len(val) < world:
        raise DefectaeError(
            f"{path}: {train.num_patches} training / {val.num_patches} validation patches "
            f"are too few for train.batch_size {batch_size} on {world} process(es)"
        )
    return train.num_patches // batch_size, val[0]["clean"]


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
