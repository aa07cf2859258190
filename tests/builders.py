"""Small artefacts several test files need: an untrained checkpoint in a run folder, the CLI as
users run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from defectae import profiles
from defectae.models import build_model
from defectae.stores.checkpoint import CheckpointState, save_checkpoint
from defectae.stores.prepared import PreparedSplit

# A generated woven dataset small enough for a one-epoch CLI run: 64x64 images, 8 + 2 + 3 of them.
TINY_SYNTHETIC = [
    "dataset.synthetic.size=64",
    "dataset.image_size=[64, 64]",
    "dataset.synthetic.n_train=8",
    "dataset.synthetic.n_test_good=2",
    "dataset.synthetic.n_test_defect=3",
    "dataset.val_fraction=0.25",
]

# A one-epoch `ae` on 32 px patches of it, tiled at stride 16: seconds from prepare to score.
TINY_TRAINING = [
    "model.input_size=32",
    "model.args.latent_dim=8",
    "augment.n_patches=32",
    "augment.n_val_patches=8",
    "train.epochs=1",
    "train.batch_size=16",
    "train.compile=false",
    "train.num_workers=0",
    "tile.stride=16",
    "tile.batch_size=16",
]


def untrained_checkpoint(run_dir: Path, profile: profiles.Profile, name: str = "best.pt") -> Path:
    """Save a freshly initialised (seed 0) model of the profile as RUN/name, a CheckpointState."""
    torch.manual_seed(0)
    model = build_model(
        profile.model.family, profile.dataset.channels, profile.model.input_size, profile.model.args
    )
    state = CheckpointState(
        model=model.state_dict(),
        profile=profiles.to_dict(profile),
        family=profile.model.family,
        in_channels=profile.dataset.channels,
        epoch=1,
        step=1,
        best_val=0.0,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, run_dir / name)
    return run_dir / name


def good_split(images: np.ndarray) -> PreparedSplit:
    """A prepared split of good (N, C, H, W) uint8 square images, without defects."""
    n, _, h, w = images.shape
    return PreparedSplit(
        images=images,
        masks=np.zeros((n, 1, h, w), np.uint8),
        labels=np.zeros(n, np.uint8),
        defect_types=["good"] * n,
        names=[f"{i:03d}" for i in range(n)],
        files=[f"good/{i:03d}.png" for i in range(n)],
        orig_sizes=np.full((n, 2), h, np.int32),
    )


def woven_attrs(profile: profiles.Profile, size: int) -> dict:
    """prepared.h5 attributes of a hand-made gray woven dataset of size x size images."""
    return {
        "layout": "synthetic",
        "source": "",
        "category": "woven",
        "image_size": [size, size],
        "color": "gray",
        "channels": 1,
        "dataset": profiles.to_dict(profile)["dataset"],
    }


def defectae(home: Path, *args: str, code: int = 0) -> subprocess.CompletedProcess:
    """The installed console script, as users run it, with --json and DEFECTAE_HOME=home."""
    cmd = [str(Path(sys.executable).with_name("defectae")), "--json", *args]
    env = {**os.environ, "DEFECTAE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == code, proc.stderr
    return proc
