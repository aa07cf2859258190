"""`defectae compare`: the metrics, training time and differing settings of scored runs, side by side.

Runs are named (RUN...) or picked with --profile-glob: the latest scored run (by folder name,
a timestamp) of each profile folder under runs/ whose name matches. A scored run holds
score/metrics.json and a checkpoint (last.pt, else best.pt).

Each run's settings are taken from the output of the command that decided them: the trained
sections from its checkpoint (what training used), [tile] from metrics.json (what made the
scored maps) and [score] from the profile.toml score wrote (else the run's own). They are
flattened to dotted keys, and the keys whose values are not the same in every run are listed;
the top-level `name` is left out (it names the row already), every other key (dataset.root,
train.device, ...) counts. Training time is the sum of `elapsed_s` over the checkpoint's
`timing` (one entry per `train` call, resumes included).

Outputs: a table on the console, `--json`, `--csv FILE` (one row per run and defect type, the
overall row first) and an HTML page with every run's curves overlaid: image ROC and PR from
the image scores in residuals.h5, pixel ROC, PR and PRO from the pixel curve score stored
beside metrics.json (score/pixel_curve.npz).
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from defectae import compare_page, console, profiles, report, workspace
from defectae.core import metrics
from defectae.errors import DefectaeError
from defectae.files import output_file, sha256_file, write_text_atomic
from defectae.profiles.load import PROFILE_FILE
from defectae.stores.scores import CURVE_FILE, read_curve, read_scored_settings

HEADLINE = ("image_auroc", "image_auprc", "pixel_auroc", "pixel_aupro", "pixel_f1_max")
COMPARABLE = ("protocol", "resolution")  # scored differently: pixel metrics do not compare
IGNORED_KEYS = ("name",)


@dataclass(frozen=True)
class ScoredRun:
    """One scored run as compare reads it."""

    path: Path
    summary: dict[str, Any]  # metrics.json
    settings: dict[str, Any]  # dotted key -> value
    train_seconds: float | None
    epochs: int
    status: str
    image_curve: metrics.Curve | None  # None when residuals.h5 is gone or changed since score
    curve_note: str = ""
    pixel_curve: metrics.Curve | None = None  # None when score stored none (no masks)

    @property
    def label(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"


def run(
    runs: list[Path],
    profile_glob: str | None,
    html: Path | None = None,
    csv_path: Path | None = None,
) -> dict[str, Any]:
    """Compare scored runs; write the HTML page (and CSV); return the table as a dict."""
    html = output_file(html or workspace.home() / "compare.html")
    if csv_path is not None:
        output_file(csv_path)
    folders = list(runs) + (latest_scored_runs(profile_glob) if profile_glob else [])
    if not folders:
        raise DefectaeError("compare: expected RUN folders or --profile-glob PATTERN")
    unique = list({p.resolve(): p for p in folders}.values())
    scored = [read_run(p) for p in unique]
    differing = differing_settings(scored)
    mixed = [k for k in COMPARABLE if len({str(r.summary.get(k)) for r in scored}) > 1]
    for key in mixed:
        console.warn(f"runs scored with different {key}s: their pixel metrics do not compare")
    for r in scored:
        if r.image_curve is None:
            console.warn(f"{r.path}: {r.curve_note}")
    summary = {
        "runs": [_run_json(r) for r in scored],
        "differing": differing,
        "mixed": mixed,
        "html": str(html),
        "csv": str(csv_path) if csv_path is not None else None,
    }
    rows = table_rows(summary)
    if csv_path is not None:
        write_csv(csv_path, rows)
    figures = {name: report.overlay_png(name, _curves(scored, name)) for name in report.OVERLAYS}
    notes = [f"{r.label}: {r.curve_note}" for r in scored if r.image_curve is None]
    write_text_atomic(html, compare_page.compare_html(summary, figures, notes, html.parent))
    console.show(compare_table(summary))
    if differing:
        console.show(settings_table(summary))
    console.info(f"page: {html}")
    return summary


# ----------------------------------------------------------------------------- inputs


def latest_scored_runs(pattern: str) -> list[Path]:
    """The latest scored run of each profile folder under runs/ whose name matches `pattern`."""
    root = workspace.home() / "runs"
    matched = sorted(p for p in root.glob("*") if p.is_dir() and fnmatch.fnmatch(p.name, pattern))
    if not matched:
        raise DefectaeError(f"--profile-glob '{pattern}': no profile folder in {root} matches")
    found = []
    for profile_dir in matched:
        runs = sorted(p.parent.parent for p in profile_dir.glob("*/score/metrics.json"))
        if runs:
            found.append(runs[-1])
        else:
            console.warn(f"{profile_dir}: no scored run; left out")
    if not found:
        raise DefectaeError(
            f"--profile-glob '{pattern}': no scored run in {', '.join(str(p) for p in matched)}"
        )
    return found


def read_run(path: Path) -> ScoredRun:
    """A run folder's metrics, settings, training record and image curve; one line if not scored."""
    from defectae.stores.checkpoint import load_checkpoint, profile_of  # imports torch

    if not path.is_dir():
        raise DefectaeError(f"{path}: run folder not found")
    metrics_json = path / "score" / "metrics.json"
    if not metrics_json.is_file():
        if inside := sorted(path.glob("*/score/metrics.json")):
            raise DefectaeError(
                f"{path}: a folder of runs, not a scored run; pass one of them (the latest "
                f"scored is {inside[-1].parent.parent}) or --profile-glob {path.name}"
            )
        raise DefectaeError(
            f"{path}: not a scored run, {metrics_json} is missing; run `defectae score --run {path}`"
        )
    scored = read_scored_settings(metrics_json)
    summary = json.loads(metrics_json.read_text(encoding="utf-8"))
    ckpt = next((path / n for n in ("last.pt", "best.pt") if (path / n).is_file()), None)
    if ckpt is None:
        raise DefectaeError(f"{path}: not a scored run, it has no last.pt or best.pt checkpoint")
    state = load_checkpoint(ckpt)
    settings = profiles.to_dict(profile_of(state, ckpt))
    settings["tile"] = profiles.to_dict(scored.tile)
    written = [p for p in (path / "score" / PROFILE_FILE, path / PROFILE_FILE) if p.is_file()]
    if written:
        settings["score"] = profiles.to_dict(profiles.load_written(written[0]))["score"]
    timing = state.get("timing") or []
    curve, note = _image_curve(path, summary)
    return ScoredRun(
        path=path,
        summary=summary,
        settings={k: v for k, v in profiles.flatten(settings).items() if k not in IGNORED_KEYS},
        train_seconds=sum(float(t["elapsed_s"]) for t in timing) if timing else None,
        epochs=int(state.get("epoch", 0)),
        status=str(state.get("status", "")),
        image_curve=curve,
        curve_note=note,
        pixel_curve=read_curve(path / "score" / CURVE_FILE),
    )


