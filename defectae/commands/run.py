"""`defectae run`: prepare, augment, train, tile-test and score in one command.

Each stage is the command's own `run()`, called in-process on the default output places
(`workspace`). A stage is skipped when its output exists, its record (`stores.stages`) says
that the same settings and input files produced it, and no earlier stage ran in this call;
`--from STAGE` runs that stage and every later one regardless, `--until STAGE` stops after it.

A stage's settings are the profile keys it reads itself; what an earlier stage read reaches it
through that stage's output file, whose identity the record holds. tile-test and score use
the run folder that the train record names, never merely the profile's latest run.

A failing stage stops the pipeline: the summary (table, and with --json the JSON naming the
failed stage) is printed, then the stage's own error goes to the CLI (exit 2 for bad input,
130 for Ctrl-C); no record is written for it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from defectae import console, profiles, report, workspace
from defectae.errors import DefectaeError, first_line
from defectae.profiles import Profile
from defectae.stores.stages import (
    StageRecord,
    file_identity,
    read_record,
    record_path,
    stale_reason,
    write_record,
)

STAGES = ("prepare", "augment", "train", "tile-test", "score")
PROTOCOL = "mvtec"
HEADLINE = ("image_auroc", "pixel_auroc", "pixel_aupro")  # the metrics the last line shows
# train keys that change neither the weights nor how the run ends: a new value does not retrain
TRAIN_UNUSED_BY_WEIGHTS = (
    "num_workers",
    "log_images_every",
    "n_log_images",
    "histograms",
    "find_batch_max",
)
TRAIN_RECORD = "train.stage.json"  # in runs/PROFILE/, naming the run folder train made


def stage_settings(profile: Profile) -> dict[str, dict[str, Any]]:
    """Per stage, the profile keys that stage reads itself (see the module doc)."""
    d = profiles.to_dict(profile)
    train = {k: v for k, v in d["train"].items() if k not in TRAIN_UNUSED_BY_WEIGHTS}
    return {
        "prepare": {"dataset": d["dataset"]},
        "augment": {
            "augment": d["augment"],
            "model": {"input_size": d["model"]["input_size"]},
            "dataset": {"color": d["dataset"]["color"]},
        },
        "train": {
            "model": d["model"],
            "loss": d["loss"],
            "corruption": d["corruption"],
            "train": train,
        },
        "tile-test": {"tile": d["tile"]},
        "score": {"score": d["score"], "protocol": PROTOCOL},
    }


def stage_index(flag: str, name: str | None, default: int) -> int:
    """The position of a stage named on the command line; an unknown name is a user error."""
    if name is None:
        return default
    if name not in STAGES:
        raise DefectaeError(f"{flag} '{name}': expected one of {', '.join(STAGES)}")
    return STAGES.index(name)


def standing_file(stage: str, output: Path) -> Path:
    """The file whose identity stands for a stage's output: train's last.pt (rewritten by any
    further training of the run), score's metrics.json, else the output file itself."""
    name = {"train": "last.pt", "score": "metrics.json"}.get(stage)
    return output / name if name else output


