"""`defectae run`: the whole pipeline in one command, skipping stages whose record matches.

One tiny trained workspace is made once; each test that changes something works in its own
copy of it (copied with mtimes kept: a moved workspace stays up to date, see stores.stages).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import pytest
from builders import TINY_SYNTHETIC, TINY_TRAINING, defectae

from defectae import profiles
from defectae.stores.stages import StageRecord, changed_keys, stale_reason

STAGES = ["prepare", "augment", "train", "tile-test", "score"]
SETS = [
    *TINY_SYNTHETIC,
    *TINY_TRAINING,
    "score.panels=false",
]
PROFILE = ["--profile", "synthetic-ae", *(a for s in SETS for a in ("--set", s))]


def run(home: Path, *extra: str, code: int = 0) -> dict:
    proc = defectae(home, "run", *PROFILE, *extra, code=code)
    return json.loads(proc.stdout)


def statuses(summary: dict) -> list[str]:
    return [summary["stages"][s]["status"] for s in STAGES]


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> tuple[Path, dict]:
    home = tmp_path_factory.mktemp("run")
    return home, run(home)


def run_in(home: Path, summary: dict) -> Path:
    """The first run's folder in the workspace `home` (a copy of the first one)."""
    return home / "runs" / "synthetic-ae" / Path(summary["run_dir"]).name


@pytest.fixture
def workspace(first, tmp_path) -> tuple[Path, dict]:
    """A copy of the trained workspace (mtimes kept) and the first run's summary."""
    home, summary = first
    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    return copy, summary


@pytest.mark.slow
def test_first_run_runs_every_stage_and_reports_the_metrics(first):
    home, summary = first
    assert statuses(summary) == ["ran"] * 5
    assert summary["failed"] is None
    run_dir = home / summary["run_dir"]
    assert summary["stages"]["train"]["output"] == summary["run_dir"]
    assert (run_dir / "residuals.h5").is_file()
    written = json.loads((run_dir / "score" / "metrics.json").read_text())
    assert summary["metrics"] == written["metrics"]
    assert summary["threshold"] == written["threshold"]["value"]
    with h5py.File(run_dir / "residuals.h5") as f:  # tile-test used the run train made
        assert Path(f.attrs["checkpoint"]).parent == run_dir
    for record in (
        "work/synthetic/prepared.stage.json",
        "work/synthetic-ae/patches.stage.json",
        "runs/synthetic-ae/train.stage.json",
        f"{summary['run_dir']}/residuals.stage.json",
        f"{summary['run_dir']}/score.stage.json",
    ):
        assert json.loads((home / record).read_text())["format"] == "defectae-stage"


@pytest.mark.slow
def test_second_run_skips_every_stage_even_in_a_moved_workspace(first, workspace):
    home, summary = first
    residuals = home / summary["run_dir"] / "residuals.h5"
    mtime = residuals.stat().st_mtime_ns
    again = run(home)
    assert statuses(again) == ["skipped"] * 5
    assert {e["reason"] for e in again["stages"].values()} == {"up to date"}
    assert again["run_dir"] == summary["run_dir"]
    assert again["metrics"] == summary["metrics"]
    assert residuals.stat().st_mtime_ns == mtime
    moved, _ = workspace
    assert statuses(run(moved)) == ["skipped"] * 5


@pytest.mark.slow
def test_changed_tile_key_reruns_only_tile_test_and_score(workspace):
    home, summary = workspace
    changed = run(home, "--set", "tile.smooth_sigma=2")
    assert statuses(changed) == ["skipped"] * 3 + ["ran"] * 2
    assert changed["stages"]["tile-test"]["reason"] == "changed: tile.smooth_sigma"
    assert changed["stages"]["score"]["reason"] == "tile-test ran"
    run_dir = run_in(home, summary)
    assert changed["run_dir"] == str(run_dir)
    assert profiles.load_written(run_dir / "residuals.profile.toml").tile.smooth_sigma == 2.0
    assert statuses(run(home, "--set", "tile.smooth_sigma=2")) == ["skipped"] * 5


@pytest.mark.slow
def test_changed_score_key_reruns_only_score(workspace):
    home, summary = workspace
    changed = run(home, "--set", "score.quantile=0.5")
    assert statuses(changed) == ["skipped"] * 4 + ["ran"]
    assert changed["stages"]["score"]["reason"] == "changed: score.quantile"
    metrics = json.loads(Path(changed["metrics_json"]).read_text())
    assert Path(changed["metrics_json"]).is_relative_to(home)
    assert metrics["threshold"]["quantile"] == 0.5
    assert changed["threshold"] == metrics["threshold"]["value"] < summary["threshold"]


@pytest.mark.slow
def test_changed_dataset_key_reruns_every_stage_into_a_new_run(workspace):
    home, summary = workspace
    changed = run(home, "--set", "dataset.seed=1")
    assert statuses(changed) == ["ran"] * 5
    assert changed["stages"]["prepare"]["reason"] == "changed: dataset.seed"
    assert [changed["stages"][s]["reason"] for s in STAGES[1:]] == [f"{s} ran" for s in STAGES[:-1]]
    assert Path(changed["run_dir"]).name != Path(summary["run_dir"]).name


