"""The installed `defectae` console script, run as users run it: every failure is one line.

User errors (bad usage, bad input, a file the system refused) exit 2; an internal error exits 1
with one line naming the log file that holds the traceback. Never a raw traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DEFECTAE = Path(sys.executable).with_name("defectae")


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None):
    return subprocess.run(
        [str(DEFECTAE), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def assert_one_line_error(result, code: int, *needles: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["export"], "--run"),
        (["train", "--bogus"], "--bogus"),
        (["export", "--run", "x", "--tolerance", "abc"], "--tolerance"),
        (["nonsense"], "nonsense"),
        (["tile-test", "--run"], "--run"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args, needle, tmp_path):
    assert_one_line_error(run_cli(*args, cwd=tmp_path), 2, needle)


def test_an_internal_error_is_one_line_naming_the_log_with_the_traceback(tmp_path):
    code = (
        "import sys; from defectae import cli\n"
        "@cli.app.command()\n"
        "def boom() -> None:\n"
        "    raise ZeroDivisionError('deliberate')\n"
        "sys.argv = ['defectae', 'boom']\n"
        "cli.main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "DEFECTAE_HOME": str(tmp_path)},
        timeout=300,
    )
    assert_one_line_error(result, 1, "a bug in defectae", "ZeroDivisionError")
    log = Path(result.stderr.strip().rsplit(" ", 1)[-1])
    assert log.parent == tmp_path / "logs" and "deliberate" in log.read_text()


def test_partial_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    from defectae.files import write_text_atomic

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".patches.h5.{int(dead.stdout)}~abc.part"
    stale.write_bytes(b"x" * 100)
    live = tmp_path / f".other.h5.{os.getpid()}~abc.part"  # a writer that still runs
    live.write_bytes(b"y")
    write_text_atomic(tmp_path / "out.txt", "done")
    assert not stale.exists() and live.exists() and (tmp_path / "out.txt").read_text() == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out.txt"]


def test_a_ctrl_c_that_a_library_swallowed_still_keeps_the_previous_output(tmp_path):
    import signal
    import time

    from defectae.files import atomic_path

    out = tmp_path / "patches.h5"
    out.write_text("complete earlier output")
    with pytest.raises(KeyboardInterrupt), atomic_path(out) as tmp:
        tmp.write_text("half of a new output")
        try:  # as h5py does in its C callbacks: the interrupt is printed and ignored
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            pass
    assert out.read_text() == "complete earlier output"
    assert [p.name for p in tmp_path.iterdir()] == ["patches.h5"]