OVERLAY_METRICS = {
    "image_roc": "image_auroc",
    "image_pr": "image_auprc",
    "pixel_roc": "pixel_auroc",
    "pixel_pr": "pixel_auprc",
    "pixel_pro": "pixel_aupro",
}


def _curves(scored: list[ScoredRun], name: str) -> list[tuple[str, metrics.Curve, float | None]]:
    """(label, curve, metric value) of every run that has the curve the overlay `name` draws."""
    rows = []
    for r in scored:
        curve = r.image_curve if name.startswith("image") else r.pixel_curve
        if curve is not None:
            rows.append((r.label, curve, r.summary["metrics"].get(OVERLAY_METRICS[name])))
    return rows


def _image_curve(path: Path, summary: dict[str, Any]) -> tuple[metrics.Curve | None, str]:
    """The image ranking curve of the residuals.h5 that was scored (checked by its SHA-256)."""
    from defectae.stores.residuals import open_residuals

    residuals = Path(summary.get("residuals", ""))
    if not residuals.is_file():
        residuals = path / "residuals.h5"
    if not residuals.is_file():
        return None, f"{residuals} is gone: no image curves for this run"
    if sha256_file(residuals) != summary.get("residuals_sha256"):
        return None, f"{residuals} changed since it was scored: no image curves for this run"
    with open_residuals(residuals) as f:
        scores = f["test/scores"][()].astype(np.float64)  # as score ranks them
        labels = f["test/labels"][()].astype(bool)
    return metrics.rank_curve(scores, labels), ""


