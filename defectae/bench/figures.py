"""bench.json's figures: each function measures one group and returns it by key.

A figure that cannot be measured is null, with its reason collected by `Figures`. The
measurements go through the same pieces the commands use: training steps
(`training.throughput`), the converters and int8 quantization of `export`, the Inspector of
tile-test, the sampling of `augment` and the metrics of `score`.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from defectae import console
from defectae import device as devices
from defectae.bench.inputs import prepared_images, random_batch, random_maps, random_patch_file
from defectae.bench.predict_rate import PREDICT_KEYS, predict_figures
from defectae.bench.probes import (
    StepClock,
    in_fresh_process,
    iterate_once,
    peak_memory,
    read_rate,
    reset_peak_memory,
    tile_throughput,
    timed,
)
from defectae.core.inspector import Inspector
from defectae.core.metrics import au_pro, compute_all, label_regions, pixel_curve
from defectae.data.sampling import make_patches, plan_patches
from defectae.errors import first_line
from defectae.export import converters
from defectae.export.quantize import quantize_int8
from defectae.models import build_model, get_family
from defectae.models.backbones import FrozenEncoder
from defectae.models.stats import count_parameters, flops_per_sample
from defectae.profiles import CorruptionConfig, Profile, ScoreConfig
from defectae.stores.patches import PatchDataset
from defectae.training.step import Objective
from defectae.training.throughput import train_throughput

READ_RATE_FACTOR = 5.0  # issue 4: the loader must read at least 5x the training rate
SCORE_TARGET_S = 10.0  # issue 6: score on 100 maps of 512x512 in under 10 s
SCORE_MAPS, SCORE_SIDE = 100, 512
TILE_OUTSIDE_TARGET = 0.15  # issue 6: under 15% of tile-test time outside the model
ITERATE_RSS_TARGET_MB = 1024.0  # issue 4: under 1 GB while iterating once over 100,000 patches
ITERATE_PATCHES, ITERATE_PATCH = 100_000, 128
QUICK_SKIP = "skipped with --quick (compiling takes minutes on a CPU)"

MATMUL_KEYS = ("matmul_n", "matmul_seconds", "matmul_gflop_per_s")
SCORE_KEYS = (
    "score_maps",
    "score_map_side",
    "score_seconds",
    "score_aupro_seconds",
    "score_under_10s",
)
ITERATE_KEYS = (
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
)
TILE_KEYS = (
    "tile_image_size",
    "tile_stride",
    "tile_whole_image",
    "tile_images_per_s",
    "tile_outside_model_share",
    "tile_outside_model_under_15pct",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_samples",
)


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
            reason = first_line(e, 240)
            self.skip(names, reason)
            console.warn(f"{self.where}: {', '.join(names)} unavailable ({reason})")
            return None
        values = {names[0]: result} if isinstance(keys, str) else result
        self.values.update({k: values[k] for k in names})
        return result

    def skip(self, keys: tuple[str, ...] | str, reason: str) -> None:
        """Leave `keys` null because of `reason`."""
        for key in (keys,) if isinstance(keys, str) else keys:
            self.values[key] = None
            self.unavailable[f"{self.where}.{key}"] = reason


# ----------------------------------------------------------------------------- machine-wide


def score_time(plan: Plan) -> dict[str, Any]:
    """Seconds of compute_all (every metric) on `score_maps` maps, and of AU-PRO alone."""
    rng = np.random.default_rng(0)
    maps, masks, labels, types = random_maps(plan.score_maps, plan.score_side, rng)
    val_maps = random_maps(max(2, plan.score_maps // 10), plan.score_side, rng)[0][::2]
    scores = maps.reshape(len(maps), -1).max(1).astype(np.float32)
    opts = ScoreConfig().metric_options()
    reps, cpu = min(plan.reps, 3), torch.device("cpu")

    def every_metric() -> None:
        compute_all(maps, masks, scores, labels, val_maps, **opts, defect_types=types)

    def aupro() -> None:
        au_pro(pixel_curve(maps, label_regions(masks)), opts["pro_max_fpr"])

    seconds = statistics.median(timed(every_metric, 1, reps, cpu))
    full_size = (plan.score_maps, plan.score_side) == (SCORE_MAPS, SCORE_SIDE)
    return {
        "score_maps": plan.score_maps,
        "score_map_side": plan.score_side,
        "score_seconds": seconds,
        "score_aupro_seconds": statistics.median(timed(aupro, 1, reps, cpu)),
        "score_under_10s": seconds < SCORE_TARGET_S if full_size else None,
    }


def iterate_figures(plan: Plan, workdir: Path, isolated: bool) -> dict[str, Any]:
    """Peak memory while a 2-worker DataLoader reads every patch of a generated 128x128 file once."""
    n = plan.iterate_patches
    path = random_patch_file(workdir / "iterate.h5", n, ITERATE_PATCH)
    if isolated:
        result = in_fresh_process(iterate_once, str(path), 128, 2, None)
    else:
        result = iterate_once(path, batch_size=128, num_workers=2)
    path.unlink()
    # Reader + workers with shared pages counted once (PSS) when Linux reports it, else the larger RSS.
    pss = result.get("peak_pss_mb") or None
    peak = pss or max(result["peak_rss_mb"], result["peak_worker_rss_mb"])
    return {
        "iterate_once_patches": n,
        "iterate_once_patch_size": ITERATE_PATCH,
        "iterate_once_file_mb": n * ITERATE_PATCH**2 / 2**20,
        "iterate_once_isolated": isolated,
        "iterate_once_seconds": result["seconds"],
        "iterate_once_patches_per_s": result["patches_per_s"],
        "iterate_once_peak_rss_mb": result["peak_rss_mb"],
        "iterate_once_peak_worker_rss_mb": result["peak_worker_rss_mb"],
        "iterate_once_peak_pss_mb": pss,
        "iterate_once_under_1gb": peak < ITERATE_RSS_TARGET_MB if n >= ITERATE_PATCHES else None,
    }


# ----------------------------------------------------------------------------- per profile


def profile_figures(
    profile: Profile, plan: Plan, device: torch.device, workdir: Path, unavailable: dict[str, str]
) -> dict[str, Any]:
    """Every per-profile figure."""
    fig = Figures(f"profiles.{profile.name}", unavailable)
    reset_peak_memory(device)
    c, p, b = profile.dataset.channels, profile.model.input_size, profile.train.batch_size
    torch.manual_seed(0)
    model = build_model(profile.model.family, c, p, profile.model.args)
    fig.values.update(
        family=profile.model.family,
        patch_size=p,
        channels=c,
        batch_size=b,
        parameters=count_parameters(model),
    )
    fig.measure(
        "forward_flops_per_patch", lambda: flops_per_sample(copy.deepcopy(model).to(device), c, p)
    )
    fig.measure("train_flops_per_patch", lambda: train_flops_per_patch(model, profile, device))
    x = random_batch(b, c, p)
    training_rates(fig, model, x, profile, plan, device)
    with console.progress() as bar:
        task = bar.add_task(f"{profile.name}: inference, tile-test, predict, data", total=4)
        inference_rates(fig, model, x, plan, device)
        if isinstance(getattr(model, "encoder", None), FrozenEncoder):
            fig.measure("encoder_share", lambda: encoder_share(model, x, plan, device))
        bar.advance(task)
        fig.measure(TILE_KEYS, lambda: tile_figures(model, profile, plan, device))
        bar.advance(task)
        n = max(2, plan.reps)
        fig.measure(PREDICT_KEYS, lambda: predict_figures(model, profile, n, workdir))
        bar.advance(task)
        data_figures(fig, model, profile, plan, workdir, device)
        bar.advance(task)
    fig.values.update(peak_memory(device))
    return fig.values


def train_flops_per_patch(
    model: nn.Module, profile: Profile, device: torch.device, batch: int = 2
) -> int:
    """FLOPs of one training step per patch: forward, loss and backward, counted by torch.utils.flop_counter."""
    model = copy.deepcopy(model).to(device).train()
    x = random_batch(batch, profile.dataset.channels, profile.model.input_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        Objective(model, profile.loss)(x, x, None, 0)["total"].backward()
    return counter.get_total_flops() // batch


def training_rates(
    fig: Figures,
    model: nn.Module,
    x: torch.Tensor,
    profile: Profile,
    plan: Plan,
    device: torch.device,
) -> None:
    """Training patches/s eager, compiled and compiled + AMP (with its autocast dtype)."""
    variants = [("eager", "off", False), ("compiled", "off", True), ("compiled_amp", "auto", True)]
    for name, amp, compiled in console.track(variants, f"{profile.name}: training"):
        key = f"train_{name}_patches_per_s"
        keys = (key, "train_amp_dtype") if name == "compiled_amp" else (key,)
        if compiled and not plan.compile:
            fig.skip(keys, QUICK_SKIP)
            continue
        fig.measure(
            keys,
            lambda a=amp, k=compiled, ks=keys: dict(
                zip(ks, train_rate(model, x, profile, plan, device, a, k), strict=False)
            ),
        )


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
    result = train_throughput(
        copy.deepcopy(model),
        clock,
        steps=plan.reps,
        amp=amp,
        compile_model=compile,
        device=str(device),
        loss=profile.loss,
        warmup=plan.warmup + int(compile),  # a compiled model's second step may still compile
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
    recon = converters.Reconstruction(model).eval()
    n = x.shape[0]

    def rate(fn: Callable[[], Any], extra_warmup: int = 0) -> float:
        with torch.inference_mode():
            return n / statistics.median(timed(fn, plan.warmup + extra_warmup, plan.reps, device))

    def compiled() -> float:
        module = devices.compile_or_eager(copy.deepcopy(recon), True, x[:2])
        if not hasattr(module, "_orig_mod"):
            raise RuntimeError("torch.compile failed; it fell back to eager")
        return rate(lambda: module(x))

    def torchscript() -> float:
        traced = converters.to_torchscript(recon, x[:2])
        return rate(
            lambda: traced(x), extra_warmup=2
        )  # the profiling executor optimises after two runs

    def onnxruntime() -> dict[str, Any]:
        data, _ = converters.to_onnx(copy.deepcopy(recon).cpu(), x[:2].cpu(), "patch", ["recon"])
        providers = onnx_providers(device)
        session, xc = converters.onnx_session(data, providers), x.cpu()
        return {
            "infer_onnxruntime_patches_per_s": rate(lambda: converters.run_onnx(session, xc)),
            "onnxruntime_provider": providers[0],
        }

    def int8() -> dict[str, Any]:
        qmodel, how = quantize_int8(model, x[: min(n, 64)])
        qrecon = converters.Reconstruction(qmodel).eval()
        return {"infer_int8_patches_per_s": rate(lambda: qrecon(x)), "int8_quantization": how}

    fig.measure("infer_eager_patches_per_s", lambda: rate(lambda: recon(x)))
    if plan.compile:
        fig.measure("infer_compiled_patches_per_s", compiled)
    else:
        fig.skip("infer_compiled_patches_per_s", QUICK_SKIP)
    fig.measure("infer_torchscript_patches_per_s", torchscript)
    fig.measure(("infer_onnxruntime_patches_per_s", "onnxruntime_provider"), onnxruntime)
    int8_keys = ("infer_int8_patches_per_s", "int8_quantization")
    if device.type != "cpu":
        fig.skip(int8_keys, "int8 kernels run on the CPU only")
    else:
        fig.measure(int8_keys, int8)


def encoder_share(model: nn.Module, x: torch.Tensor, plan: Plan, device: torch.device) -> float:
    """Feature-space models: the share of eager inference time spent in the frozen encoder."""
    model, x = model.to(device).eval(), x.to(device)
    reps = max(plan.reps, 5)  # a ratio of two noisy medians: a few more repetitions than --quick's
    with torch.inference_mode():
        encoder = statistics.median(timed(lambda: model.encoder(x), plan.warmup, reps, device))
        whole = statistics.median(timed(lambda: model(x), plan.warmup, reps, device))
    return min(1.0, encoder / whole)


def onnx_providers(device: torch.device) -> list[str]:
    """onnxruntime's providers for `device`, best first; CUDA must be available when asked for."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError("this onnxruntime has no CUDAExecutionProvider")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def tile_figures(
    model: nn.Module, profile: Profile, plan: Plan, device: torch.device
) -> dict[str, Any]:
    """tile-test images/s and outside-model share, and Inspector latency at batch 1."""
    c, p, tile = profile.dataset.channels, profile.model.input_size, profile.tile
    whole = get_family(profile.model.family).whole_image
    h, w = profile.dataset.image_size if whole else (plan.tile_side or 2 * p,) * 2
    speed = tile_throughput(model, (h, w), p, tile.stride, tile, plan.reps, device, c, whole)
    inspector = Inspector(
        model.to(device).eval(),
        patch_size=p,
        whole_image=whole,
        batch_size=tile.batch_size,
        **tile.inspector_options(),
    )
    image = random_batch(1, c, h, w, device=device)
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
    prepared = prepared_images(
        workdir / f"{profile.name}-prepared.h5", profile, 8, np.random.default_rng(0)
    )
    patches = workdir / f"{profile.name}-patches.h5"
    batch = profile.train.batch_size
    corruption = (
        profile.corruption
        if profile.corruption.kind != "none"
        else CorruptionConfig(kind="dominant_square")
    )
    fig.values.update(read_batch_size=batch, read_workers=2, read_corruption=corruption.kind)
    if (
        fig.measure("augment_patches_per_s", lambda: augment_rate(profile, plan, prepared, patches))
        is None
    ):
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


def augment_rate(profile: Profile, plan: Plan, prepared: Path, patches: Path) -> float:
    """Patches/s of augment's sampling (plan and make) of `plan.augment_patches` into `patches`."""
    cfg = dataclasses.replace(
        profile.augment, n_patches=plan.augment_patches, n_val_patches=min(64, plan.augment_patches)
    )
    profile = dataclasses.replace(profile, augment=cfg)
    n = len(plan_patches(profile, prepared))

    def sample() -> None:
        make_patches(profile, plan_patches(profile, prepared), prepared, patches)

    return n / statistics.median(timed(sample, 0, min(plan.reps, 3), torch.device("cpu")))


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
