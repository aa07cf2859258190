"""`defectae score` end to end on tiny prepared.h5 / residuals.h5 fixtures written per the contract."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
from builders import untrained_checkpoint, woven_attrs
from PIL import Image
from typer.testing import CliRunner

from defectae import profiles, workspace
from defectae.cli import app
from defectae.commands import score
from defectae.errors import DefectaeError
from defectae.files import sha256_file
from defectae.profiles import Profile
from defectae.stores.prepared import PreparedSplit, write_prepared

SIZE = 32
TYPES = ["good", "good", "good", "hole", "hole", "scratch", "scratch"]


def make_split(types: list[str], size: int = SIZE, seed: int = 0) -> PreparedSplit:
    rng = np.random.default_rng(seed)
    n = len(types)
    masks = np.zeros((n, 1, size, size), np.uint8)
    for i, t in enumerate(types):
        q = size // 8
        if t == "hole":
            masks[i, 0, 2 * q : 3 * q + 2, 3 * q : 4 * q + 2] = 1
        elif t == "scratch":
            masks[i, 0, 5 * q, q : 7 * q] = 1
            masks[i, 0, q : 2 * q, q : 2 * q] = 1  # a second region
    return PreparedSplit(
        images=rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8),
        masks=masks,
        labels=np.array([t != "good" for t in types], np.uint8),
        defect_types=list(types),
        names=[f"{i:03d}" for i in range(n)],
        files=[f"test/{t}/{i:03d}.png" for i, t in enumerate(types)],
        orig_sizes=np.full((n, 2), 2 * size, np.int32),
    )


def write_residuals(
    path,
    test: PreparedSplit,
    prepared,
    maps=None,
    val: int = 3,
    dataset="synthetic",
    names=None,
    recon: bool = True,
) -> None:
    """residuals.h5 exactly as the BRIEF's contract describes it."""
    rng = np.random.default_rng(1)
    n, _, h, w = test.masks.shape
    if maps is None:
        maps = 0.3 * rng.random((n, 1, h, w)) + 0.6 * test.masks
    strings = h5py.string_dtype()
    with h5py.File(path, "w") as f:
        f.attrs.update(
            format="defectae-residuals",
            format_version=1,
            checkpoint="best.pt",
            checkpoint_sha256="0" * 64,
            prepared=str(prepared),
            prepared_sha256=sha256_file(prepared),
            dataset=dataset,
            category="woven",
            tile=json.dumps({"residual": {"ssim": 1.0}}),
            profile="synthetic-ae",
            version="0.1.0",
        )
        for split, count in (("test", n), ("validation", val)):
            g = f.create_group(split)
            m = (
                maps
                if split == "test"
                else 0.3 * rng.random((count, 1, maps.shape[2], maps.shape[3]))
            )
            g.create_dataset("residuals", data=np.asarray(m, np.float16))
            if recon:
                g.create_dataset(
                    "recon", data=rng.integers(0, 256, (count, 1, h, w), dtype=np.uint8)
                )
            g.create_dataset(
                "scores", data=np.asarray(m, np.float32).max(axis=(1, 2, 3), initial=0)
            )
            sel = test if split == "test" else make_split(["good"] * count)
            g.create_dataset(
                "names",
                data=np.array(names or sel.names, dtype=object)
                if split == "test"
                else np.array(sel.names, dtype=object),
                dtype=strings,
            )
            for key in ("defect_types", "files"):
                g.create_dataset(key, data=np.array(getattr(sel, key), dtype=object), dtype=strings)
            g.create_dataset("labels", data=sel.labels)
            g.create_dataset("orig_sizes", data=sel.orig_sizes)


@pytest.fixture
def setup(home):
    """A profile, its prepared.h5 and a run folder with a checkpoint and residuals.h5."""
    profile = profiles.resolve("synthetic-ae")
    test = make_split(TYPES)
    test.orig_masks = [np.kron(m[0], np.ones((2, 2), np.uint8)) for m in test.masks]  # 2x size
    splits = {
        "train": make_split(["good"] * 2),
        "validation": make_split(["good"] * 3),
        "test": test,
    }
    prepared = workspace.prepared_path(profile)
    write_prepared(
        prepared,
        splits,
        woven_attrs(profile, SIZE),
    )
    run = workspace.runs_root(profile) / "20250101-000000"
    untrained_checkpoint(run, profile, "last.pt")
    profiles.write_profile(profile, run)
    write_residuals(run / "residuals.h5", test, prepared)
    return profile, run, prepared, test


