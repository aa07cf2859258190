"""bench's `predict` figure: new images per second through `defectae predict`, end to end.

A run folder is made from the benchmarked (untrained) model, random images of the dataset size
are written as PNG files, and predict reads, resizes, inspects and writes its map, mask and
overlay for each, as on the line. One image is predicted first to warm up.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import nn

from defectae import profiles
from defectae.commands import predict
from defectae.files import write_text_atomic
from defectae.profiles import Profile
from defectae.profiles.load import PROFILE_FILE
from defectae.stores.checkpoint import CheckpointState, save_checkpoint

PREDICT_KEYS = ("predict_images_per_s", "predict_image_size", "predict_images")
THRESHOLD = 0.5  # any value: bench measures speed, not verdicts


def _run_folder(model: nn.Module, profile: Profile, folder: Path) -> Path:
    """A run folder as `train` leaves one: the model as a one-epoch checkpoint, and the resolved
    profile, whose [tile] settings predict then uses (a checkpoint records only what trained)."""
    state = CheckpointState(
        model={k: v.detach().cpu() for k, v in model.state_dict().items()},
        profile=profiles.to_dict(profile),
        family=profile.model.family,
        in_channels=profile.dataset.channels,
        epoch=1,
        step=1,
        best_val=0.0,
        status="finished",
    )
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, folder / "best.pt")
    write_text_atomic(folder / PROFILE_FILE, profiles.to_toml(profile))
    return folder


def _images(profile: Profile, n: int, folder: Path) -> list[Path]:
    """n random PNG images of dataset.image_size in the profile's colour mode."""
    h, w = (int(s) for s in profile.dataset.image_size)
    shape = (h, w) if profile.dataset.channels == 1 else (h, w, 3)
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def predict_figures(model: nn.Module, profile: Profile, n: int, workdir: Path) -> dict[str, Any]:
    """Images per second of `defectae predict` on n new images (files in, files out)."""
    run = _run_folder(model, profile, workdir / f"predict-{profile.name}")
    images = _images(profile, n + 1, run / "images")
    setup = predict.make_setup(run, None, None, THRESHOLD, False)
    list(predict.predictions(images[:1], setup, run / "warmup"))
    start = time.perf_counter()
    records = list(predict.predictions(images[1:], setup, run / "out"))
    seconds = time.perf_counter() - start
    if any(r["verdict"] == "error" for r in records):
        raise RuntimeError(f"predict failed on a generated image: {records[0].get('error')}")
    return {
        "predict_images_per_s": len(records) / seconds,
        "predict_image_size": list(profile.dataset.image_size),
        "predict_images": len(records),
    }
