"""Checkpoints: one plain dict, saved atomically, loaded with weights_only=True.

`CheckpointState` lists every key. The profile inside keeps only the sections training read,
with the values training used (device, AMP and compile as decided); test-time settings ([tile],
[score]) are decided later and recorded in those commands' outputs. `status` says how the run
ended, so that later commands can refuse a run that never trained (`require_trained`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defectae import __version__
from defectae.errors import DefectaeError, first_line
from defectae.files import atomic_path
from defectae.profiles import Profile, from_dict, to_dict

FORMAT_VERSION = 1
TRAINED_SECTIONS = ("name", "dataset", "model", "loss", "augment", "corruption", "train")
META_KEYS = ("version", "format_version")
# how a run ended, as its last.pt says: "running" while it trains (and after a kill -9);
# "time-limit": stopped by its time budget (train.max_minutes), a usable model
STATUSES = ("running", "finished", "stopped_early", "nan", "interrupted", "time-limit")


@dataclasses.dataclass
class CheckpointState:
    """Every key of a checkpoint; `save_checkpoint` adds version and format_version."""

    model: dict[str, torch.Tensor]  # the plain module's state_dict
    profile: dict[str, Any]  # profiles.to_dict of the run's profile, saved as `trained_sections`
    family: str
    in_channels: int
    optimizer: dict[str, Any] = dataclasses.field(default_factory=dict)
    scheduler: dict[str, Any] = dataclasses.field(default_factory=dict)
    scaler: dict[str, Any] = dataclasses.field(default_factory=dict)
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps
    epoch_step: int = 0  # steps done in epoch `epoch + 1` (a stop by the time budget, mid-epoch)
    rng: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one per DDP rank
    best_val: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best
    status: str = "running"  # one of STATUSES
    patches: str = ""  # the patches.h5 trained on
    data: dict[str, int] = dataclasses.field(default_factory=dict)  # seed, batch_size, world_size
    # one per `train` call: its estimated and actual seconds, step time, budget (training.clock)
    timing: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The plain dict torch.save writes (the profile without its test-time sections)."""
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**state, "profile": trained_sections(self.profile)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> CheckpointState:
        """The state of a loaded checkpoint dict (keys a writer left out take their defaults)."""
        state = {k: v for k, v in state.items() if k not in META_KEYS}
        if "stopped_early" in state:  # written before `status` replaced it
            stopped = state.pop("stopped_early")
            epochs = state.get("profile", {}).get("train", {}).get("epochs", math.inf)
            finished = "finished" if state.get("epoch", 0) >= epochs else "running"
            state.setdefault("status", "stopped_early" if stopped else finished)
        return cls(**state)

    @property
    def stopped_early(self) -> bool:
        """Early stopping ended the run."""
        return self.status == "stopped_early"


def trained_sections(profile: Profile | dict[str, Any]) -> dict[str, Any]:
    """The sections of a profile that training reads, as plain data."""
    data = to_dict(profile) if isinstance(profile, Profile) else profile
    return {k: v for k, v in data.items() if k in TRAINED_SECTIONS}


def save_checkpoint(state: CheckpointState | dict[str, Any], path: str | Path) -> None:
    """Write a checkpoint atomically (a crash never leaves a truncated .pt)."""
    if isinstance(state, dict):
        state = CheckpointState.from_dict(state)
    data = {**state.to_dict(), "version": __version__, "format_version": FORMAT_VERSION}
    with atomic_path(path) as tmp:
        torch.save(data, tmp)


def record_status(path: str | Path, status: str) -> None:
    """Rewrite a checkpoint with a new `status`, everything else unchanged (how a run ended)."""
    state = CheckpointState.from_dict(load_checkpoint(path))
    save_checkpoint(dataclasses.replace(state, status=status), path)


def untrained_reason(ckpt_path: str | Path) -> str | None:
    """Why a run's checkpoint holds no trained model (stopped on a NaN loss, or no epoch
    completed and no step kept by a time-limit stop), from the run's last.pt where it has one;
    None for a usable run."""
    ckpt_path = Path(ckpt_path)
    last = ckpt_path.with_name("last.pt")
    state = CheckpointState.from_dict(load_checkpoint(last if last.is_file() else ckpt_path))
    if state.status == "nan":
        return f"stopped on a NaN loss at epoch {state.epoch + 1}"
    if state.epoch == 0 and state.epoch_step == 0:
        return "never finished an epoch"
    return None


