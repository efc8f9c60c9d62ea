"""Atomic file writing: a reader never sees half a file, a crash never leaves one.

Each writer writes to a temporary file in the destination folder, flushes and fsyncs it, then
renames it over the destination (``os.replace``, atomic on POSIX). Folders are checked and
created by :func:`check_dir` / :func:`ensure_dir`, whose failures (a file where a folder should
be, no permission) are one :class:`~lsa_ext.errors.LsaUserError`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from lsa_ext.errors import LsaUserError


def check_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Checks, without creating anything, that folder ``path`` exists or can be created.

    For commands that write at the end of a long run: a mistaken ``--out`` fails at once.

    Raises:
        LsaUserError: ``path`` or one of its parents is a file, or the nearest existing parent
            is not writable.
    """
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        if probe == path:
            raise LsaUserError(f"{what} {str(path)!r} is a file, not a folder")
        raise LsaUserError(f"{what} {str(path)!r} cannot be created: {str(probe)!r} is a file")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise LsaUserError(f"{what} {str(path)!r} is not writable ({str(probe)!r}: permission "
                           "denied)")
    return path


def ensure_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Creates folder ``path`` (and its parents) if needed and returns it as a ``Path``.

    Raises:
        LsaUserError: ``path`` or one of its parents is a file, or the folder cannot be created
            (permissions, read-only file system); the message names ``what`` and the path.
    """
    path = check_dir(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LsaUserError(f"cannot create {what} {str(path)!r}: {exc.strerror or exc}") from None
    return path


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Opens a temporary file next to ``path``; on success renames it onto ``path``."""
    path = Path(path)
    ensure_dir(path.parent, "folder")
    if path.is_dir():
        raise LsaUserError(f"cannot write {str(path)!r}: it is a folder")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Writes ``obj`` as JSON to ``path`` atomically (NaN/inf are rejected: strict JSON)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def atomic_write_csv(
    path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str]
) -> None:
    """Writes ``rows`` as CSV (UTF-8, ``\\n`` line ends) with a ``fieldnames`` header, atomically.

    Each row is a mapping from field name to value (missing fields are written empty); values
    are written with ``str`` (format numbers before, for a fixed number of digits).

    Raises:
        ValueError: a row holds a key that is not in ``fieldnames``.
    """
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fieldnames), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def atomic_write_with(path: str | os.PathLike, writer: Callable[[IO], None]) -> None:
    """Calls ``writer(binary_file)`` on a temporary file, then renames it onto ``path``.

    Example: ``atomic_write_with(p, lambda f: torch.save(state, f))`` or
    ``atomic_write_with(p, lambda f: fig.savefig(f, format="png"))``.
    """
    with atomic_open(path, "wb") as fh:
        writer(fh)
