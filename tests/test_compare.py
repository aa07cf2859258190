"""`defectae compare` on tiny scored runs (untrained checkpoints, tile-tested and scored): the
differing keys, the metrics as metrics.json holds them, training time, CSV, the page, bad input."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from builders import defectae, untrained_checkpoint, woven_attrs
from test_score import SIZE, TYPES, make_split

from defectae import profiles, workspace
from defectae.commands import compare as command
from defectae.commands import score, tiletest
from defectae.errors import DefectaeError
from defectae.stores.checkpoint import CheckpointState, load_checkpoint, save_checkpoint
from defectae.stores.prepared import write_prepared

SETS = [
    f"dataset.image_size=[{SIZE}, {SIZE}]",
    "model.input_size=16",
    "model.args.latent_dim=8",
    "tile.stride=8",
    "tile.amp=off",
    "score.panels=false",
]
OTHER_LOSS = ["loss.recon=l1", "loss.beta=0.5"]  # run B differs from run A only here
TIMING = [{"elapsed_s": 30.0}, {"elapsed_s": 12.5}]  # two `train` calls (a resume)


def splits() -> dict:
    """A tiny prepared dataset: 32x32 gray images, holes and scratches in the test split."""
    test = make_split(TYPES)
    test.orig_masks = [m[0] for m in test.masks]
    test.orig_sizes[:] = SIZE
    return {"train": make_split(["good"] * 2), "validation": make_split(["good"] * 3), "test": test}


def scored_run(run: Path, profile: profiles.Profile, resolution: str | None = None) -> Path:
    """An untrained checkpoint in `run`, tile-tested and scored."""
    untrained_checkpoint(run, profile, "last.pt")
    profiles.write_profile(profile, run)
    tiletest.run(profile, run=run, prepared=None, out=None, export_maps=None)
    score.run(profile, run, None, None, "mvtec", None, resolution=resolution)
    return run


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """runs/a/ (one scored run, one newer unscored), runs/b/ (loss differs), runs/c/ (as a,
    scored on the prepared grid)."""
    home = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEFECTAE_HOME", str(home))
        a = profiles.resolve("synthetic-ae", SETS)
        write_prepared(workspace.prepared_path(a), splits(), woven_attrs(a, SIZE))
        b = profiles.resolve("synthetic-ae", SETS + OTHER_LOSS)
        run_a = scored_run(home / "runs" / "a" / "20250101-000000", a)
        state = CheckpointState.from_dict(load_checkpoint(run_a / "last.pt"))
        save_checkpoint(dataclasses.replace(state, timing=TIMING), run_a / "last.pt")
        untrained_checkpoint(home / "runs" / "a" / "20250102-000000", a, "last.pt")
        scored_run(home / "runs" / "b" / "20250101-000000", b)
        scored_run(home / "runs" / "c" / "20250101-000000", a, resolution="prepared")
    return home


def compare(home: Path, *args: str) -> dict:
    return json.loads(defectae(home, "compare", *args).stdout)


def metrics_json(run: str | Path) -> dict:
    return json.loads((Path(run) / "score" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def ab(home, tmp_path_factory) -> dict:
    """compare of runs a and b through the CLI, with --csv and --html."""
    out = tmp_path_factory.mktemp("ab")
    runs = [str(home / "runs" / p / "20250101-000000") for p in "ab"]
    summary = compare(home, *runs, "--csv", str(out / "t.csv"), "--html", str(out / "p" / "c.html"))
    return {"runs": runs, "summary": summary, "csv": out / "t.csv", "html": out / "p" / "c.html"}


def test_lists_the_differing_keys_metrics_and_training_time(ab):
    out = ab["summary"]
    a_loss = profiles.resolve("synthetic-ae", SETS).loss
    assert out["differing"] == {"loss.beta": [a_loss.beta, 0.5], "loss.recon": [a_loss.recon, "l1"]}
    assert out["mixed"] == []
    assert [r["run"] for r in out["runs"]] == ab["runs"]
    for r in out["runs"]:
        saved = metrics_json(r["run"])
        assert r["overall"]["metrics"] == saved["metrics"]
        assert r["per_type"].keys() == saved["per_type"].keys()
        for t, col in r["per_type"].items():
            assert col["metrics"] == saved["per_type"][t]["metrics"]
    assert out["runs"][0]["train_seconds"] == 42.5
    assert out["runs"][1]["train_seconds"] is None  # no `train` call recorded its time


def test_csv_round_trip(ab):
    with open(ab["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    expected = [
        (r["run"], t, col["metrics"])
        for r in ab["summary"]["runs"]
        for t, col in [("overall", r["overall"]), *r["per_type"].items()]
    ]
    assert [(row["run"], row["defect_type"]) for row in rows] == [e[:2] for e in expected]
    for row, (_, _, values) in zip(rows, expected, strict=True):
        for name, value in values.items():
            assert (float(row[name]) if row[name] else None) == value, name
        assert row["loss.recon"] in ("ssim", "l1")
    assert {row["train_seconds"] for row in rows} == {"42.5", ""}


def test_page_names_both_runs_with_their_curves(ab):
    assert ab["summary"]["html"] == str(ab["html"])
    text = ab["html"].read_text()
    assert "a/20250101-000000" in text and "b/20250101-000000" in text
    assert text.count("data:image/png;base64,") == 5  # image ROC, PR; pixel ROC, PR, PRO
    assert "loss.recon" in text
    links = re.findall(r'<a href="([^"]+)"', text)  # each run's report, relative to the page
    assert len(links) == 2 and all(not Path(link).is_absolute() for link in links)
    assert [(ab["html"].parent / link).resolve() for link in links] == [
        (Path(run) / "score" / "index.html").resolve() for run in ab["runs"]
    ]


def test_profile_glob_takes_each_profiles_latest_scored_run(home):
    out = compare(home, "--profile-glob", "[ab]")
    assert [r["label"] for r in out["runs"]] == ["a/20250101-000000", "b/20250101-000000"]
    assert Path(out["html"]) == home / "compare.html" and Path(out["html"]).is_file()


def test_runs_scored_at_different_resolutions_are_marked(home, monkeypatch):
    monkeypatch.setenv("DEFECTAE_HOME", str(home))
    out = command.run([], "[ac]", html=home / "mixed.html")
    assert out["mixed"] == ["resolution"]
    assert out["differing"] == {}
    assert [r["resolution"] for r in out["runs"]] == ["original", "prepared"]
    assert "different resolutions" in (home / "mixed.html").read_text()


def test_a_changed_residuals_file_leaves_out_that_runs_curves(home, tmp_path, capsys):
    run = tmp_path / "copy" / "20250101-000000"
    shutil.copytree(home / "runs" / "b" / "20250101-000000", run)
    saved = metrics_json(run)
    saved["residuals"] = str(run / "residuals.h5")
    saved["residuals_sha256"] = "0" * 64
    (run / "score" / "metrics.json").write_text(json.dumps(saved))
    page = tmp_path / "page.html"
    command.run([run], None, html=page)
    assert "changed since it was scored" in capsys.readouterr().err
    assert "changed since it was scored" in page.read_text()


@pytest.mark.parametrize(
    ("args", "glob", "message"),
    [
        (
            ["a/20250102-000000"],
            None,
            r"20250102-000000: not a scored run, .*metrics.json is missing",
        ),
        (["a/nothing"], None, "nothing: run folder not found"),
        (["a"], None, r"a: a folder of runs, .* latest scored is .*a/20250101-000000\)"),
        ([], "zz*", "--profile-glob 'zz\\*': no profile folder"),
        ([], None, "expected RUN folders or --profile-glob"),
    ],
)
def test_bad_input_names_what_is_missing(home, monkeypatch, args, glob, message):
    monkeypatch.setenv("DEFECTAE_HOME", str(home))
    with pytest.raises(DefectaeError, match=message):
        command.run([home / "runs" / a for a in args], glob, html=home / "bad.html")
    assert not (home / "bad.html").exists()


def test_bad_input_is_one_line_and_exit_2(home):
    proc = defectae(home, "compare", str(home / "runs" / "a" / "20250102-000000"), code=2)
    [line] = proc.stderr.strip().splitlines()
    assert "not a scored run" in line


def test_the_overlaid_image_curve_is_the_scored_one(home):
    """The page's image ROC comes from residuals.h5: its AUROC is metrics.json's and sklearn's."""
    import h5py
    from sklearn.metrics import roc_auc_score

    from defectae.core import metrics

    run = home / "runs" / "b" / "20250101-000000"
    curve = command.read_run(run).image_curve
    with h5py.File(run / "residuals.h5") as f:
        reference = roc_auc_score(f["test/labels"][()], f["test/scores"][()])
    assert metrics.auroc(curve).value == pytest.approx(reference, abs=1e-12)
    assert metrics.auroc(curve).value == pytest.approx(metrics_json(run)["metrics"]["image_auroc"])


