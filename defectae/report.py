"""The score report: ROC, PR and PRO curves (matplotlib, Agg), one panel PNG per test image
(PIL, small and fast), and an index.html that opens from disk without a server.

Panels show: input, reconstruction (when stored), residual heatmap over the input, the
predicted mask and the ground truth (both over the dimmed input). Every file is written
atomically.
"""

from __future__ import annotations

import contextlib
import functools
import html
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from defectae.core.metrics import Curve, ScoreResults, pro_points
from defectae.files import atomic_path, write_text_atomic

METRIC_LABELS = {
    "image_auroc": "image AUROC",
    "image_auprc": "image AUPRC",
    "image_f1_max": "image F1-max",
    "image_f1_threshold": "image F1 thr",
    "image_f1_precision": "image precision @F1",
    "image_f1_recall": "image recall @F1",
    "latent_image_auroc": "latent image AUROC",
    "latent_image_auprc": "latent image AUPRC",
    "latent_image_f1_max": "latent image F1-max",
    "pixel_auroc": "pixel AUROC",
    "pixel_auprc": "pixel AUPRC",
    "pixel_aupro": "pixel AU-PRO",
    "pixel_f1_max": "pixel F1-max",
    "pixel_f1_threshold": "pixel F1 thr",
    "pixel_iou": "pixel IoU @val thr",
    "pixel_dice": "pixel Dice @val thr",
    "pixel_iou_f1": "pixel IoU @F1 thr",
    "pixel_dice_f1": "pixel Dice @F1 thr",
    "radli_auc": "Rádli & Czúni AUC",
}

_POINTS = 4000  # curve points drawn; the metrics use every point


def format_value(value: float | None, name: str = "") -> str:
    """A metric for tables: 4 decimals, thresholds with 4 significant digits, '—' when undefined."""
    if value is None:
        return "—"
    return f"{value:.4g}" if name.endswith("threshold") else f"{value:.4f}"


def format_resolution(summary: dict[str, Any]) -> str:
    """Where the pixel metrics were computed, e.g. "original, 197-607 x 211-594" (H x W ranges)."""
    sizes = summary.get("pixel_sizes")
    if not sizes:
        return str(summary.get("resolution", "prepared"))
    span = [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in (sizes["height"], sizes["width"])]
    return f"{summary.get('resolution', 'prepared')}, {span[0]} x {span[1]}"


# ----------------------------------------------------------------------------- curves


def _thin(*arrays: np.ndarray) -> list[np.ndarray]:
    n = len(arrays[0])
    if n <= _POINTS:
        return list(arrays)
    keep = np.unique(np.linspace(0, n - 1, _POINTS).round().astype(int))
    return [a[keep] for a in arrays]


def _save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _roc(ax: Any, curve: Curve, label: str, value: float | None) -> None:
    if curve.n_pos == 0 or curve.n_neg == 0:
        return
    fpr = np.concatenate([[0.0], curve.fp / curve.n_neg])
    tpr = np.concatenate([[0.0], curve.tp / curve.n_pos])
    ax.plot(*_thin(fpr, tpr), label=f"{label} ({format_value(value)})")


def _pr(ax: Any, curve: Curve, label: str, value: float | None) -> None:
    if curve.n_pos == 0:
        return
    recall = np.concatenate([[0.0], curve.tp / curve.n_pos])
    precision = np.concatenate([[1.0], curve.tp / (curve.tp + curve.fp)])
    ax.step(*_thin(recall, precision), where="post", label=f"{label} ({format_value(value)})")


