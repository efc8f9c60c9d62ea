"""Atomic file writing: a reader never sees half a file, a crash never leaves one.

Each writer writes to a temporary file in the destination folder, flushes and fsyncs it, then
renames it over the destination (``os.replace``, atomic on POSIX). The temporary file is
created with mode ``0o666`` filtered by the process umask (the kernel applies it, as for any
``open(path, "w")``): under umask 022 outputs are ``0644``, readable by colleagues and other
tools, and no other process can see the file before it is complete under its final name.
Folders are checked and created by :func:`check_dir` / :func:`ensure_dir`; failures (a file
where a folder should be, no permission, a read-only file system) are one
:class:`~lsa_ext.errors.LsaUserError` naming the path and the reason.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import secrets
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
    if probe.exists() and _read_only_fs(probe):
        raise LsaUserError(f"{what} {str(path)!r} is not writable ({str(probe)!r} is on a "
                           "read-only file system)")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise LsaUserError(f"{what} {str(path)!r} is not writable ({str(probe)!r}: permission "
                           "denied)")
    return path


def _read_only_fs(path: Path) -> bool:
    """True when ``path`` lies on a file system mounted read-only (``ST_RDONLY``)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows): os.access decides
        return False


def os_error_text(exc: OSError) -> str:
    """The reason of an ``OSError`` in words: ``"read-only file system"``, ``"permission
    denied"``, ``"no space left on device"``, else its ``strerror``."""
    named = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
             errno.EPERM: "operation not permitted", errno.ENOSPC: "no space left on device",
             getattr(errno, "EDQUOT", -1): "disk quota exceeded"}
    return named.get(exc.errno or 0) or exc.strerror or str(exc)


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
        raise LsaUserError(f"cannot create {what} {str(path)!r}: {os_error_text(exc)}") from None
    return path


# errors of the place written to, not of the program: reported as one line (LsaUserError)
_ENVIRONMENT_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC,
                       getattr(errno, "EDQUOT", errno.ENOSPC)}


def _create_temp(folder: Path, name: str) -> tuple[int, Path]:
    """A new, empty, exclusively created file ``folder/.name.<random>.tmp``, opened for writing,
    with mode ``0o666`` minus the umask (what ``open(path, "w")`` gives a new file)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) \
        | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(folder))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Opens a temporary file next to ``path``; on success renames it onto ``path``.

    The file gets mode ``0o666 & ~umask`` (0644 under umask 022), like a plain ``open``.

    Raises:
        LsaUserError: the folder cannot be created or written (the message names the reason:
            read-only file system, permission denied, no space left, ...) or ``path`` is a
            folder, or writing fails for one of those reasons (the old file is then kept).
            Other errors raised by the caller's writing are passed on unchanged.
    """
    path = Path(path)
    ensure_dir(path.parent, "folder")
    if path.is_dir():
        raise LsaUserError(f"cannot write {str(path)!r}: it is a folder")
    try:
        fd, tmp = _create_temp(path.parent, path.name)
    except OSError as exc:
        raise LsaUserError(f"cannot write {str(path)!r}: {os_error_text(exc)}") from None
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:
            raise LsaUserError(f"cannot write {str(path)!r}: {os_error_text(exc)}") from exc
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
