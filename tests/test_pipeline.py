"""The whole pipeline through the real CLI: prepare -> augment -> train -> tile-test -> score."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

SETS = [
    "dataset.synthetic.size=64",
    "dataset.image_size=[64, 64]",
    "dataset.synthetic.n_train=12",
    "dataset.synthetic.n_test_good=3",
    "dataset.synthetic.n_test_defect=5",
    "dataset.val_fraction=0.25",
    "model.input_size=32",
    "model.args.latent_dim=16",
    "augment.n_patches=256",
    "augment.n_val_patches=32",
    "train.epochs=2",
    "train.batch_size=32",
    "train.compile=false",
    "train.num_workers=0",
    "tile.stride=16",
    "tile.batch_size=16",
]


def defectae(home: Path, *args: str) -> dict:
    """Run one command with --json and return its summary; any non-zero exit fails the test."""
    cmd = [sys.executable, "-m", "defectae", "--json", *args]
    for s in SETS:
        cmd += ["--set", s]
    env = {**os.environ, "DEFECTAE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path: Path) -> None:
    prepared = defectae(tmp_path, "prepare", "--synthetic", "woven")
    assert prepared["splits"] == {"train": 9, "validation": 3, "test_good": 3, "test_defect": 5}

    profile = ["--profile", "synthetic-ae"]
    patches = defectae(tmp_path, "augment", *profile)
    assert (patches["train_patches"], patches["patch_size"]) == (256, 32)

    trained = defectae(tmp_path, "train", *profile)
    run_dir = Path(trained["run_dir"])
    assert trained["epochs"] == 2 and (run_dir / "best.pt").is_file()

    tiled = defectae(tmp_path, "tile-test", *profile, "--export-maps", str(tmp_path / "maps"))
    with h5py.File(tiled["residuals"]) as f:
        assert f["test/residuals"].shape == (8, 1, 64, 64)
    assert len(list((tmp_path / "maps").rglob("*.tiff"))) == 8

    scored = defectae(tmp_path, "score", *profile)
    assert Path(scored["index_html"]).is_file()
    metrics = json.loads(Path(scored["metrics_json"]).read_text())
    assert metrics["protocol"] == "mvtec"
    text = json.dumps(metrics)
    for name in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert name in text