@pytest.mark.slow
def test_from_train_reruns_train_tile_test_and_score(workspace):
    home, summary = workspace
    forced = run(home, "--from", "train")
    assert statuses(forced) == ["skipped"] * 2 + ["ran"] * 3
    assert {forced["stages"][s]["reason"] for s in STAGES[2:]} == {"--from train"}
    run_dir = Path(forced["run_dir"])
    assert run_dir.name != Path(summary["run_dir"]).name
    with h5py.File(run_dir / "residuals.h5") as f:
        assert Path(f.attrs["checkpoint"]).parent.name == run_dir.name


@pytest.mark.slow
def test_the_recorded_run_is_used_not_the_latest(workspace):
    home, summary = workspace
    newer = Path(json.loads(defectae(home, "train", *PROFILE).stdout)["run_dir"])
    assert newer.name != Path(summary["run_dir"]).name
    again = run(home)
    assert statuses(again) == ["skipped"] * 5
    assert again["run_dir"] == str(run_in(home, summary))


@pytest.mark.slow
def test_a_rewritten_output_reruns_its_stage(workspace):
    home, summary = workspace
    metrics = run_in(home, summary) / "score" / "metrics.json"
    stat = metrics.stat()  # as if `defectae score` had rewritten it outside `run`
    os.utime(metrics, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = run(home)
    assert statuses(again) == ["skipped"] * 4 + ["ran"]
    assert again["stages"]["score"]["reason"] == "output rewritten since its record"
    assert again["threshold"] == summary["threshold"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--from", "fit"],
            "error: --from 'fit': expected one of prepare, augment, train, tile-test, score",
        ),
        (
            ["--until", "nowhere"],
            "error: --until 'nowhere': expected one of prepare, augment, train, tile-test, score",
        ),
        (["--from", "score", "--until", "train"], "error: --until 'train': comes before --from"),
    ],
)
def test_bad_stage_names_are_one_line_errors(tmp_path, args, message):
    proc = defectae(tmp_path, "run", *PROFILE, *args, code=2)
    assert errors(proc.stderr) == [proc.stderr.strip()]
    assert proc.stderr.strip().startswith(message)
    assert proc.stdout == ""
    assert not (tmp_path / "work").exists()


def test_a_failing_stage_stops_the_pipeline_and_is_named(tmp_path):
    proc = defectae(tmp_path, "run", *PROFILE, "--set", "model.input_size=128", code=2)
    summary = json.loads(proc.stdout)
    assert summary["failed"] == "augment"
    assert statuses(summary) == ["ran", "failed", "not run", "not run", "not run"]
    [line] = errors(proc.stderr)
    assert "model.input_size" in line and "128" in line
    assert summary["stages"]["augment"]["reason"] == line.removeprefix("error: ")
    assert not (tmp_path / "work" / "synthetic-ae" / "patches.stage.json").exists()


def test_until_stops_after_the_stage(tmp_path):
    summary = run(tmp_path, "--until", "prepare")
    assert statuses(summary) == ["ran"] + ["not run"] * 4
    assert summary["stages"]["augment"]["reason"] == "after --until prepare"
    assert summary["metrics"] is None
    assert run(tmp_path, "--until", "prepare")["stages"]["prepare"]["status"] == "skipped"


def _record(settings: dict, size: int = 10) -> StageRecord:
    identity = {"path": "a.h5", "size": size, "mtime_ns": 5}
    return StageRecord("augment", settings, {"prepared": identity}, "out.h5", identity)


def test_stale_reason_names_what_changed():
    settings = {"augment": {"seed": 0, "n_patches": 4}, "model": {"input_size": 32}}
    same = {"path": "moved/a.h5", "size": 10, "mtime_ns": 5}  # a moved file: same version
    record = _record(settings)
    assert stale_reason(record, settings, {"prepared": same}, same) is None
    other = {"augment": {"seed": 1, "n_patches": 4}, "model": {"input_size": 32}}
    assert stale_reason(record, other, {"prepared": same}, same) == "changed: augment.seed"
    newer = {**same, "mtime_ns": 6}
    assert stale_reason(record, settings, {"prepared": newer}, same) == "input prepared changed"
    assert stale_reason(record, settings, {"prepared": same}, newer) == (
        "output rewritten since its record"
    )
    assert stale_reason(record, settings, {"prepared": same}, None) == "no output yet"
    assert stale_reason(None, settings, {"prepared": same}, same) == "no stage record"


def test_changed_keys_walks_nested_sections():
    old = {"tile": {"residual": {"ssim": 1.0}, "stride": 16}, "protocol": "mvtec"}
    new = {"tile": {"residual": {"ssim": 1.0, "l1": 0.5}, "stride": 8}, "protocol": "mvtec"}
    assert changed_keys(old, new) == ["tile.residual.l1", "tile.stride"]
