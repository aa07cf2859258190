"""Checkpoints: one plain dict, saved atomically, loaded with weights_only=True.

Keys: model, optimizer, scheduler, scaler, epoch (completed epochs), step, rng,
profile (profiles.to_dict), family, in_channels, best_val, version, format_version.
`defectae train` adds: best_epoch, bad_epochs (epochs since the best), stopped_early,
data (the data-order state: seed, batch_size, world_size) and patches (the patches.h5 used).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defectae import __version__
from defectae.errors import DefectaeError
from defectae.files import atomic_path
from defectae.models import build_model
from defectae.profiles import Profile, from_dict

FORMAT_VERSION = 1


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write a checkpoint dict atomically (a crash never leaves a truncated .pt)."""
    state = {**state, "version": __version__, "format_version": FORMAT_VERSION}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


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
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DefectaeError(f"{path}: not a readable defectae checkpoint ({first[:160]})") from None
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
    """The resolved profile stored in a checkpoint."""
    return from_dict(state["profile"], source=str(path))


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu", expect: Profile | None = None
) -> tuple[nn.Module, Profile, dict[str, Any]]:
    """Rebuild the model from a checkpoint's own profile and load its weights (eval mode).

    With `expect`, a checkpoint of another model family or input size is a user error.
    """
    state = load_checkpoint(path, map_location)
    profile = profile_of(state, path)
    if expect is not None:
        check_profile(profile, expect, path)
    # pretrained-initialisation files (resnetae's `weights`) are not needed: the checkpoint holds the weights
    args = {k: v for k, v in profile.model.args.items() if k != "weights"}
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
