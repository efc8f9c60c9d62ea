"""Options shared by the subcommands: comma-separated lists, ``--device``, Ctrl-C hints, plurals.

``--gamma 0.1,0.2``, ``--eps-grid 0,0.1,0.3``, ``--seeds 0,1,2``, ``--methods fgsm,pgd``: one
parser, so every list option accepts the same spelling (blanks and empty items ignored) and
fails with the same one-line message naming the option. ``--device`` is declared once, with
the spellings :func:`lsa_ext.devices.resolve_device` accepts.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from lsa_ext.errors import LsaUserError

T = TypeVar("T")

_KINDS = {float: ("a number", "numbers"), int: ("an integer", "integers")}


def parse_list(text: str | None, convert: Callable[[str], T], option: str) -> list[T] | None:
    """``"0.1, 0.2"`` → ``[0.1, 0.2]`` with ``convert`` (``float``, ``int``, ``str``).

    Returns ``None`` for ``None`` (option not given) and ``[]`` for an empty string.

    Raises:
        LsaUserError: an item ``convert`` rejects, e.g. ``--seeds must be an integer or
            comma-separated integers, got 'a'``.
    """
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [convert(t) for t in items]
    except ValueError:
        one, many = _KINDS.get(convert, ("a value", "values"))  # type: ignore[call-overload]
        raise LsaUserError(f"{option} must be {one} or comma-separated {many}, got {text!r}") \
            from None


def add_device_option(parser: argparse._ActionsContainer, default: str = "cpu") -> None:
    """Adds ``--device`` (``cpu``, ``cuda``, ``cuda:N`` or ``auto``; default ``default``) to a
    parser or argument group; the value is checked by :func:`lsa_ext.devices.resolve_device`."""
    parser.add_argument("--device", default=default,
                        help=f"cpu, cuda, cuda:N or auto (default: {default})")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C with a hint on how to continue (``lsa`` prints ``interrupted; <hint>``)."""

    def __init__(self, hint: str) -> None:
        super().__init__(hint)
        self.hint = hint


def plural(n: int, word: str) -> str:
    """``"1 epoch"``, ``"3 epochs"``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
