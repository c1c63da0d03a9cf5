"""Errors the user can fix (a bad configuration, input file, output folder, a diverging run, a full disk).

The ``sea`` command (:func:`sea_model.commands.cli.run_command`) prints any of :data:`USER_ERRORS` as one
line ``sea <cmd>: error: ...`` and exits with status 2 (``--debug`` shows the traceback).

Writing: :func:`writing` turns any failure to write (an ``OSError``; safetensors' ``SafetensorError``
and ``torch.save``'s ``RuntimeError``, which is what they raise on a full disk) into a
:class:`WriteError` naming the destination, the space it needs and the space free, after removing
the partial file or folder."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix; the message says what and, where it can, how."""


class WriteError(UserError):
    """A file or folder could not be written (a full disk, a file size limit, no permission)."""


# ValueError: configuration and data checks, CheckpointError; OSError: files and folders.
USER_ERRORS = (UserError, ValueError, OSError)


def one_line(err: BaseException) -> str:
    """``err`` as one line: an OSError as ``<file>: <reason>``, other messages with newlines joined."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{err.filename}: {err.strerror}"
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def is_write_failure(err: BaseException) -> bool:
    """What writers raise when a write fails: ``OSError``, ``torch.save``'s ``RuntimeError``
    ("enforce fail at inline_container.cc ... unexpected pos"), safetensors' ``SafetensorError``."""
    return isinstance(err, (OSError, RuntimeError)) or type(err).__name__ == "SafetensorError"


def _errno(err: BaseException) -> int | None:
    if isinstance(err, OSError) and err.errno:
        return err.errno
    found = re.search(r"os error (\d+)", str(err))  # safetensors: "I/O error: ... (os error 28)"
    return int(found.group(1)) if found else None


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def free_space(path: str | os.PathLike) -> int | None:
    """Bytes free on the file system of ``path`` (or of its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def write_reason(err: BaseException, need: int | None, free: int | None) -> str:
    """Why a write failed, in words: from the error number when there is one, else from the space."""
    code = _errno(err)
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and need is not None and free is not None and free < need):
        return "no space left on the device"
    if code == errno.EFBIG:
        return "file too large (a file size limit, ulimit -f, was reached)"
    if code is not None:
        return os.strerror(code).lower()
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else 'the write failed'}"


def write_error(
    dest: str | os.PathLike, err: BaseException, need: int | None, *, what: str = "", after: str = ""
) -> WriteError:
    """``cannot write <what or dest>: <reason> (needs about X MiB, Y MiB free<after>)``."""
    free = free_space(dest)
    needed = mib(need) if need is not None else "an unknown size"
    space = f"needs about {needed}, {mib(free) if free is not None else 'unknown'} free"
    return WriteError(f"cannot write {what or dest}: {write_reason(err, need, free)} ({space}{after})")


def remove(path: str | os.PathLike | None) -> None:
    """Remove a file or folder if it exists (a partial write); errors are ignored."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def atomic_write(dest: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``dest`` through a temporary file renamed into place: a reader never sees a
    partial file, and a failed write is a :class:`WriteError` (see :func:`writing`) that leaves none."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with writing(dest, need=len(data), partial=tmp):
        tmp.write_bytes(data)
        os.replace(tmp, dest)


@contextlib.contextmanager
def writing(
    dest: str | os.PathLike, *, need: int | Callable[[], int] | None = None, partial: str | os.PathLike | None = None
) -> Iterator[None]:
    """Any failure to write inside becomes a :class:`WriteError` naming ``dest`` with the space
    ``need`` (bytes, or a function giving them) and the space free; ``partial`` is removed first."""
    try:
        yield
    except WriteError:
        remove(partial)
        raise
    except Exception as err:
        if not is_write_failure(err):
            raise
        remove(partial)
        size = need() if callable(need) else need
        after = "; the partial output was removed" if partial is not None else ""
        raise write_error(dest, err, size, after=after) from err
