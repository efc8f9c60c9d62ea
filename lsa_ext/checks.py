"""Validation of user-given numbers, clip ranges and batch sizes: one home for every entry point.

Each checker returns the normalised value or raises :class:`~lsa_ext.errors.LsaUserError` with
one line that names the argument, so attacks, noises, evaluation and training word their errors
alike.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from lsa_ext.errors import LsaUserError

Clip = tuple[float, float] | None


def check_number(name: str, value: Any, *, positive: bool = False) -> float:
    """A finite real ``>= 0`` (``> 0`` with ``positive``) as float; bools are rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise LsaUserError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise LsaUserError(f"{name} must be finite, got {value}")
    if value < 0 or (positive and value == 0):
        raise LsaUserError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")
    return value


def check_real(name: str, value: Any) -> float:
    """Any finite real (negative allowed) as float; bools are rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise LsaUserError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_int(name: str, value: Any, minimum: int) -> int:
    """An integer ``>= minimum`` (numpy integers accepted, bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise LsaUserError(f"{name} must be an integer, got {value!r}")
    if int(value) < minimum:
        raise LsaUserError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """A real ``bool`` (``True`` / ``False``); anything else — ``"False"``, ``"no"``, ``1``,
    ``None`` — is rejected, since Python would read most of them as true. Spec strings
    (:func:`lsa_ext.perturbations.parse_perturbation_specs`) turn ``true`` / ``false`` into
    bools before this check."""
    if not isinstance(value, bool):
        raise LsaUserError(f"{name} must be True or False (in a perturbation spec: true or "
                           f"false), got {value!r}")
    return value


def check_batch_size(batch_size: Any) -> int:
    """A batch size: an integer ``>= 1``."""
    return check_int("batch_size", batch_size, minimum=1)


def check_clip(clip: Any) -> Clip:
    """``None`` or a pair ``(lo, hi)`` of finite numbers with ``lo < hi``, as floats."""
    if clip is None:
        return None
    if isinstance(clip, str):  # would unpack character by character
        raise LsaUserError(f"clip must be None or a pair (lo, hi), got {clip!r} (in a "
                           "perturbation spec: clip=lo:hi or clip=none)")
    try:
        lo, hi = clip
    except (TypeError, ValueError):
        raise LsaUserError(f"clip must be None or a pair (lo, hi), got {clip!r}") from None
    lo = check_real("clip lower bound", lo)
    hi = check_real("clip upper bound", hi)
    if not lo < hi:
        raise LsaUserError(f"clip must have lo < hi, got {clip!r}")
    return (lo, hi)


def check_in_clip_range(x: torch.Tensor, clip: Clip, tol: float = 1e-6) -> None:
    """Raises when inputs ``x`` lie outside ``clip`` by more than ``tol`` (a wrong data range)."""
    if clip is not None and x.numel():
        lo, hi = clip
        if bool(x.min() < lo - tol) or bool(x.max() > hi + tol):
            raise LsaUserError(
                f"inputs lie outside the clip range {tuple(clip)} (min {float(x.min()):.4g}, "
                f"max {float(x.max()):.4g}); pass clip=None or the data's range"
            )


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"`` — for wrapping foreign errors in one line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
