"""`defectae tile-test` end to end on a tiny prepared.h5 and an untrained tiny `ae` checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
from builders import untrained_checkpoint
from typer.testing import CliRunner

from defectae import console, profiles
from defectae.cli import app
from defectae.commands import tiletest
from defectae.core.inspector import Inspector
from defectae.errors import DefectaeError
from defectae.stores.checkpoint import load_model
from defectae.stores.prepared import PreparedSplit, read_split, write_prepared
from defectae.stores.residuals import read_tile

SETS = [
    "model.input_size=32",
    "model.args.latent_dim=8",
    "dataset.image_size=[48, 48]",
    "tile.stride=12",
    "tile.batch_size=18",
    "tile.amp=off",
    "tile.device=cpu",
]
TYPES = ["good", "good", "scratch", "hole", "scratch"]


def _profile(*extra: str) -> profiles.Profile:
    return profiles.resolve("synthetic-ae", sets=SETS + list(extra))


def _split(
    rng: np.random.Generator, n: int, channels: int, size: int, types: list[str]
) -> PreparedSplit:
    masks = np.zeros((n, 1, size, size), np.uint8)
    labels = np.array([t != "good" for t in types], np.uint8)
    masks[labels == 1, :, 10:20, 10:20] = 1
    return PreparedSplit(
        images=rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8),
        masks=masks,
        labels=labels,
        defect_types=types,
        names=[f"{i:03d}" for i in range(n)],
        files=[f"{t}/{i:03d}.png" for i, t in enumerate(types)],
        orig_sizes=np.array([[60 + i, 50] for i in range(n)], np.int32),
    )


def _prepared(path: Path, channels: int = 1, size: int = 48, **dataset: str) -> Path:
    rng = np.random.default_rng(0)
    splits = {
        "train": _split(rng, 3, channels, size, ["good"] * 3),
        "validation": _split(rng, 3, channels, size, ["good"] * 3),
        "test": _split(rng, len(TYPES), channels, size, TYPES),
    }
    attrs = {
        "layout": "synthetic",
        "source": "test",
        "category": "woven",
        "image_size": [size, size],
        "color": "gray" if channels == 1 else "rgb",
        "channels": channels,
        "dataset": {"name": "synthetic", **dataset},
    }
    return write_prepared(path, splits, attrs)


def _checkpoint(run_dir: Path, profile: profiles.Profile) -> Path:
    """A run folder as train leaves it: the checkpoint and the profile it was trained with."""
    untrained_checkpoint(run_dir, profile)
    profiles.write_profile(profile, run_dir)
    return run_dir


@pytest.fixture
def setup(home):
    profile = _profile()
    prepared = _prepared(home / "work" / "synthetic" / "prepared.h5")
    run_dir = _checkpoint(home / "runs" / profile.name / "20250101-000000", profile)
    return profile, prepared, run_dir


def test_tile_test_writes_the_residuals_contract(setup, tmp_path):
    profile, prepared, run_dir = setup
    maps = tmp_path / "maps"
    summary = tiletest.run(profile, None, None, None, maps)
    out = run_dir / "residuals.h5"
    assert (
        summary["residuals"] == str(out)
        and summary["images"] == 8
        and summary["export_maps"] == str(maps)
    )
    assert 0 < summary["model_share"] <= 1 and summary["images_per_s"] > 0
    assert profiles.load_written(run_dir / "residuals.profile.toml") == profile

    model, _, _ = load_model(run_dir / "best.pt")
    inspector = Inspector(model, patch_size=32, batch_size=18, **profile.tile.inspector_options())
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "defectae-residuals" and f.attrs["format_version"] == 1
        assert (
            f.attrs["checkpoint"] == str(run_dir / "best.pt")
            and len(f.attrs["checkpoint_sha256"]) == 64
        )
        assert f.attrs["prepared"] == str(prepared) and len(f.attrs["prepared_sha256"]) == 64
        assert (f.attrs["dataset"], f.attrs["category"], f.attrs["profile"]) == (
            "synthetic",
            "woven",
            profile.name,
        )
        assert json.loads(f.attrs["tile"])["stride"] == 12 and f.attrs["version"]
        for split, n in (("test", 5), ("validation", 3)):
            g = f[split]
            assert g["residuals"].shape == (n, 1, 48, 48) and g["residuals"].dtype == np.float16
            assert g["recon"].shape == (n, 1, 48, 48) and g["recon"].dtype == np.uint8
            assert g["scores"].shape == (n,) and g["scores"].dtype == np.float32
            source = read_split(prepared, split)
            assert [s.decode() for s in g["names"][()]] == source.names
            assert [s.decode() for s in g["defect_types"][()]] == source.defect_types
            assert np.array_equal(g["labels"][()], source.labels)
            assert np.array_equal(g["orig_sizes"][()], source.orig_sizes)
            # every image streamed into its own slot: compare with an independent pass
            with torch.no_grad():
                residual, score, recon = inspector(torch.from_numpy(source.images).float() / 255)
            np.testing.assert_allclose(g["residuals"][()], residual.numpy(), atol=2e-3)
            np.testing.assert_allclose(g["scores"][()], score.numpy(), rtol=1e-5)
            assert np.abs(g["recon"][()].astype(int) - np.round(recon.numpy() * 255)).max() <= 1
            assert np.all(g["scores"][()] > 0)

    tiffs = sorted(p.relative_to(maps).as_posix() for p in maps.rglob("*.tiff"))
    assert tiffs == [
        "woven/test/good/000.tiff",
        "woven/test/good/001.tiff",
        "woven/test/hole/003.tiff",
        "woven/test/scratch/002.tiff",
        "woven/test/scratch/004.tiff",
    ]
    first = tifffile.imread(maps / "woven/test/good/000.tiff")
    assert first.dtype == np.float32 and first.shape == (60, 50)
    assert tifffile.imread(maps / "woven/test/scratch/004.tiff").shape == (64, 50)
    assert abs(float(first.max()) - float(residual.max())) < 0.5  # same map, only resized


def test_profile_tile_settings_override_the_checkpoint(setup, tmp_path):
    _, prepared, run_dir = setup
    override = _profile(
        "tile.score=topk",
        "tile.topk_percent=5",
        "tile.save_reconstructions=false",
        "tile.stride=16",
    )
    out = tmp_path / "elsewhere" / "residuals.h5"
    trained = (run_dir / "profile.toml").read_bytes()
    tiletest.run(override, run_dir, prepared, out, None)
    assert (run_dir / "profile.toml").read_bytes() == trained  # the run's record is untouched
    with h5py.File(out, "r") as f:
        tile = json.loads(f.attrs["tile"])
        assert (tile["score"], tile["stride"]) == ("topk", 16)
        assert "recon" not in f["test"] and f["test/residuals"].shape == (5, 1, 48, 48)
        assert np.all(f["test/scores"][()] <= f["test/residuals"][()].reshape(5, -1).max(1) + 1e-3)
    written = profiles.load_written(out.parent / "residuals.profile.toml")
    assert written.tile.score == "topk" and written.model.input_size == 32


def test_without_a_profile_the_run_s_training_profile_decides_the_tile_settings(setup):
    _, prepared, run_dir = setup
    trained_with = _profile("tile.stride=8", "tile.score=topk")
    profiles.write_profile(trained_with, run_dir)
    tiletest.run(None, run_dir, prepared, None, None)
    tile = read_tile(run_dir / "residuals.h5")
    assert tile == trained_with.tile and (tile.stride, tile.score) == (8, "topk")


def test_bad_inputs(setup, tmp_path, monkeypatch):
    profile, prepared, run_dir = setup
    with pytest.raises(DefectaeError, match="run folder not found"):
        tiletest.run(None, tmp_path / "nope", prepared, None, None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DefectaeError, match="no best.pt or last.pt"):
        tiletest.run(None, tmp_path / "empty", prepared, None, None)
    with pytest.raises(
        DefectaeError, match="checkpoint has model.input_size = 32, the profile expects 64"
    ):
        tiletest.run(_profile("model.input_size=64"), None, None, None, None)
    with pytest.raises(DefectaeError, match="prepared file not found"):
        tiletest.run(None, run_dir, tmp_path / "missing.h5", None, None)
    with pytest.raises(DefectaeError, match="channel"):
        tiletest.run(None, run_dir, _prepared(tmp_path / "rgb.h5", channels=3), None, None)
    lit = _prepared(tmp_path / "lit.h5", intensity="mean-std")  # another recipe's preparation
    with pytest.raises(DefectaeError, match="dataset.intensity = 'mean-std', where this profile"):
        tiletest.run(None, run_dir, lit, None, None)
    with pytest.raises(DefectaeError, match="model.input_size 32: larger than the prepared images"):
        tiletest.run(None, run_dir, _prepared(tmp_path / "small.h5", size=24), None, None)
    assert not (run_dir / "residuals.h5").exists()
    monkeypatch.setenv("DEFECTAE_HOME", str(tmp_path / "fresh"))
    with pytest.raises(DefectaeError, match="no training run"):
        tiletest.run(profile, None, None, None, None)


def test_cli_json_summary_and_exit_code(setup, monkeypatch):
    _, prepared, run_dir = setup
    monkeypatch.setattr(console, "mode", console.OutputMode())  # the CLI callback mutates it
    ok = CliRunner().invoke(
        app, ["--json", "tile-test", "--run", str(run_dir), "--prepared", str(prepared)]
    )
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout)
    assert set(summary) == {
        "residuals",
        "images",
        "seconds",
        "images_per_s",
        "model_share",
        "validation_border",
        "export_maps",
    }
    assert summary["validation_border"]["maps"] > 0
    assert summary["images"] == 8 and summary["export_maps"] is None
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "defectae",
            "tile-test",
            "--run",
            str(run_dir),
            "--prepared",
            str(run_dir / "missing.h5"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "prepared file not found" in bad.stderr and bad.stdout == ""