@dataclass
class Step:
    """One stage as planned: where its record lives, its expected output and its input files."""

    stage: str
    record: Path
    output: Path | None  # None: train has no recorded run folder
    inputs: dict[str, Path]

    def check(self, settings: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """(identity of each input, why the stage must run or None when it is up to date)."""
        inputs = {name: file_identity(path) for name, path in self.inputs.items()}
        output = (
            None if self.output is None else file_identity(standing_file(self.stage, self.output))
        )
        return inputs, stale_reason(read_record(self.record), settings, inputs, output)


@dataclass
class Pipeline:
    """The profile, its output places, and the run folder that train made or recorded."""

    name: str
    sets: list[str]
    root: str | None
    profile: Profile
    run_dir: Path | None = None

    @property
    def prepared(self) -> Path:
        return workspace.prepared_path(self.profile)

    @property
    def patches(self) -> Path:
        return workspace.patches_path(self.profile)

    def step(self, stage: str) -> Step:
        """The plan of `stage` (tile-test and score: in the run folder of train)."""
        if stage == "prepare":
            return Step(stage, record_path(self.prepared), self.prepared, {})
        if stage == "augment":
            return Step(stage, record_path(self.patches), self.patches, {"prepared": self.prepared})
        if stage == "train":
            path = workspace.runs_root(self.profile) / TRAIN_RECORD
            recorded = read_record(path)
            # run folders are made in runs/PROFILE/: found there by name, even in a moved workspace
            run_dir = path.parent / Path(recorded.output).name if recorded is not None else None
            return Step(stage, path, run_dir, {"patches": self.patches})
        run_dir = self.recorded_run()
        residuals = run_dir / "residuals.h5"
        if stage == "tile-test":
            checkpoint = run_dir / ("best.pt" if (run_dir / "best.pt").is_file() else "last.pt")
            inputs = {"checkpoint": checkpoint, "prepared": self.prepared}
            return Step(stage, record_path(residuals), residuals, inputs)
        out = run_dir / "score"
        return Step(
            stage, record_path(out), out, {"residuals": residuals, "prepared": self.prepared}
        )

    def recorded_run(self) -> Path:
        assert self.run_dir is not None, "train runs or is skipped before tile-test and score"
        return self.run_dir

    def call(self, stage: str) -> tuple[Path, dict[str, Any]]:
        """Run one stage's command in-process: (its output, its summary)."""
        if stage == "prepare":
            from defectae.commands import prepare

            summary = prepare.run(
                profile=self.name,
                sets=self.sets,
                root=self.root,
                out=None,
                synthetic=None,
                download=None,
                sha256=None,
            )
            return Path(summary["out"]), summary
        if stage == "augment":
            from defectae.commands import augment

            summary = augment.run(self.profile, prepared=self.prepared, out=self.patches)
            return Path(summary["out"]), summary
        if stage == "train":
            from defectae.commands import train

            summary = train.run(self.profile, patches=self.patches)
            return Path(summary["run_dir"]), summary
        if stage == "tile-test":
            from defectae.commands import tiletest

            summary = tiletest.run(
                self.profile, self.recorded_run(), self.prepared, out=None, export_maps=None
            )
            return Path(summary["residuals"]), summary
        from defectae.commands import score

        summary = score.run(
            self.profile, self.recorded_run(), None, gt=None, protocol=PROTOCOL, out=None
        )
        return Path(summary["out"]), summary


def _entry(
    status: str, reason: str, output: Path | None = None, seconds: float | None = None
) -> dict[str, Any]:
    """What one stage did, as the summary lists it."""
    out = str(output) if output is not None else None
    return {"status": status, "reason": reason, "output": out, "seconds": seconds}


def run(
    profile: str | None,
    sets: list[str],
    root: str | None,
    start: str | None = None,
    until: str | None = None,
) -> dict[str, Any]:
    """Run the whole pipeline for one profile, skipping up-to-date stages; return the summary."""
    first = stage_index("--from", start, 0)
    last = stage_index("--until", until, len(STAGES) - 1)
    if last < first:
        raise DefectaeError(f"--until '{until}': comes before --from '{start}'")
    if profile is None:
        raise DefectaeError(
            "--profile: expected a profile name (see `defectae profiles list`) or a .toml path"
        )
    prof = profiles.resolve(profile, sets, root)
    pipe = Pipeline(profile, list(sets), root, prof)
    settings = stage_settings(prof)
    stages = {stage: _entry("not run", f"after --until {until}") for stage in STAGES[last + 1 :]}
    started = time.perf_counter()
    ran: str | None = None  # the latest stage that ran: every later one runs too
    scored: dict[str, Any] | None = None
    for i, stage in enumerate(STAGES[: last + 1]):
        step = pipe.step(stage)
        inputs, stale = step.check(settings[stage])
        if start is not None and i >= first:
            reason = f"--from {start}"
        else:
            reason = f"{ran} ran" if ran is not None else stale
        if reason is None:
            stages[stage] = _entry("skipped", "up to date", step.output, 0.0)
            pipe.run_dir = step.output if stage == "train" else pipe.run_dir
            continue
        console.info(f"[bold]{stage}[/bold]: {reason}")
        t0 = time.perf_counter()
        try:
            output, summary = pipe.call(stage)
        except BaseException as e:
            stages[stage] = _entry("failed", _error_line(e), None, _since(t0))
            stages.update(
                {later: _entry("not run", f"{stage} failed") for later in STAGES[i + 1 :]}
            )
            console.emit_json(_finish(pipe, stages, started, stage, None))
            raise
        record = StageRecord(
            stage, settings[stage], inputs, str(output), file_identity(standing_file(stage, output))
        )
        write_record(step.record, record)
        stages[stage] = _entry("ran", reason, output, _since(t0))
        pipe.run_dir = output if stage == "train" else pipe.run_dir
        scored = summary if stage == "score" else scored
        ran = stage
    return _finish(pipe, stages, started, None, scored)


def _error_line(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return str(e) if isinstance(e, DefectaeError) else first_line(e)


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)


def _finish(
    pipe: Pipeline,
    stages: dict[str, dict[str, Any]],
    started: float,
    failed: str | None,
    scored: dict[str, Any] | None,
) -> dict[str, Any]:
    """The summary, in stage order: what each stage did, the run folder, the final metrics;
    shown as a table."""
    stages = {stage: stages[stage] for stage in STAGES}
    summary: dict[str, Any] = {
        "profile": pipe.profile.name,
        "stages": stages,
        "failed": failed,
        "run_dir": str(pipe.run_dir) if pipe.run_dir is not None else None,
        "seconds": _since(started),
        **_metrics(pipe.run_dir, stages["score"]["status"], scored),
    }
    table = Table(title=f"run {pipe.profile.name}")
    for col in ("stage", "status", "reason", "seconds", "output"):
        table.add_column(col, justify="right" if col == "seconds" else "left", overflow="fold")
    styles = {"ran": "green", "skipped": "cyan", "failed": "bold red", "not run": "dim"}
    for stage, entry in stages.items():
        seconds = entry["seconds"]
        table.add_row(
            stage,
            Text(entry["status"], style=styles[entry["status"]]),
            Text(entry["reason"]),  # an error message may hold [brackets]: no markup
            "" if seconds is None else f"{seconds:.1f}",
            Text(entry["output"] or ""),
        )
    console.show(table)
    if summary["metrics"]:
        shown = (
            f"{report.METRIC_LABELS[k]} {report.format_value(summary['metrics'].get(k), k)}"
            for k in HEADLINE
        )
        console.info(f"{', '.join(shown)}  ({summary['metrics_json']})")
    return summary


def _metrics(run_dir: Path | None, status: str, scored: dict[str, Any] | None) -> dict[str, Any]:
    """The final metrics: those score returned, or its metrics.json when it was skipped."""
    if status not in ("ran", "skipped") or run_dir is None:
        return {"metrics": None, "threshold": None, "metrics_json": None}
    path = run_dir / "score" / "metrics.json"
    data = scored if scored is not None else json.loads(path.read_text(encoding="utf-8"))
    return {
        "metrics": data["metrics"],
        "threshold": data["threshold"]["value"],
        "metrics_json": str(path),
    }
