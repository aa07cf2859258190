"""Datasets as users have them: a manifest (CSV or JSON lines), pattern-matched folders with a
label bitmap per image (KolektorSDD as distributed), plain folders labelled by their masks;
group-aware splits, the split file, `prepare --dry-run`, and the one-line bad-input errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from builders import TINY_TRAINING, defectae
from PIL import Image

from defectae import profiles
from defectae.data.manifest import list_manifest
from defectae.data.patterns import group_of, group_rule, list_patterns, mask_path
from defectae.data.split import assign_splits
from defectae.errors import DefectaeError
from defectae.stores.prepared import read_split

SIDE = 64
BASE = ["--profile", "mvtec-bottle-ae", "--set", "dataset.color=gray"]
SMALL = ["--set", f"dataset.image_size=[{SIDE}, {SIDE}]"]


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _noise(seed: int, side: int = SIDE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)


def _mask(defective: bool, side: int = SIDE) -> np.ndarray:
    m = np.zeros((side, side), np.uint8)
    if defective:
        m[10:20, 12:30] = 255
    return m


def make_kolektor(root: Path, parts: int = 8, defective: tuple[int, ...] = (2, 5)) -> Path:
    """ROOT/kosNN/Part0..7.jpg with PartK_label.bmp beside each; part p's view p % 8 is defective
    when p is in `defective`."""
    for p in range(1, parts + 1):
        for k in range(8):
            folder = root / f"kos{p:02d}"
            _save(folder / f"Part{k}.jpg", _noise(100 * p + k))
            _save(folder / f"Part{k}_label.bmp", _mask(p in defective and k == p % 8))
    return root


def make_images(root: Path, n: int, bad: set[int]) -> Path:
    """ROOT/img/NNN.png and ROOT/masks/NNN.png (defect rectangle for indices in `bad`)."""
    for i in range(n):
        _save(root / "img" / f"{i:03d}.png", _noise(i))
        _save(root / "masks" / f"{i:03d}.png", _mask(i in bad))
    return root


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def splits_file(out: Path) -> list[dict[str, str]]:
    with out.with_name(f"{out.stem}.splits.csv").open() as f:
        return list(csv.DictReader(f))


def prepare(home: Path, root: Path, out: Path, *sets: str, code: int = 0):
    args = [a for s in sets for a in ("--set", s)]
    return defectae(
        home, "prepare", *BASE, *SMALL, "--root", str(root), "--out", str(out), *args, code=code
    )


def errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------- patterns


KOLEKTOR = [
    "dataset.layout=patterns",
    "dataset.patterns.images=['kos*/Part*.jpg']",
    "dataset.patterns.mask={stem}_label.bmp",
    "dataset.patterns.group=folder",
]


def test_kolektor_tree_as_distributed(tmp_path: Path) -> None:
    root, out = make_kolektor(tmp_path / "ksdd"), tmp_path / "p.h5"
    summary = json.loads(prepare(tmp_path / "home", root, out, *KOLEKTOR).stdout)
    # 64 images, no label bitmap among them; the two parts with a defective view go to test
    assert sum(summary["splits"].values()) == 64 and summary["groups"] == 6
    assert summary["splits"]["test_defect"] == 2 and summary["defect_types"] == {"defect": 2}
    rows = splits_file(out)
    assert len(rows) == 64 and not any("_label" in r["file"] for r in rows)
    by_group: dict[str, set[str]] = {}
    for r in rows:
        by_group.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_group.values()) and len(by_group) == 8
    assert by_group["kos02"] == by_group["kos05"] == {"test"}
    bad = {r["file"] for r in rows if r["label"] == "1"}
    assert bad == {"kos02/Part2.jpg", "kos05/Part5.jpg"}
    test = read_split(out, "test")
    i = test.files.index("kos05/Part5.jpg")
    assert (
        test.labels[i] == 1 and test.masks[i, 0, 10:20, 12:30].all() and test.masks[i].sum() == 180
    )
    assert set(test.names) >= {"kos05_Part5", "kos05_Part0"}  # names unique across folders


def test_kolektor_split_mode_leaves_defective_views_out(tmp_path: Path) -> None:
    root, out = make_kolektor(tmp_path / "ksdd", defective=tuple(range(1, 9))), tmp_path / "p.h5"
    sets = [*KOLEKTOR, "dataset.defective_groups=split", "dataset.test_fraction=0.25"]
    proc = prepare(tmp_path / "home", root, out, *sets)
    summary = json.loads(proc.stdout)
    rows = splits_file(out)
    left = [r for r in rows if r["split"] == "left_out"]
    assert (
        summary["left_out"] == len(left) == 6 and f"{len(left)} defective image(s)" in proc.stderr
    )
    assert all(r["label"] == "1" for r in left)
    assert summary["splits"]["test_defect"] == 2 and summary["splits"]["train"] == 5 * 7
    for split in ("train", "validation"):
        assert (read_split(out, split).labels == 0).all()


def test_mask_templates_and_group_rules(tmp_path: Path) -> None:
    image = tmp_path / "a" / "b" / "x.jpg"
    for template, expected in [
        ("{stem}_label.bmp", "a/b/x_label.bmp"),
        ("{name}.png", "a/b/x.jpg.png"),
        ("../../masks/{parent}/{stem}.png", "a/b/../../masks/b/x.png"),
        ("../../gt/{dir}/{stem}.png", "a/b/../../gt/a/b/x.png"),
    ]:
        assert mask_path(image, tmp_path, template) == tmp_path / expected
    assert mask_path(image, tmp_path, "") is None
    with pytest.raises(DefectaeError, match=r"dataset.patterns.mask '\{stm\}.png': expected"):
        mask_path(image, tmp_path, "{stm}.png")
    assert group_of("kos01/Part3.jpg", group_rule("folder")) == "kos01"
    assert group_of("kos01/Part3.jpg", group_rule("none")) == ""
    assert group_of("lot7_part12_view3.png", group_rule(r"part(?P<group>\d+)")) == "12"
    assert group_of("lot7_part12_view3.png", group_rule(r"lot\d+")) == "lot7"
    with pytest.raises(DefectaeError, match="x.png: path does not match dataset.patterns.group"):
        group_of("x.png", group_rule(r"lot\d+"))


# ----------------------------------------------------------------------------- manifests


def test_manifest_with_every_column(tmp_path: Path) -> None:
    root = make_images(tmp_path / "data", 12, bad={9, 10, 11})
    rows = []
    for i in range(12):
        kind = "good" if i < 9 else ("scratch" if i < 11 else "dent")
        split = {0: "validation", 2: "train", 9: "test"}.get(i, "")
        rows.append([f"img/{i:03d}.png", f"masks/{i:03d}.png", kind, split, f"part{i // 2}"])
    write_csv(root / "labels.csv", ["image", "mask", "label", "split", "group"], rows)
    out = tmp_path / "p.h5"
    summary = json.loads(prepare(tmp_path / "home", root, out, "dataset.layout=manifest").stdout)
    assert summary["defect_types"] == {"dent": 1, "scratch": 2} and summary["groups"] == 4
    split_of = {r["file"]: r["split"] for r in splits_file(out)}
    # explicit splits hold for the whole group; the group of a defective row goes to test
    assert split_of["img/000.png"] == split_of["img/001.png"] == "validation"
    assert split_of["img/002.png"] == split_of["img/003.png"] == "train"
    assert split_of["img/008.png"] == "test"  # part4 holds the defective 009
    test = read_split(out, "test")
    i = test.files.index("img/011.png")
    assert (test.defect_types[i], test.labels[i]) == ("dent", 1) and test.masks[i].sum() == 180


def test_manifest_with_image_and_label_only(tmp_path: Path) -> None:
    root = make_images(tmp_path / "data", 10, bad=set())
    labels = ["good"] * 8 + ["crack", "hole"]
    write_csv(
        tmp_path / "list.csv",
        ["image", "label", "note"],
        [[str(root / "img" / f"{i:03d}.png"), labels[i], "x"] for i in range(10)],
    )
    out = tmp_path / "p.h5"
    sets = ["dataset.layout=manifest", f"dataset.manifest.file={tmp_path / 'list.csv'}"]
    proc = prepare(tmp_path / "home", root, out, *sets)
    summary = json.loads(proc.stdout)
    assert summary["defect_types"] == {"crack": 1, "hole": 1} and summary["empty_defect_masks"] == 2
    assert (
        summary["splits"]["train"]
        + summary["splits"]["validation"]
        + summary["splits"]["test_good"]
        == 8
    )
    assert "all-zero mask and stay labelled defective" in proc.stderr


def test_a_test_split_without_defects_is_warned(tmp_path: Path) -> None:
    root = make_images(tmp_path / "data", 10, bad=set())
    write_csv(
        tmp_path / "list.csv",
        ["image", "label"],
        [[str(root / "img" / f"{i:03d}.png"), "good"] for i in range(10)],
    )
    sets = ["dataset.layout=manifest", f"dataset.manifest.file={tmp_path / 'list.csv'}"]
    proc = prepare(tmp_path / "home", root, tmp_path / "p.h5", *sets)
    assert json.loads(proc.stdout)["splits"]["test_defect"] == 0
    assert "the test split holds no defective image" in proc.stderr


def test_manifest_labels_from_masks(tmp_path: Path) -> None:
    root = make_images(tmp_path / "data", 10, bad={3, 7})
    write_csv(
        root / "labels.csv",
        ["image", "mask"],
        [[f"img/{i:03d}.png", f"masks/{i:03d}.png"] for i in range(10)],
    )
    out = tmp_path / "p.h5"
    sets = ["dataset.layout=manifest", "dataset.manifest.default_type=flaw"]
    summary = json.loads(prepare(tmp_path / "home", root, out, *sets).stdout)
    assert summary["defect_types"] == {"flaw": 2} and summary["splits"]["test_defect"] == 2
    bad = {r["file"] for r in splits_file(out) if r["label"] == "1"}
    assert bad == {"img/003.png", "img/007.png"}


def test_maskless_jsonl_manifest_with_image_level_labels(tmp_path: Path) -> None:
    root = make_images(tmp_path / "data", 10, bad=set())
    lines = [
        {"image": f"img/{i:03d}.png", "label": "good" if i < 7 else "stain", "group": f"g{i // 2}"}
        for i in range(10)
    ]
    (root / "labels.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "p.h5"
    sets = ["dataset.layout=manifest", "dataset.manifest.file=labels.jsonl"]
    summary = json.loads(prepare(tmp_path / "home", root, out, *sets).stdout)
    assert summary["splits"]["test_defect"] == 3 and summary["groups"] == 3  # g3, g4 hold stains
    split_of = {r["file"]: r["split"] for r in splits_file(out)}
    assert split_of["img/006.png"] == "test"  # good, but in group g3 with the stained 007
    test = read_split(out, "test")
    assert test.masks[np.asarray(test.labels) == 1].sum() == 0


# ----------------------------------------------------------------------------- folders


def make_folders(root: Path) -> Path:
    """good/ (one with a defect mask), scratch/ (two defective, one clean mask, one maskless)."""
    for i in range(8):
        _save(root / "good" / f"{i:03d}.png", _noise(i))
    _save(root / "good" / "007_mask.png", _mask(True))
    for i in range(4):
        _save(root / "scratch" / f"s_{i:03d}.png", _noise(50 + i))
        if i < 3:
            _save(root / "scratch" / f"s_{i:03d}_mask.png", _mask(i < 2))
    return root


@pytest.mark.parametrize(
    ("sets", "types"),
    [
        ([], {"scratch": 2, "defect": 1}),  # the folder name; a defect in good/ gets "defect"
        (["dataset.folders.default_type=flaw"], {"flaw": 3}),
        ([r"dataset.folders.type_pattern=^(?P<type>[a-z]+)_|^\d+"], None),
    ],
)
def test_folders_labelled_by_their_masks(tmp_path: Path, sets: list[str], types) -> None:
    root, out = make_folders(tmp_path / "f"), tmp_path / "p.h5"
    all_sets = ["dataset.layout=folders", "dataset.folders.label_from_mask=true", *sets]
    if types is None:  # 007.png matches without a type: one line naming it
        proc = prepare(tmp_path / "home", root, out, *all_sets, code=2)
        assert "good/007.png: file name does not match dataset.folders.type_pattern" in proc.stderr
        return
    summary = json.loads(prepare(tmp_path / "home", root, out, *all_sets).stdout)
    assert summary["defect_types"] == dict(sorted(types.items()))
    good = {r["file"] for r in splits_file(out) if r["label"] == "0"}
    assert {"scratch/s_002.png", "scratch/s_003.png"} <= good and "good/007.png" not in good


# ----------------------------------------------------------------------------- splits


@pytest.mark.parametrize("mode", ["test", "split"])
def test_no_group_ever_lands_in_two_splits(tmp_path: Path, mode: str) -> None:
    root = make_kolektor(tmp_path / "ksdd", parts=10, defective=(1, 4, 6, 7))
    pat = profiles.resolve("mvtec-bottle-ae", KOLEKTOR).dataset
    listing = list_patterns(root, pat.patterns)
    rows = [
        [f"img/{i:03d}.png", "", "good" if i % 7 else "dent", "", f"g{i % 9}"] for i in range(40)
    ]
    make_images(tmp_path / "m", 40, set())
    write_csv(tmp_path / "m" / "labels.csv", ["image", "mask", "label", "split", "group"], rows)
    manifest = list_manifest(tmp_path / "m", pat.manifest)
    part = {r[0]: r[4] for r in rows}  # the groups as written, not as the code derives them
    part |= {s.file: s.file.split("/")[0] for s in listing.pool + listing.test}
    for seed in range(20):
        for lst in (listing, manifest):
            fractions = {
                "val_fraction": 0.1 + seed % 3 * 0.1,
                "test_fraction": 0.1 + seed % 4 * 0.1,
            }
            cfg = profiles.resolve(
                "mvtec-bottle-ae",
                [f"dataset.seed={seed}", f"dataset.defective_groups={mode}"]
                + [f"dataset.{k}={v}" for k, v in fractions.items()],
            ).dataset
            plan = assign_splits(lst, cfg, "patterns")
            where: dict[str, set[str]] = {}
            for name, samples in plan.splits.items():
                for s in samples:
                    where.setdefault(part[s.file], set()).add(name)
            assert all(len(v) == 1 for v in where.values()), seed
            assert not any(s.label for n in ("train", "validation") for s in plan.splits[n])
            n_images = sum(len(v) for v in plan.splits.values()) + len(plan.left_out)
            assert n_images == len(lst.pool) + len(lst.test)
            if mode == "test":
                assert not plan.left_out
                assert all(where[part[s.file]] == {"test"} for s in lst.test)


# ----------------------------------------------------------------------------- bad input


def _manifest_case(root: Path, case: str) -> list[str]:
    make_images(root, 8, bad={6, 7})
    rows = [[f"img/{i:03d}.png", f"masks/{i:03d}.png", "", "", f"p{i // 2}"] for i in range(8)]
    sets = ["dataset.layout=manifest"]
    if case == "missing":
        rows[1][0] = "img/nope.png"
    elif case == "size":
        _save(root / "masks" / "004.png", np.zeros((32, 32), np.uint8))
    elif case == "label":
        rows[6][2] = "scratchy"
        sets.append("dataset.manifest.types=['scratch', 'dent']")
    elif case == "split":
        rows[0][3] = "training"
    elif case == "group":
        rows[0][3], rows[1][3] = "train", "test"
    elif case == "defect":
        rows[7][3] = "validation"
    elif case == "empty":
        rows = [r for r in rows if r[4] in ("p0", "p3")]
    write_csv(root / "labels.csv", ["image", "mask", "label", "split", "group"], rows)
    return sets


BAD = {
    "missing": "labels.csv line 3: image file not found: ",
    "size": "masks/004.png: mask is 32x32 but its image ",
    "label": "labels.csv line 8: label 'scratchy': expected good or one of scratch, dent",
    "split": "labels.csv line 2: split 'training': expected train, validation or test",
    "group": "labels.csv line 3: group 'p0' is in split 'test' here but 'train' on line 2",
    "defect": "labels.csv line 9: defective image img/007.png ('defect') in the validation split",
    "empty": "the validation split is empty after splitting 1 group(s)",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    root, out = tmp_path / "data", tmp_path / "out" / "p.h5"
    sets = _manifest_case(root, case)
    proc = prepare(tmp_path / "home", root, out, *sets, code=2)
    assert len(errors(proc)) == 1 and BAD[case] in errors(proc)[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.parent.exists()


# ----------------------------------------------------------------------------- dry run


def test_dry_run_reports_and_writes_nothing(tmp_path: Path) -> None:
    root = make_kolektor(tmp_path / "ksdd")
    home, out = tmp_path / "home", tmp_path / "out" / "p.h5"
    before = sorted(root.rglob("*"))
    common = ["prepare", *BASE, *SMALL, "--root", str(root), "--out", str(out)]
    common += [a for s in KOLEKTOR for a in ("--set", s)]
    args = [*common, "--dry-run"]
    summary = json.loads(defectae(home, *args).stdout)
    assert summary["counts"]["test"]["defect"] == 2 and summary["problems"] == []
    assert summary["sizes"] == {f"{SIDE}x{SIDE} L": 64} and len(summary["examples"]) == 3
    ex = summary["examples"][0]
    assert ex["defect_type"] == "defect" and ex["mask"] == ex["image"].replace(".jpg", "_label.bmp")

    _save(root / "kos03" / "Part4_label.bmp", np.zeros((32, SIDE), np.uint8))
    (root / "kos04" / "Part1.jpg").write_bytes(b"not a jpeg")
    before = sorted(root.rglob("*"))
    proc = defectae(home, *args, code=1)
    problems = json.loads(proc.stdout)["problems"]
    assert len(problems) == 2
    assert any(p.startswith(f"{root}/kos03/Part4_label.bmp: mask is 32x64") for p in problems)
    assert any(
        p.startswith(f"{root}/kos04/Part1.jpg: unreadable or truncated image") for p in problems
    )
    assert sorted(root.rglob("*")) == before and not home.exists() and not out.parent.exists()
    # without --dry-run the first problem stops prepare before anything is written
    proc = defectae(home, *common, code=2)
    assert "mask is 32x64" in errors(proc)[0] or "unreadable or truncated" in errors(proc)[0]
    assert "and 1 more: see prepare --dry-run" in errors(proc)[0] and not out.parent.exists()


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_kolektor_tree_through_the_pipeline(tmp_path: Path) -> None:
    root, home = make_kolektor(tmp_path / "ksdd"), tmp_path / "home"
    sets = [*KOLEKTOR, f"dataset.image_size=[{SIDE}, {SIDE}]", *TINY_TRAINING]
    profile = [*BASE, "--root", str(root), *(a for s in sets for a in ("--set", s))]
    summary = json.loads(defectae(home, "run", *profile).stdout)  # the five stages, one process
    assert [s["status"] for s in summary["stages"].values()] == ["ran"] * 5
    report = json.loads(Path(summary["metrics_json"]).read_text())
    assert report["counts"]["defective"] == 2
    assert report["ground_truth_masks"] == {"defective_images": 2, "without_mask": 0}
    assert report["metrics"]["image_auroc"] is not None


def _manifest_shape(root: Path, shape: str) -> list[str]:
    """A manifest dataset of one shape under root; the --set keys that read it."""
    if shape == "all-columns":
        make_images(root, 12, bad={9, 10, 11})
        rows = [
            [
                f"img/{i:03d}.png",
                f"masks/{i:03d}.png",
                "good" if i < 9 else "scratch",
                "",
                f"p{i // 2}",
            ]
            for i in range(12)
        ]
        write_csv(root / "labels.csv", ["image", "mask", "label", "split", "group"], rows)
    elif shape == "image-and-mask":  # labels from the masks
        make_images(root, 12, bad={9, 10, 11})
        rows = [[f"img/{i:03d}.png", f"masks/{i:03d}.png"] for i in range(12)]
        write_csv(root / "labels.csv", ["image", "mask"], rows)
    else:  # mask-less: image-level labels only
        make_images(root, 12, bad=set())
        rows = [[f"img/{i:03d}.png", "good" if i < 9 else "stain"] for i in range(12)]
        write_csv(root / "labels.csv", ["image", "label"], rows)
    return ["dataset.layout=manifest", "dataset.manifest.file=labels.csv"]


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["all-columns", "image-and-mask", "mask-less"])
def test_manifest_shapes_through_the_pipeline(tmp_path: Path, shape: str) -> None:
    """Each manifest shape through prepare, augment, a one-epoch train, tile-test and score
    (`defectae run`: one process for the five stages)."""
    root = tmp_path / "data"
    sets = [*_manifest_shape(root, shape), f"dataset.image_size=[{SIDE}, {SIDE}]", *TINY_TRAINING]
    profile = [*BASE, "--root", str(root), *(a for s in sets for a in ("--set", s))]
    summary = json.loads(defectae(tmp_path / "home", "run", *profile).stdout)
    assert [s["status"] for s in summary["stages"].values()] == ["ran"] * 5
    report = json.loads(Path(summary["metrics_json"]).read_text())
    assert report["counts"]["defective"] == 3
    assert report["metrics"]["image_auroc"] is not None
    pixel_defined = report["metrics"]["pixel_auroc"] is not None
    assert pixel_defined == (shape != "mask-less")


def test_dry_run_names_every_manifest_problem(tmp_path: Path) -> None:
    root = make_images(tmp_path / "data", 8, bad={7})
    (root / "masks" / "002.png").unlink()
    rows = [[f"img/{i:03d}.png", f"masks/{i:03d}.png"] for i in range(8)] + [["img/005.png", ""]]
    write_csv(root / "labels.csv", ["image", "mask"], rows)
    args = ["prepare", *BASE, *SMALL, "--root", str(root), "--set", "dataset.layout=manifest"]
    proc = defectae(tmp_path / "home", *args, "--dry-run", code=1)
    summary = json.loads(proc.stdout)
    manifest = root / "labels.csv"
    assert summary["problems"] == [
        f"{manifest} line 4: mask file not found: {root / 'masks' / '002.png'}",
        f"{manifest} line 10: image img/005.png is listed twice (also line 7)",
    ]
    assert sum(sum(c.values()) for c in summary["counts"].values()) == 7
    assert all(p in proc.stderr for p in ("line 4", "line 10")) and not (tmp_path / "home").exists()


def test_an_absolute_image_pattern_is_one_line(tmp_path: Path) -> None:
    from defectae.data.patterns import find_images
    from defectae.profiles.schema import PatternsOptions

    opts = PatternsOptions(images=[str(tmp_path / "*.png")], mask="{stem}_label.bmp")
    with pytest.raises(DefectaeError, match="expected a glob pattern relative to root"):
        find_images(tmp_path, opts)
