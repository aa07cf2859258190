"""`defectae train`: check the arguments and the patches, make (or resume) the run folder, run
the training loop (`defectae.training.loop`, where its choices are explained) and report.

AMP, torch.compile, validation, early stopping, exact resume, TensorBoard and DDP (under
torchrun) all live in the loop; `--find-batch-size` in `defectae.training.batch_size`.

A run records what it trained with: the saved profile (RUN/profile.toml and every checkpoint)
holds the effective settings, `train.device` resolved, `train.amp` as the dtype it picked and
`train.compile` as used (`--amp` and `--compile` applied; false after a fallback to eager), with
the batch size; the checkpoint adds the patches file and the number of DDP processes. A plain
`--resume RUN` continues with exactly these, so it ends with the uninterrupted run's weights.

`--resume` with a `--profile`, `--set`, `--patches`, `--amp` or `--compile` that asks for
something else applies it only where that is well defined, and otherwise refuses, naming it:
- `train.epochs` above the epochs done continues the run to the new total. The learning-rate
  schedule is then the one over the new total, from the step reached (a cosine that had reached
  0 goes on from its value at that step of the longer schedule); the summary says so.
- keys that never touch the weights (`FREE_ON_RESUME`) are taken.
- any other change (learning rate, batch size, model, loss, device, AMP, compile, patches, the
  number of processes, ...) is refused: start a new run.
The test-time sections ([tile], [score]) are not training's: a `--profile` may differ there, and
RUN/profile.toml keeps the run's own.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.table import Table

from defectae import console, profiles, workspace
from defectae import device as devices
from defectae.errors import DefectaeError
from defectae.profiles import Profile
from defectae.profiles.load import PROFILE_FILE
from defectae.stores.checkpoint import (
    TRAINED_SECTIONS,
    CheckpointState,
    check_profile,
    load_checkpoint,
    profile_of,
    trained_sections,
)
from defectae.stores.patches import PatchDataset
from defectae.training.batch_size import find_batch_size as search_batch_size
from defectae.training.clock import duration
from defectae.training.loop import Run, fit
from defectae.training.range_check import check_range
from defectae.training.state import TrainState

AMP_MODES = ("auto", "bf16", "fp16", "off")
COMPILE_MODES = ("on", "off")
AMP_OF_DTYPE = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}
# profile keys a resumed run may change: none of them touches the weights
FREE_ON_RESUME = (
    "dataset.root",
    "train.num_workers",  # corruptions are seeded per batch, whichever worker reads it
    "train.log_images_every",
    "train.n_log_images",
    "train.histograms",
    "train.find_batch_max",
    "train.max_minutes",  # a budget per call: a resumed run gets a new one
)


def run(
    profile: Profile | None,
    patches: Path | None = None,
    resume: Path | None = None,
    amp: str | None = None,
    compile_model: str | None = None,
    find_batch_size: bool = False,
    write_batch_size: bool = False,
    sets: Sequence[str] = (),
    root: str | None = None,
    max_minutes: float | None = None,
) -> dict[str, Any]:
    """Train a model on patches.h5 into a new run folder (or continue one with `resume`).

    `sets` and `root` (--set, --root) are read only with `resume` and no `profile`: they apply
    to the run's own profile (otherwise the CLI has resolved them into `profile`).
    `max_minutes` (--max-minutes) sets train.max_minutes, the time budget of this call.
    """
    if max_minutes is not None and not (math.isfinite(max_minutes) and max_minutes >= 0):
        raise DefectaeError(
            f"--max-minutes {max_minutes:g}: expected a number of minutes >= 0 (0 = no limit)"
        )
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
        resumed, profile = _resume(Path(resume), profile, sets, root, patches, amp, compile_model)
        patches = Path(resumed["patches"])
    elif profile is None:
        raise DefectaeError(
            "--profile: expected a profile name or a .toml path (or --resume RUN_DIR)"
        )
    else:
        profile = _effective(profile, amp, compile_model)
        patches = Path(patches or workspace.patches_path(profile))
    if max_minutes is not None:
        budget = dataclasses.replace(profile.train, max_minutes=float(max_minutes))
        profile = dataclasses.replace(profile, train=budget)
    cfg = profile.train
    num_train = _check_patches(patches, profile)
    rank, world, dev = _init_distributed(devices.resolve_device(cfg.device))
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = not cfg.deterministic
        dtype = devices.amp_dtype(dev, cfg.amp)
        if find_batch_size:
            found = search_batch_size(profile, dev, dtype, num_train, world)
            if not write_batch_size:
                return found
            profile = dataclasses.replace(
                profile, train=dataclasses.replace(cfg, batch_size=found["batch_size"])
            )
        run_dir = Path(resume) if resume else None
        return _train(profile, patches, resumed, run_dir, dev, dtype, rank, world)
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
    rank: int,
    world: int,
) -> dict[str, Any]:
    """Build (or restore) the model, make the run folder, run the loop and sum it up."""
    cfg = profile.train
    if resumed is not None and world != (trained := resumed["data"].get("world_size", 1)):
        raise DefectaeError(
            f"{world} process(es): cannot change on --resume (the run was trained on "
            f"{trained}); start a new run"
        )
    steps, example = _check_batches(patches, cfg.batch_size, world)
    state = TrainState.build(profile, dev, dtype, cfg.compile, steps, example.to(dev))
    if state.compiled != cfg.compile:  # torch.compile fell back to eager (it warned why)
        if resumed is not None:
            raise DefectaeError(
                f"{run_dir}: the run was trained compiled, but torch.compile fails here "
                "(see the warning above); start a new run"
            )
        profile = dataclasses.replace(profile, train=dataclasses.replace(cfg, compile=False))
    if resumed is not None:
        state.restore(resumed, run_dir / "last.pt", rank, dev)
    else:
        # independent noise per rank; the weights are rank 0's (DDP broadcasts them)
        torch.manual_seed(cfg.seed + rank)
    run_dir = _run_dir(profile, run_dir, rank == 0, world)
    job = Run(profile, patches, run_dir, dev, dtype, rank, world)
    planned = resumed["profile"]["train"]["epochs"] if resumed is not None else cfg.epochs
    record = resumed is None or trained_sections(profile) != resumed["profile"]
    if job.main:
        if record:
            profiles.write_profile(_recorded(profile, run_dir), run_dir)
        console.info(f"run folder: {run_dir}")
        console.info(f"tensorboard --logdir {run_dir / 'tensorboard'}")
        if planned != cfg.epochs:
            console.info(
                f"train.epochs {planned} -> {cfg.epochs}: the run continues to epoch "
                f"{cfg.epochs}, on the learning-rate schedule over {cfg.epochs} epochs"
            )
    val, rate = fit(job, state, save_first=record)
    # on rank 0, its sub-batch; warns when reconstructions miss the inputs' intensity range
    checked = (
        check_range(state.model, patches, cfg.batch_size // world, dev, dtype) if job.main else {}
    )
    summary = {
        "run_dir": str(run_dir),
        "tensorboard": f"tensorboard --logdir {run_dir / 'tensorboard'}",
        "status": state.status,
        "epochs": state.epoch,
        "epochs_total": cfg.epochs,
        "epochs_total_before": planned if planned != cfg.epochs else None,
        "best_epoch": state.best_epoch,
        "best_val": state.best_val,
        "stopped_early": state.stopped,
        "steps": state.step,
        "batch_size": cfg.batch_size,
        "device": str(dev),
        "world_size": world,
        "amp": devices.amp_name(dtype),
        "compiled": state.compiled,
        "val": val,
        "patches_per_s": rate,
        **checked,  # recon_range, uniform_mae, uniform_patches
        "time": state.timing[-1],  # this call: estimate_s, elapsed_s, step_ms, max_minutes
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
        ("status", summary["status"]),
        ("time", _time(summary["time"])),
    ):
        table.add_row(key, str(value))
    if (before := summary["epochs_total_before"]) is not None:
        total = summary["epochs_total"]
        table.add_row(
            "epochs total", f"{total} (was {before}; the learning-rate schedule spans {total})"
        )
    console.show(table)


def _time(timing: dict[str, Any]) -> str:
    """This call's training time, with the warm-up's estimate of it."""
    took = duration(timing["elapsed_s"])
    if timing["estimate_s"] is None:
        return took
    return f"{took} (estimated {duration(timing['estimate_s'])})"


def _choice(flag: str, value: str | None, choices: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if value.lower() not in choices:
        raise DefectaeError(f"{flag} '{value}': expected one of {', '.join(choices)}")
    return value.lower()


def _effective(profile: Profile, amp: str | None, compile_model: str | None) -> Profile:
    """The profile with its training settings as used: the device resolved, `train.amp` as the
    dtype it picks there, --amp and --compile applied (a fallback to eager is applied later)."""
    cfg = profile.train
    dev = devices.resolve_device(cfg.device)
    dtype = devices.amp_dtype(dev, amp or cfg.amp)
    compiled = cfg.compile if compile_model is None else compile_model == "on"
    train = dataclasses.replace(cfg, device=str(dev), amp=AMP_OF_DTYPE[dtype], compile=compiled)
    return dataclasses.replace(profile, train=train)


def _resume(
    run_dir: Path,
    profile: Profile | None,
    sets: Sequence[str],
    root: str | None,
    patches: Path | None,
    amp: str | None,
    compile_model: str | None,
) -> tuple[dict[str, Any], Profile]:
    """The run's last.pt and the profile it continues with: its own, with what the arguments
    change where a resumed run can take it (see the module doc); anything else is refused."""
    if not run_dir.is_dir():
        raise DefectaeError(f"{run_dir}: run folder not found (--resume expects a run folder)")
    path = run_dir / "last.pt"
    state = load_checkpoint(path)
    if "rng" not in state or "optimizer" not in state:
        raise DefectaeError(
            f"{path}: not a training checkpoint of `defectae train` (no optimizer state)"
        )
    if patches is not None and Path(patches).resolve() != Path(state["patches"]).resolve():
        raise DefectaeError(
            f"--patches {patches}: cannot change on --resume (the run was trained on "
            f"{state['patches']}); start a new run"
        )
    saved = _effective(profile_of(state, path), None, None)
    if profile is not None:
        check_profile(saved, profile, path, keys=("name",))
        asked, origin = profile, "--profile"
    else:
        asked, origin = _with_sets(saved, sets, root), "--set"
    asked = _effective(asked, amp, compile_model)
    done = CheckpointState.from_dict(state)
    data = profiles.to_dict(saved)
    for key, was, want in _changes(trained_sections(saved), trained_sections(asked)):
        if key == "train.epochs":
            _check_more_epochs(done, saved, want, origin)
        elif key not in FREE_ON_RESUME:
            raise _cannot_change(
                key, was, want, origin, {"train.amp": amp, "train.compile": compile_model}
            )
        *sections, name = key.split(".")
        target = data
        for section in sections:
            target = target[section]
        target[name] = want
    return state, profiles.from_dict(data, source=str(path))


def _with_sets(saved: Profile, sets: Sequence[str], root: str | None) -> Profile:
    """The run's profile with --set and --root applied, resolved like any profile file."""
    test_time = {f.name for f in dataclasses.fields(Profile)} - set(TRAINED_SECTIONS)
    for item in sets:
        if (section := item.split("=", 1)[0].strip().split(".")[0]) in test_time:
            raise DefectaeError(
                f"--set {item}: [{section}] is not a training setting; "
                f"`train --resume` keeps the run's own (give it to tile-test or score)"
            )
    if not sets and root is None:
        return saved
    with tempfile.TemporaryDirectory() as tmp:
        return profiles.resolve(str(profiles.write_profile(saved, tmp)), list(sets), root)