def write_curves(out_dir: Path, results: ScoreResults, max_fpr: float) -> dict[str, str]:
    """ROC, PR, PRO (and Rádli & Czúni's) curves as PNGs; returns {name: file name}."""
    m = results.metrics
    written: dict[str, str] = {}
    fpr_axis = "false positive rate"

    with _curve(out_dir, "roc", "ROC", fpr_axis, "true positive rate", written) as ax:
        _roc(ax, results.image_curve, "image", m["image_auroc"].value)
        _roc(ax, results.pixel_curve, "pixel", m["pixel_auroc"].value)
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")

    with _curve(out_dir, "pr", "precision-recall", "recall", "precision", written) as ax:
        _pr(ax, results.image_curve, "image", m["image_auprc"].value)
        _pr(ax, results.pixel_curve, "pixel", m["pixel_auprc"].value)

    with _curve(out_dir, "pro", "PRO", fpr_axis, "per-region overlap", written) as ax:
        pixel = results.pixel_curve
        if pixel.pro is not None and pixel.n_neg > 0:
            fpr, pro = pro_points(pixel)
            label = f"PRO (AU-PRO@{max_fpr:g} {format_value(m['pixel_aupro'].value)})"
            ax.plot(*_thin(fpr, pro), label=label)
            ax.axvline(max_fpr, color="0.5", lw=0.8, ls="--")

    r = results.radli
    if r is not None and r.n_images:
        title = "Rádli & Czúni (50 thresholds)"
        with _curve(out_dir, "radli", title, "mean FPR", "mean TPR", written) as ax:
            order = np.argsort(r.fpr, kind="stable")
            label = f"mean of {r.n_images} images (AUC {format_value(r.auc.value)})"
            ax.plot(r.fpr[order], r.tpr[order], marker=".", label=label)
    return written


@contextlib.contextmanager
def _curve(
    out_dir: Path, name: str, title: str, xlabel: str, ylabel: str, written: dict[str, str]
) -> Iterator[Any]:
    """One curve figure on [0, 1] x [0, 1]: yields the axes, then adds the legend and saves NAME.png."""
    fig = Figure(figsize=(5, 4.2))
    ax = fig.subplots()
    yield ax
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(0, 1), ylim=(0, 1.01))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "undefined", ha="center", va="center", color="0.5")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    _save(fig, path)
    written[name] = path.name


# ----------------------------------------------------------------------------- latent (VAEs)


