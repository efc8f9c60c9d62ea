"""How many intra-op CPU threads torch uses: the ``--threads`` option of every ``lsa`` command.

Too many threads hurt more than too few: on a machine whose cores are busy with other work, or
for a tiny model whose operations are too small to split, torch's default (one thread per core)
made small-model runs 3.7–18× slower than one thread. ``"auto"`` (the default) therefore picks:

1. the value of ``OMP_NUM_THREADS`` when the user set it (an explicit choice wins);
2. one thread for a tiny model (the embedded datasets' default models:
   ``presets.PRESETS[name].small_model``);
3. otherwise torch's default, capped at the cores not busy with other work (available cores
   minus the 1-minute load average, at least 1).

A number sets exactly that many threads.
"""

from __future__ import annotations

import logging
import os

import torch

from lsa_ext.checks import check_int
from lsa_ext.errors import LsaUserError

log = logging.getLogger("lsa_ext.threads")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def idle_cores() -> int:
    """Available cores minus the 1-minute load average (rounded), at least 1."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return available_cores()
    return max(1, available_cores() - round(load))


def choose_threads(requested: int | str | None = "auto", *, small_model: bool = False
                   ) -> tuple[int, str]:
    """The number of intra-op threads for ``requested`` and the reason, in words.

    Args:
        requested: a positive integer, or ``"auto"``/``None`` (see the module docstring).
        small_model: the run's model is tiny (one thread is fastest).

    Raises:
        LsaUserError: ``requested`` is neither ``"auto"`` nor an integer ≥ 1.
    """
    if requested is None or (isinstance(requested, str) and requested.strip().lower() == "auto"):
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        if env.isdigit() and int(env) > 0:
            return int(env), "OMP_NUM_THREADS"
        if small_model:
            return 1, "tiny model"
        n = min(torch.get_num_threads(), idle_cores())
        return n, f"torch's default capped at the idle cores ({idle_cores()} of " \
                  f"{available_cores()})"
    if isinstance(requested, str):
        try:
            requested = int(requested)
        except ValueError:
            raise LsaUserError(f"--threads must be 'auto' or an integer >= 1, got "
                               f"{requested!r}") from None
    n = check_int("threads", requested, minimum=1)
    if n > available_cores():
        log.warning("%d intra-op threads requested on %d available cores: the threads will "
                    "take turns on the cores (oversubscription), which is slower than %d",
                    n, available_cores(), available_cores())
    return n, "requested"


def set_threads(requested: int | str | None = "auto", *, small_model: bool = False) -> int:
    """Applies :func:`choose_threads` with ``torch.set_num_threads``; returns the number."""
    n, why = choose_threads(requested, small_model=small_model)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    log.debug("intra-op threads: %d (%s)", n, why)
    return n
