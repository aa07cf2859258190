"""Stage records of `defectae run`: which settings and inputs produced a stage's output.

One small JSON file beside each output (`<stem>.stage.json`), written atomically after the
stage succeeds. `run` skips a stage only when the record says its output came from the same
settings and inputs, and the output is the very file the stage wrote.

Files are identified by size and modification time (nanoseconds), not by content hash:
every defectae output is written to a temporary file and renamed, so any rewrite gives a new
mtime, while hashing a prepared or patch file of several GB would cost as much as a small
stage. The path is recorded but not compared, so a workspace moved with its mtimes kept
(`cp -a`, `rsync -a`) stays up to date; `--from` forces a stage whatever its record says.
"""

from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defectae import __version__
from defectae.files import write_text_atomic
from defectae.profiles.load import flatten

FORMAT = "defectae-stage"
FORMAT_VERSION = 1


def record_path(output: Path) -> Path:
    """Where the record of `output` lives: `<stem>.stage.json` in the same folder."""
    return output.with_name(f"{output.stem}.stage.json")


def file_identity(path: Path) -> dict[str, Any] | None:
    """A file's path, size and mtime (ns), or None when it is not a file."""
    try:
        st = path.stat()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def settings_hash(settings: dict[str, Any]) -> str:
    """SHA-256 of the settings as canonical JSON (sorted keys), the part of a record compared."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class StageRecord:
    """What produced one stage's output: settings, input files, the output and its checked file."""

    stage: str
    settings: dict[str, Any]
    inputs: dict[str, dict[str, Any] | None]  # name -> file_identity
    output: str  # the file or folder the stage produced (train: the run folder)
    output_file: dict[str, Any] | None  # identity of the file that stands for it

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "version": __version__,
                "stage": self.stage,
                "settings_sha256": settings_hash(self.settings),
                "settings": self.settings,
                "inputs": self.inputs,
                "output": self.output,
                "output_file": self.output_file,
            },
            indent=2,
        )


def write_record(path: Path, record: StageRecord) -> None:
    """Write a stage record atomically (only after the stage succeeded)."""
    write_text_atomic(path, record.to_json() + "\n")


def read_record(path: Path) -> StageRecord | None:
    """The record at `path`; None when missing, damaged or of another format (the stage reruns)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    if data.get("format_version") != FORMAT_VERSION:
        return None
    try:
        return StageRecord(
            str(data["stage"]),
            dict(data["settings"]),
            dict(data["inputs"]),
            str(data["output"]),
            data["output_file"],
        )
    except (KeyError, TypeError, ValueError):
        return None


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two settings dicts (nested dicts walked)."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def stale_reason(
    record: StageRecord | None,
    settings: dict[str, Any],
    inputs: dict[str, dict[str, Any] | None],
    output_file: dict[str, Any] | None,
) -> str | None:
    """Why a stage must run again given its record, or None when its output is up to date."""
    if output_file is None:
        return "no output yet"
    if record is None:
        return "no stage record"
    if settings_hash(record.settings) != settings_hash(settings):
        keys = changed_keys(record.settings, settings)
        shown = ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")
        return f"changed: {shown or 'settings'}"
    for name, identity in inputs.items():
        if not same_file(record.inputs.get(name), identity):
            return f"input {name} changed"
    if not same_file(record.output_file, output_file):
        return "output rewritten since its record"
    return None


def same_file(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two identities are of the same file version (size and mtime; see the module doc)."""
    if a is None or b is None:
        return False
    return (a.get("size"), a.get("mtime_ns")) == (b.get("size"), b.get("mtime_ns"))
