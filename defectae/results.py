"""The results table of `make results`: one row per recipe, from the files its stages wrote.

Each recipe folder holds `train.json` and `score.json` (the `--json` summaries of `train` and
`score`) and `train.seconds` (the wall time of `train`). Run as
`python -m defectae.results DIR... --out TABLE.md`; writes TABLE.md and TABLE.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import date
from pathlib import Path
from typing import Any

import torch

from defectae.errors import DefectaeError
from defectae.files import atomic_path

COLUMNS = ("image_auroc", "pixel_auroc", "pixel_aupro")
HEAD = ("recipe", "image AUROC", "pixel AUROC", "AU-PRO", "train min", "epochs", "evaluated at")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DefectaeError(f"{path}: not found (did this recipe's stages all run?)") from None
    except json.JSONDecodeError as e:
        raise DefectaeError(f"{path}: not a JSON summary ({e.msg})") from None


def row(folder: Path) -> dict[str, Any]:
    """One recipe's figures: its metrics, training minutes and where it was evaluated."""
    train, score = _read_json(folder / "train.json"), _read_json(folder / "score.json")
    seconds = float((folder / "train.seconds").read_text())
    return {
        "recipe": folder.name,
        **{k: score["metrics"].get(k) for k in COLUMNS},
        "train_minutes": round(seconds / 60.0, 1),
        "epochs": train["epochs"],
        "status": train["status"],
        "resolution": score.get("resolution", "prepared"),
    }


def machine() -> str:
    """The machine the table was measured on, in words."""
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}"


def markdown(rows: list[dict[str, Any]], measured: str) -> str:
    """The table as markdown, headed by the machine and date."""

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [
        f"Measured {measured} on {machine()}.",
        "",
        "| " + " | ".join(HEAD) + " |",
        "|" + "---|" * len(HEAD),
    ]
    for r in rows:
        cells = [r["recipe"], *(fmt(r[k]) for k in COLUMNS), f"{r['train_minutes']:.1f}"]
        cells += [f"{r['epochs']} ({r['status']})", r["resolution"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m defectae.results", description=__doc__)
    parser.add_argument("folders", nargs="+", type=Path, help="one folder per recipe")
    parser.add_argument("--out", type=Path, required=True, help="the markdown table (and .json)")
    args = parser.parse_args(argv)
    try:
        rows = [row(f) for f in args.folders]
    except DefectaeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    measured = date.today().isoformat()
    with atomic_path(args.out) as tmp:
        tmp.write_text(markdown(rows, measured))
    with atomic_path(args.out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({"date": measured, "machine": machine(), "rows": rows}, indent=2))
    print(args.out.read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
