"""Progress bars for loops over datasets (tqdm on stderr).

Shown when stderr is a terminal; ``LSA_PROGRESS=1`` forces them on, ``LSA_PROGRESS=0`` off.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(
    iterable: Iterable[T], desc: str = "", total: int | None = None, enabled: bool | None = None
) -> Iterator[T]:
    """Wraps ``iterable`` in a progress bar. ``enabled=None`` follows ``LSA_PROGRESS`` / the tty."""
    if enabled is None:
        env = os.environ.get("LSA_PROGRESS")
        enabled = None if env is None else env not in ("0", "", "false")
    disable = None if enabled is None else not enabled
    bar = tqdm(iterable, desc=desc, total=total, disable=disable, leave=False, dynamic_ncols=True)
    return iter(bar)
