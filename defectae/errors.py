"""The one exception type for user errors: bad paths, bad profiles, bad data."""


class DefectaeError(Exception):
    """A problem the user can fix; the CLI prints it as one red line and exits with code 2.

    The message names the file, key or value at fault and what was expected.
    Bugs are not DefectaeErrors: they stay tracebacks.
    """


def first_line(e: BaseException, limit: int = 200) -> str:
    """The exception's type and the first line of its message (at most `limit` characters)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit]}" if text else type(e).__name__
