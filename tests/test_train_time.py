"""Honest training time: the warm-up estimate, elapsed/ETA lines and the time budget (--max-minutes).

The runs go through the installed `defectae` console script, as users run it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_tiletest import _prepared
from test_train import EPOCHS, STEPS, assert_same_state, set_args, stripes

from defectae.stores.checkpoint import load_checkpoint, load_model
from defectae.stores.patches import write_patches
from defectae.training.clock import Clock, warmup_plan

N_TRAIN = STEPS * 16


def defectae(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEFECTAE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).with_name("defectae")), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def train(home: Path, patches: Path, *args: str) -> subprocess.CompletedProcess:
    return defectae(
        home, "--json", "train", "-p", "synthetic-ae", "--patches", str(patches), *set_args(), *args
    )


@pytest.fixture(scope="module")
def patches(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("patches") / "patches.h5"
    meta = {"seed": 0, "source": "stripes"}
    return write_patches(path, stripes(N_TRAIN, 0), stripes(64, 1), meta, chunk_patches=32)


@pytest.fixture(scope="module")
def whole(patches, tmp_path_factory) -> subprocess.CompletedProcess:
    """An uninterrupted run under a budget it never reaches."""
    proc = train(tmp_path_factory.mktemp("whole"), patches, "--max-minutes", "60")
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def limited(patches, tmp_path_factory) -> subprocess.CompletedProcess:
    """The same run under a 60 ms budget: it stops after its first step(s)."""
    proc = train(tmp_path_factory.mktemp("limited"), patches, "--max-minutes", "0.001")
    assert proc.returncode == 0, proc.stderr
    return proc


def test_warmup_plan_times_at_least_one_step_and_skips_only_where_there_is_room():
    assert warmup_plan(1000) == (2, 5)
    assert warmup_plan(7) == (2, 5)
    assert warmup_plan(6) == (1, 5)
    assert warmup_plan(3) == (1, 2)
    assert warmup_plan(1) == (0, 1)


def test_the_budget_stops_in_the_epoch_where_the_time_runs_out(monkeypatch):
    clock = Clock(torch.device("cpu"), budget_s=100.0, step_s=1.0, val_s=5.0)
    monkeypatch.setattr(clock, "elapsed", lambda: 10.0)
    # 10 s + 15 steps = 25, + 5 validation = 30; epochs of 20 s + 5 s end at 55, 80, 105
    assert clock.stop_epoch(15, 1, 12, 20) == 4
    assert clock.remaining(15, 11, 20) == 15 + 5 + 11 * 25
    assert clock.stop_epoch(15, 1, 3, 20) is None  # ends at 80 s, within 100
    assert Clock(torch.device("cpu"), step_s=1.0).stop_epoch(15, 1, 12, 20) is None


def test_the_warmup_estimate_is_printed_and_recorded(whole):
    summary = json.loads(whole.stdout)
    line = re.search(
        rf"estimated training time: \d+ s \({STEPS} steps/epoch x {EPOCHS} epochs x "
        r"([\d.e+-]+) ms/step \+ ([\d.e+-]+) s validation/epoch, measured on 5 warm-up steps\); "
        r"the 60 min budget is enough\n",
        whole.stderr,
    )
    assert line, whole.stderr
    ms, val = float(line[1]), float(line[2])
    timing = summary["time"]
    expected = STEPS * EPOCHS * ms / 1000 + EPOCHS * val
    assert timing["estimate_s"] == pytest.approx(expected, rel=0.1, abs=0.05)
    assert timing["warmup_steps"] == 5 and timing["steps"] == STEPS * EPOCHS
    assert timing["max_minutes"] == 60 and timing["status"] == "finished"
    assert timing["elapsed_s"] > 0
    last = load_checkpoint(Path(summary["run_dir"]) / "last.pt")
    (recorded,) = last["timing"]  # as of the last save, just before the end
    assert recorded["estimate_s"] == timing["estimate_s"] and recorded["status"] == "finished"
    # not a terminal: one line per epoch with elapsed and remaining time, and no bar residue
    epochs = re.findall(r"epoch (\d)/3 .* \d:\d\d:\d\d elapsed, ~\d:\d\d:\d\d left", whole.stderr)
    assert epochs == ["1", "2", "3"] and "━" not in whole.stderr


def test_a_tiny_budget_stops_cleanly_with_a_usable_model(limited, tmp_path):
    summary = json.loads(limited.stdout)
    run_dir = Path(summary["run_dir"])
    assert summary["status"] == "time-limit" and 1 <= summary["steps"] < STEPS * EPOCHS
    assert summary["time"]["status"] == "time-limit" and summary["time"]["max_minutes"] == 0.001
    (message,) = [line for line in limited.stderr.splitlines() if line.startswith("time limit:")]
    assert f"at step {summary['steps']} " in message or f"(step {summary['steps']})" in message
    assert f"--resume {run_dir}" in message
    last = load_checkpoint(run_dir / "last.pt")
    assert last["status"] == "time-limit" and last["step"] == summary["steps"]
    assert last["epoch"] * STEPS + last["epoch_step"] == summary["steps"]
    assert (run_dir / "best.pt").is_file() == (last["epoch"] > 0)
    model, _, _ = load_model(run_dir / "last.pt")
    assert all(torch.equal(v, last["model"][k]) for k, v in model.state_dict().items())
    prepared = _prepared(tmp_path / "prepared.h5", size=32)
    out = tmp_path / "residuals.h5"
    tile = defectae(
        tmp_path,
        "tile-test",
        "--run",
        str(run_dir),
        "--prepared",
        str(prepared),
        "--out",
        str(out),
    )
    assert tile.returncode == 0, tile.stderr
    assert out.is_file()


def test_resuming_a_time_limited_run_continues_it_to_the_uninterrupted_weights(
    limited, whole, tmp_path
):
    run_dir = Path(shutil.copytree(json.loads(limited.stdout)["run_dir"], tmp_path / "run"))
    before = json.loads(limited.stdout)["steps"]
    again = defectae(tmp_path, "--json", "train", "--resume", str(run_dir))  # its own budget, anew
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["status"] == "time-limit" and before < summary["steps"] < STEPS * EPOCHS
    done = defectae(tmp_path, "--json", "train", "--resume", str(run_dir), "--max-minutes", "0")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "finished" and summary["steps"] == STEPS * EPOCHS
    reference = Path(json.loads(whole.stdout)["run_dir"])
    assert_same_state(run_dir / "last.pt", reference / "last.pt")
    assert_same_state(run_dir / "best.pt", reference / "best.pt")
    timing = load_checkpoint(run_dir / "last.pt")["timing"]
    assert [t["status"] for t in timing] == ["time-limit", "time-limit", "finished"]
    assert [t["max_minutes"] for t in timing] == [0.001, 0.001, 0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-minutes", "-1"], "error: --max-minutes -1: expected a number of minutes >= 0"),
        (["--max-minutes", "nan"], "error: --max-minutes nan: expected a number of minutes >= 0"),
        (["--set", "train.max_minutes=-1"], "train.max_minutes"),
    ],
)
def test_a_bad_budget_is_one_line_and_exit_2(patches, tmp_path, args, message):
    proc = train(tmp_path, patches, *args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()
