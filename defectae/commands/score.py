"""`defectae score`: image and pixel metrics, curves, panels and an HTML report from residuals.h5.

Inputs: residuals.h5 (written by tile-test; --residuals or RUN/residuals.h5), the masks of
the prepared.h5 it was made from, or a ground-truth folder in MVTec layout (--gt DIR:
DIR/TYPE/NAME_mask.png; good images have none). Outputs in RUN/score/ (or --out):
metrics.json, pixel_curve.npz (the pixel curve, thinned, for compare), roc.png, pr.png,
pro.png, panels/, index.html and profile.toml. VAE runs (whose residuals.h5 holds latent
codes) add latent image metrics, latent_pca.png and prior_samples.png; score.image_score =
"latent" makes the latent Mahalanobis distance the image score.

Resolution (--resolution, else score.resolution): "original" upsamples each map bilinearly
to its image's size before prepare and compares it with the mask at that size (from
prepared.h5, or --gt read without resizing), as the MVTec AD evaluation does; "prepared"
compares maps and nearest-resized masks on the prepared grid. Image scores, the label-free
threshold (from validation maps), panels and the Rádli protocol stay on the prepared grid.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from defectae import __version__, console, profiles, report, workspace
from defectae.core import latent, metrics
from defectae.core.ragged import Ragged
from defectae.core.residuals import upsample_maps
from defectae.data.ground_truth import (
    masks_from_prepared,
    masks_on_grid,
    original_masks_from_folder,
    original_masks_from_prepared,
    prepared_rows,
    read_folder_masks,
)
from defectae.errors import DefectaeError
from defectae.files import output_dir, sha256_file
from defectae.profiles import Profile, ScoreConfig, to_dict
from defectae.profiles.load import PROFILE_FILE
from defectae.stores.checkpoint import require_trained
from defectae.stores.prepared import file_attr_json, open_prepared
from defectae.stores.residuals import (
    LatentCodes,
    Residuals,
    open_residuals,
    read_latent,
    read_residuals,
)
from defectae.stores.scores import CURVE_FILE, write_curve, write_metrics

RESOLUTIONS = typing.get_args(typing.get_type_hints(ScoreConfig)["resolution"])
CURVE_POINTS = 2000  # of the stored pixel curve: enough to draw it
NO_MASKS = "the dataset has no masks: no defective test image has a mask pixel"


def run(
    profile: Profile | None,
    run: Path | None,
    residuals: Path | None,
    gt: Path | None,
    protocol: str,
    out: Path | None,
    allow_unfinished: bool = False,
    resolution: str | None = None,
) -> dict[str, Any]:
    """Score a run's residual maps; write metrics.json, figures and index.html; return the summary.

    `resolution` ("original" or "prepared") overrides the profile's score.resolution.
    """
    if protocol not in metrics.PROTOCOLS:
        raise DefectaeError(
            f"--protocol: '{protocol}' is not one of {', '.join(metrics.PROTOCOLS)}"
        )
    if resolution is not None and resolution not in RESOLUTIONS:
        raise DefectaeError(f"--resolution: '{resolution}' is not one of {', '.join(RESOLUTIONS)}")
    run_dir, residuals_path = _locate(profile, run, residuals)
    if profile is None:
        profile = _profile_near(run_dir, residuals_path)
    cfg = profile.score if profile is not None else ScoreConfig()
    res = read_residuals(residuals_path)
    space = latent_space(res)
    if cfg.image_score == "latent":
        res = dataclasses.replace(res, scores=_latent_scores(res, space))
    ckpt = Path(str(res.attrs.get("checkpoint", "")))
    if ckpt.name and ckpt.is_file():
        require_trained(ckpt, allow_unfinished)
    if profile is not None:
        _check_same_dataset(
            res, profile.dataset.name, profile.dataset.category, f"the profile '{profile.name}'"
        )
    prepared = _prepared_path(res, profile, required=gt is None)
    if prepared is not None:
        _check_prepared(res, prepared)
    found = read_folder_masks(gt, res) if gt is not None else None
    if found is not None:
        masks, truth = masks_on_grid(found, res), str(gt)
    else:
        masks, truth = masks_from_prepared(prepared, res), f"{prepared} (test masks)"
    px_maps, px_masks, resolution_json = _pixel_inputs(
        res, masks, resolution or cfg.resolution, gt, found, prepared
    )
    if protocol == "radli" and _residual_kinds(res) != {"ssim"}:
        console.warn(
            "--protocol radli: its thresholds (0.01 to 1) are made for 1-SSIM residuals; these maps are not"
        )

    console.info(f"scoring {len(res.names)} test images of {residuals_path}")
    results = metrics.compute_all(
        px_maps,
        px_masks,
        res.scores,
        res.labels,
        res.val_maps,
        **cfg.metric_options(),
        defect_types=res.types,
        protocol=protocol,
        grid=(res.maps, masks),
    )
    coverage = mask_coverage(res.labels, px_masks)
    if coverage["defective_images"] and coverage["without_mask"] == coverage["defective_images"]:
        results = without_pixel_metrics(results, NO_MASKS)
    del px_maps, px_masks  # at the original resolution, large; the rest needs the grid only
    out_dir = output_dir(
        out or (run_dir / "score" if run_dir is not None else residuals_path.parent / "score")
    )
    summary = _summary(res, results, cfg, protocol, resolution_json, truth, profile)
    summary["ground_truth_masks"] = coverage
    summary["figures"] = report.write_curves(out_dir, results, cfg.pro_max_fpr)
    if space is not None:
        _add_latent(summary, space, res, cfg, out_dir)
    entries, note = _write_panels(out_dir, res, masks, prepared, results, cfg)
    _write_pixel_curve(out_dir / CURVE_FILE, results)
    metrics_json = out_dir / "metrics.json"
    write_metrics(metrics_json, summary)
    index = out_dir / "index.html"
    report.write_index(index, summary, summary["figures"], entries, note)
    if profile is not None:
        profiles.write_profile(profile, out_dir)
    console.show(metrics_table(summary))
    undefined: dict[tuple[str, str], list[str]] = {}
    for column, col in [("overall", summary)] + list(summary["per_type"].items()):
        for name, reason in col["undefined"].items():
            undefined.setdefault((report.METRIC_LABELS.get(name, name), reason), []).append(column)
    for (label, reason), columns in undefined.items():
        if reason != NO_MASKS:  # said once, for every pixel metric, just below
            console.info(f"{label}: undefined ({reason}) in {', '.join(columns)}")
    if coverage["without_mask"]:
        console.warn(coverage["note"])
    console.info(f"report: {index}")
    return {
        **summary,
        "metrics_json": str(metrics_json),
        "index_html": str(index),
        "out": str(out_dir),
    }


# ----------------------------------------------------------------------------- inputs


def _locate(
    profile: Profile | None, run: Path | None, residuals: Path | None
) -> tuple[Path | None, Path]:
    if run is not None and not run.is_dir():
        raise DefectaeError(f"{run}: run folder not found")
    if residuals is not None:
        if not residuals.is_file():
            raise DefectaeError(
                f"{residuals}: residuals file not found; run `defectae tile-test` first"
            )
        return run, residuals
    if run is None:
        if profile is None:
            raise DefectaeError(
                "--profile, --run or --residuals: expected one of them to find residuals.h5"
            )
        run = workspace.latest_run(profile)
    path = run / "residuals.h5"
    if not path.is_file():
        raise DefectaeError(
            f"{path}: no residuals in this run; run `defectae tile-test --run {run}` first"
        )
    return run, path


def _profile_near(run_dir: Path | None, residuals_path: Path) -> Profile | None:
    """The profile tile-test recorded beside the residuals, else the run's training profile."""
    beside = residuals_path.with_name(f"{residuals_path.stem}.profile.toml")
    for path in (beside, run_dir / PROFILE_FILE if run_dir is not None else None):
        if path is not None and path.is_file():
            return profiles.load_written(path)
    console.debug("no profile beside the residuals: using the default score settings")
    return None


