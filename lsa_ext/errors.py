"""Exception types. User mistakes raise :class:`LsaUserError` (a ``ValueError``)."""

from __future__ import annotations


class LsaUserError(ValueError):
    """A user error: bad name, shape, file or value. The CLI prints its message and exits 2."""


class LsaTypeError(TypeError):
    """A user error about a type (e.g. an integer tensor where floats are needed)."""