def require_trained(ckpt_path: Path, allow_unfinished: bool) -> None:
    """Refuse a checkpoint of a run that stopped on a NaN loss or never finished an epoch
    (its weights are untrained or stale), unless `allow_unfinished`."""
    if allow_unfinished:
        return
    if reason := untrained_reason(ckpt_path):
        raise DefectaeError(
            f"{Path(ckpt_path).parent}: the run {reason}; "
            "pass --allow-unfinished to evaluate it anyway"
        )


def checkpoint_in(run_dir: str | Path) -> Path:
    """best.pt of a run folder, else last.pt; a folder without either is a user error."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DefectaeError(f"{run_dir}: run folder not found")
    for name in ("best.pt", "last.pt"):
        if (run_dir / name).is_file():
            return run_dir / name
    raise DefectaeError(f"{run_dir}: no best.pt or last.pt in this run folder")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely; a corrupt or foreign file is a one-line user error."""
    path = Path(path)
    if not path.is_file():
        raise DefectaeError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise DefectaeError(f"{path}: empty file; expected a defectae checkpoint (.pt)")
    if not zipfile.is_zipfile(path):
        raise DefectaeError(f"{path}: not a PyTorch checkpoint (a .pt zip archive was expected)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise DefectaeError(
            f"{path}: refused: it holds Python objects that a defectae checkpoint never contains "
            "(not loaded, so nothing in it ran)"
        ) from None
    except Exception as e:  # noqa: BLE001 - any other failure of a foreign or damaged archive
        raise DefectaeError(
            f"{path}: not a readable defectae checkpoint ({first_line(e)})"
        ) from None
    if (
        not isinstance(state, dict)
        or state.get("format_version") != FORMAT_VERSION
        or "model" not in state
    ):
        raise DefectaeError(
            f"{path}: not a defectae checkpoint (format_version {FORMAT_VERSION} expected)"
        )
    return state


def profile_of(state: dict[str, Any], path: str | Path = "checkpoint") -> Profile:
    """The profile stored in a checkpoint; the sections it does not keep take the schema defaults."""
    return from_dict(state["profile"], source=str(path))


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu", expect: Profile | None = None
) -> tuple[nn.Module, Profile, dict[str, Any]]:
    """Rebuild the model from a checkpoint's own profile and load its weights (eval mode).

    With `expect`, a checkpoint of another model family or input size is a user error.
    """
    from defectae.models import build_model, get_family  # torchvision: 2 s to import

    state = load_checkpoint(path, map_location)
    profile = profile_of(state, path)
    if expect is not None:
        check_profile(profile, expect, path)
    # pretrained weights (resnetae's, the feature-space encoders') are not read: the checkpoint holds them
    args = dict(profile.model.args)
    if "weights" in inspect.signature(get_family(profile.model.family).builder).parameters:
        args["weights"] = "none"
    model = build_model(
        profile.model.family, profile.dataset.channels, profile.model.input_size, args
    )
    load_weights(model, state, path)
    model.to(map_location).eval()
    return model, profile, state


def check_profile(
    saved: Profile, expect: Profile, path: str | Path, keys: tuple[str, ...] = ()
) -> None:
    """A checkpoint of another model family, input size or colour mode (or other `keys`) is a user error."""
    pairs = [
        ("model.family", saved.model.family, expect.model.family),
        ("model.input_size", saved.model.input_size, expect.model.input_size),
        ("dataset.color", saved.dataset.color, expect.dataset.color),
    ]
    pairs += [(key, getattr(saved, key), getattr(expect, key)) for key in keys]
    for what, got, want in pairs:
        if got != want:
            raise DefectaeError(
                f"{path}: checkpoint has {what} = {got!r}, the profile expects {want!r}"
            )


def load_weights(model: nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """Load a checkpoint's weights into a built model; a shape or key mismatch is a user error."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        family = state.get("family") or state.get("profile", {}).get("model", {}).get("family", "?")
        raise DefectaeError(
            f"{path}: weights do not fit model '{family}' ({str(e).splitlines()[0][:160]})"
        ) from None
