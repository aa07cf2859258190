"""Atomic file writing, hashing and checked opening of our HDF5 files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import h5py

from defectae import console
from defectae.errors import DefectaeError

PART_SEP = "~"  # .NAME.PID~RANDOM.part: the pid tells whether the writer still runs


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    An exception or Ctrl-C inside the block removes the temporary file, so a reader
    never sees a partial output and an earlier complete file is kept. A Ctrl-C that a
    library swallowed (h5py's filter callbacks print "Exception ignored" and go on) is
    remembered and raised again before the rename.
    """
    path = output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(path.parent)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}{PART_SEP}", suffix=".part", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(
        tmp_path, 0o666 & ~_umask()
    )  # mkstemp makes 0600; outputs follow the umask like any file
    try:
        with _remember_interrupts() as interrupted:
            yield tmp_path
            if interrupted:
                raise KeyboardInterrupt
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def _remember_interrupts() -> Iterator[list[int]]:
    """Ctrl-C raises KeyboardInterrupt as usual and is also noted in the yielded list."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    noted: list[int] = []
    previous = signal.getsignal(signal.SIGINT)

    def note(signum: int, frame: object) -> None:
        noted.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)


def _writer_alive(part: Path) -> bool:
    """Whether the process that is writing a .part file still runs (its pid is in the name)."""
    try:
        pid = int(part.name.rsplit(PART_SEP, 1)[0].rsplit(".", 1)[1])
    except (IndexError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_parts(folder: Path) -> list[Path]:
    """Delete the .part files a killed command left in `folder` (their writer no longer runs)."""
    removed = []
    for part in folder.glob(".*.part"):
        if not _writer_alive(part):
            with contextlib.suppress(OSError):
                part.unlink()
                removed.append(part)
    if removed:
        console.info(
            f"removed {len(removed)} partial file(s) left by an interrupted run in {folder}"
        )
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def output_file(path: str | Path) -> Path:
    """An output file path, checked before any work: a folder there is a user error."""
    path = Path(path)
    if path.is_dir():
        raise DefectaeError(f"{path}: is a folder; expected the path of a file to write")
    return path


def output_dir(path: str | Path) -> Path:
    """An output folder path, checked before any work: a file there is a user error."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DefectaeError(f"{path}: is a file; expected a folder to write into")
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a small text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so large files do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def open_h5(
    path: str | Path,
    fmt: str,
    version: int,
    command: str,
    required: Iterable[str] = (),
    older: Iterable[int] = (),
) -> h5py.File:
    """Open one of defectae's HDF5 files read-only after checking its format, version and datasets.

    `command` is the defectae command that writes the file, named in the error messages;
    `older` are earlier format versions the caller still reads.
    """
    path = Path(path)
    kind = fmt.removeprefix("defectae-")
    if path.is_dir():
        raise DefectaeError(
            f"{path}: is a folder; expected a {kind} file written by `defectae {command}`"
        )
    if not path.is_file():
        raise DefectaeError(f"{path}: {kind} file not found; run `defectae {command}` first")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise DefectaeError(f"{path}: not a readable HDF5 file") from None
    try:
        if f.attrs.get("format") != fmt:
            raise DefectaeError(f"{path}: not a defectae {kind} file (attribute format != '{fmt}')")
        found = int(f.attrs.get("format_version", -1))
        if found != version and found not in set(older):
            raise DefectaeError(
                f"{path}: {kind} format version {found}, expected {version}; run `defectae {command}` again"
            )
        for key in required:
            if key not in f:
                raise DefectaeError(f"{path}: missing dataset '{key}'")
    except BaseException:
        f.close()
        raise
    return f