def test_the_stored_pixel_curve_is_the_scored_one(home):
    """score's thinned pixel curve keeps the ends and the counts; its AUROC is close to the
    scored one (every point) and its last point counts every pixel."""
    from defectae.core import metrics

    run = home / "runs" / "b" / "20250101-000000"
    curve = command.read_run(run).pixel_curve
    scored = metrics_json(run)["metrics"]
    assert curve is not None and curve.pro is not None and len(curve.thresholds) <= 2000
    assert (curve.tp[-1], curve.fp[-1]) == (curve.n_pos, curve.n_neg)
    assert metrics.auroc(curve).value == pytest.approx(scored["pixel_auroc"], abs=2e-3)


def test_thin_curve_keeps_both_ends_and_every_point_of_a_short_curve():
    from defectae.core import metrics

    rng = np.random.default_rng(0)
    labels = rng.random(10_000) < 0.3
    curve = metrics.rank_curve(rng.random(10_000) + labels, labels)
    thin = metrics.thin_curve(curve, 100)
    assert len(thin.thresholds) == 100
    assert thin.thresholds[0] == curve.thresholds[0] and thin.tp[-1] == curve.tp[-1]
    assert metrics.auroc(thin).value == pytest.approx(metrics.auroc(curve).value, abs=5e-3)
    assert metrics.thin_curve(thin, 100) is thin
