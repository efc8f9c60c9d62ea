"""Seeds: one home for deriving and applying them.

- :func:`seed_everything`: torch (CPU and CUDA), numpy and ``random`` from one integer.
- :func:`batch_seed`: a seed per global batch, independent of how batches are spread over ranks.
- :func:`rng_scope`: torch's global RNG seeded inside a block, restored after.
- :func:`reseed` / :func:`batch_seeding`: restart perturbations' private generators per batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seeds ``torch`` (CPU and CUDA), ``numpy`` and ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def batch_seed(seed: int, index: int, salt: str = "") -> int:
    """A 63-bit seed derived from ``(seed, index, salt)``, independent of the number of ranks.

    Seed a generator per global batch (or sample) with it so random perturbations do not
    depend on how the data is sharded.
    """
    h = hashlib.blake2b(f"{seed}:{index}:{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def rng_scope(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Seeds torch's global RNG (CPU, and ``device`` if CUDA) inside, restores it after.

    For perturbations that draw from the global RNG (e.g. other libraries' attacks)::

        with rng_scope(batch_seed(seed, k)):
            x_hat = attack(x, y)
    """
    dev = torch.device(device) if device is not None else None
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if (
        dev is not None and dev.type == "cuda") else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def reseed(perturbation: Any, seed: int) -> bool:
    """Restarts a perturbation's private generator from ``seed`` if it has one.

    Calls ``perturbation.reseed(seed)`` (lsa_ext attacks and noises). Returns False when the
    object has no such method (it then draws from the global RNG: seed that with
    :func:`rng_scope` or ``torch.manual_seed``).
    """
    fn = getattr(perturbation, "reseed", None)
    if callable(fn):
        fn(seed)
        return True
    return False


@contextlib.contextmanager
def batch_seeding(
    perturbations: Mapping[str, Any], seed: int
) -> Iterator[Callable[[int], None]]:
    """Makes each batch's randomness a function of ``(seed, batch index)`` only.

    Yields ``reseed_batch(k)``; call it before perturbing global batch ``k``. It reseeds each
    perturbation ``i`` that has a ``reseed`` method (lsa_ext noises and attacks) with
    ``batch_seed(s_i, k)`` — ``s_i`` is the perturbation's own integer ``seed`` attribute as
    it was on entry, else ``seed + i`` — and torch's global RNG (all devices) with
    ``batch_seed(seed, k, "global")`` (for callables drawing from it). Then a run whose batches
    are split over any number of ranks draws exactly the noise and attack random starts of a
    1-process run. On exit the perturbations are reseeded with their own seeds (a fresh
    stream, as when built); use inside ``torch.random.fork_rng`` to keep the caller's global
    RNG.
    """
    items = list(perturbations.values())
    owns = [getattr(p, "seed", None) for p in items]
    owns = [o if isinstance(o, int) and not isinstance(o, bool) else None for o in owns]
    bases = [seed + i if o is None else o for i, o in enumerate(owns)]

    def reseed_batch(index: int) -> None:
        for p, base in zip(items, bases, strict=True):
            reseed(p, batch_seed(base, index))
        torch.manual_seed(batch_seed(seed, index, "global"))

    try:
        yield reseed_batch
    finally:
        for p, own in zip(items, owns, strict=True):
            if own is not None:
                reseed(p, own)
