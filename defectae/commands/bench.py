"""`defectae bench`: the performance report, comparable across machines (bench.json).

Self-contained: it builds untrained models and generates its own data in a temporary folder,
so no prepared dataset is needed. Per profile (default: synthetic-ae, 128x128 patches at
batch 128, and synthetic-vae8, whole 256x256 images):
    parameters, FLOPs per patch (forward, and one training step counted the same way);
    training patches/s eager, compiled, compiled + AMP (train.train_throughput);
    inference patches/s eager, compiled, TorchScript, ONNX Runtime, INT8 (export's converters);
    tile-test images/s at 512x512 and the share of it outside the model (tile_test.tile_throughput);
    p50 / p95 latency of one image through the Inspector at batch 1; peak memory;
    augment patches/s, the DataLoader's read rate with and without corruption, and its ratio
    to the training rate (issue 4 asks for at least 5x);
    achieved GFLOP/s and its fraction of this machine's peak: the rate of a large float32 matmul,
    run at the start and at the end of the bench (the better of the two; load from other
    processes only lowers it).
Once per run: the peak RSS of iterating once over a 100,000-patch 128x128 file (under 1 GB
asked), and `score` (metrics.compute_all) on 100 maps of 512x512 (under 10 s asked), AU-PRO
timed on its own. Whole-image models are tile-tested at their profile's image size. Timings exclude warm-up and are medians over repetitions; a measurement that
fails is null, with its reason under "unavailable". --quick shrinks everything to seconds.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader

from defectae import __version__, console
from defectae import device as devices
from defectae.bench.probes import tile_throughput
from defectae.commands import augment, export
from defectae.core.inspector import Inspector
from defectae.core.metrics import au_pro, compute_all, label_regions, pixel_curve
from defectae.files import write_text_atomic
from defectae.models import build_model, get_family
from defectae.models.stats import count_parameters, flops_per_sample
from defectae.profiles import CorruptionConfig, Profile, ScoreConfig, resolve, to_dict
from defectae.stores.patches import PatchDataset, create_patches, iterate_once, read_rate
from defectae.stores.prepared import PreparedSplit, write_prepared
from defectae.training.step import Objective
from defectae.training.throughput import train_throughput

DEFAULT_PROFILES = ("synthetic-ae", "synthetic-vae8")
DEFAULT_OUT = Path("bench") / "bench.json"
READ_RATE_FACTOR = 5.0  # issue 4: the loader must read at least 5x the training rate
SCORE_TARGET_S = 10.0  # issue 6: score on 100 maps of 512x512 in under 10 s
TILE_OUTSIDE_TARGET = 0.15  # issue 6: under 15% of tile-test time outside the model
ITERATE_RSS_TARGET_MB = 1024.0  # issue 4: under 1 GB while iterating once over 100,000 patches
ITERATE_PATCH = 128


@dataclass(frozen=True)
class Plan:
    """How much work each measurement does."""

    warmup: int
    reps: int  # timed repetitions (medians are reported)
    latency_samples: int
    tile_side: int  # 0 = twice the patch size
    read_seconds: float
    augment_patches: int
    iterate_patches: int
    score_maps: int
    score_side: int
    matmul_n: int
    compile: bool


FULL = Plan(
    warmup=1,
    reps=3,
    latency_samples=10,
    tile_side=512,
    read_seconds=5.0,
    augment_patches=5000,
    iterate_patches=100_000,
    score_maps=100,
    score_side=512,
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


class Figures:
    """Collects figures; a measurement that raises leaves its keys null and records why."""

    def __init__(self, where: str, unavailable: dict[str, str]) -> None:
        self.values: dict[str, Any] = {}
        self.where = where
        self.unavailable = unavailable

    def measure(self, keys: str | tuple[str, ...], fn: Callable[[], Any]) -> Any:
        """Run `fn`; it returns the value of `keys` (one key) or a dict of them."""
        names = (keys,) if isinstance(keys, str) else keys
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - one failed figure must not end the bench
            text = str(e).strip()
            reason = (
                f"{type(e).__name__}: {text.splitlines()[0][:240]}" if text else type(e).__name__
            )
            self.skip(names, reason)
            console.warn(f"{self.where}: {', '.join(names)} unavailable ({reason})")
            return None
        values = {names[0]: result} if isinstance(keys, str) else result
        self.values.update({k: values[k] for k in names})
        return result

    def skip(self, keys: tuple[str, ...] | str, reason: str) -> None:
        for key in (keys,) if isinstance(keys, str) else keys:
            self.values[key] = None
            self.unavailable[f"{self.where}.{key}"] = reason


# ----------------------------------------------------------------------------- timing and memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], warmup: int, reps: int, device: torch.device) -> list[float]:
    """Wall seconds of `reps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def reset_peak_memory(device: torch.device) -> None:
    """Restart the peak-memory counters (Linux: the RSS high-water mark via clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_rss_mb() -> float:
    """The process's resident-set high-water mark (VmHWM, else getrusage's lifetime peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class StepClock:
    """The same batch forever, noting when each is asked for: `train_throughput` asks for the next
    batch right after each optimizer step, so the gaps between requests are step times."""

    def __init__(self, x: torch.Tensor) -> None:
        self.batch = {"clean": x, "input": x, "mask": torch.zeros_like(x[:, :1])}
        self.times: list[float] = []

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            self.times.append(time.perf_counter())
            yield self.batch

    def step_seconds(self, steps: int) -> list[float]:
        return list(np.diff(self.times)[-steps:])


# ----------------------------------------------------------------------------- machine-wide figures


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on (no host name)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "gpu": None,
        "defectae": __version__,
    }
    with_ort = None
    try:
        import onnxruntime

        with_ort = onnxruntime.__version__
    except ImportError:
        pass
    info["onnxruntime"] = with_ort
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def matmul_peak(n: int, plan: Plan, device: torch.device) -> dict[str, Any]:
    """This machine's float32 peak as the rate of one large matmul: 2 n^3 FLOPs per call."""
    a = torch.rand(n, n, device=device)
    b = torch.rand(n, n, device=device)
    seconds = statistics.median(
        timed(lambda: torch.mm(a, b), plan.warmup, max(3, plan.reps), device)
    )
    return {
        "matmul_n": n,
        "matmul_seconds": seconds,
        "matmul_gflop_per_s": 2 * n**3 / seconds / 1e9,
    }


def random_maps(
    n: int, side: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Residual-like float16 maps (N, side, side), masks with 1-3 elliptic regions on half of them,
    labels and defect types."""
    yy, xx = np.mgrid[0:side, 0:side]
    maps = (rng.random((n, side, side), dtype=np.float32) * 0.3).astype(np.float32)
    masks = np.zeros((n, side, side), bool)
    labels = np.arange(n) % 2 == 1
    types = []
    for i in range(n):
        types.append(("scratch", "hole")[i // 2 % 2] if labels[i] else "good")
        if not labels[i]:
            continue
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(side // 8, side - side // 8, 2)
            ry, rx = rng.integers(max(2, side // 64), max(3, side // 10), 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        maps[i][masks[i]] += rng.random(int(masks[i].sum()), dtype=np.float32) * 0.6
    return maps.astype(np.float16), masks, labels, types


def score_time(plan: Plan, quick: bool) -> dict[str, Any]:
    """Seconds of compute_all (every metric) on `score_maps` maps, and of AU-PRO alone."""
    rng = np.random.default_rng(0)
    maps, masks, labels, types = random_maps(plan.score_maps, plan.score_side, rng)
    val_maps = random_maps(max(2, plan.score_maps // 10), plan.score_side, rng)[0][::2]
    scores = maps.reshape(len(maps), -1).max(1).astype(np.float32)
    opts = ScoreConfig().metric_options()
    reps = min(plan.reps, 3)
    cpu = torch.device("cpu")
    seconds = statistics.median(
        timed(
            lambda: compute_all(maps, masks, scores, labels, val_maps, **opts, defect_types=types),
            1,
            reps,
            cpu,
        )
    )
    aupro = statistics.median(
        timed(
            lambda: au_pro(pixel_curve(maps, label_regions(masks)), opts["pro_max_fpr"]),
            1,
            reps,
            cpu,
        )
    )
    full_size = (plan.score_maps, plan.score_side) == (FULL.score_maps, FULL.score_side)
    return {
        "score_maps": plan.score_maps,
        "score_map_side": plan.score_side,
        "score_seconds": seconds,
        "score_aupro_seconds": aupro,
        "score_under_10s": seconds < SCORE_TARGET_S if full_size and not quick else None,
    }


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a new process forked from a small server process, so its peak RSS is its own.

    (A spawned child's getrusage peak starts at its parent's resident size, which here is the
    bench with every model it has built; `iterate_once(isolated=True)` spawns.)
    """
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def iterate_figures(plan: Plan, workdir: Path, quick: bool) -> dict[str, Any]:
    """Peak memory while a 2-worker DataLoader reads every patch of a generated 128x128 file once."""
    path = workdir / "iterate.h5"
    n, shape = plan.iterate_patches, (1, ITERATE_PATCH, ITERATE_PATCH)
    rng = np.random.default_rng(0)
    with create_patches(path, n, 1, 1, ITERATE_PATCH, {"seed": 0, "source": "bench"}) as f:
        block = 4096
        for start in range(0, n, block):
            stop = min(n, start + block)
            f["train/patches"][start:stop] = rng.integers(
                0, 256, (stop - start, *shape), dtype=np.uint8
            )
        f["validation/patches"][:] = rng.integers(0, 256, (1, *shape), dtype=np.uint8)
    isolated = not quick
    if isolated:
        result = in_fresh_process(iterate_once, str(path), 128, 2, None, False)
    else:
        result = iterate_once(path, batch_size=128, num_workers=2)
    path.unlink()
    # Reader + workers with shared pages counted once (PSS) when Linux reports it, else the larger RSS.
    pss = result.get("peak_pss_mb") or None
    peak = pss or max(result["peak_rss_mb"], result["peak_worker_rss_mb"])
    return {
        "iterate_once_patches": n,
        "iterate_once_patch_size": ITERATE_PATCH,
        "iterate_once_file_mb": n * int(np.prod(shape)) / 2**20,
        "iterate_once_isolated": isolated,
        "iterate_once_seconds": result["seconds"],
        "iterate_once_patches_per_s": result["patches_per_s"],
        "iterate_once_peak_rss_mb": result["peak_rss_mb"],
        "iterate_once_peak_worker_rss_mb": result["peak_worker_rss_mb"],
        "iterate_once_peak_pss_mb": pss,
        "iterate_once_under_1gb": peak < ITERATE_RSS_TARGET_MB
        if n >= FULL.iterate_patches
        else None,
    }


# ----------------------------------------------------------------------------- per-profile figures


def train_flops_per_patch(
    model: nn.Module, profile: Profile, device: torch.device, batch: int = 2
) -> int:
    """FLOPs of one training step per patch: forward, loss and backward, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model).to(device).train()
    c, p = profile.dataset.channels, profile.model.input_size
    x = torch.rand(batch, c, p, p, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        Objective(model, profile.loss)(x, x, None, 0)["total"].backward()
    return counter.get_total_flops() // batch


def train_rate(
    model: nn.Module,
    x: torch.Tensor,
    profile: Profile,
    plan: Plan,
    device: torch.device,
    amp: str,
    compile: bool,
) -> tuple[float, str]:
    """Median training patches/s (and the autocast dtype) over `reps` steps after `warmup` (a fresh copy of the model)."""
    clock = StepClock(x)
    warmup = plan.warmup + int(
        compile
    )  # a compiled model's second step may still compile (backward)
    result = train_throughput(
        copy.deepcopy(model),
        clock,
        steps=plan.reps,
        amp=amp,
        compile_model=compile,
        device=str(device),
        loss=profile.loss,
        warmup=warmup,
    )
    if compile and not result["compiled"]:
        raise RuntimeError("torch.compile failed and train_throughput fell back to eager")
    return x.shape[0] / statistics.median(clock.step_seconds(plan.reps)), result["amp"]


def inference_rates(
    fig: Figures, model: nn.Module, x: torch.Tensor, plan: Plan, device: torch.device
) -> None:
    """Forward patches/s of the eager, compiled, TorchScript, ONNX Runtime and INT8 model."""
    model = model.to(device).eval()
    x = x.to(device)
    recon = export.Reconstruction(model).eval()
    n = x.shape[0]

    def rate(fn: Callable[[], Any], extra_warmup: int = 0) -> float:
        with torch.inference_mode():
            return n / statistics.median(timed(fn, plan.warmup + extra_warmup, plan.reps, device))

    fig.measure("infer_eager_patches_per_s", lambda: rate(lambda: recon(x)))
    if plan.compile:

        def compiled() -> float:
            module = devices.compile_or_eager(copy.deepcopy(recon), True, x[:2])
            if not hasattr(module, "_orig_mod"):
                raise RuntimeError("torch.compile failed; it fell back to eager")
            return rate(lambda: module(x))

        fig.measure("infer_compiled_patches_per_s", compiled)
    else:
        fig.skip(
            "infer_compiled_patches_per_s",
            "skipped with --quick (compiling takes minutes on a CPU)",
        )

    def torchscript() -> float:
        traced = export.to_torchscript(recon, x[:2])
        return rate(
            lambda: traced(x), extra_warmup=2
        )  # the profiling executor optimises after two runs

    fig.measure("infer_torchscript_patches_per_s", torchscript)

    def onnxruntime() -> dict[str, Any]:
        data, _ = export.to_onnx(copy.deepcopy(recon).cpu(), x[:2].cpu(), "patch", ["recon"])
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("this onnxruntime has no CUDAExecutionProvider")
            providers.insert(0, "CUDAExecutionProvider")
        session = export.onnx_session(data, providers)
        xc = x.cpu()
        return {
            "infer_onnxruntime_patches_per_s": rate(lambda: export.run_onnx(session, xc)),
            "onnxruntime_provider": providers[0],
        }

    fig.measure(("infer_onnxruntime_patches_per_s", "onnxruntime_provider"), onnxruntime)

    if device.type != "cpu":
        fig.skip(
            ("infer_int8_patches_per_s", "int8_quantization"), "int8 kernels run on the CPU only"
        )
        return

    def int8() -> dict[str, Any]:
        qmodel, how = export.quantize_int8(model, x[: min(n, 64)])
        qrecon = export.Reconstruction(qmodel).eval()
        return {"infer_int8_patches_per_s": rate(lambda: qrecon(x)), "int8_quantization": how}

    fig.measure(("infer_int8_patches_per_s", "int8_quantization"), int8)


def tile_figures(
    model: nn.Module, profile: Profile, plan: Plan, device: torch.device
) -> dict[str, Any]:
    """tile-test images/s and outside-model share, and Inspector latency at batch 1."""
    c, p, tile = profile.dataset.channels, profile.model.input_size, profile.tile
    whole = get_family(profile.model.family).whole_image
    if whole:
        h, w = profile.dataset.image_size
    else:
        h = w = plan.tile_side or 2 * p
    speed = tile_throughput(model, (h, w), p, tile.stride, tile, plan.reps, device, c, whole)
    inspector = Inspector(
        model.to(device).eval(),
        patch_size=p,
        whole_image=whole,
        batch_size=tile.batch_size,
        **tile.inspector_options(),
    )
    image = torch.rand(1, c, h, w, device=device)
    with torch.inference_mode():
        times = timed(lambda: inspector(image), plan.warmup, plan.latency_samples, device)
    share = speed["outside_model_share"]
    return {
        "tile_image_size": [h, w],
        "tile_stride": None if whole else tile.stride,
        "tile_whole_image": whole,
        "tile_images_per_s": speed["images_per_s"],
        "tile_outside_model_share": share,
        "tile_outside_model_under_15pct": share < TILE_OUTSIDE_TARGET,
        "latency_p50_ms": float(np.percentile(times, 50)) * 1e3,
        "latency_p95_ms": float(np.percentile(times, 95)) * 1e3,
        "latency_samples": len(times),
    }


def _prepared_images(path: Path, profile: Profile, n_train: int, rng: np.random.Generator) -> Path:
    """A prepared.h5 of smooth random images at the profile's image size (nothing to read from disk)."""
    c, (h, w) = profile.dataset.channels, profile.dataset.image_size

    def split(n: int) -> PreparedSplit:
        small = rng.integers(0, 256, (n, c, max(1, h // 8), max(1, w // 8))).astype(np.float32)
        images = torch.nn.functional.interpolate(
            torch.from_numpy(small), size=(h, w), mode="bilinear"
        )
        images = images.add_(torch.from_numpy(rng.normal(0, 8, (n, c, h, w)).astype(np.float32)))
        return PreparedSplit(
            images.clamp_(0, 255).to(torch.uint8).numpy(),
            np.zeros((n, 1, h, w), np.uint8),
            np.zeros(n, np.uint8),
            ["good"] * n,
            [f"{i:03d}" for i in range(n)],
            [f"{i:03d}.png" for i in range(n)],
            np.full((n, 2), (h, w), np.int32),
        )

    return write_prepared(
        path,
        {"train": split(n_train), "validation": split(2), "test": PreparedSplit.empty(c, (h, w))},
        {
            "layout": "synthetic",
            "source": "bench",
            "category": "bench",
            "image_size": [h, w],
            "color": profile.dataset.color,
            "channels": c,
            "dataset": {"name": "bench"},
        },
    )


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Hide another command's progress bars and tables while it is measured."""
    quiet, console.mode.quiet = console.mode.quiet, True
    try:
        yield
    finally:
        console.mode.quiet = quiet


def loader_wait(
    model: nn.Module, patches: Path, profile: Profile, plan: Plan, device: torch.device
) -> float:
    """Fraction of eager training step time spent waiting for the 2-worker DataLoader."""
    batch = min(profile.train.batch_size, plan.augment_patches)
    loader = DataLoader(
        PatchDataset(patches, batch_size=batch), batch_size=None, shuffle=True, num_workers=2
    )
    result = train_throughput(
        copy.deepcopy(model),
        loader,
        steps=plan.reps,
        amp="off",
        compile_model=False,
        device=str(device),
        loss=profile.loss,
        warmup=plan.warmup,
    )
    return result["data_wait_fraction"]


def data_figures(
    fig: Figures,
    model: nn.Module,
    profile: Profile,
    plan: Plan,
    workdir: Path,
    device: torch.device,
) -> None:
    """augment patches/s on generated images, the DataLoader's read rate on its patches.h5,
    and the share of training step time spent waiting for that loader."""
    rng = np.random.default_rng(0)
    prepared = _prepared_images(workdir / f"{profile.name}-prepared.h5", profile, 8, rng)
    patches = workdir / f"{profile.name}-patches.h5"
    cfg = dataclasses.replace(
        profile.augment, n_patches=plan.augment_patches, n_val_patches=min(64, plan.augment_patches)
    )
    prof = dataclasses.replace(profile, augment=cfg)

    def augment_rate() -> float:
        rates = []
        for _ in range(min(plan.reps, 3)):
            with silenced():
                rates.append(augment.run(prof, prepared, patches)["patches_per_s"])
        return statistics.median(rates)

    batch = profile.train.batch_size
    corruption = (
        profile.corruption
        if profile.corruption.kind != "none"
        else CorruptionConfig(kind="dominant_square")
    )
    fig.values.update(read_batch_size=batch, read_workers=2, read_corruption=corruption.kind)
    if fig.measure("augment_patches_per_s", augment_rate) is None:
        fig.skip(
            ("read_patches_per_s", "read_corrupted_patches_per_s", "train_data_wait_fraction"),
            "no patch file (augment failed)",
        )
    else:
        fig.measure(
            "read_patches_per_s", lambda: read_rate(patches, batch, 2, None, plan.read_seconds)
        )
        fig.measure(
            "read_corrupted_patches_per_s",
            lambda: read_rate(patches, batch, 2, corruption, plan.read_seconds),
        )
        fig.measure(
            "train_data_wait_fraction", lambda: loader_wait(model, patches, profile, plan, device)
        )
    prepared.unlink(missing_ok=True)
    patches.unlink(missing_ok=True)


def bench_profile(
    profile: Profile, plan: Plan, device: torch.device, workdir: Path, unavailable: dict[str, str]
) -> dict[str, Any]:
    """Every per-profile figure."""
    fig = Figures(f"profiles.{profile.name}", unavailable)
    reset_peak_memory(device)
    c, p, b = profile.dataset.channels, profile.model.input_size, profile.train.batch_size
    torch.manual_seed(0)
    model = build_model(profile.model.family, c, p, profile.model.args)
    fig.values.update(
        {
            "family": profile.model.family,
            "patch_size": p,
            "channels": c,
            "batch_size": b,
            "parameters": count_parameters(model),
        }
    )
    fig.measure(
        "forward_flops_per_patch", lambda: flops_per_sample(copy.deepcopy(model).to(device), c, p)
    )
    fig.measure("train_flops_per_patch", lambda: train_flops_per_patch(model, profile, device))
    x = torch.rand(b, c, p, p)

    variants = [("eager", "off", False), ("compiled", "off", True), ("compiled_amp", "auto", True)]
    for name, amp, compiled in console.track(variants, f"{profile.name}: training"):
        key = f"train_{name}_patches_per_s"
        keys = (key, "train_amp_dtype") if name == "compiled_amp" else (key,)
        if compiled and not plan.compile:
            fig.skip(keys, "skipped with --quick (compiling takes minutes on a CPU)")
            continue
        fig.measure(
            keys,
            lambda a=amp, k=compiled, ks=keys: dict(
                zip(ks, train_rate(model, x, profile, plan, device, a, k), strict=False)
            ),
        )

    with console.progress() as bar:
        task = bar.add_task(f"{profile.name}: inference, tile-test, data", total=3)
        inference_rates(fig, model, x, plan, device)
        bar.advance(task)
        fig.measure(
            (
                "tile_image_size",
                "tile_stride",
                "tile_whole_image",
                "tile_images_per_s",
                "tile_outside_model_share",
                "tile_outside_model_under_15pct",
                "latency_p50_ms",
                "latency_p95_ms",
                "latency_samples",
            ),
            lambda: tile_figures(model, profile, plan, device),
        )
        bar.advance(task)
        data_figures(fig, model, profile, plan, workdir, device)
        bar.advance(task)
    fig.values["peak_rss_mb"] = peak_rss_mb()
    fig.values["peak_gpu_memory_mb"] = (
        torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    )
    return fig.values


def add_efficiency(v: dict[str, Any], peak_gflops: float | None) -> None:
    """The read-to-train ratio, and achieved GFLOP/s (eager and best float variant) with their fraction of peak."""
    train_rates = [v.get(f"train_{n}_patches_per_s") for n in ("eager", "compiled", "compiled_amp")]
    best_train = max((r for r in train_rates if r), default=None)
    read = v.get("read_patches_per_s")
    v["read_to_train_ratio"] = read / best_train if read and best_train else None
    ratio = v["read_to_train_ratio"]
    v["read_at_least_5x_train"] = bool(ratio >= READ_RATE_FACTOR) if ratio else None
    infer_rates = [
        v.get(f"infer_{n}_patches_per_s")
        for n in ("eager", "compiled", "torchscript", "onnxruntime")
    ]
    best_infer = max((r for r in infer_rates if r), default=None)
    for what, flops, eager, best in (
        ("train", v.get("train_flops_per_patch"), train_rates[0], best_train),
        ("infer", v.get("forward_flops_per_patch"), infer_rates[0], best_infer),
    ):
        for label, rate in (("eager", eager), ("best", best)):
            gflops = flops * rate / 1e9 if flops and rate else None
            v[f"{what}_{label}_gflop_per_s"] = gflops
            v[f"{what}_{label}_fraction_of_peak"] = (
                gflops / peak_gflops if gflops and peak_gflops else None
            )


# ----------------------------------------------------------------------------- the command


def run(
    profiles: list[str] | None = None,
    sets: list[str] | None = None,
    device: str = "cpu",
    out: Path | None = None,
    quick: bool = False,
) -> dict[str, Any]:
    """Benchmark the profiles (default synthetic-ae and synthetic-vae8) and write bench.json."""
    started = time.perf_counter()
    names = list(profiles or DEFAULT_PROFILES)
    dev = devices.resolve_device(device)
    resolved = [resolve(name, sets or []) for name in names]  # bad names fail before any work
    out = Path(out) if out is not None else DEFAULT_OUT
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
    matmul_keys = ("matmul_n", "matmul_seconds", "matmul_gflop_per_s")
    matmul = [Figures("matmul", unavailable)]
    matmul[0].measure(matmul_keys, lambda: matmul_peak(plan.matmul_n, plan, dev))
    data, score = Figures("data", unavailable), Figures("score", unavailable)
    summary["profiles"] = {}
    with tempfile.TemporaryDirectory(prefix="defectae-bench-") as tmp:
        workdir = Path(tmp)
        with console.progress() as bar:
            task = bar.add_task("data loader memory", total=1)
            data.measure(
                (
                    "iterate_once_patches",
                    "iterate_once_patch_size",
                    "iterate_once_file_mb",
                    "iterate_once_isolated",
                    "iterate_once_seconds",
                    "iterate_once_patches_per_s",
                    "iterate_once_peak_rss_mb",
                    "iterate_once_peak_worker_rss_mb",
                    "iterate_once_peak_pss_mb",
                    "iterate_once_under_1gb",
                ),
                lambda: iterate_figures(plan, workdir, quick),
            )
            bar.advance(task)
        for profile in resolved:
            figures = bench_profile(profile, plan, dev, workdir, unavailable)
            summary["profiles"][profile.name] = {**figures, "profile": to_dict(profile)}
    with console.progress() as bar:
        task = bar.add_task("score, matmul", total=2)
        score.measure(
            (
                "score_maps",
                "score_map_side",
                "score_seconds",
                "score_aupro_seconds",
                "score_under_10s",
            ),
            lambda: score_time(plan, quick),
        )
        bar.advance(task)
        matmul.append(
            Figures("matmul", {})
        )  # again at the end: the better of two is the machine's peak
        matmul[1].measure(matmul_keys, lambda: matmul_peak(plan.matmul_n, plan, dev))
        bar.advance(task)
    runs = [m.values for m in matmul if m.values.get("matmul_gflop_per_s")]
    summary["matmul"] = (
        {**max(runs, key=lambda m: m["matmul_gflop_per_s"]), "matmul_runs": len(runs)}
        if runs
        else {**matmul[0].values, "matmul_runs": 0}
    )
    for figures in summary["profiles"].values():
        add_efficiency(figures, summary["matmul"]["matmul_gflop_per_s"])
    summary["data"], summary["score"] = data.values, score.values
    summary["unavailable"] = unavailable
    summary["seconds"] = time.perf_counter() - started
    write_text_atomic(out, _json(summary))
    summary["out"] = str(out)
    _show(summary)
    console.info(f"bench.json -> {out} ({summary['seconds']:.0f} s)")
    return summary


def _json(summary: dict[str, Any]) -> str:
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, (np.floating, np.integer, np.bool_)):
            return value.item()
        return value

    return json.dumps(clean(summary), indent=2) + "\n"


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
