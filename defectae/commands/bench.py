"""`defectae bench`: the performance report, comparable across machines (bench.json).

Self-contained: it builds untrained models and generates its own data in a temporary folder,
so no prepared dataset is needed. Per profile (default: synthetic-ae, 128x128 patches at
batch 128, synthetic-vae8, whole 256x256 images, and synthetic-draem, the CPU widths):
    parameters, FLOPs per patch (forward, and one training step counted the same way);
    training patches/s eager, compiled, compiled + AMP (training.throughput);
    inference patches/s eager, compiled, TorchScript, ONNX Runtime, INT8 (defectae.export);
    tile-test images/s at 512x512 and the share of it outside the model (bench.probes);
    p50 / p95 latency of one image through the Inspector at batch 1; peak memory;
    for the feature-space families (rd, dfr), the share of inference time in the frozen encoder;
    augment's sampling patches/s, the DataLoader's read rate with and without corruption, and its ratio
    to the training rate (issue 4 asks for at least 5x);
    achieved GFLOP/s and its fraction of this machine's peak: the rate of a large float32 matmul,
    run at the start and at the end of the bench (the better of the two; load from other
    processes only lowers it).
Once per run: the peak RSS of iterating once over a 100,000-patch 128x128 file (under 1 GB
asked), and `score` (metrics.compute_all) on 100 maps of 512x512 (under 10 s asked), AU-PRO
timed on its own. Whole-image models are tile-tested at their profile's image size. Timings
exclude warm-up and are medians over repetitions; a measurement that fails is null, with its
reason under "unavailable". --quick shrinks everything to seconds. The measurements are
`defectae.bench.figures`; this module plans them, runs them and writes the report.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from defectae import __version__, console
from defectae import device as devices
from defectae.bench.figures import (
    ITERATE_KEYS,
    ITERATE_PATCHES,
    MATMUL_KEYS,
    SCORE_KEYS,
    SCORE_MAPS,
    SCORE_SIDE,
    Figures,
    Plan,
    add_efficiency,
    iterate_figures,
    profile_figures,
    score_time,
)
from defectae.bench.probes import machine, matmul_peak
from defectae.files import output_file, write_text_atomic
from defectae.profiles import resolve, to_dict

DEFAULT_PROFILES = ("synthetic-ae", "synthetic-vae8", "synthetic-draem")
DEFAULT_OUT = Path("bench") / "bench.json"

FULL = Plan(
    warmup=1,
    reps=3,
    latency_samples=10,
    tile_side=512,
    read_seconds=5.0,
    augment_patches=5000,
    iterate_patches=ITERATE_PATCHES,
    score_maps=SCORE_MAPS,
    score_side=SCORE_SIDE,
    matmul_n=2048,
    compile=True,
)
QUICK = Plan(
    warmup=1,
    reps=2,
    latency_samples=3,
    tile_side=0,
    read_seconds=0.5,
    augment_patches=256,
    iterate_patches=1000,
    score_maps=4,
    score_side=64,
    matmul_n=512,
    compile=False,
)


def run(
    profiles: list[str] | None = None,
    sets: list[str] | None = None,
    device: str = "cpu",
    out: Path | None = None,
    quick: bool = False,
) -> dict[str, Any]:
    """Benchmark the profiles (default synthetic-ae, synthetic-vae8, synthetic-draem) and write bench.json."""
    started = time.perf_counter()
    names = list(profiles or DEFAULT_PROFILES)
    dev = devices.resolve_device(device)
    resolved = [resolve(name, sets or []) for name in names]  # bad names fail before any work
    out = output_file(out if out is not None else DEFAULT_OUT)
    plan = QUICK if quick else FULL
    unavailable: dict[str, str] = {}
    console.info(
        f"bench on {dev} ({'quick' if quick else 'full'}): {', '.join(p.name for p in resolved)}"
    )
    summary: dict[str, Any] = {
        "format": "defectae-bench",
        "version": __version__,
        "machine": machine(dev),
        "settings": {
            "quick": quick,
            "device": str(dev),
            "warmup": plan.warmup,
            "reps": plan.reps,
            "profiles": names,
            "sets": list(sets or []),
        },
    }
    matmul = [_matmul(plan, dev, unavailable)]
    data, score = Figures("data", unavailable), Figures("score", unavailable)
    with tempfile.TemporaryDirectory(prefix="defectae-bench-") as tmp:
        with console.progress() as bar:
            task = bar.add_task("data loader memory", total=1)
            data.measure(ITERATE_KEYS, lambda: iterate_figures(plan, Path(tmp), not quick))
            bar.advance(task)
        summary["profiles"] = {
            p.name: {**profile_figures(p, plan, dev, Path(tmp), unavailable), "profile": to_dict(p)}
            for p in resolved
        }
    with console.progress() as bar:
        task = bar.add_task("score, matmul", total=2)
        score.measure(SCORE_KEYS, lambda: score_time(plan))
        bar.advance(task)
        matmul.append(_matmul(plan, dev, {}))  # again at the end: the better of two is the peak
        bar.advance(task)
    summary["matmul"] = _best_matmul(matmul)
    for figures in summary["profiles"].values():
        add_efficiency(figures, summary["matmul"]["matmul_gflop_per_s"])
    summary["data"], summary["score"] = data.values, score.values
    summary["unavailable"] = unavailable
    summary["seconds"] = time.perf_counter() - started
    write_text_atomic(out, json.dumps(console.jsonable(summary), indent=2) + "\n")
    summary["out"] = str(out)
    _show(summary)
    console.info(f"bench.json -> {out} ({summary['seconds']:.0f} s)")
    return summary


def _matmul(plan: Plan, dev: torch.device, unavailable: dict[str, str]) -> dict[str, Any]:
    """One measurement of this machine's matmul peak."""
    fig = Figures("matmul", unavailable)
    fig.measure(MATMUL_KEYS, lambda: matmul_peak(plan.matmul_n, plan.warmup, plan.reps, dev))
    return fig.values


def _best_matmul(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The faster of the matmul runs (load from other processes only lowers the rate)."""
    done = [m for m in runs if m.get("matmul_gflop_per_s")]
    if not done:
        return {**runs[0], "matmul_runs": 0}
    return {**max(done, key=lambda m: m["matmul_gflop_per_s"]), "matmul_runs": len(done)}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        return "x".join(str(v) for v in value)
    return str(value)


def _show(summary: dict[str, Any]) -> None:
    per = summary["profiles"]
    table = Table(
        title=f"bench on {summary['machine']['device']} ({summary['machine']['cpu_model']}, "
        f"{summary['machine']['torch_threads']} threads)"
    )
    table.add_column("figure")
    for name in per:
        table.add_column(name, justify="right")
    keys = [k for k in dict.fromkeys(k for fig in per.values() for k in fig) if k != "profile"]
    for key in keys:
        table.add_row(key, *(_fmt(per[name].get(key)) for name in per))
    console.show(table)
    rest = Table(title="machine-wide", show_header=False)
    rest.add_column("figure")
    rest.add_column("value", justify="right")
    for section in ("matmul", "data", "score"):
        for key, value in summary[section].items():
            rest.add_row(key, _fmt(value))
    console.show(rest)
    if summary["unavailable"]:
        console.warn(
            f"{len(summary['unavailable'])} figure(s) unavailable; reasons under 'unavailable' in bench.json"
        )
