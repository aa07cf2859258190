"""`train --resume` is exact and never ignores what it was asked; a run records how it ended.

A run records the settings it trained with (compile, AMP, device as used), a plain --resume
uses them, a change is applied (more epochs, logging keys) or refused naming it, and commands
after training can tell a run that stopped on NaN or never finished an epoch (issue 11).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import (
    SETS,
    assert_same_state,
    metrics_of,
    one_thread,  # noqa: F401 - autouse: tiny models train faster on one thread
    stripes,
    wait_for_saved_epoch,
)

from defectae import console, profiles, workspace
from defectae import device as devices
from defectae.commands import train
from defectae.errors import DefectaeError
from defectae.stores.checkpoint import (
    CheckpointState,
    load_checkpoint,
    require_trained,
    save_checkpoint,
)
from defectae.stores.patches import write_patches
from defectae.training import loop, step

N_TRAIN, BATCH, EPOCHS = 384, 16, 3
STEPS = N_TRAIN // BATCH  # long enough epochs for a kill to land inside one
# the profile's own compile and amp are the defaults (true, auto): the flags decide
RUN_SETS = [s for s in SETS if not s.startswith(("train.compile", "train.amp"))]
RUN_SETS.append(f"train.batch_size={BATCH}")


def run_profile(*extra: str) -> profiles.Profile:
    return profiles.resolve("synthetic-ae", RUN_SETS + list(extra))


@pytest.fixture(scope="module")
def patches(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("patches") / "patches.h5"
    meta = {"seed": 0, "source": "stripes"}
    return write_patches(path, stripes(N_TRAIN, 0), stripes(64, 1), meta, chunk_patches=32)


@pytest.fixture(scope="module")
def finished(patches, tmp_path_factory) -> Path:
    """A finished 3-epoch run, trained with --compile off --amp off over a profile saying true, auto."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEFECTAE_HOME", str(tmp_path_factory.mktemp("home")))
        summary = train.run(run_profile(), patches=patches, amp="off", compile_model="off")
    return Path(summary["run_dir"])


