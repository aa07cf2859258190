"""`python -m defectae.results`: the table of `make results`, from the stages' own summaries."""

from __future__ import annotations

import json
import subprocess
import sys

SCORE = {"metrics": {"image_auroc": 0.91234, "pixel_auroc": 0.95, "pixel_aupro": None}}


def _recipe(root, name, seconds="150"):
    d = root / name
    d.mkdir()
    (d / "train.json").write_text(json.dumps({"epochs": 12, "status": "finished"}))
    (d / "score.json").write_text(json.dumps({**SCORE, "resolution": "original"}))
    (d / "train.seconds").write_text(seconds)
    return d


def test_the_table_has_one_row_per_recipe(tmp_path):
    a, b = _recipe(tmp_path, "synthetic-ae"), _recipe(tmp_path, "magnetic-tile-ae", "61")
    out = tmp_path / "RESULTS.md"
    done = subprocess.run(
        [sys.executable, "-m", "defectae.results", str(a), str(b), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    lines = out.read_text().splitlines()
    assert lines[0].startswith("Measured ") and "CPU cores" in lines[0]
    assert lines[4] == "| synthetic-ae | 0.912 | 0.950 | n/a | 2.5 | 12 (finished) | original |"
    assert lines[5].startswith("| magnetic-tile-ae |") and "| 1.0 |" in lines[5]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["recipe"] for r in rows] == ["synthetic-ae", "magnetic-tile-ae"]


def test_a_recipe_whose_stages_did_not_all_run_is_named(tmp_path):
    d = _recipe(tmp_path, "synthetic-dae")
    (d / "score.json").unlink()
    done = subprocess.run(
        [sys.executable, "-m", "defectae.results", str(d), "--out", str(tmp_path / "t.md")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and not (tmp_path / "t.md").exists()
    assert done.stderr.strip().splitlines() == [
        f"error: {d / 'score.json'}: not found (did this recipe's stages all run?)"
    ]
