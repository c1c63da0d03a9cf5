"""Errors the user can fix (a bad configuration, input file, output folder, a diverging run).

The ``sea`` command (:func:`sea_model.commands.cli.run_command`) prints any of :data:`USER_ERRORS` as one
line ``sea <cmd>: error: ...`` and exits with status 2 (``--debug`` shows the traceback)."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message says what and, where it can, how."""


# ValueError: configuration and data checks, CheckpointError; OSError: files and folders.
USER_ERRORS = (UserError, ValueError, OSError)


def one_line(err: BaseException) -> str:
    """``err`` as one line: an OSError as ``<file>: <reason>``, other messages with newlines joined."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{err.filename}: {err.strerror}"
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__
