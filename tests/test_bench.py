"""`defectae bench --quick` on a tiny model, and the probes it measures with."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import h5py
import pytest
import torch
from torch import nn

from defectae import profiles
from defectae.bench.figures import Figures
from defectae.bench.inputs import random_patch_file
from defectae.bench.probes import StepClock, iterate_once, read_rate, tile_throughput
from defectae.commands import bench
from defectae.errors import DefectaeError
from defectae.models import build_model

TINY = [
    "model.input_size=32",
    "model.args.latent_dim=8",
    "train.batch_size=8",
    "dataset.image_size=[64, 64]",
    "tile.stride=16",
]
README = Path(__file__).parents[1] / "README.md"
# The README's bench table, row by row, and the bench.json figures each row reports.
README_ROWS = {
    "parameters / GFLOP per patch (forward)": ["parameters", "forward_flops_per_patch"],
    "training patches/s: eager / compiled / compiled + bf16": [
        "train_eager_patches_per_s",
        "train_compiled_patches_per_s",
        "train_compiled_amp_patches_per_s",
    ],
    "share of training step time waiting for data": ["train_data_wait_fraction"],
    "inference patches/s: eager / compiled / TorchScript / ONNX Runtime / INT8": [
        "infer_eager_patches_per_s",
        "infer_compiled_patches_per_s",
        "infer_torchscript_patches_per_s",
        "infer_onnxruntime_patches_per_s",
        "infer_int8_patches_per_s",
    ],
    "tile-test images/s (share outside the model)": [
        "tile_images_per_s",
        "tile_outside_model_share",
    ],
    "latency per image, batch 1, p50 / p95": ["latency_p50_ms", "latency_p95_ms"],
    "patch loader read rate, plain / corrupted (patches/s)": [
        "read_patches_per_s",
        "read_corrupted_patches_per_s",
    ],
    "peak RSS": ["peak_rss_mb"],
}
# Figures null by design in a --quick run on the CPU: the targets are judged at full size only.
NOT_APPLICABLE = {"score.score_under_10s", "data.iterate_once_under_1gb"}
NOT_APPLICABLE_CPU = {"peak_gpu_memory_mb"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    summary = bench.run(["synthetic-ae"], TINY, "cpu", out, quick=True)
    return summary, json.loads(out.read_text())


def _figures(saved: dict) -> dict[str, object]:
    """Every figure of bench.json under the name `unavailable` uses for it."""
    found = {
        f"{section}.{k}": v
        for section in ("matmul", "data", "score")
        for k, v in saved[section].items()
    }
    for name, fig in saved["profiles"].items():
        found.update({f"profiles.{name}.{k}": v for k, v in fig.items() if k != "profile"})
    return found


def test_quick_bench_on_a_tiny_model_records_its_settings_and_figures(quick):
    summary, saved = quick
    assert summary["out"].endswith("bench.json") and saved["settings"]["quick"] is True
    assert saved["machine"]["device"] == "cpu" and saved["machine"]["torch"] == torch.__version__
    fig = saved["profiles"]["synthetic-ae"]
    assert fig["patch_size"] == 32 and fig["batch_size"] == 8 and fig["tile_image_size"] == [64, 64]
    assert fig["profile"]["model"]["input_size"] == 32
    assert fig["predict_images_per_s"] > 0 and fig["predict_image_size"] == [64, 64]


def test_every_figure_is_a_finite_number_or_null_with_a_reason(quick):
    _, saved = quick
    unavailable = saved["unavailable"]
    assert unavailable, "--quick skips compiling, so some figures must say why they are null"
    for key, value in _figures(saved).items():
        if value is None:
            known = key in NOT_APPLICABLE or key.rsplit(".", 1)[1] in NOT_APPLICABLE_CPU
            assert known or unavailable.get(key), f"{key} is null without a reason"
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            assert math.isfinite(value) and value >= 0, key
    for key, reason in unavailable.items():
        assert key in _figures(saved) and _figures(saved)[key] is None and reason, key
    assert "--quick" in unavailable["profiles.synthetic-ae.infer_compiled_patches_per_s"]


def test_the_figures_the_readme_table_reports_exist_and_are_measured(quick):
    _, saved = quick
    text = README.read_text()
    fig = saved["profiles"]["synthetic-ae"]
    for row, keys in README_ROWS.items():
        assert f"| {row} |" in text, f"README bench table lost its row {row!r}"
        for key in keys:
            assert key in fig, key
            if "compiled" not in key:  # --quick does not compile
                assert fig[key] is not None and fig[key] >= 0, key
    assert saved["matmul"]["matmul_gflop_per_s"] > 0  # "GFLOP/s matmul peak"
    assert saved["data"]["iterate_once_peak_rss_mb"] > 0  # "Reading a 100,000-patch file"
    assert saved["score"]["score_seconds"] > 0 and saved["score"]["score_aupro_seconds"] > 0


def _conv_flops(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Forward FLOPs per sample of every Conv2d / ConvTranspose2d, counted by hand through hooks
    (a multiply-add is 2), and those of the first layer."""
    counts: list[int] = []

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        kernel = module.kernel_size[0] * module.kernel_size[1]
        per_output = module.in_channels // module.groups * kernel
        if isinstance(module, nn.ConvTranspose2d):  # every input pixel scatters a kernel
            n_in = inputs[0].shape[0] * inputs[0].shape[2] * inputs[0].shape[3]
            counts.append(
                2 * n_in * module.in_channels * module.out_channels // module.groups * kernel
            )
        else:
            counts.append(2 * out.numel() * per_output)

    hooks = [
        m.register_forward_hook(count)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return sum(counts) // len(x), counts[0] // len(x)


def test_flops_match_a_count_by_hand(quick):
    _, saved = quick
    fig = saved["profiles"]["synthetic-ae"]
    model = build_model("ae", 1, 32, {"latent_dim": 8})
    assert not any(isinstance(m, nn.Linear) for m in model.modules())  # convolutions only
    forward, first = _conv_flops(model, torch.rand(2, 1, 32, 32))
    assert fig["forward_flops_per_patch"] == forward
    # A step: the forward, a weight gradient per layer, an input gradient per layer but the first
    # (the patch needs none), and the SSIM loss: at most 8 full 11x11 window convolutions.
    step = 3 * forward - first
    ssim_bound = 8 * 2 * 32 * 32 * 11 * 11
    assert step < fig["train_flops_per_patch"] < step + ssim_bound


class Delayed(nn.Module):
    """A reconstruction model that takes at least `delay` seconds per call."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.calls = 0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        time.sleep(self.delay)
        return {"recon": x}


def test_tile_throughput_splits_time_between_the_model_and_the_rest():
    tile = profiles.resolve("synthetic-ae", TINY).tile
    fast, slow = Delayed(0.0), Delayed(0.05)
    n = 3

    def measure(model: Delayed) -> tuple[dict[str, float], float]:
        start = time.perf_counter()
        speed = tile_throughput(model, 64, 32, 16, tile, n)
        return speed, time.perf_counter() - start

    fast_speed, _ = measure(fast)
    slow_speed, wall = measure(slow)
    calls = slow.calls // (n + 1)  # one warm-up image
    assert calls >= 1 and slow.calls == calls * (n + 1)
    assert slow_speed["model_seconds"] >= 0.05 * calls * n
    assert slow_speed["model_seconds"] <= slow_speed["seconds"] <= wall
    assert slow_speed["images_per_s"] <= 1 / (0.05 * calls)
    assert slow_speed["images_per_s"] * slow_speed["seconds"] == pytest.approx(n)
    # the sleep is the model's time, never the rest's (shares themselves vary with the load)
    assert fast_speed["model_seconds"] < slow_speed["model_seconds"] - 0.04 * calls * n
    for speed in (fast_speed, slow_speed):
        assert 0 <= speed["outside_model_share"] <= 1


def test_the_loader_probes_read_every_patch(tmp_path):
    path = random_patch_file(tmp_path / "p.h5", 300, 12)
    with h5py.File(path, "r") as f:
        corners = f["train/patches"][:, :, 0, 0].astype("float64").sum() / 255.0
    stats = iterate_once(path, batch_size=32, num_workers=0)
    assert stats["patches"] == 300 and stats["checksum"] == pytest.approx(corners, rel=1e-5)
    assert stats["peak_rss_mb"] > 0 and stats["seconds"] > 0
    assert read_rate(path, batch_size=32, num_workers=0, seconds=0.2, warmup_batches=1) > 0


def test_step_clock_gaps_are_the_time_between_requests():
    clock = StepClock(torch.zeros(2, 1, 4, 4))
    batches = iter(clock)
    for _ in range(4):
        next(batches)
        time.sleep(0.02)
    next(batches)
    gaps = clock.step_seconds(3)
    assert len(gaps) == 3 and all(0.018 < g < 0.2 for g in gaps)


def test_a_failing_measurement_is_null_with_its_reason():
    unavailable: dict[str, str] = {}
    fig = Figures("profiles.x", unavailable)
    assert fig.measure(("a", "b"), lambda: {"a": 1, "b": 2}) == {"a": 1, "b": 2}
    fig.measure("c", lambda: 1 / 0)
    assert fig.values == {"a": 1, "b": 2, "c": None}
    assert unavailable == {"profiles.x.c": "ZeroDivisionError: division by zero"}


def test_bad_profile_and_missing_cuda_are_user_errors(tmp_path):
    with pytest.raises(DefectaeError):
        bench.run(["no-such-profile"], [], "cpu", tmp_path / "b.json", quick=True)
    if not torch.cuda.is_available():
        with pytest.raises(DefectaeError, match="CUDA is not available"):
            bench.run(["synthetic-ae"], [], "cuda", tmp_path / "b.json", quick=True)
    assert not (tmp_path / "b.json").exists()


def test_bench_predicts_with_the_profiles_tile_settings(tmp_path):
    """A checkpoint records only the trained sections: bench's run folder must also carry the
    profile, or predict would tile with the schema's defaults instead of the recipe's."""
    from defectae.bench.predict_rate import _run_folder
    from defectae.commands import predict

    profile = profiles.resolve(
        "synthetic-ae", [*TINY, "tile.stride=8", "tile.smooth_sigma=3"], None
    )
    model = build_model("ae", 1, 32, profile.model.args)
    run = _run_folder(model, profile, tmp_path / "run")
    setup = predict.make_setup(run, None, None, 0.5, False)
    assert setup.profile.tile == profile.tile
