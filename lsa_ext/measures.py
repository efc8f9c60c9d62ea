"""Comparison measures (CM) between a layer's clean and perturbed representations.

A measure maps a pair ``(a, b)`` of ``[B, ...]`` tensors (``a`` clean, ``b`` perturbed) to
per-sample values ``[B]``. Registry :data:`MEASURES`:

================  ======================================================================
name              per-sample value
================  ======================================================================
relative_error    ``||a - b||_F / max(||a||_F, 1e-12)`` (default; the CM of Khalooei et al.,
                  arXiv 2202.02626; fused kernel :func:`lsa_ext.relative_error`)
mse               ``mean((a - b)^2)`` over the sample's elements
cosine            ``1 - cos(a, b)`` of the flattened sample (cosine distance, in [0, 2]);
                  norms clamped at 1e-12
relative_linf     ``max|a - b| / max(max|a|, 1e-12)``
================  ======================================================================

Any callable ``(a, b) -> [B]`` is accepted by :func:`get_measure` as a custom measure.
Values are float32 for float16/bfloat16/float32 input, float64 for float64 input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lsa_ext import ops
from lsa_ext.errors import LsaUserError
from lsa_ext.reference import acc_dtype

EPS = 1e-12

MeasureFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Measure:
    """A named comparison measure.

    Attributes:
        name: registry name (or the callable's ``__name__`` for a custom measure).
        fn: ``(a, b) -> [B]`` per-sample values.
        description: one line for reports.
    """

    name: str
    fn: MeasureFn
    description: str = ""

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fn(a, b)


def _flat(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acc = acc_dtype(a.dtype)
    return a.reshape(a.shape[0], -1).to(acc), b.reshape(b.shape[0], -1).to(acc)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a_i - b_i||_F / max(||a_i||_F, 1e-12)`` per sample (fused kernel)."""
    return ops.relative_error(a, b, reduction="none", eps=EPS)


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per sample: ``mean((a_i - b_i)^2)``."""
    d, _ = ops.sq_sums(a, b)
    numel = a[0].numel() if a.shape[0] else 1
    return d / max(numel, 1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine distance per sample: ``1 - <a_i, b_i> / (max(|a_i|, eps) · max(|b_i|, eps))``."""
    fa, fb = _flat(a, b)
    dot = (fa * fb).sum(dim=1)
    na = fa.norm(dim=1).clamp_min(EPS)
    nb = fb.norm(dim=1).clamp_min(EPS)
    return 1.0 - dot / (na * nb)


def relative_linf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``max|a_i - b_i| / max(max|a_i|, 1e-12)`` per sample."""
    fa, fb = _flat(a, b)
    if fa.shape[1] == 0:
        return fa.new_zeros(fa.shape[0])
    return (fa - fb).abs().amax(dim=1) / fa.abs().amax(dim=1).clamp_min(EPS)


MEASURES: dict[str, Measure] = {
    "relative_error": Measure(
        "relative_error", relative_error, "||a-b||_F / ||a||_F per sample (fused kernel)"
    ),
    "mse": Measure("mse", mse, "mean((a-b)^2) per sample"),
    "cosine": Measure("cosine", cosine, "1 - cos(a, b) per sample"),
    "relative_linf": Measure("relative_linf", relative_linf, "max|a-b| / max|a| per sample"),
}


def get_measure(name_or_callable: str | MeasureFn | Measure) -> Measure:
    """The :class:`Measure` for a registry name, a :class:`Measure` or a callable ``(a, b) -> [B]``.

    Raises:
        LsaUserError: unknown name (the message lists the choices).
        TypeError: neither a string nor a callable.
    """
    if isinstance(name_or_callable, Measure):
        return name_or_callable
    if isinstance(name_or_callable, str):
        try:
            return MEASURES[name_or_callable]
        except KeyError:
            raise LsaUserError(
                f"unknown measure {name_or_callable!r}; choices: {', '.join(MEASURES)}"
            ) from None
    if callable(name_or_callable):
        name = getattr(name_or_callable, "__name__", type(name_or_callable).__name__)
        return Measure(str(name), name_or_callable, "custom measure")
    raise TypeError(
        f"measure must be a name ({', '.join(MEASURES)}) or a callable (a, b) -> [B], "
        f"got {type(name_or_callable).__name__}"
    )