def differing_settings(scored: list[ScoredRun]) -> dict[str, list[Any]]:
    """{dotted key: the value in each run} for the keys not equal in all runs (None: absent)."""
    keys = sorted({k for r in scored for k in r.settings})
    values = {k: [r.settings.get(k) for r in scored] for k in keys}
    return {k: v for k, v in values.items() if any(x != v[0] for x in v)}


# ----------------------------------------------------------------------------- outputs


def _run_json(r: ScoredRun) -> dict[str, Any]:
    s = r.summary
    return {
        "run": str(r.path),
        "label": r.label,
        "profile": s.get("profile", ""),
        "dataset": s.get("dataset", ""),
        "category": s.get("category", ""),
        "protocol": s.get("protocol"),
        "resolution": s.get("resolution"),
        "resolution_detail": report.format_resolution(s),
        "train_seconds": r.train_seconds,
        "epochs": r.epochs,
        "status": r.status,
        "metrics_json": str(r.path / "score" / "metrics.json"),
        "index_html": str(r.path / "score" / "index.html"),
        "overall": {"counts": s["counts"], "metrics": s["metrics"]},
        "per_type": {
            t: {"counts": v["counts"], "metrics": v["metrics"]} for t, v in s["per_type"].items()
        },
    }


def _metric_names(summary: dict[str, Any]) -> list[str]:
    found = {n for r in summary["runs"] for n in r["overall"]["metrics"]}
    return [n for n in report.METRIC_LABELS if n in found] + sorted(
        found - set(report.METRIC_LABELS)
    )


def table_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per run and defect type (overall first): the table --csv writes."""
    names = _metric_names(summary)
    rows = []
    for i, r in enumerate(summary["runs"]):
        head = {k: r[k] for k in ("run", "label", "profile", "protocol", "resolution")}
        head |= {k: r[k] for k in ("train_seconds", "epochs", "status")}
        head |= {key: values[i] for key, values in summary["differing"].items()}
        for defect_type, col in [("overall", r["overall"]), *r["per_type"].items()]:
            rows.append(
                {
                    **head,
                    "defect_type": defect_type,
                    "images": col["counts"]["images"],
                    **{n: col["metrics"].get(n) for n in names},
                }
            )
    return rows


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    return value if isinstance(value, (str, int, float)) else json.dumps(value)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """The rows as CSV (atomically); empty cells are undefined metrics, other values as JSON."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _csv_cell(v) for k, v in row.items()} for row in rows)
    write_text_atomic(path, buffer.getvalue())


def compare_table(summary: dict[str, Any]) -> Table:
    """The headline metrics of each run, overall then per defect type; a "scored at" column
    when the runs were scored with different protocols or resolutions."""
    from defectae.training.clock import duration

    mixed = summary["mixed"]
    ref = summary["runs"][0]
    caption = (
        "scored at: differently (pixel metrics do not compare)"
        if mixed
        else f"scored at: {ref['protocol']}, {ref['resolution']}"
    )
    table = Table(title="compare", caption=caption)
    for column in ["run", "type", "train"] + (["scored at"] if mixed else []):
        table.add_column(column, overflow="fold", min_width=5 if column == "train" else 8)
    for name in HEADLINE:
        table.add_column(report.METRIC_LABELS[name], justify="right", min_width=6)
    for r in summary["runs"]:
        took = "—" if r["train_seconds"] is None else duration(r["train_seconds"])
        scored_at = [f"{r['protocol']}, {r['resolution_detail']}"] if mixed else []
        for k, (defect_type, col) in enumerate([("overall", r["overall"]), *r["per_type"].items()]):
            first = k == 0
            table.add_row(
                r["label"] if first else "",
                defect_type,
                took if first else "",
                *(scored_at if first else [""] * len(scored_at)),
                *(report.format_value(col["metrics"].get(n), n) for n in HEADLINE),
                end_section=k == len(r["per_type"]),
            )
    return table


def settings_table(summary: dict[str, Any]) -> Table:
    """The profile keys whose values differ, one column per run."""
    table = Table(title="settings that differ")
    table.add_column("key", no_wrap=True)
    for r in summary["runs"]:
        table.add_column(r["label"])
    for key, values in summary["differing"].items():
        table.add_row(key, *(compare_page.format_setting(v) for v in values))
    return table
