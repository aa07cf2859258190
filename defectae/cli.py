"""The `defectae` command line: turns arguments into a typed profile and calls one module's `run`.

No logic lives here. Each command module returns a summary dict, printed by `--json`.
User errors (DefectaeError) become one red line and exit code 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from defectae import __version__, console, workspace
from defectae.errors import DefectaeError

app = typer.Typer(
    name="defectae",
    help="Unsupervised visual defect detection with autoencoders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
profiles_app = typer.Typer(help="List and show profiles.", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")

ProfileOpt = Annotated[
    Optional[str],
    typer.Option("--profile", "-p", help="DATASET-MODEL name or path/to/profile.toml."),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a profile key: section.key=value (repeatable)."),
]
RootOpt = Annotated[Optional[str], typer.Option("--root", help="Override the dataset root folder.")]
AllowUnfinishedOpt = Annotated[
    bool,
    typer.Option(
        "--allow-unfinished",
        help="Use a run that stopped on a NaN loss or never finished an epoch.",
    ),
]


@app.callback()
def _global(
    verbose: Annotated[
        bool, typer.Option("--verbose/--quiet", "-v/-q", help="More or less output.")
    ] = None,  # type: ignore[assignment]
    json_out: Annotated[
        bool, typer.Option("--json", help="Print a JSON summary on stdout (and nothing else).")
    ] = False,
) -> None:
    console.mode.verbose = verbose is True
    console.mode.quiet = verbose is False
    console.mode.json = json_out


def _profile(name: str | None, sets: list[str] | None, root: str | None, required: bool = True):
    from defectae import profiles

    if name is None:
        if required:
            raise DefectaeError(
                "--profile: expected a profile name (see `defectae profiles list`) or a .toml path"
            )
        return None
    return profiles.resolve(name, sets or [], root)


def _done(summary: dict[str, Any]) -> None:
    console.emit_json(summary)


# ----------------------------------------------------------------------------- commands


@app.command()
def prepare(
    profile: ProfileOpt = None,
    sets: SetOpt = None,
    root: RootOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output HDF5 file.")] = None,
    synthetic: Annotated[
        Optional[str],
        typer.Option("--synthetic", help="Generate a procedural texture dataset: woven or grid."),
    ] = None,
    download: Annotated[
        Optional[str], typer.Option("--download", help="Fetch and unpack a dataset archive first.")
    ] = None,
    sha256: Annotated[
        Optional[str], typer.Option("--sha256", help="Expected SHA-256 of the archive.")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="List and split only, write nothing; exit 1 on a problem."),
    ] = False,
) -> None:
    """Read a dataset and write one prepared HDF5 file (train / validation / test with masks)."""
    from defectae.commands import prepare as command

    summary = command.run(
        profile=profile,
        sets=sets or [],
        root=root,
        out=out,
        synthetic=synthetic,
        download=download,
        sha256=sha256,
        dry_run=dry_run,
    )
    _done(summary)
    if summary.get("problems"):
        raise typer.Exit(1)


@app.command()
def augment(
    profile: ProfileOpt = None,
    sets: SetOpt = None,
    root: RootOpt = None,
    prepared: Annotated[
        Optional[Path], typer.Option("--prepared", help="Input prepared.h5.")
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output patches.h5.")] = None,
) -> None:
    """Sample augmented training and validation patches into an HDF5 patch dataset."""
    from defectae.commands import augment as command

    _done(command.run(_profile(profile, sets, root), prepared=prepared, out=out))


@app.command()
def train(
    profile: ProfileOpt = None,
    sets: SetOpt = None,
    root: RootOpt = None,
    patches: Annotated[Optional[Path], typer.Option("--patches", help="Input patches.h5.")] = None,
    resume: Annotated[
        Optional[Path], typer.Option("--resume", help="Continue the run in RUN_DIR from last.pt.")
    ] = None,
    amp: Annotated[Optional[str], typer.Option("--amp", help="auto, bf16, fp16 or off.")] = None,
    compile_mode: Annotated[Optional[str], typer.Option("--compile", help="on or off.")] = None,
    find_batch_size: Annotated[
        bool, typer.Option("--find-batch-size", help="Find the largest batch that fits, then stop.")
    ] = False,
    write_batch_size: Annotated[
        bool, typer.Option("--write-batch-size", help="With --find-batch-size: train with it.")
    ] = False,
    max_minutes: Annotated[
        Optional[float],
        typer.Option(
            "--max-minutes",
            help="Time budget: stop cleanly after the step that reaches it (train.max_minutes; 0 = off).",
        ),
    ] = None,
) -> None:
    """Train a model on the patch dataset (AMP, torch.compile, early stopping, resume, DDP)."""
    from defectae.commands import train as command

    prof = _profile(profile, sets, root, required=resume is None)
    _done(
        command.run(
            prof,
            patches=patches,
            resume=resume,
            amp=amp,
            compile_model=compile_mode,
            find_batch_size=find_batch_size,
            write_batch_size=write_batch_size,
            sets=sets or [],
            root=root,
            max_minutes=max_minutes,
        )
    )


@app.command("tile-test")
def tile_test(
    profile: ProfileOpt = None,
    sets: SetOpt = None,
    root: RootOpt = None,
    run: Annotated[
        Optional[Path], typer.Option("--run", help="Run folder (default: the profile's latest).")
    ] = None,
    prepared: Annotated[
        Optional[Path], typer.Option("--prepared", help="Input prepared.h5.")
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output residuals.h5.")] = None,
    export_maps: Annotated[
        Optional[Path], typer.Option("--export-maps", help="Write MVTec-evaluator TIFF maps here.")
    ] = None,
    allow_unfinished: AllowUnfinishedOpt = False,
) -> None:
    """Reconstruct every test and validation image by sliding window and write residual maps."""
    from defectae.commands import tiletest as command

    _done(
        command.run(
            _profile(profile, sets, root, required=run is None),
            run=run,
            prepared=prepared,
            out=out,
            export_maps=export_maps,
            allow_unfinished=allow_unfinished,
        )
    )


@app.command()
def score(
    profile: ProfileOpt = None,
    sets: SetOpt = None,
    root: RootOpt = None,
    run: Annotated[
        Optional[Path], typer.Option("--run", help="Run folder (default: the profile's latest).")
    ] = None,
    residuals: Annotated[
        Optional[Path], typer.Option("--residuals", help="Input residuals.h5.")
    ] = None,
    gt: Annotated[
        Optional[Path], typer.Option("--gt", help="Ground-truth folder in MVTec layout.")
    ] = None,
    protocol: Annotated[str, typer.Option("--protocol", help="mvtec or radli.")] = "mvtec",
    resolution: Annotated[
        Optional[str],
        typer.Option(
            "--resolution",
            help="Pixel metrics at each image's original size or on the prepared grid: "
            "original or prepared (default: the profile's score.resolution, original).",
        ),
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Report folder.")] = None,
    allow_unfinished: AllowUnfinishedOpt = False,
) -> None:
    """Compute image and pixel metrics and write metrics.json, figures and index.html."""
    from defectae.commands import score as command

    _done(
        command.run(
            _profile(profile, sets, root, required=False),
            run=run,
            residuals=residuals,
            gt=gt,
            protocol=protocol,
            out=out,
            allow_unfinished=allow_unfinished,
            resolution=resolution,
        )
    )


@app.command("run")
def run_pipeline(
    profile: ProfileOpt = None,
    sets: SetOpt = None,
    root: RootOpt = None,
    start: Annotated[
        Optional[str],
        typer.Option("--from", help="Run this stage and every later one, even if up to date."),
    ] = None,
    until: Annotated[Optional[str], typer.Option("--until", help="Stop after this stage.")] = None,
) -> None:
    """Prepare, augment, train, tile-test and score in one go, skipping stages already up to date."""
    from defectae.commands import run as command

    _done(command.run(profile, sets or [], root, start=start, until=until))


@app.command()
def export(
    run: Annotated[Path, typer.Option("--run", help="Run folder with a checkpoint.")],
    fmt: Annotated[str, typer.Option("--format", help="torchscript, onnx or all.")] = "all",
    int8: Annotated[
        bool, typer.Option("--int8", help="Also write an INT8-quantized CPU model.")
    ] = False,
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Output folder (default RUN/export).")
    ] = None,
    tolerance: Annotated[
        Optional[float],
        typer.Option(
            "--tolerance",
            min=0.0,
            help="Largest max-abs difference from the eager model (default 1e-4).",
        ),
    ] = None,
    allow_unfinished: AllowUnfinishedOpt = False,
) -> None:
    """Export the model and the whole-image inspector, verified against the eager model."""
    from defectae.commands import export as command

    _done(
        command.run(
            run=run,
            fmt=fmt,
            int8=int8,
            out=out,
            tolerance=command.TOLERANCE if tolerance is None else tolerance,
            allow_unfinished=allow_unfinished,
        )
    )


@app.command()
def predict(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="Image files, folders (searched recursively) or glob patterns.",
            metavar="PATH",
            show_default=False,
        ),
    ],
    run: Annotated[
        Path, typer.Option("--run", help="Run folder: its checkpoint, settings and threshold.")
    ],
    out: Annotated[
        Optional[Path], typer.Option("--out", help="Output folder (default RUN/predict).")
    ] = None,
    checkpoint: Annotated[
        Optional[Path],
        typer.Option("--checkpoint", help="Checkpoint to use (default RUN/best.pt, else last.pt)."),
    ] = None,
    from_export: Annotated[
        Optional[Path],
        typer.Option(
            "--from-export",
            help="Run an exported inspector.pt (TorchScript) or inspector.onnx instead.",
        ),
    ] = None,
    threshold: Annotated[
        Optional[float],
        typer.Option(
            "--threshold",
            help="Pixel and image threshold (default: the label-free one of the run's last score).",
        ),
    ] = None,
    allow_unfinished: AllowUnfinishedOpt = False,
) -> None:
    """Anomaly maps, masks, outlined overlays and verdicts for new images; exit 1 if one is unreadable."""
    from defectae.commands import predict as command

    summary = command.run(
        run=run,
        paths=paths,
        out=out,
        checkpoint=checkpoint,
        from_export=from_export,
        threshold=threshold,
        allow_unfinished=allow_unfinished,
    )
    command.emit_line(summary)  # one line, after the images' lines
    if summary["failed"]:
        raise typer.Exit(1)


@app.command()
def compare(
    runs: Annotated[
        Optional[list[Path]],
        typer.Argument(help="Scored run folders.", metavar="RUN", show_default=False),
    ] = None,
    profile_glob: Annotated[
        Optional[str],
        typer.Option(
            "--profile-glob",
            help="Also the latest scored run of each matching profile, e.g. 'mvtec-*-ae'.",
        ),
    ] = None,
    html: Annotated[
        Optional[Path], typer.Option("--html", help="The page (default ./compare.html).")
    ] = None,
    csv_path: Annotated[
        Optional[Path], typer.Option("--csv", help="Also write the table as CSV.")
    ] = None,
) -> None:
    """Metrics, training time and differing settings of scored runs; curves overlaid in a page."""
    from defectae.commands import compare as command

    _done(command.run(runs or [], profile_glob, html=html, csv_path=csv_path))


@app.command()
def bench(
    profile: Annotated[
        Optional[list[str]],
        typer.Option("--profile", "-p", help="Profiles to benchmark (repeatable)."),
    ] = None,
    sets: SetOpt = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    out: Annotated[Optional[Path], typer.Option("--out", help="Where to write bench.json.")] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Few repetitions (for smoke tests).")
    ] = False,
) -> None:
    """Measure parameters, FLOPs, throughput, latency and memory; write bench.json."""
    from defectae.commands import bench as command

    _done(command.run(profiles=profile or [], sets=sets or [], device=device, out=out, quick=quick))


@app.command()
def models() -> None:
    """List every model family with its parameter count and FLOPs per patch."""
    from defectae.models import catalogue

    _done(catalogue.run())


@profiles_app.command("list")
def profiles_list() -> None:
    """List dataset and model profiles (combine them as DATASET-MODEL)."""
    from defectae.profiles import catalogue

    _done(catalogue.list_profiles())


@profiles_app.command("show")
def profiles_show(
    name: Annotated[str, typer.Argument(help="DATASET-MODEL or path/to/profile.toml.")],
    sets: SetOpt = None,
    root: RootOpt = None,
) -> None:
    """Print the fully resolved profile as TOML."""
    from defectae.profiles import catalogue

    _done(catalogue.show(_profile(name, sets, root)))


GLOBAL_FLAGS = ("--json", "--verbose", "--quiet", "-v", "-q")


def _hoist_global_flags(argv: list[str]) -> list[str]:
    """Accept the global flags anywhere (`defectae train -p X --json`), as scripts write them."""
    flags = [a for a in argv if a in GLOBAL_FLAGS]
    return flags + [a for a in argv if a not in GLOBAL_FLAGS]


def _crash_log(exc: BaseException) -> Path:
    """Write the full traceback of an internal error to a log file and return its path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = "".join(traceback.format_exception(exc))
    for folder in (workspace.home() / "logs", Path(tempfile.gettempdir())):
        path = folder / f"defectae-crash-{stamp}-{os.getpid()}.log"
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(f"defectae {__version__}\n{' '.join(sys.argv)}\n\n{text}")
            return path
    return Path("(no writable folder for the log)")


