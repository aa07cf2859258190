"""Profiles: name resolution, overrides, shipped dataset profiles and every validation error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from defectae import profiles
from defectae.errors import DefectaeError
from defectae.profiles.load import available, to_toml

MVTEC = (
    "bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush "
    "transistor wood zipper"
).split()
MVTEC3D = "bagel cable_gland carrot cookie dowel foam peach potato rope tire".split()


@pytest.fixture
def user_profiles(tmp_path: Path, monkeypatch) -> Path:
    """A DEFECTAE_PROFILES folder with a tiny dataset, a tiny model and their pair file."""
    d = tmp_path / "profiles"
    (d / "datasets").mkdir(parents=True)
    (d / "models").mkdir()
    (d / "datasets" / "tiny.toml").write_text(
        '# tiny\n[dataset]\nlayout = "folders"\nroot = "data/tiny"\nimage_size = [64, 64]\n'
    )
    (d / "models" / "small.toml").write_text(
        '# small\n[model]\nfamily = "ae"\ninput_size = 32\n[model.args]\nlatent_dim = 8\n[train]\nepochs = 5\n'
    )
    (d / "tiny-small.toml").write_text("[train]\nepochs = 7\n[model.args]\nwidth = 4\n")
    monkeypatch.setenv("DEFECTAE_PROFILES", str(d))
    return d


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- resolution


def test_name_resolves_dataset_and_model() -> None:
    p = profiles.resolve("magnetic-tile-ae")
    assert p.name == "magnetic-tile-ae"
    assert p.dataset.name == "magnetic-tile" and p.model.name == "ae"
    assert p.dataset.layout == "folders" and p.dataset.folders.type_prefix == "MT_"
    assert p.dataset.image_size == (256, 256) and p.dataset.channels == 1
    assert p.model.family == "ae" and p.loss.recon == "mse"  # the pair file magnetic-tile-ae.toml
    assert p.model.input_size == 64 and profiles.resolve("texture1-ae").loss.recon == "ssim"


def test_shipped_dataset_profiles() -> None:
    names = available("datasets")
    expected = [f"mvtec-{c}" for c in MVTEC] + [f"mvtec3d-{c}" for c in MVTEC3D]
    expected += ["texture1", "texture2", "aitex", "magnetic-tile", "synthetic", "synthetic-grid"]
    assert set(expected) <= set(names)
    for name in expected:
        p = profiles.resolve(f"{name}-ae")
        assert p.dataset.name == name and p.dataset.root
    for c in MVTEC:
        ds = profiles.resolve(f"mvtec-{c}-ae").dataset
        assert ds.category == c and ds.layout == "mvtec"
        assert ds.color == ("gray" if c in ("grid", "screw", "zipper") else "rgb")
    for n in (1, 2):
        ds = profiles.resolve(f"texture{n}-ae").dataset
        assert (ds.category, ds.image_size, ds.color) == (f"texture_{n}", (512, 512), "gray")
    assert profiles.resolve("synthetic-grid-ae").dataset.synthetic.texture == "grid"
    assert all(profiles.resolve(f"mvtec3d-{c}-ae").dataset.color == "rgb" for c in MVTEC3D)


def test_every_dataset_profile_starts_with_a_comment() -> None:
    shipped = sorted((Path(__file__).resolve().parents[1] / "profiles" / "datasets").glob("*.toml"))
    assert len(shipped) >= 20, "the shipped dataset profiles were not found"
    for path in shipped:
        assert path.read_text().startswith("# "), path


def test_set_overrides_are_typed() -> None:
    p = profiles.resolve(
        "magnetic-tile-ae",
        [
            "dataset.image_size=[64, 32]",
            "train.epochs=3",
            "dataset.color=rgb",
            "train.lr=0.01",
            "dataset.folders.image_exts=['.bmp']",
            "train.compile=false",
            "dataset.train_list=x y.txt",
        ],
    )
    assert p.dataset.image_size == (64, 32) and p.train.epochs == 3 and p.dataset.color == "rgb"
    assert (
        p.train.lr == 0.01 and p.dataset.folders.image_exts == [".bmp"] and p.train.compile is False
    )
    assert p.dataset.train_list == "x y.txt"


def test_root_override() -> None:
    assert profiles.resolve("magnetic-tile-ae", [], "/data/mt").dataset.root == "/data/mt"
    # --root wins over --set dataset.root
    assert profiles.resolve("magnetic-tile-ae", ["dataset.root=/a"], "/b").dataset.root == "/b"


def test_pair_file_overrides_the_model(user_profiles: Path) -> None:
    p = profiles.resolve("tiny-small")
    assert p.train.epochs == 7  # pair file beats the model file
    assert p.model.args == {"latent_dim": 8, "width": 4}  # model.args merge key by key
    assert p.dataset.image_size == (64, 64)
    assert profiles.resolve("tiny-small", ["train.epochs=9"]).train.epochs == 9  # --set beats both


def test_profile_path_and_base(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "mine.toml",
        'base = "magnetic-tile-ae"\n[train]\nepochs = 2\n[dataset]\nseed = 4\n',
    )
    p = profiles.resolve(path)
    assert p.name == "mine" and p.train.epochs == 2 and p.dataset.seed == 4
    assert p.dataset.layout == "folders" and p.model.family == "ae"
    plain = _write(tmp_path / "plain.toml", '[dataset]\nlayout = "mvtec"\nroot = "r"\n')
    q = profiles.resolve(plain)
    assert q.dataset.root == "r" and q.train == profiles.TrainConfig()


def test_round_trip_to_toml(tmp_path: Path) -> None:
    for name in ("magnetic-tile-ae", "aitex-ae", "mvtec-zipper-ae", "synthetic-ae"):
        p = profiles.resolve(name, ["train.epochs=3"], "/somewhere")
        path = _write(tmp_path / f"{name}.toml", to_toml(p))
        assert profiles.resolve(path) == p
        assert profiles.from_dict(profiles.to_dict(p)) == p
        written = profiles.write_profile(p, tmp_path / name)
        assert profiles.load_written(written) == p


# ----------------------------------------------------------------------------- errors


def _error(name: str, sets: list[str] | None = None) -> str:
    with pytest.raises(DefectaeError) as e:
        profiles.resolve(name, sets or [])
    message = str(e.value)
    assert "\n" not in message
    return message


def test_unknown_key_suggests_the_nearest() -> None:
    msg = _error("magnetic-tile-ae", ["dataset.imag_size=[8, 8]"])
    assert (
        msg
        == "--set dataset.imag_size: unknown key 'dataset.imag_size'; did you mean 'image_size'?"
    )
    assert "did you mean 'epochs'" in _error("magnetic-tile-ae", ["train.epoch=1"])


def test_unknown_key_in_a_file_names_the_file(user_profiles: Path) -> None:
    _write(
        user_profiles / "datasets" / "tiny.toml", '[dataset]\nlayout = "folders"\ncolour = "gray"\n'
    )
    msg = _error("tiny-small")
    assert msg.startswith(str(user_profiles / "datasets" / "tiny.toml"))
    assert "unknown key 'dataset.colour'; did you mean 'color'?" in msg


def test_pair_file_errors_name_the_pair_file(user_profiles: Path) -> None:
    _write(user_profiles / "tiny-small.toml", "[train]\nepochs = -1\n")
    msg = _error("tiny-small")
    assert (
        msg
        == f"{user_profiles / 'tiny-small.toml'}: key 'train.epochs': expected a value in [1, inf], got -1"
    )


def test_wrong_types() -> None:
    assert "cannot parse 'abc' as int" in _error("magnetic-tile-ae", ["dataset.seed=abc"])
    msg = _error("magnetic-tile-ae", ["dataset.seed='3'"])
    assert msg == "--set dataset.seed: key 'dataset.seed': expected an integer, got '3'"
    assert "expected one of 'gray', 'rgb'" in _error("magnetic-tile-ae", ["dataset.color=grey"])
    assert "expected a list of 2 ints" in _error("magnetic-tile-ae", ["dataset.image_size=[8]"])
    assert "expected true or false" in _error("magnetic-tile-ae", ["train.compile=1"])


def test_wrong_type_in_a_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.toml", 'base = "aitex-ae"\n[dataset.aitex]\nfabrics = "00"\n')
    assert _error(path) == f"{path}: key 'dataset.aitex.fabrics': expected a list of strs, got '00'"


def test_out_of_range() -> None:
    msg = _error("magnetic-tile-ae", ["dataset.val_fraction=0.95"])
    assert (
        msg
        == "--set dataset.val_fraction: key 'dataset.val_fraction': expected a value in [0.0, 0.9], got 0.95"
    )
    assert "expected a value in [8, 8192]" in _error(
        "magnetic-tile-ae", ["dataset.image_size=[4, 64]"]
    )


def test_unknown_section(tmp_path: Path, user_profiles: Path) -> None:
    _write(user_profiles / "datasets" / "tiny.toml", '[datset]\nlayout = "folders"\n')
    msg = _error("tiny-small")
    assert msg.endswith("unknown section 'datset' (did you mean 'dataset'?)")
    _write(user_profiles / "models" / "small.toml", "[trian]\nepochs = 1\n")
    _write(user_profiles / "datasets" / "tiny.toml", '[dataset]\nlayout = "folders"\n')
    assert "unknown section 'trian' (did you mean 'train'?)" in _error("tiny-small")
    path = _write(tmp_path / "p.toml", "[scoring]\nquantile = 0.9\n")
    assert "unknown key 'scoring'; did you mean 'score'?" in _error(path)


def test_bad_set_syntax() -> None:
    assert (
        _error("magnetic-tile-ae", ["dataset.seed"])
        == "--set 'dataset.seed': expected section.key=value"
    )
    assert _error("magnetic-tile-ae", ["seed=1"]) == "--set 'seed=1': expected section.key=value"
    assert "expected section.key=value" in _error("magnetic-tile-ae", ["dataset..seed=1"])


def test_bad_names_and_files(tmp_path: Path) -> None:
    assert "did you mean 'magnetic-tile-ae'" in _error("magnetic-tile-aa")
    assert (
        _error(str(tmp_path / "none.toml")) == f"{tmp_path / 'none.toml'}: profile file not found"
    )
    path = _write(tmp_path / "broken.toml", "[dataset\n")
    assert _error(path).startswith(f"{path}: invalid TOML")
    path = _write(tmp_path / "b.toml", "base = 3\n")
    assert _error(path) == f"{path}: key 'base': expected a profile name string"


# ----------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "400"}
    return subprocess.run(
        [sys.executable, "-m", "defectae", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_cli_profile_error_is_one_line_exit_2() -> None:
    r = _cli("profiles", "show", "magnetic-tile-ae", "--set", "dataset.colr=gray")
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "dataset.colr" in lines[0] and "did you mean 'color'" in lines[0]


def test_cli_show_prints_the_resolved_profile() -> None:
    r = _cli("profiles", "show", "magnetic-tile-ae", "--root", "/x")
    assert r.returncode == 0, r.stderr
    assert r.stdout == to_toml(profiles.resolve("magnetic-tile-ae", [], "/x"))


def test_defaults_are_not_shared_mutable_objects() -> None:
    assert profiles.TileConfig().residual is not profiles.TileConfig().residual
    a, b = profiles.Profile(), profiles.Profile()
    assert a == b and a.dataset.folders.defect_dirs is not b.dataset.folders.defect_dirs


@pytest.mark.parametrize(
    "item", ["train.lr=nan", "train.lr=inf", "loss.alpha=-inf", "model.args.dropout=nan"]
)
def test_non_finite_numbers_are_refused(item: str) -> None:
    key = item.split("=")[0]
    with pytest.raises(DefectaeError, match=rf"key '{key}': expected a finite number"):
        profiles.resolve("magnetic-tile-ae", sets=[item])


def test_every_shipped_recipe_resolves_and_is_in_make_results():
    repo = Path(__file__).resolve().parents[1]
    text = (repo / "Makefile").read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if x.startswith("RECIPES ?="))
    listed = line.split("=", 1)[1].split()
    shipped = sorted(p.stem for p in (repo / "profiles").glob("*.toml"))
    assert sorted(listed) == shipped
    for name in shipped:
        assert profiles.resolve(name).name == name
