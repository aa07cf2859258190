"""A manifest: one row per image, in a CSV file with a header row or in JSON lines (.jsonl).

    image   the image, relative to the manifest's folder (required)
    mask    its mask, relative to the same folder (optional; non-zero = defect)
    label   good or a defect type; empty or absent = from the mask (absent or all-zero = good,
            else dataset.manifest.default_type)
    split   train, validation or test; empty or absent = by val_fraction / test_fraction / seed
    group   rows sharing a group are never split apart; empty or absent = the image alone
Other columns are ignored. Defective rows belong in test; a group's explicit splits must agree.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from defectae.data.split import Listing, Sample, mask_is_defective, relative, sample_name
from defectae.errors import DefectaeError
from defectae.profiles.schema import ManifestOptions

GOOD = "good"
COLUMNS = ("image", "mask", "label", "split", "group")
SPLIT_NAMES = ("train", "validation", "test")


@dataclass(frozen=True)
class Row:
    """One manifest row: its line number and the five columns ('' where absent)."""

    line: int
    image: str
    mask: str = ""
    label: str = ""
    split: str = ""
    group: str = ""


def _row(values: dict, line: int, where: str) -> Row:
    cells = {}
    for key in COLUMNS:
        value = values.get(key)
        if value is not None and not isinstance(value, (str, int)):
            raise DefectaeError(
                f"{where} line {line}: column '{key}': expected text, got {value!r}"
            )
        cells[key] = "" if value is None else str(value).strip()
    if not cells["image"]:
        raise DefectaeError(f"{where} line {line}: no image; expected a path in column 'image'")
    return Row(line, **cells)


def read_rows(path: Path) -> list[Row]:
    """The manifest's rows; a missing 'image' column or unreadable line is a one-line error."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DefectaeError(f"{path}: cannot read the manifest ({e})") from None
    rows = []
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                values = json.loads(line)
            except json.JSONDecodeError as e:
                raise DefectaeError(f"{path} line {n}: not a JSON object ({e.msg})") from None
            if not isinstance(values, dict):
                raise DefectaeError(f"{path} line {n}: expected a JSON object, got {values!r}")
            rows.append(_row(values, n, str(path)))
    else:
        reader = csv.DictReader(text.splitlines())
        header = [h.strip() for h in reader.fieldnames or []]
        if "image" not in header:
            raise DefectaeError(
                f"{path} line 1: expected a header row with an 'image' column (and optional "
                "mask, label, split, group)"
            )
        reader.fieldnames = header
        for values in reader:
            rows.append(_row(values, reader.line_num, str(path)))
    if not rows:
        raise DefectaeError(f"{path}: the manifest names no images")
    return rows


def manifest_path(root: Path, opts: ManifestOptions) -> Path:
    """The manifest file: dataset.manifest.file, relative to root unless absolute."""
    path = Path(opts.file)
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise DefectaeError(f"{path}: manifest not found (dataset.manifest.file)")
    return path


class _Groups:
    """The split each group is given by its rows; two different ones are an error."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fixed: dict[str, str] = {}
        self.lines: dict[str, int] = {}

    def add(self, group: str, split: str, line: int) -> None:
        other = self.fixed.setdefault(group, split)
        if other != split:
            raise DefectaeError(
                f"{self.path} line {line}: group '{group}' is in split '{split}' here but "
                f"'{other}' on line {self.lines[group]}; a group's rows share one split"
            )
        self.lines.setdefault(group, line)


def _label(row: Row, mask: Path | None, opts: ManifestOptions, where: str) -> str:
    """The row's label: its label column, else from its mask."""
    if not row.label:
        return opts.default_type if mask_is_defective(mask) else GOOD
    if row.label.lower() == GOOD:
        return GOOD
    if opts.types and row.label not in opts.types:
        raise DefectaeError(
            f"{where}: label '{row.label}': expected good or one of {', '.join(opts.types)} "
            "(dataset.manifest.types)"
        )
    return row.label


def list_manifest(root: Path, opts: ManifestOptions) -> Listing:
    """List the manifest's rows: good rows are the pool, defective rows the test images."""
    path = manifest_path(root, opts)
    base = path.parent
    groups = _Groups(path)
    seen: dict[Path, int] = {}
    pool: list[Sample] = []
    test: list[Sample] = []
    problems: list[str] = []
    for row in read_rows(path):
        where = f"{path} line {row.line}"
        if row.split and row.split not in SPLIT_NAMES:
            raise DefectaeError(
                f"{where}: split '{row.split}': expected train, validation or test (or empty)"
            )
        image = base / row.image
        mask = base / row.mask if row.mask else None
        if not image.is_file():
            problems.append(f"{where}: image file not found: {image}")
            continue
        if mask is not None and not mask.is_file():
            problems.append(f"{where}: mask file not found: {mask}")
            continue
        if image.resolve() in seen:
            problems.append(
                f"{where}: image {row.image} is listed twice (also line {seen[image.resolve()]})"
            )
            continue
        seen[image.resolve()] = row.line
        label = _label(row, mask, opts, where)
        if label != GOOD and row.split in ("train", "validation"):
            raise DefectaeError(
                f"{where}: defective image {row.image} ('{label}') in the {row.split} split; "
                "expected test"
            )
        file = relative(image, root)
        if row.split:
            groups.add(row.group or file, row.split, row.line)
        sample = Sample(
            image,
            (mask,) if mask is not None else (),
            label,
            int(label != GOOD),
            sample_name(file),
            file,
            group_key=row.group,
        )
        (pool if label == GOOD else test).append(sample)
    return Listing(
        pool=pool,
        test=test,
        pool_dir=str(path),
        holdout_test_good=True,
        fixed=groups.fixed,
        problems=problems,
    )