def _os_error(e: OSError) -> str:
    """An operating-system refusal (permission, a folder where a file belongs, disk full) as one line."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = e.strerror or type(e).__name__
    return f"{where}: {what.lower()}" if where else what


def main() -> None:
    """Console entry point: every failure is one line on stderr.

    Exit codes: 0 success, 2 a user error (bad input, bad usage, a file the system refused),
    130 Ctrl-C, 1 an internal error (a bug: the traceback goes to a log file, named on the line)
    or, for `predict`, images it could not read (each named on its own line).
    """
    try:
        code = app(
            args=_hoist_global_flags(sys.argv[1:]), prog_name="defectae", standalone_mode=False
        )
        if isinstance(code, int) and code:  # not standalone, typer returns 130 for Ctrl-C
            sys.exit(code)
    except DefectaeError as e:
        console.error(str(e))
        sys.exit(2)
    except KeyboardInterrupt:
        console.error("interrupted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as e:  # usage: unknown command or option, bad or missing value
        console.error(f"{e.format_message()} (see `defectae --help`)")
        sys.exit(2)
    except OSError as e:
        console.error(_os_error(e))
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - the last line of defence: never a raw traceback
        console.error(
            f"internal error, a bug in defectae ({type(e).__name__}); "
            f"the full traceback is in {_crash_log(e)}"
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