def _residual_kinds(res: Residuals) -> set[str]:
    return {k for k, w in res.tile.residual.items() if w}


def _check_same_dataset(res: Residuals, dataset: str, category: str, other: str) -> None:
    have = (str(res.attrs.get("dataset", "")), str(res.attrs.get("category", "")))
    if have[0] != dataset or (have[1] and category and have[1] != category):
        raise DefectaeError(
            f"{res.path}: residuals of dataset '{'/'.join(filter(None, have))}', "
            f"but {other} is dataset '{'/'.join(filter(None, (dataset, category)))}'"
        )


def _prepared_path(res: Residuals, profile: Profile | None, required: bool) -> Path | None:
    recorded = Path(str(res.attrs.get("prepared", "")))
    candidates = [recorded] if str(recorded) not in ("", ".") else []
    if profile is not None:
        candidates.append(workspace.prepared_path(profile))
    for path in candidates:
        if path.is_file():
            return path
    if required:
        raise DefectaeError(
            f"{res.path}: the prepared file it was made from ({recorded}) is missing; "
            "prepare the dataset again or pass --gt DIR"
        )
    console.warn(f"{recorded}: prepared file not found; panels show no input images")
    return None


def _check_prepared(res: Residuals, prepared: Path) -> None:
    with open_prepared(prepared) as f:
        dataset = file_attr_json(f, "dataset").get("name", "")
        _check_same_dataset(res, dataset, str(f.attrs.get("category", "")), str(prepared))
    recorded = res.attrs.get("prepared_sha256")
    if recorded and sha256_file(prepared) != recorded:
        console.warn(f"{prepared}: changed since tile-test wrote {res.path} (SHA-256 differs)")


