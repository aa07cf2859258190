"""Where outputs go by default, so every command finds the previous one's result.

    work/DATASET/prepared.h5            prepare
    work/PROFILE/patches.h5             augment
    runs/PROFILE/TIMESTAMP/             train (checkpoints, metrics.jsonl, tensorboard/)
    runs/PROFILE/TIMESTAMP/residuals.h5 tile-test
    runs/PROFILE/TIMESTAMP/score/       score (metrics.json, figures, index.html)

The base folder is the current directory, or $DEFECTAE_HOME when set.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from defectae import console
from defectae.errors import DefectaeError
from defectae.profiles import Profile


def home() -> Path:
    return Path(os.environ.get("DEFECTAE_HOME", "."))


def prepared_path(profile: Profile) -> Path:
    return home() / "work" / profile.dataset.name / "prepared.h5"


def run_prepared_candidates(run: Path, profile: Profile) -> list[Path]:
    """Where a run's prepared.h5 may be, in order: the file its residuals.h5 records (tile-test
    read it), then the workspace default."""
    from defectae.stores.residuals import recorded_prepared  # h5py and torch: not at CLI start

    recorded = recorded_prepared(run / "residuals.h5")
    return [*([recorded] if recorded else []), prepared_path(profile)]


def patches_path(profile: Profile) -> Path:
    return home() / "work" / profile.name / "patches.h5"


def runs_root(profile: Profile) -> Path:
    return home() / "runs" / profile.name


def new_run_dir(profile: Profile) -> Path:
    """A fresh, timestamped run folder (suffixed if two runs start in the same second)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = runs_root(profile) / stamp
    path, n = base, 1
    while path.exists():
        path = base.with_name(f"{stamp}-{n}")
        n += 1
    path.mkdir(parents=True)
    return path


def latest_run(profile: Profile) -> Path:
    """The newest run folder of a profile holding a checkpoint, passing over runs that stopped on
    a NaN loss or never finished an epoch; when every run is such, the newest one (so that the
    command's own check says why, and --allow-unfinished can still evaluate it)."""
    from defectae.stores.checkpoint import checkpoint_in, untrained_reason  # imports torch

    root = runs_root(profile)
    runs = sorted(
        (p for p in root.glob("*") if (p / "last.pt").is_file() or (p / "best.pt").is_file()),
        reverse=True,
    )
    if not runs:
        raise DefectaeError(
            f"{root}: no training run with a checkpoint; run `defectae train --profile {profile.name}` first"
        )
    for run in runs:
        reason = untrained_reason(checkpoint_in(run))
        if reason is None:
            return run
        console.debug(f"{run}: skipped, the run {reason}")
    return runs[0]
