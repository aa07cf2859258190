"""`defectae augment`: sample augmented training and validation patches into patches.h5.

Training patches come from the train split only, validation patches (crop only) from the
validation split only. Sampling itself (planned up front, made in bounded blocks, seeded per
sample) is `defectae.data.sampling`; this command picks the files and reports, including how
the training patches' intensities compare with the training images' (a warning when they
differ: a model does not learn to reconstruct intensities its patches rarely hold).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from defectae import console, workspace
from defectae.data import intensity_report
from defectae.data.sampling import make_patches, plan_patches
from defectae.files import output_file
from defectae.profiles import Profile, write_profile


def run(profile: Profile, prepared: Path | None = None, out: Path | None = None) -> dict[str, Any]:
    """Write patches.h5 (and its profile beside it, as patches.profile.toml) from prepared.h5; returns the summary."""
    prepared = Path(prepared) if prepared is not None else workspace.prepared_path(profile)
    out = output_file(out if out is not None else workspace.patches_path(profile))
    started = time.perf_counter()
    job = plan_patches(profile, prepared)
    with console.progress() as bar:
        task = bar.add_task("augment", total=len(job))
        intensity = make_patches(profile, job, prepared, out, functools.partial(bar.advance, task))
    write_profile(profile, out.parent, f"{out.stem}.profile.toml")
    seconds = time.perf_counter() - started
    summary = {
        "out": str(out),
        "train_patches": len(job.train),
        "validation_patches": len(job.validation),
        "patch_size": job.size,
        "channels": job.channels,
        "seconds": round(seconds, 3),
        "patches_per_s": round(len(job) / max(seconds, 1e-9), 1),
        "intensity": intensity,
    }
    _show(summary)
    console.info(intensity_report.describe(intensity))
    if (warning := intensity_report.warning(intensity)) is not None:
        console.warn(warning)
    return summary


def _show(summary: dict[str, Any]) -> None:
    table = Table(title="augment", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    for key, value in summary.items():
        if key == "intensity":
            continue
        table.add_row(key.replace("_", " "), str(value))
    console.show(table)