def _pixel_inputs(
    res: Residuals,
    masks: np.ndarray,
    resolution: str,
    gt: Path | None,
    found: list[np.ndarray | None] | None,
    prepared: Path | None,
) -> tuple[np.ndarray | Ragged, np.ndarray | Ragged, dict[str, Any]]:
    """The maps and masks the pixel metrics use at `resolution`, and how it reads in metrics.json.

    Original resolution falls back to the grid, with a warning, when the ground truth at the
    original size is not available (a prepared.h5 written before format 2).
    """
    h, w = res.maps.shape[1:]
    on_grid = {"resolution": "prepared", "pixel_sizes": {"height": [h, h], "width": [w, w]}}
    if resolution == "prepared":
        note = f"pixel metrics on the prepared {h}x{w} grid (masks resized nearest)"
        return res.maps, masks, {**on_grid, "resolution_note": note}
    if gt is not None and found is not None:
        original = original_masks_from_folder(gt, found, res)
        source = f"{res.path} records no orig_sizes (run tile-test again)"
    else:
        assert prepared is not None
        original = original_masks_from_prepared(prepared, res)
        source = f"{prepared} has no original-size masks (prepare again)"
    if original is None:
        note = (
            f"original resolution asked, but {source}: pixel metrics on the prepared {h}x{w} grid"
        )
        console.warn(f"--resolution original: {source}; falling back to the prepared {h}x{w} grid")
        return res.maps, masks, {**on_grid, "resolution_note": note}
    note = (
        "pixel metrics over every original pixel, each map upsampled bilinearly to its image's "
        f"size; image scores, the label-free threshold, panels and the Rádli protocol on the "
        f"prepared {h}x{w} grid"
    )
    info = {"resolution": "original", "pixel_sizes": original.size_range(), "resolution_note": note}
    return upsample_maps(res.maps, original.sizes), original, info


def _write_pixel_curve(path: Path, results: metrics.ScoreResults) -> None:
    """The pixel curve, thinned, for `compare` to overlay; none (and no stale one) when the
    pixel metrics are undefined."""
    if results.metrics["pixel_auroc"].value is None:
        path.unlink(missing_ok=True)
        return
    write_curve(path, metrics.thin_curve(results.pixel_curve, CURVE_POINTS))


# ----------------------------------------------------------------------------- masks


def mask_coverage(labels: np.ndarray, masks: np.ndarray | Ragged) -> dict[str, Any]:
    """How many defective test images have no mask pixel (image-level labels only), for
    metrics.json: such images' pixels count as defect-free in the pixel metrics."""
    defective = np.flatnonzero(np.asarray(labels, bool))
    missing = sum(not masks[int(i)].any() for i in defective)
    coverage: dict[str, Any] = {"defective_images": len(defective), "without_mask": missing}
    if missing == len(defective) and missing:
        coverage["note"] = f"pixel metrics undefined: {NO_MASKS}; image metrics only"
    elif missing:
        coverage["note"] = (
            f"{missing} of {len(defective)} defective test images have no mask pixel; "
            "their pixels count as defect-free in the pixel metrics"
        )
    return coverage


