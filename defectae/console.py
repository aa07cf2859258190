"""Terminal output: human messages on stderr, the `--json` summary alone on stdout.

Every command reports through here so that `--json` output is never mixed with
progress bars or tables, and `--quiet` / `--verbose` mean the same everywhere.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

T = TypeVar("T")

stderr = Console(stderr=True, highlight=False)
stdout = Console(highlight=False, soft_wrap=True)


@dataclass
class OutputMode:
    """Global output options, set once by the CLI callback."""

    verbose: bool = False
    quiet: bool = False
    json: bool = False


mode = OutputMode()


def info(message: str) -> None:
    """A normal progress message (suppressed by --quiet)."""
    if not mode.quiet:
        stderr.print(message, soft_wrap=True)  # never wrap a path or command mid-way


def debug(message: str) -> None:
    """Detail shown only with --verbose."""
    if mode.verbose and not mode.quiet:
        stderr.print(f"[dim]{message}[/dim]")


def warn(message: str) -> None:
    """A one-line warning; shown even with --quiet."""
    stderr.print(Text.assemble(("warning: ", "yellow"), message), soft_wrap=True)


def error(message: str) -> None:
    """The one red line for a user error."""
    stderr.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)


def show(renderable: Any) -> None:
    """Print a rich table or panel for humans (stderr when --json owns stdout)."""
    if mode.quiet:
        return
    (stderr if mode.json else stdout).print(renderable)


def jsonable(value: Any) -> Any:
    """`value` as plain JSON types: non-finite floats become null, paths and numpy/torch scalars plain."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "__fspath__"):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value


def emit_json(summary: dict[str, Any]) -> None:
    """Print the machine-readable summary on stdout when --json was given."""
    if mode.json:
        print(json.dumps(jsonable(summary), indent=2, sort_keys=False), flush=True)


class _Remaining(TimeRemainingColumn):
    """Rich's time remaining, or the task's own `eta` field (seconds) where it has one: a
    whole training run knows its ETA better than the speed of its last steps does."""

    def render(self, task: Task) -> Text:
        eta = task.fields.get("eta")
        if eta is None:
            return super().render(task)
        minutes, seconds = divmod(round(eta), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"{hours}:{minutes:02d}:{seconds:02d}", style="progress.remaining")


def progress() -> Progress:
    """A rich progress display on stderr, hidden with --quiet and when stderr is not a terminal."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        _Remaining(),
        console=stderr,
        disable=mode.quiet
        or not stderr.is_terminal,  # bars are for people; logs and pipes get none
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar."""
    with progress() as bar:
        task = bar.add_task(description, total=total if total is not None else _len(items))
        for item in items:
            yield item
            bar.advance(task)


def _len(items: Iterable[Any]) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None
