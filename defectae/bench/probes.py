"""Timing and memory probes: how fast and how large the pieces the commands run are.

Each probe measures one thing and returns plain numbers; `defectae.bench.figures` turns them
into bench.json's figures.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from defectae import __version__
from defectae import device as devices
from defectae.core.inspector import Inspector, inspect_uint8
from defectae.errors import DefectaeError
from defectae.profiles import CorruptionConfig, TileConfig
from defectae.stores.patches import PatchDataset, clean_batch

# ----------------------------------------------------------------------------- time


def timed(fn: Callable[[], Any], warmup: int, reps: int, device: torch.device) -> list[float]:
    """Wall seconds of `reps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        devices.synchronize(device)
        start = time.perf_counter()
        fn()
        devices.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def matmul_peak(n: int, warmup: int, reps: int, device: torch.device) -> dict[str, Any]:
    """This machine's float32 peak as the rate of one large matmul: 2 n^3 FLOPs per call."""
    a = torch.rand(n, n, device=device)
    b = torch.rand(n, n, device=device)
    seconds = statistics.median(timed(lambda: torch.mm(a, b), warmup, max(3, reps), device))
    return {
        "matmul_n": n,
        "matmul_seconds": seconds,
        "matmul_gflop_per_s": 2 * n**3 / seconds / 1e9,
    }


class StepClock:
    """The same batch forever, noting when each is asked for: `train_throughput` asks for the next
    batch right after each optimizer step, so the gaps between requests are step times."""

    def __init__(self, x: torch.Tensor) -> None:
        self.batch = clean_batch(x)
        self.times: list[float] = []

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            self.times.append(time.perf_counter())
            yield self.batch

    def step_seconds(self, steps: int) -> list[float]:
        """The last `steps` gaps between requests."""
        return list(np.diff(self.times)[-steps:])


def tile_throughput(
    model: nn.Module,
    image_size: int | tuple[int, int],
    patch_size: int,
    stride: int,
    tile_cfg: TileConfig,
    n_images: int,
    device: str | torch.device = "cpu",
    channels: int = 1,
    whole_image: bool = False,
    amp: torch.dtype | None = None,
) -> dict[str, float]:
    """tile-test speed on random images (no file I/O): images/s and the share outside the model.

    One warm-up image is excluded; the outside share covers patching, fusion, residual, score
    and the copies back to the CPU.
    """
    device = torch.device(device)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    model_clock = devices.TimedModel(model.to(device).eval(), device, amp)
    inspector = Inspector(
        model_clock,
        patch_size=patch_size,
        whole_image=whole_image,
        batch_size=tile_cfg.batch_size,
        **{**tile_cfg.inspector_options(), "stride": stride},
    )
    images = np.random.default_rng(0).integers(0, 256, (1, channels, h, w), dtype=np.uint8)
    with torch.inference_mode():
        inspect_uint8(inspector, images, device)
        model_clock.seconds = 0.0
        devices.synchronize(device)
        start = time.perf_counter()
        for _ in range(n_images):
            inspect_uint8(inspector, images, device)
        devices.synchronize(device)
        seconds = time.perf_counter() - start
    return {
        "images_per_s": n_images / seconds,
        "outside_model_share": 1.0 - model_clock.seconds / seconds,
        "seconds": seconds,
        "model_seconds": model_clock.seconds,
    }


# ----------------------------------------------------------------------------- the machine


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on (no host name)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "defectae": __version__,
        "onnxruntime": ort_version,
    }


# ----------------------------------------------------------------------------- memory


def reset_peak_memory(device: torch.device) -> None:
    """Restart the peak-memory counters (Linux: the RSS high-water mark via clear_refs)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float | None]:
    """Peak RSS and peak GPU memory (MiB) since `reset_peak_memory`; None where there is no GPU."""
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mb": peak_rss_mb(), "peak_gpu_memory_mb": gpu}


def peak_rss_mb(children: bool = False) -> float:
    """Resident-set high-water mark in MiB: this process's (VmHWM, restarted by
    `reset_peak_memory`; else getrusage's lifetime peak), or its largest finished child's."""
    if not children:
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux reports KiB


def _pss_mb(pid: int) -> float:
    """Proportional set size of one process (shared pages split between their users), Linux only."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def tree_pss_mb() -> float:
    """PSS of this process plus its children (the DataLoader workers): memory really in use."""
    pids = [os.getpid()]
    for task in Path("/proc/self/task").glob("*/children"):
        with contextlib.suppress(OSError):
            pids += [int(p) for p in task.read_text().split()]
    return sum(_pss_mb(pid) for pid in pids)


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a new process forked from a small server process, so its peak RSS is its own.

    (A spawned child's getrusage peak starts at its parent's resident size, which here is the
    bench with every model it has built.)
    """
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


# ----------------------------------------------------------------------------- the patch loader


def _loader(ds: PatchDataset, num_workers: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=None, shuffle=True, num_workers=num_workers, generator=g)


def read_rate(
    path: str | Path,
    batch_size: int = 128,
    num_workers: int = 2,
    corruption: CorruptionConfig | None = None,
    seconds: float = 5.0,
    warmup_batches: int = 4,
) -> float:
    """Sustained DataLoader read rate in patches/s (shuffled batches, epochs repeated until `seconds`).

    Worker start-up and the first `warmup_batches` batches are not timed.
    """
    ds = PatchDataset(path, "train", batch_size, corruption)
    if len(ds) == 0:
        raise DefectaeError(f"{path}: the training split is empty")
    warmup = min(warmup_batches, len(ds))
    patches, epoch, started = 0, 0, None
    while True:
        ds.set_epoch(epoch)
        for i, batch in enumerate(_loader(ds, num_workers, epoch)):
            if started is None:
                if i + 1 >= warmup:
                    started = time.perf_counter()
                continue
            patches += batch["clean"].shape[0]
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                ds.close()
                return patches / elapsed
        epoch += 1


def iterate_once(
    path: str | Path,
    batch_size: int = 128,
    num_workers: int = 2,
    corruption: CorruptionConfig | None = None,
) -> dict[str, float]:
    """Read every training batch once through a DataLoader: patches, seconds and peak memory (MiB).

    peak_rss_mb: the reading process's peak RSS (most of it is torch's own libraries; run it
    `in_fresh_process` for the iteration's alone); peak_worker_rss_mb: the largest DataLoader
    worker's, counting the pages it shares with its parent; peak_pss_mb: the sampled peak of
    reader + workers with shared pages counted once (Linux /proc; 0 elsewhere).
    """
    ds = PatchDataset(path, "train", batch_size, corruption)
    patches, checksum, peak_pss = 0, 0.0, tree_pss_mb()
    start = time.perf_counter()
    for i, batch in enumerate(_loader(ds, num_workers, 0)):
        patches += batch["clean"].shape[0]
        checksum += float(batch["input"][:, :, 0, 0].sum())  # touch the data so nothing is skipped
        if i % 8 == 0:
            peak_pss = max(peak_pss, tree_pss_mb())
    seconds = time.perf_counter() - start
    ds.close()
    return {
        "patches": patches,
        "seconds": seconds,
        "patches_per_s": patches / max(seconds, 1e-9),
        "peak_rss_mb": peak_rss_mb(),
        "peak_worker_rss_mb": peak_rss_mb(children=True),
        "peak_pss_mb": peak_pss,
        "checksum": checksum,
    }