def without_pixel_metrics(results: metrics.ScoreResults, reason: str) -> metrics.ScoreResults:
    """The results with every pixel metric (overall and per type) undefined for `reason`."""

    def drop(metric_set: metrics.MetricSet) -> metrics.MetricSet:
        return {
            name: metrics.Metric.undefined(reason)
            if name.startswith("pixel_") or name == "radli_auc"
            else m
            for name, m in metric_set.items()
        }

    per_type = {t: drop(m) for t, m in results.per_type.items()}
    return dataclasses.replace(results, metrics=drop(results.metrics), per_type=per_type)


# ----------------------------------------------------------------------------- latent (VAEs)


@dataclasses.dataclass(frozen=True)
class LatentSpace:
    """A VAE run's codes and the latent image scores: Mahalanobis distances of the test codes
    to the Gaussian of the good training codes (None, with `reason`, when it cannot be fitted)."""

    codes: LatentCodes
    scores: np.ndarray | None
    reason: str = ""


def latent_space(res: Residuals) -> LatentSpace | None:
    """The latent scores of a VAE run's residuals; None for other families (no codes stored)."""
    codes = read_latent(res.path, len(res.names))
    if codes is None:
        return None
    if len(codes.train) < latent.MIN_FIT_CODES:
        reason = (
            f"{len(codes.train)} good training code(s), a Gaussian needs {latent.MIN_FIT_CODES}"
        )
        return LatentSpace(codes, None, reason)
    return LatentSpace(codes, latent.mahalanobis(codes.test, latent.fit_gaussian(codes.train)))


def _latent_scores(res: Residuals, space: LatentSpace | None) -> np.ndarray:
    """The latent image scores that score.image_score = "latent" asks for, or a user error."""
    if space is None:
        raise DefectaeError(
            f"score.image_score 'latent': {res.path} holds no latent codes (tile-test stores "
            "them for VAE families only); expected 'residual'"
        )
    if space.scores is None:
        raise DefectaeError(f"score.image_score 'latent': {res.path}: {space.reason}")
    return space.scores.astype(np.float32)


def _add_latent(
    summary: dict[str, Any], space: LatentSpace, res: Residuals, cfg: ScoreConfig, out_dir: Path
) -> None:
    """Add the latent image metrics (overall, per type), the PCA and prior-sample figures."""
    overall, per_type = latent.latent_metrics(space.scores, res.labels, res.types, space.reason)
    for column, metric_set in [(summary, overall)] + [
        (summary["per_type"][t], m) for t, m in per_type.items() if t in summary["per_type"]
    ]:
        as_json = metrics.metric_set_json(metric_set)
        column["metrics"].update(as_json["metrics"])
        column["undefined"].update(as_json["undefined"])
    codes = space.codes
    summary["image_score"] = cfg.image_score
    summary["latent"] = {
        "per_image": codes.per_image,
        "dimensions": int(codes.test.shape[1]),
        "train_codes": len(codes.train),
        "covariance": "Ledoit-Wolf shrinkage, fitted on the good training codes",
    }
    pca = latent.pca_2d(codes.test)
    report.write_latent_pca(
        out_dir / "latent_pca.png",
        pca.transform(codes.test),
        res.types,
        pca.transform(codes.train),
        pca.explained_ratio,
        codes.per_image,
    )
    summary["figures"]["latent_pca"] = "latent_pca.png"
    if codes.prior is not None:
        report.write_prior_grid(out_dir / "prior_samples.png", codes.prior)
        summary["figures"]["prior_samples"] = "prior_samples.png"


# ----------------------------------------------------------------------------- outputs