def test_score_writes_metrics_figures_panels_and_index(setup):
    profile, run, _, test = setup
    summary = score.run(profile, None, None, None, "mvtec", None)
    out = run / "score"
    saved = json.loads((out / "metrics.json").read_text())
    for key in (
        "profile",
        "protocol",
        "residuals",
        "residuals_sha256",
        "threshold",
        "metrics",
        "undefined",
        "per_type",
        "counts",
        "figures",
    ):
        assert key in saved, key
    assert saved["profile"] == "synthetic-ae" and saved["protocol"] == "mvtec"
    assert saved["residuals_sha256"] == sha256_file(run / "residuals.h5")
    assert set(saved["per_type"]) == {"hole", "scratch"}
    assert saved["per_type"]["hole"]["counts"] == {
        "images": 5,
        "defective": 2,
        "good": 3,
        "regions": 2,
    }
    assert saved["counts"]["regions"] == 6
    m = saved["metrics"]
    assert m["image_auroc"] == 1.0 and m["pixel_auroc"] > 0.99 and m["pixel_aupro"] > 0.9
    assert saved["threshold"]["method"] == "val_quantile" and saved["threshold"]["value"] < 0.31
    assert m["pixel_iou"] is not None and saved["undefined"] == {}
    assert (out / "profile.toml").is_file()

    index = (out / "index.html").read_text()
    sources = re.findall(r'src="([^"]+)"', index)
    assert {"roc.png", "pr.png", "pro.png"} <= set(sources)
    assert sum(s.startswith("panels/") for s in sources) == len(test)
    for src in sources:
        assert (out / src).is_file(), src
    with Image.open(out / sources[-1]) as im:  # input, recon, residual, predicted, truth
        assert im.height == SIZE + 14 and im.width == 5 * SIZE + 4 * 4
    assert "<script" not in index
    assert summary["index_html"] == str(out / "index.html")


def test_score_json_summary_via_cli(setup):
    _, run, _, _ = setup
    result = CliRunner().invoke(
        app, ["--json", "score", "--run", str(run), "--out", str(run / "report")]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["index_html"] == str(run / "report" / "index.html")
    assert summary["metrics"]["image_auroc"] == 1.0
    assert (run / "report" / "metrics.json").is_file()


def test_ground_truth_folder_at_original_size_gives_the_same_metrics(setup, tmp_path):
    profile, run, _, test = setup
    gt = tmp_path / "ground_truth"
    for i, (t, name) in enumerate(zip(test.defect_types, test.names, strict=True)):
        if t != "good":  # MVTec: no masks for good images; masks at the original (2x) size
            (gt / t).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.kron(test.masks[i, 0], np.ones((2, 2), np.uint8)) * 255).save(
                gt / t / f"{name}_mask.png"
            )
    from_folder = score.run(profile, run, None, gt, "mvtec", tmp_path / "a")
    from_prepared = score.run(profile, run, None, None, "mvtec", tmp_path / "b")
    assert from_folder["metrics"] == from_prepared["metrics"]
    assert from_folder["ground_truth"] == str(gt)

    (gt / "hole" / "004_mask.png").unlink()
    with pytest.raises(
        DefectaeError,
        match=r"004_mask\.png: no ground-truth mask for defective test image 'hole/004'",
    ):
        score.run(profile, run, None, gt, "mvtec", tmp_path / "c")
    with pytest.raises(DefectaeError, match="ground-truth folder not found"):
        score.run(profile, run, None, tmp_path / "nowhere", "mvtec", None)


def test_radli_protocol_adds_its_curve(setup):
    profile, run, _, _ = setup
    summary = score.run(profile, run, None, None, "radli", None)
    assert summary["protocol"] == "radli"
    assert len(summary["radli"]["fpr"]) == 50 and summary["radli"]["images"] == 4
    assert summary["metrics"]["radli_auc"] is not None
    assert "radli_auc" in summary["per_type"]["hole"]["metrics"]
    assert summary["figures"]["radli"] == "radli.png" and (run / "score" / "radli.png").is_file()


