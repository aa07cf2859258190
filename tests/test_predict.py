"""`defectae predict` through the real CLI on one tiny trained, tile-tested and scored run:
the same image scores as tile-test through the checkpoint and both exports, outputs at the
original size, an unreadable image, a run never scored, an export that is not an inspector."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from builders import TINY_SYNTHETIC, TINY_TRAINING, defectae
from PIL import Image

pytestmark = pytest.mark.slow

ORIGINAL = 80  # generated images are 80x80, prepared at 64x64: maps go back to 80x80
SETS = [
    *(s for s in TINY_SYNTHETIC if not s.startswith("dataset.synthetic.size")),
    f"dataset.synthetic.size={ORIGINAL}",
    *TINY_TRAINING,
    "tile.amp=off",  # the fp32 maps the exports reproduce
]
PROFILE = ["--profile", "synthetic-ae", *(a for s in SETS for a in ("--set", s))]


def lines(proc: subprocess.CompletedProcess) -> tuple[list[dict], dict]:
    """predict's JSON lines: one per image, then the summary."""
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert records and records[-1].get("summary") is True
    return records[:-1], records[-1]


def errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> dict:
    """One trained run, tile-tested, scored and exported to TorchScript and ONNX."""
    home = tmp_path_factory.mktemp("predict")
    for command in ("prepare", "augment"):
        defectae(home, command, *PROFILE)
    run = Path(json.loads(defectae(home, "train", *PROFILE).stdout)["run_dir"])
    residuals = json.loads(defectae(home, "tile-test", *PROFILE).stdout)["residuals"]
    metrics = json.loads(defectae(home, "score", *PROFILE).stdout)["metrics_json"]
    defectae(home, "export", "--run", str(run), "--format", "all")
    with h5py.File(residuals) as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f["test/names"][()]]
        types = [t.decode() if isinstance(t, bytes) else t for t in f["test/defect_types"][()]]
        scores = dict(
            zip(zip(types, names, strict=True), f["test/scores"][()].tolist(), strict=True)
        )
    test_dir = next(p for p in home.rglob("test") if (p / "good").is_dir())
    threshold = json.loads(Path(metrics).read_text())["threshold"]["value"]
    return {"home": home, "run": run, "scores": scores, "test": test_dir, "threshold": threshold}


def _predicted(records: list[dict]) -> dict[tuple[str, str], float]:
    return {(Path(r["path"]).parent.name, Path(r["path"]).stem): r["score"] for r in records}


@pytest.mark.parametrize("source", ["checkpoint", "inspector.pt", "inspector.onnx"])
def test_scores_equal_tile_test_through_the_checkpoint_and_the_exports(scored, tmp_path, source):
    args = (
        [] if source == "checkpoint" else ["--from-export", str(scored["run"] / "export" / source)]
    )
    out = tmp_path / "out"
    proc = defectae(
        scored["home"],
        "predict",
        "--run",
        str(scored["run"]),
        str(scored["test"]),
        "--out",
        str(out),
        *args,
    )
    records, summary = lines(proc)
    predicted = _predicted(records)
    assert predicted.keys() == scored["scores"].keys()
    assert np.allclose(
        [predicted[k] for k in scored["scores"]], list(scored["scores"].values()), rtol=0, atol=1e-5
    )
    assert summary["threshold"]["value"] == scored["threshold"]
    assert summary["images"] == len(records) and summary["failed"] == 0
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [r["path"] for r in records]
    assert {r["verdict"] for r in rows} <= {"good", "defective"}


def test_maps_masks_and_overlays_at_the_original_size(scored, tmp_path):
    image = scored["test"] / "good" / "000.png"
    proc = defectae(
        scored["home"], "predict", "--run", str(scored["run"]), str(image), "--out", str(tmp_path)
    )
    [record], _ = lines(proc)
    anomaly = np.asarray(Image.open(record["map"]))
    assert anomaly.dtype == np.float32 and anomaly.shape == (ORIGINAL, ORIGINAL)
    mask = np.asarray(Image.open(record["mask"])) > 0
    assert (mask == (anomaly >= scored["threshold"])).all()
    assert record["defective_share"] == pytest.approx(mask.mean())
    assert Image.open(record["overlay"]).size == (ORIGINAL, ORIGINAL)
    assert record["verdict"] == ("defective" if record["score"] >= scored["threshold"] else "good")
    assert Path(record["map"]).parent == tmp_path  # one file: outputs directly in --out