@pytest.fixture
def copy(finished, tmp_path) -> Path:
    """A copy of the finished run, free to change."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def files_of(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()}


def interrupt_in_epoch(monkeypatch, epoch: int) -> None:
    """Ctrl-C after the steps of `epoch`, before it is validated and saved."""
    real, calls = loop.validate, []

    def validate(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "validate", validate)


# ----------------------------------------------------------------------------- what a run records


def test_a_run_records_compile_amp_and_device_as_it_used_them(finished):
    recorded = profiles.load_written(finished / "profile.toml").train
    assert (recorded.compile, recorded.amp, recorded.device) == (False, "off", "cpu")
    for name in ("last.pt", "best.pt"):
        assert profiles.from_dict(load_checkpoint(finished / name)["profile"]).train == recorded
    assert load_checkpoint(finished / "last.pt")["status"] == "finished"


def test_a_plain_resume_trains_as_the_run_did(finished, patches, home, monkeypatch):
    compiled = []

    def record_compile(model, enabled, example):
        compiled.append(enabled)
        return model

    monkeypatch.setattr(devices, "compile_for_training", record_compile)
    interrupt_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train.run(run_profile(), patches=patches, amp="off", compile_model="off")
    (run_dir,) = (home / "runs" / "synthetic-ae").iterdir()
    monkeypatch.setattr(loop, "validate", step.validate)
    summary = train.run(None, resume=run_dir)
    assert compiled == [False, False] and not summary["compiled"] and summary["amp"] == "off"
    assert summary["status"] == "finished" and summary["epochs_total_before"] is None
    assert_same_state(run_dir / "last.pt", finished / "last.pt")


# ----------------------------------------------------------------------------- changes on resume


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(compile_model="on"),
            "--compile on: cannot change on --resume (the run was trained eagerly); "
            "start a new run",
        ),
        (dict(amp="bf16"), "--amp bf16: cannot change on --resume (the run was trained with off)"),
        (
            dict(sets=["train.lr=1e-3"]),
            "--set train.lr: cannot change on --resume (the run was trained with 0.002, "
            "not 0.001); start a new run",
        ),
        (dict(sets=["train.batch_size=8"]), "--set train.batch_size: cannot change"),
        (dict(sets=["train.compile=true"]), "--set train.compile: cannot change"),
        (dict(sets=["model.args.latent_dim=8"]), "--set model.args: cannot change"),
        (dict(sets=["train.epochs=2"]), "--set train.epochs 2: the run has already trained 3"),
        (dict(sets=["tile.stride=8"]), "--set tile.stride=8: [tile] is not a training setting"),
        (
            dict(profile=run_profile("train.seed=1"), amp="off", compile_model="off"),
            "--profile train.seed: cannot change",
        ),
        (
            dict(profile=run_profile()),  # the profile says amp = auto: bf16 here; the run: off
            '--profile train.amp: cannot change on --resume (the run was trained with "off", '
            'not "bf16")',
        ),
        (dict(patches=Path("other.h5")), "--patches other.h5: cannot change on --resume"),
    ],
)
def test_resume_refuses_a_change_it_cannot_take_naming_it(copy, kwargs, message):
    before = files_of(copy)
    with pytest.raises(DefectaeError, match=re.escape(message)):
        train.run(kwargs.pop("profile", None), resume=copy, **kwargs)
    assert files_of(copy) == before


def test_resume_takes_the_flags_the_run_used_and_keys_that_leave_the_weights_alone(copy):
    weights = load_checkpoint(copy / "last.pt")["model"]
    summary = train.run(
        None, resume=copy, amp="off", compile_model="off", sets=["train.histograms=false"]
    )
    assert summary["epochs"] == EPOCHS and summary["steps"] == EPOCHS * STEPS
    last = load_checkpoint(copy / "last.pt")
    assert last["profile"]["train"]["histograms"] is False
    assert all(v.equal(weights[k]) for k, v in last["model"].items())
    assert profiles.load_written(copy / "profile.toml").train.histograms is False


def test_more_epochs_equal_a_longer_run_when_the_schedule_does_not_depend_on_them(patches, home):
    flat = ("train.scheduler=none",)  # warm-up, then a constant learning rate
    short = train.run(run_profile(*flat), patches=patches, amp="off", compile_model="off")
    long = train.run(
        run_profile(*flat, "train.epochs=5"), patches=patches, amp="off", compile_model="off"
    )
    run_dir = Path(short["run_dir"])
    summary = train.run(None, resume=run_dir, sets=["train.epochs=5"])
    assert summary["epochs"] == 5 and summary["epochs_total_before"] == EPOCHS
    assert summary["status"] == "finished"
    assert_same_state(run_dir / "last.pt", Path(long["run_dir"]) / "last.pt")
    assert [r["epoch"] for r in metrics_of(run_dir)] == [1, 2, 3, 4, 5]
    assert profiles.load_written(run_dir / "profile.toml").train.epochs == 5
    assert load_checkpoint(run_dir / "last.pt")["profile"]["train"]["epochs"] == 5


def test_more_epochs_continue_on_the_cosine_over_the_new_total(copy, monkeypatch, capsys):
    lrs, real = [], loop.train_step

    def record_lr(objective, optimizer, *args, **kwargs):
        lrs.append(optimizer.param_groups[0]["lr"])
        return real(objective, optimizer, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", record_lr)
    train.run(None, resume=copy, sets=["train.epochs=5"])

    # warm-up over epoch 1, then a cosine from step STEPS to 0 at step 5 * STEPS
    def cosine(step: int) -> float:
        return 2e-3 * 0.5 * (1 + math.cos(math.pi * (step - STEPS) / (4 * STEPS)))

    assert len(lrs) == 2 * STEPS and lrs[0] == pytest.approx(cosine(3 * STEPS))  # = 1e-3
    assert [r["lr"] for r in metrics_of(copy)][3:] == pytest.approx([cosine(4 * STEPS), 0])
    assert "learning-rate schedule over 5 epochs" in " ".join(capsys.readouterr().err.split())


def test_a_run_that_stopped_early_is_not_extended(patches, home, monkeypatch):
    totals = iter([1.0, 1.1])
    monkeypatch.setattr(loop, "validate", lambda *a, **k: {"total": next(totals), "ssim": 0.5})
    summary = train.run(
        run_profile("train.patience=1", "train.epochs=4"), patches=patches, amp="off"
    )
    assert summary["status"] == "stopped_early" and summary["epochs"] == 2
    with pytest.raises(DefectaeError, match=r"the run stopped early at epoch 2 \(train.patience 1"):
        train.run(None, resume=Path(summary["run_dir"]), sets=["train.epochs=9"])


def test_resume_refuses_another_number_of_processes(copy):
    state = load_checkpoint(copy / "last.pt")
    save_checkpoint({**state, "data": {**state["data"], "world_size": 2}}, copy / "last.pt")
    with pytest.raises(DefectaeError, match=r"1 process\(es\): cannot change on --resume"):
        train.run(None, resume=copy)


# ----------------------------------------------------------------------------- how a run ended


def fake_run(home: Path, stamp: str, epoch: int, status: str) -> Path:
    """A run folder whose last.pt has only the counters that say how the run ended."""
    run_dir = home / "runs" / "synthetic-ae" / stamp
    run_dir.mkdir(parents=True)
    state = CheckpointState(
        model={},
        profile=profiles.to_dict(run_profile()),
        family="ae",
        in_channels=1,
        epoch=epoch,
        status=status,
    )
    save_checkpoint(state, run_dir / "last.pt")
    return run_dir


def test_require_trained_refuses_a_run_that_stopped_on_nan_or_never_finished_an_epoch(home):
    nan = fake_run(home, "a", 2, "nan")
    shutil.copy(nan / "last.pt", nan / "best.pt")
    for path in (nan / "last.pt", nan / "best.pt"):  # best.pt: the run's last.pt says why
        with pytest.raises(
            DefectaeError,
            match=r"stopped on a NaN loss at epoch 3; pass --allow-unfinished to evaluate it",
        ):
            require_trained(path, allow_unfinished=False)
    untrained = fake_run(home, "b", 0, "running") / "last.pt"
    with pytest.raises(DefectaeError, match="never finished an epoch; pass --allow-unfinished"):
        require_trained(untrained, allow_unfinished=False)
    require_trained(untrained, allow_unfinished=True)
    for stamp, status in (("c", "finished"), ("d", "interrupted"), ("e", "stopped_early")):
        require_trained(fake_run(home, stamp, 1, status) / "last.pt", allow_unfinished=False)


def test_latest_run_passes_over_runs_without_a_trained_model(home, monkeypatch, capsys):
    usable = fake_run(home, "20260101-000000", 3, "finished")
    fake_run(home, "20260101-000001", 2, "nan")
    fake_run(home, "20260101-000002", 0, "running")
    monkeypatch.setattr(console.mode, "verbose", True)
    assert workspace.latest_run(run_profile()) == usable
    err = " ".join(capsys.readouterr().err.split())
    assert "000001: skipped, the run stopped on a NaN loss at epoch 3" in err
    assert "000002: skipped, the run never finished an epoch" in err
    shutil.rmtree(usable)  # none usable: the newest, for the caller's own check to explain
    assert workspace.latest_run(run_profile()).name == "20260101-000002"


# ----------------------------------------------------------------------------- a real crash


def defectae(home: Path, *args: str) -> subprocess.Popen:
    """The installed console script; torch.compile on the fast aot_eager backend."""
    env = {
        **os.environ,
        "DEFECTAE_HOME": str(home),
        "OMP_NUM_THREADS": "1",
        "TORCH_COMPILE_OVERRIDE_BACKENDS": ">=0:aot_eager",
    }
    cmd = [str(Path(sys.executable).with_name("defectae")), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("compile_mode", ["off", "on"])
def test_kill_9_mid_epoch_then_a_plain_resume_matches_the_uninterrupted_run(
    finished, patches, tmp_path, compile_mode
):
    args = ["train", "-p", "synthetic-ae", "--patches", str(patches)]
    args += [
        "--amp",
        "off",
        "--compile",
        compile_mode,
        *[a for s in RUN_SETS for a in ("--set", s)],
    ]
    # uninterrupted: the eager run is `finished`; the compiled one runs beside the killed one
    whole = defectae(tmp_path / "whole", *args) if compile_mode == "on" else None
    killed = defectae(tmp_path / "killed", *args)
    wait_for_saved_epoch(tmp_path / "killed")
    killed.kill()  # SIGKILL, inside epoch 2
    killed.communicate(timeout=30)
    (run_dir,) = (tmp_path / "killed" / "runs" / "synthetic-ae").iterdir()
    state = load_checkpoint(run_dir / "last.pt")
    assert 1 <= state["epoch"] < EPOCHS and state["status"] == "running"
    resumed = defectae(tmp_path / "killed", "train", "--resume", str(run_dir))
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert ("compiled" if compile_mode == "on" else "eager") in err
    reference = finished
    if whole is not None:
        _, err = whole.communicate(timeout=120)
        assert whole.returncode == 0, err
        (reference,) = (tmp_path / "whole" / "runs" / "synthetic-ae").iterdir()
    assert_same_state(run_dir / "last.pt", reference / "last.pt")
    last = load_checkpoint(run_dir / "last.pt")
    assert last["status"] == "finished" and last["profile"]["train"]["compile"] == (
        compile_mode == "on"
    )
