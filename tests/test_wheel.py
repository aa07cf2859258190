"""The built wheel is a working install on its own: it carries the shipped profiles as package data,
and from a fresh virtualenv, outside the checkout, `profiles list` and the synthetic pipeline run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import h5py
import pytest
from builders import TINY_SYNTHETIC, TINY_TRAINING
from sklearn.metrics import roc_auc_score

from defectae.profiles.load import read_toml

ROOT = Path(__file__).resolve().parents[1]
SETS = [
    *TINY_SYNTHETIC,
    *TINY_TRAINING,
]
OVERRIDES = [a for s in SETS for a in ("--set", s)]


def _packages_on_disk() -> set[str]:
    """Every package the wheel must hold: defectae's folders with an __init__.py, and the
    profiles/ folders, which ship as defectae._profiles."""
    code = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "defectae").rglob("__init__.py")
    }
    data = {
        ".".join(("defectae", "_profiles", *d.relative_to(ROOT / "profiles").parts))
        for d in [ROOT / "profiles", *(ROOT / "profiles").rglob("*")]
        if d.is_dir() and any(d.glob("*.toml"))
    }
    return code | data


def test_pyproject_lists_every_package_and_profile_folder() -> None:
    config = read_toml(ROOT / "pyproject.toml")["tool"]["setuptools"]
    assert set(config["packages"]) == _packages_on_disk()
    assert config["package-dir"] == {"defectae._profiles": "profiles"}


def _isolation_flags() -> list[str]:
    """Build offline with this environment's backend when it meets build-system.requires (it does
    after `make install`); otherwise let pip fetch the backend into an isolated build env."""
    from packaging.requirements import Requirement

    for text in read_toml(ROOT / "pyproject.toml")["build-system"]["requires"]:
        req = Requirement(text)
        try:
            if not req.specifier.contains(metadata.version(req.name), prereleases=True):
                return []
        except metadata.PackageNotFoundError:
            return []
    return ["--no-build-isolation"]


def _source_copy(dest: Path) -> Path:
    """The files a commit would hold (tracked or untracked, not ignored), copied to `dest`: a
    build in the checkout would leave build/ behind and could pack stale modules from it."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in filter(None, listed.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """defectae built as a wheel by pip, from a copy of the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp / "src")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", *_isolation_flags()]
    proc = subprocess.run(
        [*cmd, "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = (tmp / "dist").glob("defectae-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtualenv outside the checkout with only the wheel installed; the dependencies
    (torch and the rest) come from this environment's site-packages through a .pth file."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps"]
    proc = subprocess.run([*install, "--no-index", str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Written after the install, so pip never sees the checkout's editable defectae.
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    outer = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (Path(own) / "outer-dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(outer)))
    return venv


def _run(venv: Path, cwd: Path, *args: str) -> str:
    """A command of the fresh virtualenv, run in `cwd` with no path leading to the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DEFECTAE_PROFILES")}
    env |= {"DEFECTAE_HOME": str(cwd), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_wheel_holds_the_shipped_profiles_and_no_top_level_folders(wheel) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {
        "defectae/_profiles/" + p.relative_to(ROOT / "profiles").as_posix()
        for p in (ROOT / "profiles").rglob("*.toml")
    }
    assert shipped and {n for n in names if n.startswith("defectae/_profiles/")} == shipped
    assert "defectae/_profiles/synthetic-ae.toml" in names
    top = {n.split("/")[0] for n in names} - {"defectae"}
    assert len(top) == 1 and top.pop().endswith(".dist-info")


@pytest.mark.slow
def test_installed_wheel_lists_profiles_and_runs_the_synthetic_pipeline(venv, tmp_path) -> None:
    where = _run(
        venv,
        tmp_path,
        "python",
        "-c",
        "import defectae; from defectae.profiles.load import profile_dirs; "
        "print(defectae.__file__); print(*profile_dirs(), sep='\\n')",
    ).split()
    assert len(where) == 2 and Path(where[1]).name == "_profiles", where
    assert all(Path(p).resolve().is_relative_to(venv.resolve()) for p in where), where

    listed = json.loads(_run(venv, tmp_path, "defectae", "--json", "profiles", "list"))
    assert {"synthetic-ae", "magnetic-tile-dfr"} <= set(listed["pairs"])
    assert {"synthetic", "magnetic-tile"} <= set(listed["datasets"])
    assert {"ae", "dfr"} <= set(listed["models"])

    def step(*args: str) -> dict:
        return json.loads(_run(venv, tmp_path, "defectae", "--json", *args, *OVERRIDES))

    step("prepare", "--synthetic", "woven")
    for command in ("augment", "train"):
        step(command, "--profile", "synthetic-ae")
    residuals = step("tile-test", "--profile", "synthetic-ae")["residuals"]
    scored = step("score", "--profile", "synthetic-ae")
    assert Path(scored["metrics_json"]).resolve().is_relative_to(tmp_path.resolve())
    with h5py.File(residuals) as f:
        labels, scores = f["test/labels"][()], f["test/scores"][()]
    assert "image_auroc" not in scored["undefined"]
    assert scored["metrics"]["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
