"""`defectae train`: learning, exact resume, Ctrl-C, NaN stop, early stopping, TensorBoard, DDP, bad input."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from defectae import profiles
from defectae.commands import train
from defectae.errors import DefectaeError
from defectae.stores.checkpoint import (
    TRAINED_SECTIONS,
    CheckpointState,
    load_checkpoint,
    load_model,
    require_trained,
)
from defectae.stores.patches import write_patches
from defectae.training import batch_size, loop, step

PATCH, N_TRAIN, BATCH, EPOCHS = 16, 128, 16, 3
STEPS = N_TRAIN // BATCH
SETS = [
    f"model.input_size={PATCH}",
    "model.args.latent_dim=16",
    "loss.recon=mse",
    f"train.epochs={EPOCHS}",
    f"train.batch_size={BATCH}",
    "train.lr=2e-3",
    "train.amp=off",
    "train.compile=false",
    "train.num_workers=0",
    "train.deterministic=true",
    "train.warmup_epochs=1",
    "train.log_images_every=2",
    "train.n_log_images=4",
    "train.patience=0",
    "train.histograms=true",
]


def stripes(n: int, seed: int) -> np.ndarray:
    """Vertical stripes of period 4 on a random brightness, plus noise: a simple learnable texture."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(0.25, 0.75, (n, 1, 1, 1))
    img = (
        level
        + 0.2 * np.sin(np.pi * np.arange(PATCH) / 2)
        + rng.normal(0, 0.03, (n, 1, PATCH, PATCH))
    )
    return np.clip(img * 255, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train faster on one thread (and do not spin-wait on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_profile(*extra: str) -> profiles.Profile:
    return profiles.resolve("synthetic-ae", SETS + list(extra))


def trained_profile(*extra: str) -> profiles.Profile:
    """make_profile as a run records it: with the device it resolved to."""
    return make_profile("train.device=cpu", *extra)


@pytest.fixture(scope="module")
def patches(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("patches") / "patches.h5"
    return write_patches(
        path,
        stripes(N_TRAIN, 0),
        stripes(64, 1),
        {"seed": 0, "source": "stripes"},
        chunk_patches=32,
    )


@pytest.fixture(scope="module")
def reference(patches, tmp_path_factory) -> dict:
    """One uninterrupted 3-epoch run, shared by the tests that inspect a finished run."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEFECTAE_HOME", str(tmp_path_factory.mktemp("home")))
        return train.run(make_profile(), patches=patches)


def metrics_of(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_state(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa["epoch"] == sb["epoch"] and sa["step"] == sb["step"]
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    for (ka, va), (kb, vb) in zip(
        sa["optimizer"]["state"].items(), sb["optimizer"]["state"].items(), strict=True
    ):
        assert ka == kb and all(torch.equal(va[k], vb[k]) for k in va)


def cli(home: Path, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "DEFECTAE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "defectae", *args]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def wait_for_saved_epoch(home: Path, timeout: float = 60) -> None:
    """Wait (at most `timeout` s) until the single run under `home` has saved an epoch."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        lasts = list(home.glob("runs/synthetic-ae/*/last.pt"))
        if lasts and load_checkpoint(lasts[0])["epoch"] >= 1:
            return
        time.sleep(0.02)


def set_args(*extra: str) -> list[str]:
    return [arg for s in SETS + list(extra) for arg in ("--set", s)]


# ----------------------------------------------------------------------------- a finished run


def test_a_tiny_ae_lowers_its_validation_loss_and_writes_the_run(reference, patches):
    run_dir = Path(reference["run_dir"])
    rows = metrics_of(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["step"] == EPOCHS * STEPS
    assert rows[-1]["val_total"] < 0.95 * rows[0]["val_total"]
    assert rows[-1]["val_ssim"] > rows[0]["val_ssim"]
    for key in (
        "lr",
        "train_total",
        "train_recon",
        "val_recon",
        "seconds",
        "patches_per_s",
        "data_wait_fraction",
    ):
        assert key in rows[0]
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine ends at zero
    assert reference["epochs"] == EPOCHS and reference["steps"] == EPOCHS * STEPS
    assert (
        reference["best_val"] == min(r["val_total"] for r in rows)
        and not reference["stopped_early"]
    )
    assert reference["tensorboard"] == f"tensorboard --logdir {run_dir / 'tensorboard'}"
    assert profiles.load_written(run_dir / "profile.toml") == trained_profile()
    model, profile, state = load_model(run_dir / "best.pt", expect=make_profile())
    assert state["epoch"] == reference["best_epoch"] and state["patches"] == str(patches.resolve())
    assert set(state["rng"][0]) >= {"torch", "numpy", "python"}


def test_the_checkpoint_keeps_what_training_read_and_loads_as_a_full_profile(reference):
    path = Path(reference["run_dir"]) / "last.pt"
    state = load_checkpoint(path)
    assert CheckpointState.from_dict(state).to_dict().keys() == state.keys() - {
        "version",
        "format_version",
    }
    assert tuple(state["profile"]) == TRAINED_SECTIONS  # no [tile] or [score]
    _, profile, _ = load_model(path)
    defaults = profiles.Profile()
    assert profile == dataclasses.replace(
        trained_profile(), tile=defaults.tile, score=defaults.score
    )


def test_resuming_a_finished_run_ignores_test_time_settings_and_keeps_its_profile_toml(
    reference, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    shutil.copytree(reference["run_dir"], run_dir)
    written = (run_dir / "profile.toml").read_text()
    summary = train.run(make_profile("tile.stride=8", "score.quantile=0.5"), resume=run_dir)
    assert summary["epochs"] == EPOCHS and summary["steps"] == EPOCHS * STEPS
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert all("cannot reach its inputs' intensities" in w for w in warnings), warnings
    assert (run_dir / "profile.toml").read_text() == written


def test_tensorboard_event_files_hold_the_expected_tags(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(reference["run_dir"]) / "tensorboard"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {
        "train/total",
        "train/recon",
        "val/total",
        "val/recon",
        "val/ssim",
        "lr",
        "grad_norm/mean",
        "throughput/patches_per_s",
        "throughput/data_wait_fraction",
        "step/loss",
    } <= scalars
    assert len(acc.Scalars("step/loss")) == EPOCHS * STEPS
    assert [e.step for e in acc.Scalars("val/total")] == [STEPS, 2 * STEPS, 3 * STEPS]
    assert [e.step for e in acc.Images("val/reconstructions")] == [
        STEPS,
        2 * STEPS,
    ]  # epoch 1, then every 2nd
    assert "weights/encoder.0.weight" in acc.Tags()["histograms"]


# ----------------------------------------------------------------------------- interruptions


def test_resume_after_an_interruption_ends_with_identical_weights(
    reference, patches, home, monkeypatch
):
    real_validate, calls = loop.validate, []

    def interrupt_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # epoch 2 trained its steps, nothing saved yet
            raise KeyboardInterrupt
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(loop, "validate", interrupt_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train.run(make_profile(), patches=patches)
    (run_dir,) = (home / "runs" / "synthetic-ae").iterdir()
    interrupted = load_checkpoint(run_dir / "last.pt")
    assert interrupted["epoch"] == 1 and interrupted["status"] == "interrupted"
    monkeypatch.setattr(loop, "validate", real_validate)
    summary = train.run(None, resume=run_dir)
    assert summary["epochs"] == EPOCHS and summary["run_dir"] == str(run_dir)
    assert summary["status"] == "finished"
    assert_same_state(run_dir / "last.pt", Path(reference["run_dir"]) / "last.pt")
    assert [r["epoch"] for r in metrics_of(run_dir)] == [1, 2, 3]


def test_ctrl_c_exits_130_with_a_resumable_last_pt(patches, tmp_path):
    proc = cli(
        tmp_path,
        "train",
        "--profile",
        "synthetic-ae",
        "--patches",
        str(patches),
        *set_args("train.epochs=200"),
    )
    wait_for_saved_epoch(tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    (run_dir,) = (tmp_path / "runs" / "synthetic-ae").iterdir()
    state = load_checkpoint(run_dir / "last.pt")
    # a signal between the metrics line and last.pt leaves one extra line, which resume drops
    assert state["status"] == "interrupted"
    assert 1 <= state["epoch"] < 200 and len(metrics_of(run_dir)) in (
        state["epoch"],
        state["epoch"] + 1,
    )
    assert "--resume" in err


def test_a_nan_loss_stops_with_epoch_and_step_and_keeps_the_checkpoints(patches, home, monkeypatch):
    real, calls, before = step.compute_losses, [], {}

    def nan_at_epoch_3(out, target, **kwargs):
        terms = real(out, target, **kwargs)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 2 * STEPS + 2:  # the second step of epoch 3
                run_dir = next((home / "runs" / "synthetic-ae").iterdir())
                before.update({n: (run_dir / n).read_bytes() for n in ("best.pt", "last.pt")})
                terms["total"] = terms["total"] * float("nan")
        return terms

    monkeypatch.setattr(step, "compute_losses", nan_at_epoch_3)
    with pytest.raises(DefectaeError, match=rf"epoch 3 step {2 * STEPS + 2} .*loss is nan"):
        train.run(make_profile(), patches=patches)
    run_dir = next((home / "runs" / "synthetic-ae").iterdir())
    assert before and (run_dir / "best.pt").read_bytes() == before["best.pt"]
    last, kept = load_checkpoint(run_dir / "last.pt"), torch.load(io.BytesIO(before["last.pt"]))
    assert last["epoch"] == 2 and last["status"] == "nan"  # only the status changed
    assert all(torch.equal(v, kept["model"][k]) for k, v in last["model"].items())
    with pytest.raises(DefectaeError, match="the run stopped on a NaN loss at epoch 3"):
        require_trained(run_dir / "best.pt", allow_unfinished=False)


@pytest.mark.parametrize(("patience", "min_delta", "stop_epoch"), [(2, 0.05, 4), (0, 0.0, 6)])
def test_early_stopping_stops_at_the_right_epoch(
    patches, home, monkeypatch, patience, min_delta, stop_epoch
):
    totals = iter([1.0, 0.8, 0.79, 0.85, 0.9, 0.7])  # 0.79 is not better than 0.8 by 0.05

    def fixed_validation(*args, **kwargs):
        return {"total": next(totals), "recon": 0.1, "ssim": 0.5}

    monkeypatch.setattr(loop, "validate", fixed_validation)
    summary = train.run(
        make_profile(
            "train.epochs=6", f"train.patience={patience}", f"train.min_delta={min_delta}"
        ),
        patches=patches,
    )
    assert summary["epochs"] == stop_epoch and summary["stopped_early"] == (patience > 0)
    assert summary["best_epoch"] == (2 if patience else 6)
    run_dir = Path(summary["run_dir"])
    assert len(metrics_of(run_dir)) == stop_epoch
    assert load_checkpoint(run_dir / "best.pt")["epoch"] == summary["best_epoch"]
    status = load_checkpoint(run_dir / "last.pt")["status"]
    assert status == ("stopped_early" if patience else "finished")


# ----------------------------------------------------------------------------- schedule, data order, batch size


def test_learning_rate_schedules():
    cfg = make_profile("train.epochs=10", "train.warmup_epochs=2").train
    cosine = step.lr_factor(cfg, steps_per_epoch=10)
    assert [cosine(s) for s in (0, 9, 19)] == pytest.approx([0.05, 0.5, 1.0])
    assert (
        cosine(20) == pytest.approx(1.0) and cosine(60) == pytest.approx(0.5) and cosine(99) < 1e-3
    )
    decay = step.lr_factor(
        dataclasses.replace(cfg, scheduler="step", warmup_epochs=0, step_size=3, gamma=0.5), 10
    )
    assert [decay(s) for s in (0, 29, 30, 60, 99)] == pytest.approx([1, 1, 0.5, 0.25, 0.125])
    none = step.lr_factor(dataclasses.replace(cfg, scheduler="none", warmup_epochs=0), 10)
    assert {none(s) for s in range(100)} == {1.0}


def test_ddp_ranks_together_read_the_single_process_batches():
    single = step.epoch_order(seed=3, epoch=5, steps=7)
    ranks = [step.epoch_order(seed=3, epoch=5, steps=7, world=2, rank=r) for r in (0, 1)]
    assert [{a, b} for a, b in zip(*ranks, strict=True)] == [{2 * g, 2 * g + 1} for g in single]
    assert step.epoch_order(3, 6, 7) != single and step.epoch_order(3, 5, 7) == single


def test_largest_batch_doubles_then_bisects():
    tried = []

    def fits_below_38(b: int) -> bool:
        tried.append(b)
        return b < 38

    assert batch_size.largest_batch(fits_below_38, cap=4096) == 37
    assert tried[:7] == [1, 2, 4, 8, 16, 32, 64] and len(tried) <= 13
    assert batch_size.largest_batch(lambda b: True, cap=100) == 100
    with pytest.raises(DefectaeError, match="batch of 1"):
        batch_size.largest_batch(lambda b: False, cap=8)


def test_find_batch_size_reports_and_write_batch_size_trains_with_it(patches, home):
    found = train.run(make_profile("train.find_batch_max=8"), patches=patches, find_batch_size=True)
    assert found["batch_size"] == 8 and not (home / "runs").exists()
    summary = train.run(
        make_profile("train.find_batch_max=8", "train.epochs=1"),
        patches=patches,
        find_batch_size=True,
        write_batch_size=True,
    )
    assert summary["batch_size"] == 8 and summary["steps"] == N_TRAIN // 8
    assert profiles.load_written(Path(summary["run_dir"]) / "profile.toml").train.batch_size == 8


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_are_one_line_errors(reference, patches, tmp_path):
    run_dir = Path(reference["run_dir"])
    cases = [
        (
            dict(profile=make_profile(), patches=tmp_path / "missing.h5"),
            "missing.h5: patch file not found",
        ),
        (dict(profile=make_profile("model.input_size=32"), patches=patches), "patches are 16 px"),
        (
            dict(profile=make_profile(), patches=patches, amp="fast"),
            "--amp 'fast': expected one of auto",
        ),
        (
            dict(profile=make_profile(), patches=patches, compile_model="maybe"),
            "--compile 'maybe': expected one of on",
        ),
        (
            dict(profile=make_profile(), patches=patches, write_batch_size=True),
            "--write-batch-size",
        ),
        (dict(profile=None, resume=tmp_path / "nowhere"), "run folder not found"),
        (dict(profile=make_profile("model.family=cnnae"), resume=run_dir), "model.family = 'ae'"),
        (
            dict(profile=dataclasses.replace(make_profile(), name="other-ae"), resume=run_dir),
            "name = 'synthetic-ae'",
        ),
        (
            dict(profile=make_profile(), resume=run_dir, find_batch_size=True),
            "--find-batch-size: not with --resume",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(DefectaeError, match=message.replace("(", r"\(")):
            train.run(**kwargs)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DefectaeError, match="last.pt: not a PyTorch checkpoint"):
        train.run(None, resume=corrupt)


def test_bad_cli_value_exits_2_with_one_red_line(patches, tmp_path):
    proc = cli(
        tmp_path,
        "train",
        "--profile",
        "synthetic-ae",
        "--patches",
        str(patches),
        "--compile",
        "yes",
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and err.strip().count("\n") == 0 and "--compile 'yes'" in err


# ----------------------------------------------------------------------------- DDP and compile


@pytest.mark.slow
def test_two_process_ddp_equals_single_process_with_the_same_global_batch(
    reference, patches, tmp_path
):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "defectae",
        "--json",
        "train",
        "--profile",
        "synthetic-ae",
        "--patches",
        str(patches),
        *set_args(),
    ]
    env = {**os.environ, "DEFECTAE_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["world_size"] == 2  # one summary: only rank 0 prints
    (run_dir,) = (tmp_path / "runs" / "synthetic-ae").iterdir()
    for ddp, single in zip(metrics_of(run_dir), metrics_of(reference["run_dir"]), strict=True):
        for key in ("step", "train_total", "val_total", "val_ssim", "grad_norm"):
            assert ddp[key] == pytest.approx(single[key], rel=1e-3), key
    ddp, single = (
        load_checkpoint(run_dir / "last.pt"),
        load_checkpoint(Path(reference["run_dir"]) / "last.pt"),
    )
    for key, value in single["model"].items():
        # Adam's normalised step turns float summation-order noise in near-zero gradients
        # into differences of up to about one learning rate.
        torch.testing.assert_close(ddp["model"][key], value, rtol=0, atol=2e-3)


@pytest.mark.slow
def test_compile_on_trains_or_falls_back_to_eager_with_a_warning(patches, home):
    summary = train.run(
        make_profile("train.epochs=1", "train.log_images_every=0"),
        patches=patches,
        compile_model="on",
    )
    assert summary["epochs"] == 1 and summary["best_val"] < 1.0


def test_a_ctrl_c_that_a_finalizer_swallows_is_still_remembered():
    class Finalizer:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # KeyboardInterrupt inside __del__: Python drops it

    before = signal.getsignal(signal.SIGINT)
    with loop.remembered_interrupts():
        Finalizer()
        assert loop.INTERRUPTED.is_set()
    assert signal.getsignal(signal.SIGINT) is before
