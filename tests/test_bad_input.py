"""The bad-input matrix, run through the installed `defectae` console script as a user runs it.

Every case must: exit 2, print exactly one line on stderr that names the file, key or value at
fault, print no traceback, and leave every file under the workspace as it was (no new, changed
or half-written output). The workspace is a real one: a prepared synthetic set, a patch file,
a trained run, its residuals and its score, made once by the same console script.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from builders import TINY_SYNTHETIC
from PIL import Image

DEFECTAE = Path(sys.executable).with_name("defectae")
SETS = [
    *TINY_SYNTHETIC,
    "model.input_size=32",
    "model.args.latent_dim=8",
    "augment.n_patches=64",
    "augment.n_val_patches=16",
    "train.epochs=1",
    "train.batch_size=16",
    "train.compile=false",
    "train.num_workers=0",
    "train.device=cpu",
    "tile.stride=16",
    "tile.device=cpu",
]
PROFILE = ["--profile", "synthetic-ae", *[a for s in SETS for a in ("--set", s)]]


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEFECTAE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(DEFECTAE), *args], capture_output=True, text=True, cwd=home, env=env, timeout=600
    )


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and modification time (crash logs aside)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and p.parts[len(root.parts)] != "logs"
    }


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """A workspace made by the real commands, and the bad files the cases feed them."""
    home = tmp_path_factory.mktemp("ws")
    for args in (
        ["prepare", "--synthetic", "woven", *PROFILE[2:]],
        ["augment", *PROFILE],
        ["train", *PROFILE],
        ["tile-test", *PROFILE],
        ["score", *PROFILE],
    ):
        result = cli(home, *args)
        assert result.returncode == 0, result.stderr
    run = next((home / "runs" / "synthetic-ae").iterdir())
    bad = home / "bad"
    bad.mkdir()
    (bad / "text.txt").write_text("not an hdf5 file\n")
    (bad / "empty.h5").write_bytes(b"")
    truncated = (home / "work" / "synthetic" / "prepared.h5").read_bytes()
    (bad / "truncated.h5").write_bytes(truncated[: len(truncated) // 3])
    (bad / "folder.h5").mkdir()
    with h5py.File(bad / "foreign.h5", "w") as f:
        f["x"] = np.zeros(3)
    for name, content in {
        "text": b"hello, not a checkpoint",
        "empty": b"",
    }.items():
        (bad / name / "best.pt").parent.mkdir(parents=True)
        (bad / name / "best.pt").write_bytes(content)
    (bad / "tensor").mkdir()
    torch.save(torch.zeros(3), bad / "tensor" / "best.pt")
    (bad / "pickle").mkdir()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {home / 'pwned'}",))

    (bad / "pickle" / "best.pt").write_bytes(pickle.dumps(Evil()))
    (bad / "norun").mkdir()
    (bad / "readonly").mkdir()
    (bad / "gt" / "hole").mkdir(parents=True)
    (bad / "gt" / "hole" / "000_mask.png").write_text("not a png")
    folders = bad / "folders"
    (folders / "good").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(folders / "good" / f"a{i}.png")
    (folders / "good" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (bad / "bad.toml").write_text("[train]\nlr = nan\n")
    (bad / "unknown.toml").write_text("[train]\nlearning_rate = 1e-3\n")
    return {"home": home, "run": run, "bad": bad}


def P(ws, key):  # noqa: N802 - a short path builder for the case table
    return str(ws["bad"] / key) if key not in ("home", "run") else str(ws[key])


# (id, argv builder, needle that the one line must contain)
CASES = [
    # ---- prepare
    ("prepare-unknown-profile", lambda w: ["prepare", "--profile", "nope-ae"], "nope"),
    (
        "prepare-missing-root",
        lambda w: ["prepare", "--profile", "mvtec-bottle-ae", "--root", P(w, "missing")],
        "missing",
    ),
    (
        "prepare-root-is-file",
        lambda w: ["prepare", "--profile", "mvtec-bottle-ae", "--root", P(w, "text.txt")],
        "text.txt",
    ),
    ("prepare-unknown-texture", lambda w: ["prepare", "--synthetic", "marble"], "marble"),
    (
        "prepare-bad-set-key",
        lambda w: ["prepare", "--profile", "synthetic-ae", "--set", "dataset.sise=3"],
        "dataset.sise",
    ),
    (
        "prepare-bad-set-syntax",
        lambda w: ["prepare", "--profile", "synthetic-ae", "--set", "dataset.size"],
        "dataset.size",
    ),
    (
        "prepare-sha-without-download",
        lambda w: ["prepare", "--profile", "synthetic-ae", "--sha256", "ab"],
        "--sha256",
    ),
    (
        "prepare-out-is-folder",
        lambda w: ["prepare", "--synthetic", "woven", *PROFILE[2:], "--out", P(w, "folder.h5")],
        "folder.h5",
    ),
    (
        "prepare-truncated-image",
        lambda w: [
            "prepare",
            "--profile",
            "magnetic-tile-ae",
            "--root",
            P(w, "folders"),
            "--set",
            "dataset.folders.good_dir=good",
            "--set",
            "dataset.folders.image_subdir=",
            "--set",
            "dataset.folders.image_exts=['.png']",
            "--set",
            "dataset.folders.defect_dirs=[]",
            "--set",
            "dataset.folders.mask_suffix=_mask",
        ],
        "b.png",
    ),
    ("prepare-profile-file-nan", lambda w: ["prepare", "--profile", P(w, "bad.toml")], "train.lr"),
    (
        "prepare-profile-file-unknown-key",
        lambda w: ["prepare", "--profile", P(w, "unknown.toml")],
        "learning_rate",
    ),
    # ---- augment
    (
        "augment-missing-prepared",
        lambda w: ["augment", *PROFILE, "--prepared", P(w, "missing.h5")],
        "missing.h5",
    ),
    (
        "augment-prepared-is-folder",
        lambda w: ["augment", *PROFILE, "--prepared", P(w, "folder.h5")],
        "folder.h5",
    ),
    (
        "augment-prepared-is-text",
        lambda w: ["augment", *PROFILE, "--prepared", P(w, "text.txt")],
        "text.txt",
    ),
    (
        "augment-prepared-empty",
        lambda w: ["augment", *PROFILE, "--prepared", P(w, "empty.h5")],
        "empty.h5",
    ),
    (
        "augment-prepared-truncated",
        lambda w: ["augment", *PROFILE, "--prepared", P(w, "truncated.h5")],
        "truncated.h5",
    ),
    (
        "augment-prepared-foreign",
        lambda w: ["augment", *PROFILE, "--prepared", P(w, "foreign.h5")],
        "foreign.h5",
    ),
    (
        "augment-zero-patches",
        lambda w: ["augment", *PROFILE, "--set", "augment.n_patches=0"],
        "augment.n_patches",
    ),
    (
        "augment-bad-compression",
        lambda w: ["augment", *PROFILE, "--set", "augment.compression=zip"],
        "augment.compression",
    ),
    (
        "augment-out-is-folder",
        lambda w: ["augment", *PROFILE, "--out", P(w, "folder.h5")],
        "folder.h5",
    ),
    # ---- train
    (
        "train-missing-patches",
        lambda w: ["train", *PROFILE, "--patches", P(w, "missing.h5")],
        "missing.h5",
    ),
    (
        "train-patches-wrong-kind",
        lambda w: [
            "train",
            *PROFILE,
            "--patches",
            str(w["home"] / "work" / "synthetic" / "prepared.h5"),
        ],
        "prepared.h5",
    ),
    (
        "train-unknown-family",
        lambda w: ["train", *PROFILE, "--set", "model.family=transformerx"],
        "transformerx",
    ),
    ("train-bad-amp", lambda w: ["train", *PROFILE, "--amp", "fp8"], "fp8"),
    ("train-bad-compile", lambda w: ["train", *PROFILE, "--compile", "maybe"], "maybe"),
    ("train-lr-nan", lambda w: ["train", *PROFILE, "--set", "train.lr=nan"], "train.lr"),
    ("train-lr-inf", lambda w: ["train", *PROFILE, "--set", "train.lr=inf"], "train.lr"),
    (
        "train-negative-epochs",
        lambda w: ["train", *PROFILE, "--set", "train.epochs=-1"],
        "train.epochs",
    ),
    ("train-unknown-device", lambda w: ["train", *PROFILE, "--set", "train.device=tpu"], "tpu"),
    ("train-resume-missing", lambda w: ["train", "--resume", P(w, "missing-run")], "missing-run"),
    ("train-resume-no-checkpoint", lambda w: ["train", "--resume", P(w, "norun")], "norun"),
    (
        "train-bad-model-arg",
        lambda w: ["train", *PROFILE, "--set", "model.args.latent_dimm=4"],
        "latent_dimm",
    ),
    (
        "train-resume-changes-lr",
        lambda w: ["train", "--resume", P(w, "run"), "--set", "train.lr=0.5"],
        "train.lr",
    ),
    (
        "train-resume-changes-compile",
        lambda w: ["train", "--resume", P(w, "run"), "--compile", "on"],
        "--compile",
    ),
    # ---- tile-test
    ("tiletest-run-missing", lambda w: ["tile-test", "--run", P(w, "missing-run")], "missing-run"),
    ("tiletest-run-is-file", lambda w: ["tile-test", "--run", P(w, "text.txt")], "text.txt"),
    ("tiletest-text-checkpoint", lambda w: ["tile-test", "--run", P(w, "text")], "best.pt"),
    ("tiletest-empty-checkpoint", lambda w: ["tile-test", "--run", P(w, "empty")], "best.pt"),
    ("tiletest-foreign-checkpoint", lambda w: ["tile-test", "--run", P(w, "tensor")], "best.pt"),
    ("tiletest-malicious-checkpoint", lambda w: ["tile-test", "--run", P(w, "pickle")], "best.pt"),
    (
        "tiletest-prepared-wrong-kind",
        lambda w: [
            "tile-test",
            "--run",
            P(w, "run"),
            "--prepared",
            str(w["home"] / "work" / "synthetic-ae" / "patches.h5"),
        ],
        "patches.h5",
    ),
    (
        "tiletest-export-maps-is-file",
        lambda w: ["tile-test", "--run", P(w, "run"), "--export-maps", P(w, "text.txt")],
        "text.txt",
    ),
    (
        "tiletest-stride-too-large",
        lambda w: ["tile-test", *PROFILE, "--set", "tile.stride=64"],
        "tile.stride",
    ),
    (
        "tiletest-unknown-residual",
        lambda w: ["tile-test", *PROFILE, "--set", "tile.residual={ssmi=1}"],
        "ssmi",
    ),
    (
        "tiletest-out-is-folder",
        lambda w: ["tile-test", "--run", P(w, "run"), "--out", P(w, "folder.h5")],
        "folder.h5",
    ),
    # ---- score
    (
        "score-residuals-missing",
        lambda w: ["score", "--residuals", P(w, "missing.h5")],
        "missing.h5",
    ),
    (
        "score-residuals-wrong-kind",
        lambda w: ["score", "--residuals", str(w["home"] / "work" / "synthetic" / "prepared.h5")],
        "prepared.h5",
    ),
    ("score-residuals-text", lambda w: ["score", "--residuals", P(w, "text.txt")], "text.txt"),
    (
        "score-bad-protocol",
        lambda w: ["score", "--run", P(w, "run"), "--protocol", "kaggle"],
        "kaggle",
    ),
    (
        "score-gt-missing",
        lambda w: ["score", "--run", P(w, "run"), "--gt", P(w, "missing-gt")],
        "missing-gt",
    ),
    (
        "score-gt-unreadable-mask",
        lambda w: ["score", "--run", P(w, "run"), "--gt", P(w, "gt")],
        "000_mask.png",
    ),
    ("score-run-missing", lambda w: ["score", "--run", P(w, "missing-run")], "missing-run"),
    # ---- export
    ("export-no-run", lambda w: ["export"], "--run"),
    (
        "export-unknown-format",
        lambda w: ["export", "--run", P(w, "run"), "--format", "tflite"],
        "tflite",
    ),
    (
        "export-negative-tolerance",
        lambda w: ["export", "--run", P(w, "run"), "--tolerance", "-1"],
        "--tolerance",
    ),
    (
        "export-bad-tolerance",
        lambda w: ["export", "--run", P(w, "run"), "--tolerance", "abc"],
        "--tolerance",
    ),
    ("export-no-checkpoint", lambda w: ["export", "--run", P(w, "norun")], "norun"),
    ("export-text-checkpoint", lambda w: ["export", "--run", P(w, "text")], "best.pt"),
    # ---- bench, profiles, usage
    ("bench-unknown-profile", lambda w: ["bench", "--profile", "nope-ae", "--quick"], "nope"),
    ("bench-unknown-device", lambda w: ["bench", "--device", "tpu", "--quick"], "tpu"),
    ("profiles-show-unknown", lambda w: ["profiles", "show", "nope-ae"], "nope"),
    ("unknown-command", lambda w: ["nonsense"], "nonsense"),
    ("unknown-option", lambda w: ["score", "--bogus"], "--bogus"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(ws, case):
    _, argv, needle = case
    before = snapshot(ws["home"])
    result = cli(ws["home"], *argv(ws))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert needle in lines[0], lines[0]
    assert snapshot(ws["home"]) == before
    assert not (ws["home"] / "pwned").exists()