def _summary(
    res: Residuals,
    results: metrics.ScoreResults,
    cfg: ScoreConfig,
    protocol: str,
    resolution: dict[str, Any],
    truth: str,
    profile: Profile | None,
) -> dict[str, Any]:
    threshold: dict[str, Any] = {"method": cfg.threshold}
    threshold.update(
        {"quantile": cfg.quantile}
        if cfg.threshold == "val_quantile"
        else {"target_fpr": cfg.target_fpr}
    )
    threshold.update(value=results.threshold.value, reason=results.threshold.reason)
    summary: dict[str, Any] = {
        "profile": profile.name if profile is not None else res.attrs.get("profile", ""),
        "protocol": protocol,
        **resolution,
        "dataset": res.attrs.get("dataset", ""),
        "category": res.attrs.get("category", ""),
        "residuals": str(res.path),
        "residuals_sha256": sha256_file(res.path),
        "checkpoint": res.attrs.get("checkpoint", ""),
        "ground_truth": truth,
        "tile": to_dict(res.tile),
        "threshold": threshold,
        "pro_max_fpr": cfg.pro_max_fpr,
        "counts": results.counts["overall"],
        **metrics.metric_set_json(results.metrics),
        "per_type": {
            t: {"counts": results.counts[t], **metrics.metric_set_json(m)}
            for t, m in results.per_type.items()
        },
        "version": __version__,
    }
    if results.radli is not None:
        r = results.radli
        summary["radli"] = {
            "thresholds": r.thresholds.tolist(),
            "fpr": _floats(r.fpr),
            "tpr": _floats(r.tpr),
            "auc": r.auc.value,
            "images": r.n_images,
            "resolution": "prepared",
        }
    return summary


def _floats(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def _write_panels(
    out_dir: Path,
    res: Residuals,
    masks: np.ndarray,
    prepared: Path | None,
    results: metrics.ScoreResults,
    cfg: ScoreConfig,
) -> tuple[list[report.PanelEntry], str]:
    if not cfg.panels:
        return [], "Panels are off (score.panels = false)."
    threshold, which = results.threshold, "label-free"
    if not threshold.defined:
        threshold, which = (
            results.metrics["pixel_f1_threshold"],
            "F1-optimal (no label-free threshold)",
        )
    note = (
        f"Predicted mask: residual >= {report.format_value(threshold.value, 'threshold')} ({which} threshold)."
        if threshold.defined
        else "No threshold is defined, so no predicted masks."
    )
    value_range = (float(res.maps.min()), float(res.maps.max()))
    images = open_prepared(prepared) if prepared is not None else None
    recon = open_residuals(res.path) if res.has_recon else None
    entries, pending = [], []
    # Reading stays in this thread (HDF5); drawing and PNG encoding, which release the GIL, use a pool.
    workers = min(4, os.cpu_count() or 1)
    try:
        rows = prepared_rows(images, res, prepared) if images is not None else None
        with ThreadPoolExecutor(workers) as pool:
            for i in console.track(range(len(res.names)), "panels"):
                residual = res.maps[i].astype(np.float32)
                file = report.panel_file(i, res.types[i], res.names[i])
                pending.append(
                    pool.submit(
                        report.write_panel,
                        out_dir / file,
                        images["test/images"][rows[i]] if images is not None else None,
                        recon["test/recon"][i] if recon is not None else None,
                        residual,
                        residual >= threshold.value if threshold.defined else None,
                        masks[i],
                        value_range,
                        cfg.panel_size,
                    )
                )
                if len(pending) > 2 * workers:  # bounded memory; surfaces errors early
                    pending.pop(0).result()
                entries.append(
                    report.PanelEntry(
                        res.types[i], res.names[i], float(res.scores[i]), int(res.labels[i]), file
                    )
                )
            for job in pending:
                job.result()
    finally:
        for f in (images, recon):
            if f is not None:
                f.close()
    return entries, note


def metrics_table(summary: dict[str, Any]) -> Table:
    """The metrics as a rich table: one row per metric, columns overall and each defect type."""
    columns = [("overall", summary)] + list(summary["per_type"].items())
    table = Table(
        title=f"score: {summary.get('profile') or summary['residuals']} ({summary['protocol']})",
        caption=f"pixel metrics undefined (—): {NO_MASKS}"
        if NO_MASKS in summary["undefined"].values()
        else f"pixel metrics at resolution: {report.format_resolution(summary)}",
    )
    table.add_column("metric", no_wrap=True)
    for name, col in columns:
        table.add_column(f"{name}\n{col['counts']['images']} images", justify="right")
    for key, label in report.METRIC_LABELS.items():
        if key in summary["metrics"]:
            table.add_row(
                label, *(report.format_value(c["metrics"].get(key), key) for _, c in columns)
            )
    return table
