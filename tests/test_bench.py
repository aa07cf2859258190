"""`defectae bench --quick` on a tiny model: finishes in seconds and bench.json holds every field."""

from __future__ import annotations

import json
import time

import pytest
import torch

from defectae.commands import bench
from defectae.errors import DefectaeError

TINY = [
    "model.input_size=32",
    "model.args.latent_dim=8",
    "train.batch_size=8",
    "dataset.image_size=[64, 64]",
    "tile.stride=16",
]

MACHINE_KEYS = {
    "platform",
    "python",
    "cpu_model",
    "cpu_cores",
    "torch_threads",
    "torch",
    "numpy",
    "device",
    "gpu",
    "defectae",
    "onnxruntime",
}
PROFILE_KEYS = {
    "family",
    "patch_size",
    "channels",
    "batch_size",
    "parameters",
    "forward_flops_per_patch",
    "train_flops_per_patch",
    "train_eager_patches_per_s",
    "train_compiled_patches_per_s",
    "train_compiled_amp_patches_per_s",
    "train_amp_dtype",
    "infer_eager_patches_per_s",
    "infer_compiled_patches_per_s",
    "infer_torchscript_patches_per_s",
    "infer_onnxruntime_patches_per_s",
    "onnxruntime_provider",
    "infer_int8_patches_per_s",
    "int8_quantization",
    "tile_image_size",
    "tile_stride",
    "tile_whole_image",
    "tile_images_per_s",
    "tile_outside_model_share",
    "tile_outside_model_under_15pct",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_samples",
    "augment_patches_per_s",
    "read_batch_size",
    "read_workers",
    "read_corruption",
    "read_patches_per_s",
    "read_corrupted_patches_per_s",
    "train_data_wait_fraction",
    "read_to_train_ratio",
    "read_at_least_5x_train",
    "peak_rss_mb",
    "peak_gpu_memory_mb",
    "train_eager_gflop_per_s",
    "train_eager_fraction_of_peak",
    "train_best_gflop_per_s",
    "train_best_fraction_of_peak",
    "infer_eager_gflop_per_s",
    "infer_eager_fraction_of_peak",
    "infer_best_gflop_per_s",
    "infer_best_fraction_of_peak",
    "profile",
}
DATA_KEYS = {
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
}
SCORE_KEYS = {
    "score_maps",
    "score_map_side",
    "score_seconds",
    "score_aupro_seconds",
    "score_under_10s",
}
MATMUL_KEYS = {"matmul_n", "matmul_seconds", "matmul_gflop_per_s", "matmul_runs"}
MEASURED = [
    "parameters",
    "forward_flops_per_patch",
    "train_flops_per_patch",
    "train_eager_patches_per_s",
    "infer_eager_patches_per_s",
    "infer_torchscript_patches_per_s",
    "infer_onnxruntime_patches_per_s",
    "infer_int8_patches_per_s",
    "tile_images_per_s",
    "latency_p50_ms",
    "augment_patches_per_s",
    "read_patches_per_s",
    "read_corrupted_patches_per_s",
    "train_data_wait_fraction",
    "read_to_train_ratio",
    "peak_rss_mb",
    "train_eager_gflop_per_s",
    "infer_best_gflop_per_s",
]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    start = time.perf_counter()
    summary = bench.run(["synthetic-ae"], TINY, "cpu", out, quick=True)
    return summary, json.loads(out.read_text()), time.perf_counter() - start


def test_quick_bench_on_a_tiny_model_finishes_in_seconds_and_holds_every_field(quick):
    summary, saved, seconds = quick
    assert seconds < 120  # --quick on a tiny model: seconds on an idle machine, generous under load
    assert set(saved) == {
        "format",
        "version",
        "machine",
        "settings",
        "matmul",
        "profiles",
        "data",
        "score",
        "unavailable",
        "seconds",
    }
    assert set(saved["machine"]) == MACHINE_KEYS and saved["machine"]["device"] == "cpu"
    assert saved["machine"]["torch"] == torch.__version__ and saved["machine"]["torch_threads"] >= 1
    assert set(saved["matmul"]) == MATMUL_KEYS and saved["matmul"]["matmul_gflop_per_s"] > 0
    assert list(saved["profiles"]) == ["synthetic-ae"]
    fig = saved["profiles"]["synthetic-ae"]
    assert set(fig) == PROFILE_KEYS
    assert set(saved["data"]) == DATA_KEYS and set(saved["score"]) == SCORE_KEYS
    assert saved["settings"]["quick"] is True and summary["out"].endswith("bench.json")


def test_quick_figures_are_measured_or_null_with_a_reason(quick):
    _, saved, _ = quick
    fig = saved["profiles"]["synthetic-ae"]
    for key in MEASURED:
        assert isinstance(fig[key], (int, float)) and fig[key] > 0, key
    assert fig["patch_size"] == 32 and fig["batch_size"] == 8 and fig["tile_image_size"] == [64, 64]
    assert fig["profile"]["model"]["input_size"] == 32
    assert (
        fig["latency_p50_ms"] <= fig["latency_p95_ms"] and 0 <= fig["tile_outside_model_share"] <= 1
    )
    assert fig["train_eager_gflop_per_s"] == pytest.approx(
        fig["train_flops_per_patch"] * fig["train_eager_patches_per_s"] / 1e9
    )
    assert fig["read_at_least_5x_train"] == (fig["read_to_train_ratio"] >= 5)
    assert fig["int8_quantization"].startswith("static")
    unavailable = saved["unavailable"]
    for key in (
        "train_compiled_patches_per_s",
        "train_compiled_amp_patches_per_s",
        "infer_compiled_patches_per_s",
    ):
        assert fig[key] is None and "--quick" in unavailable[f"profiles.synthetic-ae.{key}"]
    assert saved["data"]["iterate_once_patches"] == bench.QUICK.iterate_patches
    assert (
        saved["data"]["iterate_once_peak_rss_mb"] > 0
        and saved["data"]["iterate_once_under_1gb"] is None
    )
    assert saved["score"]["score_seconds"] > 0 and saved["score"]["score_aupro_seconds"] > 0


def test_step_clock_gaps_are_the_time_between_requests():
    clock = bench.StepClock(torch.zeros(2, 1, 4, 4))
    batches = iter(clock)
    for _ in range(4):
        next(batches)
        time.sleep(0.02)
    next(batches)
    gaps = clock.step_seconds(3)
    assert len(gaps) == 3 and all(0.018 < g < 0.2 for g in gaps)


def test_a_failing_measurement_is_null_with_its_reason():
    unavailable: dict[str, str] = {}
    fig = bench.Figures("profiles.x", unavailable)
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
