"""The reconstruction-range check after training: flags a model that cannot reach its inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from defectae import console
from defectae.stores.patches import write_patches
from defectae.training import range_check
from defectae.training.range_check import RangeCheck, check_range, range_warning

DEFECTAE = Path(sys.executable).with_name("defectae")


def bright(n: int = 24, p: int = 16, seed: int = 0) -> torch.Tensor:
    """(n, 1, p, p) in [0, 1]: half of them nearly uniform white, half mid-grey noise."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 + 0.4 * torch.rand(n, 1, p, p, generator=g)
    x[: n // 2] = 0.97 + 0.005 * torch.rand(n // 2, 1, p, p, generator=g)
    return (x * 255).round() / 255


class Constant(nn.Module):
    """A model whose every reconstruction is 0.5 grey."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"recon": torch.full_like(x, 0.5)}


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"recon": x.clone()}


def test_a_constant_grey_model_is_flagged_and_the_identity_is_not():
    x = bright()
    flat = int((x.flatten(1).std(1) < 0.02).sum())
    assert flat == 12
    grey, same = RangeCheck(), RangeCheck()
    for batch in x.split(7):
        grey.add(batch, Constant()(batch)["recon"])
        same.add(batch, Identity()(batch)["recon"])
    g, s = grey.result(), same.result()
    assert not g["recon_range"]["reached"] and s["recon_range"]["reached"]
    assert g["uniform_patches"] == s["uniform_patches"] == flat
    expected = float((x[:12] - 0.5).abs().mean())
    assert g["uniform_mae"] == pytest.approx(expected, abs=1e-6) and s["uniform_mae"] == 0
    assert g["recon_range"]["recon_p1"] == g["recon_range"]["recon_p99"] == 0.5
    assert s["recon_range"]["recon_p99"] == s["recon_range"]["input_p99"]
    warning = range_warning(g)
    assert warning is not None and "\n" not in warning and f"on {flat} uniform" in warning
    assert range_warning(s) is None


def test_percentiles_match_numpy_to_the_histogram_resolution():
    x = torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(1)) ** 2
    check = RangeCheck()
    check.add(x, x)
    span = check.result()["recon_range"]
    values = x.numpy().ravel()
    step = 1 / (2 * (range_check.LEVELS - 1))
    for q, key in ((1, "input_p1"), (99, "input_p99"), (1, "recon_p1"), (99, "recon_p99")):
        assert span[key] == pytest.approx(np.percentile(values, q, method="inverted_cdf"), abs=step)


def test_a_dark_floor_missed_from_below_is_flagged_too():
    x = bright()
    x[12:] = 0.0  # black patches the model returns as 0.3
    check = RangeCheck()
    check.add(x, x.clamp(min=0.3))
    assert not check.result()["recon_range"]["reached"]


def test_check_range_reads_the_validation_patches_and_warns_once(tmp_path, monkeypatch):
    val = (bright(20) * 255).round().to(torch.uint8).numpy()
    path = write_patches(tmp_path / "p.h5", val[:8], val, {"seed": 0}, chunk_patches=8)
    warned = []
    monkeypatch.setattr(console, "warn", warned.append)
    grey = check_range(Constant(), path, 6, torch.device("cpu"), None)
    assert len(warned) == 1 and grey["uniform_patches"] == 10
    same = check_range(Identity(), path, 6, torch.device("cpu"), None)
    assert len(warned) == 1 and same["uniform_mae"] == 0


def test_train_json_reports_the_range_check(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(60, 200, (80, 1, 16, 16)).astype(np.uint8)
    white = np.full((16, 1, 16, 16), 250, np.uint8)
    path = write_patches(
        tmp_path / "patches.h5", noise[:64], np.concatenate([white, noise[64:]]), {"seed": 0}
    )
    sets = ["model.input_size=16", "model.args.latent_dim=8", "loss.recon=mse"]
    sets += ["train.epochs=1", "train.batch_size=16", "train.amp=off", "train.compile=false"]
    sets += ["train.num_workers=0", "train.log_images_every=0"]
    cmd = [str(DEFECTAE), "--json", "train", "--profile", "synthetic-ae", "--patches", str(path)]
    cmd += [arg for s in sets for arg in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEFECTAE_HOME": str(tmp_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    span = summary["recon_range"]
    assert set(span) == {"input_p1", "input_p99", "recon_p1", "recon_p99", "reached"}
    assert summary["uniform_patches"] == 16
    assert span["input_p99"] == pytest.approx(250 / 255, abs=1e-3)
    assert 0 <= summary["uniform_mae"] <= 1
    # four steps leave a tiny model near grey: it misses the white patches, and says so
    assert not span["reached"] and span["recon_p99"] < span["input_p99"] - 0.1
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert any("cannot reach its inputs' intensities" in line for line in warnings), proc.stderr
