"""The one exception type the CLI turns into a one-line error and exit 2."""


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file's contents).

    The CLI prints ``pyfuse <command>: error: <message>`` and exits with 2;
    the Python API lets it propagate (it is a ValueError-like condition)."""
