"""The one exception type for user errors: bad paths, bad profiles, bad data."""


class DefectaeError(Exception):
    """A problem the user can fix; the CLI prints it as one red line and exits with code 2.

    The message names the file, key or value at fault and what was expected.
    Bugs are not DefectaeErrors: they stay tracebacks.
    """
