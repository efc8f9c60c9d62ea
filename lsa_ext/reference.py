"""Pure-PyTorch reference of the fused ops: the tests' oracle and the fallback backend.

Semantics are identical to :mod:`lsa_ext.ops`; the difference is cost (temporaries of the
input's size, several passes over memory).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation/output dtype: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[B, numel / B]`` (also for B = 0 and for samples with no elements)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def sq_sums(clean: torch.Tensor, perturbed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(sum (clean - perturbed)^2, sum clean^2)``, each ``[B]``, in ``acc_dtype``."""
    acc = acc_dtype(clean.dtype)
    a = _rows(clean).to(acc)
    b = _rows(perturbed).to(acc)
    return (a - b).square().sum(dim=1), a.square().sum(dim=1)


def sq_sums_multi(
    cleans: Sequence[torch.Tensor], perturbeds: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sq_sums` for L layers of one batch size: two ``[L, B]`` tensors."""
    pairs = [sq_sums(a, b) for a, b in zip(cleans, perturbeds, strict=True)]
    return torch.stack([d for d, _ in pairs]), torch.stack([n for _, n in pairs])


def eps_floor(eps: float, dtype: torch.dtype) -> float:
    """The denominator floor for inputs of ``dtype``: ``max(eps, finfo(dtype).tiny)``.

    ``tiny`` is the dtype's smallest normal number (float16: 2**-14 ≈ 6.1e-5; bfloat16 and
    float32: 2**-126; float64: 2**-1022). A zero-norm clean sample's gradients are bounded by
    ``|upstream| / floor`` per element, and ``finfo.max · tiny ≈ 4`` in every IEEE format, so
    they stay finite in the input's dtype for ``|upstream| < 4`` (the gradient of a sum or mean
    of the result has ``|upstream| ≤ 1``). With the default ``eps = 1e-12`` only float16
    changes (``1e-12`` would give gradients of 1e12, beyond float16's 65504).
    """
    return max(float(eps), torch.finfo(dtype).tiny)


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` whose gradient at ``x == 0`` is 0 instead of inf (NaN still propagates)."""
    zero = x == 0
    return torch.where(zero, 0.0, torch.where(zero, 1.0, x).sqrt())


def ratio(diff: torch.Tensor, norm: torch.Tensor, eps: float) -> torch.Tensor:
    """``sqrt(diff) / max(sqrt(norm), eps)``, elementwise, with finite gradients everywhere."""
    if eps * eps >= torch.finfo(norm.dtype).tiny:
        # sqrt(max(norm, eps^2)) == max(sqrt(norm), eps); its gradient is 0 where clamped.
        den = norm.clamp_min(eps * eps).sqrt()
    else:  # eps^2 would underflow in norm's dtype
        den = safe_sqrt(norm).clamp_min(eps)
    return safe_sqrt(diff) / den


def ratio_backward(
    grad: torch.Tensor, diff: torch.Tensor, norm: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`ratio` w.r.t. ``diff`` and ``norm`` for an upstream ``grad``.

    The chain rule through :func:`ratio`'s own ops, written out as autograd applies it (``sqrt``:
    ``g / (2 sqrt(x))``, 0 at 0 for :func:`safe_sqrt`; ``clamp_min``: ``g`` where ``x >= min``,
    else 0; division: ``g / den`` and ``-g (num / den) / den``), so the compiled op's backward
    (lsa_ext.ops) equals autograd of the reference. All tensors elementwise, one dtype.
    """
    dz = diff == 0
    num = torch.where(dz, 0.0, torch.where(dz, 1.0, diff).sqrt())
    if eps * eps >= torch.finfo(norm.dtype).tiny:
        den = norm.clamp_min(eps * eps).sqrt()
        g_den = -grad * ((num / den) / den)
        g_norm = torch.where(norm >= eps * eps, g_den / (2 * den), 0.0)
    else:
        nz = norm == 0
        root = torch.where(nz, 1.0, norm).sqrt()
        s = torch.where(nz, 0.0, root)
        den = s.clamp_min(eps)
        g_den = -grad * ((num / den) / den)
        g_norm = torch.where(nz, 0.0, torch.where(s >= eps, g_den, 0.0) / (2 * root))
    g_diff = torch.where(dz, 0.0, (grad / den) / (2 * torch.where(dz, 1.0, num)))
    return g_diff, g_norm


def reduce(diff: torch.Tensor, norm: torch.Tensor, reduction: str, eps: float) -> torch.Tensor:
    """Applies ``reduction`` along the last (sample) dimension of ``diff``/``norm``."""
    if reduction == "batch":
        return ratio(diff.sum(dim=-1), norm.sum(dim=-1), eps)
    r = ratio(diff, norm, eps)
    if reduction == "none":
        return r
    if reduction == "mean":
        return r.mean(dim=-1)
    if reduction == "sum":
        return r.sum(dim=-1)
    raise ValueError(f"unknown reduction {reduction!r}")


def relative_error(
    clean: torch.Tensor, perturbed: torch.Tensor, reduction: str = "none", eps: float = 1e-12
) -> torch.Tensor:
    """Reference of :func:`lsa_ext.relative_error` (no argument validation)."""
    d, n = sq_sums(clean, perturbed)
    return reduce(d, n, reduction, eps_floor(eps, clean.dtype))


def relative_error_multi(
    cleans: Sequence[torch.Tensor],
    perturbeds: Sequence[torch.Tensor],
    reduction: str = "none",
    eps: float = 1e-12,
) -> torch.Tensor:
    """Reference of :func:`lsa_ext.relative_error_multi` (no argument validation)."""
    d, n = sq_sums_multi(cleans, perturbeds)
    return reduce(d, n, reduction, eps_floor(eps, cleans[0].dtype))