def test_an_unreadable_image_is_named_and_the_others_are_processed(scored, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("000.png", "001.png"):
        shutil.copy(scored["test"] / "good" / name, images / name)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    proc = defectae(
        scored["home"],
        "predict",
        "--run",
        str(scored["run"]),
        str(images / "*.png"),
        "--out",
        str(tmp_path / "out"),
        code=1,
    )
    records, summary = lines(proc)
    assert len(errors(proc)) == 1 and "broken.png" in errors(proc)[0]
    assert summary["failed_paths"] == [str(images / "broken.png")]
    assert [Path(r["path"]).name for r in records if "score" in r] == ["000.png", "001.png"]
    assert (tmp_path / "out" / "001_overlay.png").is_file()
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        assert [r["verdict"] for r in csv.DictReader(f)].count("error") == 1


def test_a_run_never_scored_needs_score_or_threshold(scored, tmp_path):
    run = tmp_path / "unscored"
    shutil.copytree(scored["run"], run, ignore=shutil.ignore_patterns("score", "export", "predict"))
    image = str(scored["test"] / "good" / "000.png")
    proc = defectae(scored["home"], "predict", "--run", str(run), image, code=2)
    assert len(errors(proc)) == 1 and "defectae score" in errors(proc)[0]
    assert "--threshold" in errors(proc)[0] and "Traceback" not in proc.stderr
    _, summary = lines(
        defectae(scored["home"], "predict", "--run", str(run), image, "--threshold", "0.5")
    )
    assert summary["threshold"]["value"] == 0.5 and (run / "predict" / "predictions.csv").is_file()


def test_a_reconstruction_export_is_refused(scored):
    model = str(scored["run"] / "export" / "model.pt")
    image = str(scored["test"] / "good" / "000.png")
    proc = defectae(
        scored["home"],
        "predict",
        "--run",
        str(scored["run"]),
        image,
        "--from-export",
        model,
        code=2,
    )
    assert len(errors(proc)) == 1 and "inspector" in errors(proc)[0]


def _short_side_setup(fixed_size: tuple[int, int] | None):
    from defectae.commands.predict import Setup
    from defectae.profiles import resolve

    profile = resolve("synthetic-ae", ["dataset.resize=short-side", "dataset.image_size=[64, 64]"])
    return Setup(profile, None, "inspector.pt", {}, ("none", 0.0, 0.0), 1, fixed_size)


def test_a_short_side_export_takes_the_images_that_reach_its_traced_size(tmp_path):
    from defectae.commands.predict import read_one
    from defectae.errors import DefectaeError

    square, wide = tmp_path / "square.png", tmp_path / "wide.png"
    Image.fromarray(np.full((80, 80), 128, np.uint8)).save(square)
    Image.fromarray(np.full((80, 120), 128, np.uint8)).save(wide)
    setup = _short_side_setup((64, 64))
    assert read_one(square, Path("square"), setup).pixels.shape == (1, 64, 64)
    with pytest.raises(DefectaeError, match=r"wide.png: 80x120 becomes 64x96.*only 64x64"):
        read_one(wide, Path("wide"), setup)
    assert read_one(wide, Path("wide"), _short_side_setup(None)).pixels.shape == (1, 64, 96)


def test_a_short_side_export_must_share_the_runs_short_side(tmp_path):
    from defectae.commands.predict import _check_export
    from defectae.errors import DefectaeError

    profile = _short_side_setup(None).profile
    meta = {"format": "defectae-export", "artefact": "inspector"}
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"x")
    given = {"channels": 1, "color": "gray"}
    _check_export(tmp_path, {**meta, "input": {**given, "image_size": [64, 96]}}, profile, ckpt)
    with pytest.raises(DefectaeError, match=r"image_size \[48, 72\].*short side of 64"):
        _check_export(tmp_path, {**meta, "input": {**given, "image_size": [48, 72]}}, profile, ckpt)