def test_undefined_metrics_are_reported_with_reasons(home, tmp_path):
    profile = profiles.resolve("synthetic-ae", ["score.panels=false"])
    test = make_split(["good"] * 3)
    prepared = tmp_path / "prepared.h5"
    write_prepared(
        prepared,
        {"train": test, "validation": test, "test": test},
        {"category": "woven", "dataset": profiles.to_dict(profile)["dataset"]},
    )
    write_residuals(tmp_path / "residuals.h5", test, prepared, val=0)
    summary = score.run(profile, None, tmp_path / "residuals.h5", None, "mvtec", None)
    assert summary["metrics"]["image_auroc"] is None
    assert summary["undefined"]["image_auroc"] == "no defective images"
    assert summary["undefined"]["pixel_aupro"] == "no defect regions in the ground truth"
    assert (
        summary["threshold"]["value"] is None
        and summary["threshold"]["reason"] == "no validation images"
    )
    assert "validation" in summary["undefined"]["pixel_iou"]
    index = (tmp_path / "score" / "index.html").read_text()
    assert "no defective images" in index and "panels/" not in index


def test_residuals_that_do_not_match_the_masks(setup, tmp_path):
    profile, run, prepared, test = setup
    bad_names = tmp_path / "names.h5"
    write_residuals(
        bad_names, test, prepared, names=["000", "001", "002", "003", "004", "005", "999"]
    )
    with pytest.raises(DefectaeError, match=r"'scratch/999' is not in .*prepared\.h5"):
        score.run(profile, None, bad_names, None, "mvtec", tmp_path / "o")

    small = tmp_path / "small.h5"
    write_residuals(small, make_split(TYPES, size=16), prepared)
    with pytest.raises(
        DefectaeError, match=r"test masks are 32x32, the residual maps .* are 16x16"
    ):
        score.run(profile, None, small, None, "mvtec", tmp_path / "o")


def test_residuals_from_another_dataset(setup, tmp_path):
    profile, _, prepared, test = setup
    other = tmp_path / "other.h5"
    write_residuals(other, test, prepared, dataset="mvtec_grid")
    with pytest.raises(
        DefectaeError,
        match=r"residuals of dataset 'mvtec_grid/woven', but the profile 'synthetic-ae'",
    ):
        score.run(profile, None, other, None, "mvtec", tmp_path / "o")
    with pytest.raises(
        DefectaeError,
        match=r"residuals of dataset 'mvtec_grid/woven', but .*prepared\.h5 is dataset",
    ):
        score.run(None, None, other, None, "mvtec", tmp_path / "o")


def test_missing_inputs_and_unknown_protocol(setup, tmp_path):
    profile, run, _, _ = setup
    with pytest.raises(DefectaeError, match="run folder not found"):
        score.run(profile, tmp_path / "no-run", None, None, "mvtec", None)
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    with pytest.raises(
        DefectaeError, match=r"residuals\.h5: no residuals in this run; run `defectae tile-test"
    ):
        score.run(None, empty_run, None, None, "mvtec", None)
    with pytest.raises(
        DefectaeError, match=r"missing\.h5: residuals file not found; run `defectae tile-test`"
    ):
        score.run(None, None, tmp_path / "missing.h5", None, "mvtec", None)
    with pytest.raises(DefectaeError, match="--profile, --run or --residuals"):
        score.run(None, None, None, None, "mvtec", None)
    with pytest.raises(DefectaeError, match="no training run"):
        score.run(Profile(name="nothing"), None, None, None, "mvtec", None)
    with pytest.raises(DefectaeError, match="--protocol: 'bergmann' is not one of mvtec, radli"):
        score.run(profile, run, None, None, "bergmann", None)
    not_h5 = tmp_path / "not.h5"
    not_h5.write_text("text")
    with pytest.raises(DefectaeError, match="not a readable HDF5 file"):
        score.run(None, None, not_h5, None, "mvtec", None)


def test_user_errors_exit_2_with_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "defectae", "score", "--run", str(run)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "tile-test" in proc.stderr
