"""The page of `defectae compare`: one HTML file, its overlaid curves embedded, that opens from
disk without a server; each run's own score report (pixel curves, panels) is linked from it."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any

from defectae.report import METRIC_LABELS, format_value

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;background:#fff}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child,.left{text-align:left}
.warn{color:#a40}.curves img{width:520px;margin-right:8px}.thumbs img{width:300px}
"""


def format_setting(value: Any) -> str:
    """A profile value for tables: strings as they are, others as JSON; '—' where absent."""
    if value is None:
        return "—"
    return value if isinstance(value, str) else json.dumps(value)


def _link(path: str, base: Path) -> str:
    """`path` relative to the page's folder where it can be (the page then survives a move)."""
    try:
        return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).resolve().as_uri()


def _metrics_table(summary: dict[str, Any]) -> str:
    e = html.escape
    runs = summary["runs"]
    names = [n for n in METRIC_LABELS if any(n in r["overall"]["metrics"] for r in runs)]
    head = "".join(f"<th>{e(METRIC_LABELS[n])}</th>" for n in names)
    rows = []
    for r in runs:
        minutes = "—" if r["train_seconds"] is None else f"{r['train_seconds'] / 60:.1f}"
        for defect_type, col in [("overall", r["overall"]), *r["per_type"].items()]:
            cells = "".join(f"<td>{format_value(col['metrics'].get(n), n)}</td>" for n in names)
            rows.append(
                f'<tr><td>{e(r["label"])}</td><td class="left">{e(defect_type)}</td>'
                f"<td>{col['counts']['images']}</td><td>{minutes}</td>"
                f'<td class="left">{e(r["protocol"])}, {e(r["resolution_detail"])}</td>{cells}</tr>'
            )
    return (
        "<table><tr><th>run</th><th>defect type</th><th>images</th><th>train min</th>"
        f"<th>scored at</th>{head}</tr>{''.join(rows)}</table>"
    )


def _settings_table(summary: dict[str, Any]) -> str:
    e = html.escape
    if not summary["differing"]:
        return "<p>The runs' settings are the same (the profile name aside).</p>"
    head = "".join(f"<th>{e(r['label'])}</th>" for r in summary["runs"])
    rows = "".join(
        f"<tr><td>{e(key)}</td>"
        + "".join(f'<td class="left">{e(format_setting(v))}</td>' for v in values)
        + "</tr>"
        for key, values in summary["differing"].items()
    )
    return f"<table><tr><th>key</th>{head}</tr>{rows}</table>"


def compare_html(
    summary: dict[str, Any], figures: dict[str, bytes], notes: list[str], base: Path
) -> str:
    """The page: runs, metrics (overall and per type), differing settings, overlaid curves
    (PNG bytes by name), and links to each run's report; `base` is the page's folder."""
    e = html.escape
    mixed = "".join(
        f'<p class="warn">The runs were scored with different {e(k)}s: their pixel metrics do '
        "not compare.</p>"
        for k in summary["mixed"]
    )
    curves = "".join(
        f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{e(k)}">'
        for k, png in figures.items()
    )
    note_list = "".join(f"<li>{e(n)}</li>" for n in notes)
    reports = []
    for r in summary["runs"]:
        folder = Path(r["index_html"]).parent
        thumbs = "".join(
            f'<img src="{e(_link(str(folder / f), base))}" alt="{e(r["label"])} {f}">'
            for f in ("roc.png", "pro.png")
            if (folder / f).is_file()
        )
        reports.append(
            f'<h3><a href="{e(_link(r["index_html"], base))}">{e(r["label"])}</a></h3>'
            f'<p>{e(r["run"])}</p><div class="thumbs">{thumbs}</div>'
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>defectae compare: {len(summary['runs'])} runs</title><style>{_CSS}</style>"
        f"</head><body><h1>defectae compare</h1>{mixed}"
        f"<h2>Metrics</h2>{_metrics_table(summary)}"
        f"<h2>Settings that differ</h2>{_settings_table(summary)}"
        f'<h2>Curves</h2><div class="curves">{curves}</div>'
        + (f"<ul>{note_list}</ul>" if notes else "")
        + "<h2>Each run's report</h2>"
        + "".join(reports)
        + "</body></html>\n"
    )