def write_latent_pca(
    path: Path,
    test: np.ndarray,
    types: Sequence[str],
    train: np.ndarray,
    explained: np.ndarray,
    note: str,
) -> None:
    """Scatter of the test images' codes in 2-D PCA (test: (N, 2)), one colour per defect type,
    with the good training codes (train: (K, 2)) in light grey behind them."""
    fig = Figure(figsize=(5.5, 4.6))
    ax = fig.subplots()
    if len(train):
        ax.scatter(train[:, 0], train[:, 1], s=10, color="0.8", label="train (good)")
    kinds = np.asarray(types)
    for t in sorted(set(types), key=lambda t: (t != "good", t)):
        sel = kinds == t
        ax.scatter(test[sel, 0], test[sel, 1], s=18, label=f"{t} ({int(sel.sum())})")
    ax.set(
        xlabel=f"PC 1 ({explained[0]:.0%} of the test codes' variance)",
        ylabel=f"PC 2 ({explained[1]:.0%})",
        title=f"latent means, PCA of the test images ({note})",
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def write_prior_grid(path: Path, samples: np.ndarray, columns: int = 4) -> None:
    """Decoded prior samples (S, C, P, P) uint8 as one PNG grid, small tiles enlarged to 96 px."""
    tiles = [_rgb(s) for s in samples]
    p = tiles[0].shape[0]
    scale = max(1, 96 // p)
    gap, rows = 2, -(-len(tiles) // columns)
    side = p * scale
    canvas = Image.new(
        "RGB", (columns * (side + gap) - gap, rows * (side + gap) - gap), (32, 32, 32)
    )
    for k, tile in enumerate(tiles):
        image = Image.fromarray(tile).resize((side, side), Image.Resampling.NEAREST)
        canvas.paste(image, ((k % columns) * (side + gap), (k // columns) * (side + gap)))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


# ----------------------------------------------------------------------------- panels


@functools.cache
def _lut() -> np.ndarray:
    from matplotlib import colormaps

    rgb = colormaps["inferno"](np.linspace(0, 1, 256))[:, :3]  # (256, 3) in [0, 1]
    return (rgb * 255).round().astype(np.uint8)


def _rgb(image: np.ndarray) -> np.ndarray:
    # (C, H, W) uint8 -> (H, W, 3) uint8
    hwc = np.moveaxis(image, 0, -1)
    return np.repeat(hwc, 3, axis=-1) if hwc.shape[-1] == 1 else hwc[..., :3]


def _resize(array: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    h, w = array.shape[:2]
    if (w, h) == size:
        return array
    mode = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(array).resize(size, mode))


def _tint(base: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    out = (base.astype(np.uint16) * 2 // 5).astype(np.uint8)  # dimmed input
    out[mask] = color
    return out


def panel_image(
    image: np.ndarray | None,
    recon: np.ndarray | None,
    residual: np.ndarray,
    predicted: np.ndarray | None,
    truth: np.ndarray,
    value_range: tuple[float, float],
    size: int,
) -> Image.Image:
    """One row of tiles: input, reconstruction, heatmap, prediction, ground truth."""
    h, w = residual.shape
    scale = min(1.0, size / max(h, w))
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    lo, hi = value_range
    small = _resize(residual.astype(np.float32), (tw, th))
    heat = _lut()[np.clip((small - lo) / max(hi - lo, 1e-12) * 255, 0, 255).astype(np.uint8)]
    base = _resize(_rgb(image), (tw, th)) if image is not None else np.zeros((th, tw, 3), np.uint8)
    tiles = []
    if image is not None:
        tiles.append(("input", base))
    if recon is not None:
        tiles.append(("reconstruction", _resize(_rgb(recon), (tw, th))))
    overlay = ((base.astype(np.uint16) + heat) // 2).astype(np.uint8) if image is not None else heat
    tiles.append(("residual", overlay))
    if predicted is not None:
        tiles.append(
            (
                "predicted",
                _tint(base, _resize(predicted.astype(np.uint8), (tw, th), True) > 0, (255, 60, 60)),
            )
        )
    tiles.append(
        (
            "ground truth",
            _tint(base, _resize(truth.astype(np.uint8), (tw, th), True) > 0, (60, 220, 90)),
        )
    )

    gap, header = 4, 14
    canvas = Image.new("RGB", (len(tiles) * (tw + gap) - gap, th + header), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for k, (label, tile) in enumerate(tiles):
        x = k * (tw + gap)
        canvas.paste(Image.fromarray(tile), (x, header))
        draw.text((x + 2, 1), label, fill=(230, 230, 230), font=font)
    return canvas


def write_panel(
    path: Path,
    image: np.ndarray | None,
    recon: np.ndarray | None,
    residual: np.ndarray,
    predicted: np.ndarray | None,
    truth: np.ndarray,
    value_range: tuple[float, float],
    size: int,
) -> None:
    """Draw a panel and save it as PNG atomically (fast compression: reports hold hundreds)."""
    panel = panel_image(image, recon, residual, predicted, truth, value_range, size)
    with atomic_path(path) as tmp:
        panel.save(tmp, format="PNG", compress_level=1)


def panel_file(index: int, defect_type: str, name: str) -> str:
    """A safe, unique panel file name relative to the report folder."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{defect_type}_{name}")
    return f"panels/{index:04d}_{safe}.png"


# ----------------------------------------------------------------------------- index.html


@dataclass(frozen=True)
class PanelEntry:
    """One test image in the report."""

    defect_type: str
    name: str
    score: float
    label: int
    file: str  # relative to index.html


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;background:#fff}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}
.undef{color:#999;cursor:help}.meta td{text-align:left}
.curves img{width:400px;margin-right:8px}
figure{display:inline-block;margin:6px;vertical-align:top}
figure img{display:block;max-width:100%}figcaption{font-size:12px;color:#444}
"""


def _cell(values: dict[str, Any], undefined: dict[str, str], name: str) -> str:
    if name in undefined or values.get(name) is None:
        reason = html.escape(undefined.get(name, "undefined"))
        return f'<td class="undef" title="{reason}">—</td>'
    return f"<td>{format_value(values[name], name)}</td>"


def index_html(
    summary: dict[str, Any], figures: dict[str, str], panels: Sequence[PanelEntry], panel_note: str
) -> str:
    """The report page: metadata, the metrics table (overall and per type), curves, panels."""
    e = html.escape
    per_type = summary.get("per_type", {})
    columns = [("overall", summary)] + [(t, per_type[t]) for t in per_type]
    names = [n for n in METRIC_LABELS if any(n in c["metrics"] for _, c in columns)]
    head = "".join(
        f"<th>{e(title)}<br><small>{col['counts']['images']} images</small></th>"
        for title, col in columns
    )
    rows = "".join(
        f"<tr><td>{e(METRIC_LABELS[n])}</td>"
        + "".join(_cell(c["metrics"], c["undefined"], n) for _, c in columns)
        + "</tr>"
        for n in names
    )
    reasons = sorted(
        {
            f"{c}: {METRIC_LABELS.get(n, n)}: {r}"
            for c, col in columns
            for n, r in col["undefined"].items()
        }
    )
    reason_list = "".join(f"<li>{e(r)}</li>" for r in reasons)
    threshold = summary["threshold"]
    meta = [
        ("profile", summary.get("profile") or "—"),
        ("dataset", f"{summary.get('dataset', '')} {summary.get('category', '')}".strip()),
        ("residuals", summary["residuals"]),
        ("ground truth", summary["ground_truth"]),
        ("protocol", summary["protocol"]),
        (
            "resolution",
            format_resolution(summary)
            + (f" ({summary['resolution_note']})" if summary.get("resolution_note") else ""),
        ),
        (
            "label-free threshold",
            f"{threshold['method']}: {format_value(threshold['value'], 'threshold')}"
            + (f" ({threshold['reason']})" if threshold.get("reason") else ""),
        ),
    ]
    meta_rows = "".join(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in meta)
    curves = "".join(f'<img src="{e(f)}" alt="{e(k)} curve">' for k, f in figures.items())

    groups: dict[str, list[PanelEntry]] = {}
    for p in panels:
        groups.setdefault(p.defect_type, []).append(p)
    order = sorted(groups, key=lambda t: (t == "good", t))
    sections = []
    for t in order:
        figs = "".join(
            f'<figure><img src="{e(p.file)}" loading="lazy" alt="{e(p.name)}">'
            f"<figcaption>{e(p.name)} · score {p.score:.4g}{' · defective' if p.label else ''}</figcaption></figure>"
            for p in groups[t]
        )
        sections.append(f'<h3 id="type-{e(t)}">{e(t)} ({len(groups[t])})</h3>{figs}')
    panel_html = "".join(sections) if sections else "<p>No panels (score.panels = false).</p>"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>defectae score: {e(str(summary.get('profile') or summary['residuals']))}</title>"
        f"<style>{_CSS}</style></head><body>"
        f'<h1>defectae score report</h1><table class="meta">{meta_rows}</table>'
        f"<h2>Metrics</h2><table><tr><th>metric</th>{head}</tr>{rows}</table>"
        + (f"<p>Undefined:</p><ul>{reason_list}</ul>" if reasons else "")
        + f'<h2>Curves</h2><div class="curves">{curves}</div>'
        f"<h2>Test images</h2><p>{e(panel_note)}</p>{panel_html}</body></html>\n"
    )


def write_index(
    path: Path,
    summary: dict[str, Any],
    figures: dict[str, str],
    panels: Sequence[PanelEntry],
    panel_note: str,
) -> None:
    """Write index.html atomically."""
    write_text_atomic(path, index_html(summary, figures, panels, panel_note))


# ----------------------------------------------------------------------------- compare


OVERLAYS = {  # name -> (title, x label, y label)
    "image_roc": ("image ROC", "false positive rate", "true positive rate"),
    "image_pr": ("image precision-recall", "recall", "precision"),
    "pixel_roc": ("pixel ROC", "false positive rate", "true positive rate"),
    "pixel_pr": ("pixel precision-recall", "recall", "precision"),
    "pixel_pro": ("PRO", "false positive rate", "per-region overlap"),
}


def overlay_png(name: str, curves: Sequence[tuple[str, Curve, float | None]]) -> bytes:
    """Several runs' curves on one figure as PNG bytes: `name` one of OVERLAYS, one (label,
    curve, metric value) per run; `defectae compare` embeds it in its page."""
    import tempfile

    title, xlabel, ylabel = OVERLAYS[name]
    kind = name.split("_")[1]
    with tempfile.TemporaryDirectory() as folder:
        with _curve(Path(folder), name, title, xlabel, ylabel, {}) as ax:
            for label, curve, value in curves:
                if kind == "pro":
                    if curve.pro is not None and curve.n_neg > 0:
                        ax.plot(
                            *_thin(*pro_points(curve)), label=f"{label} ({format_value(value)})"
                        )
                else:
                    (_roc if kind == "roc" else _pr)(ax, curve, label, value)
            if kind == "roc":
                ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        return (Path(folder) / f"{name}.png").read_bytes()
