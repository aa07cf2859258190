"""The families that make their own anomaly map (feature-space ones with the offline backbone,
draem) through the real CLI: one epoch of training on generated texture, tile-test, score, and
an export verified against eager."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
from builders import TINY_SYNTHETIC, defectae

SETS = [
    *TINY_SYNTHETIC,
    "model.input_size=64",
    "augment.whole_image=true",
    "augment.n_patches=16",
    "augment.n_val_patches=4",
    "train.epochs=1",
    "train.batch_size=8",
    "train.compile=false",
    "train.num_workers=0",
    "tile.normalize=none",  # raw maps, to check they are the model's (positive) distances
]


# settings of one family only
OWN = {"draem": ["model.args.recon_width=4", "model.args.seg_width=4", "tile.stride=32"]}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["rd", "dfr", "draem"])
def test_one_epoch_then_tile_test_score_and_a_verified_export(tmp_path, family):
    sets = [*SETS, *OWN.get(family, [])]
    profile = ["--profile", f"synthetic-{family}", *(a for s in sets for a in ("--set", s))]
    defectae(tmp_path, "prepare", *profile)
    defectae(tmp_path, "augment", *profile)
    trained = json.loads(defectae(tmp_path, "train", *profile).stdout)
    assert trained["status"] == "finished" and "ssim" not in trained["val"]
    tiled = json.loads(defectae(tmp_path, "tile-test", *profile).stdout)
    with h5py.File(tiled["residuals"]) as f:  # the model's own maps, not a pixel residual
        assert f["test/residuals"].shape == (5, 1, 64, 64) and f["test/residuals"][()].min() > 0
    scored = json.loads(defectae(tmp_path, "score", *profile).stdout)
    metrics = json.loads(Path(scored["metrics_json"]).read_text())["metrics"]
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    exported = json.loads(
        defectae(tmp_path, "export", "--run", trained["run_dir"], "--format", "all").stdout
    )
    assert max(exported["max_abs_diff"].values()) <= 1e-4
    model_meta = json.loads((Path(trained["run_dir"]) / "export" / "export.json").read_text())
    assert model_meta["max_abs_diff"].keys() >= {"model.pt", "inspector.pt", "model.onnx"}


def test_an_unknown_backbone_is_one_line_and_exit_2(tmp_path):
    sets = ["--set", "model.args.backbone=resnet-18"]
    proc = defectae(tmp_path, "bench", "--profile", "synthetic-rd", *sets, "--quick", code=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: model.args.backbone 'resnet-18': unknown backbone; expected one of "
        "efficientnet-lite0, resnet18, wide_resnet50_2, vgg16"
    ]
    assert "Traceback" not in proc.stderr