def _check_more_epochs(done: CheckpointState, saved: Profile, epochs: int, origin: str) -> None:
    """A resumed run can train on to `epochs` only when it has done fewer and did not stop early."""
    if done.stopped_early:
        raise DefectaeError(
            f"{origin} train.epochs {epochs}: the run stopped early at epoch {done.epoch} "
            f"(train.patience {saved.train.patience}); start a new run"
        )
    if epochs <= done.epoch:
        raise DefectaeError(
            f"{origin} train.epochs {epochs}: the run has already trained {done.epoch} epochs; "
            "expected more"
        )


def _cannot_change(
    key: str, was: Any, want: Any, origin: str, flags: dict[str, str | None]
) -> DefectaeError:
    """The refusal of a change a resumed run cannot take, naming the flag or key asking for it."""
    if flags.get(key) is not None:
        flag = "--" + key.split(".")[1]
        trained = ("compiled" if was else "eagerly") if key == "train.compile" else f"with {was}"
        return DefectaeError(
            f"{flag} {flags[key]}: cannot change on --resume (the run was trained {trained}); "
            "start a new run"
        )
    return DefectaeError(
        f"{origin} {key}: cannot change on --resume (the run was trained with "
        f"{json.dumps(was)}, not {json.dumps(want)}); start a new run"
    )


def _changes(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) where two profile dicts differ; model.args as one."""
    changes = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict) and key != "args":
            changes += _changes(va, vb, f"{prefix}{key}.")
        elif va != vb:
            changes.append((prefix + key, va, vb))
    return changes


def _recorded(profile: Profile, run_dir: Path) -> Profile:
    """RUN/profile.toml to write: training's sections from `profile`, the test-time sections
    as the run folder recorded them (when it has a profile.toml already)."""
    path = run_dir / PROFILE_FILE
    if not path.is_file():
        return profile
    trained = {name: getattr(profile, name) for name in TRAINED_SECTIONS}
    return dataclasses.replace(profiles.load_written(path), **trained)


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
