"""Algorithm 1 of Khalooei et al. (arXiv 2202.02626): the Most Vulnerable Layers (MVL) list,
and a ranking of all layers.

Input is a table of comparison-measure (CM) values of M samples at L layers, given either as

* a ``[M, L]`` array of per-sample values (numpy array, tensor or nested list), or
* per-layer sufficient statistics ``count``, ``sum``, ``sumsq``, each ``[L]``: an object with
  those attributes (e.g. ``CMStats.row(p)`` of :mod:`lsa_ext.cm_stats`) or a dict with those keys.

Algorithm 1: over all M·L values, ``μ = mean`` and ``σ = population std`` (divide by M·L),
computed from the statistics as ``σ² = Σ sumsq / Σ count − μ²``. Layer ``l`` joins the MVL when
its **mean CM over the samples** exceeds ``μ`` by more than ``η·σ``::

    mean_l − μ > η · σ

The list is returned sorted by layer index. ``η`` (default 1.0) is the user's cut-off: larger
values keep fewer layers, ``η = 0`` keeps every layer above the overall mean, negative values
keep more. Note that σ includes the spread of CM across samples within each layer, so with few
layers and noisy CMs a large η may select none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lsa_ext.errors import LsaUserError

DEFAULT_ETA = 1.0


@dataclass(frozen=True)
class MvlDetail:
    """Outcome of Algorithm 1: ``layers`` (indices, sorted), ``mu``, ``sigma``, ``eta`` and
    ``threshold = mu + eta·sigma`` against which each layer's mean CM (``means``) was compared."""

    layers: list[int]
    mu: float
    sigma: float
    eta: float
    threshold: float
    means: list[float]


def layer_stats(table: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(count, sum, sumsq)`` per layer, float64 ``[L]`` each, from either input form."""
    keys = ("count", "sum", "sumsq")
    if isinstance(table, dict) and all(k in table for k in keys):
        parts = [table[k] for k in keys]
    elif all(hasattr(table, k) for k in keys):
        parts = [getattr(table, k) for k in keys]
    else:
        arr = np.asarray(_np(table), dtype=np.float64)
        if arr.ndim != 2:
            raise LsaUserError(f"CM table must be [M samples, L layers], got shape {arr.shape}")
        parts = [np.full(arr.shape[1], arr.shape[0]), arr.sum(axis=0), np.square(arr).sum(axis=0)]
    count, s, ss = (np.asarray(_np(v), dtype=np.float64).reshape(-1) for v in parts)
    if not (count.shape == s.shape == ss.shape) or count.size == 0:
        raise LsaUserError("CM statistics must be three non-empty [L] arrays of equal length")
    if np.any(count <= 0):
        bad = [int(i) for i in np.flatnonzero(count <= 0)]
        raise LsaUserError(f"no CM values for layer(s) {bad}")
    return count, s, ss


def _np(v: object) -> object:
    try:
        import torch

        if isinstance(v, torch.Tensor):
            return v.detach().to("cpu", dtype=torch.float64).numpy()
    except ImportError:  # pragma: no cover
        pass
    return v


def mvl_detail(table: object, eta: float = DEFAULT_ETA) -> MvlDetail:
    """Algorithm 1 with its intermediate values. See the module docstring."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta):
        raise LsaUserError(f"eta must be a finite number, got {eta!r}")
    count, s, ss = layer_stats(table)
    total = count.sum()
    mu = float(s.sum() / total)
    var = float(ss.sum() / total - mu * mu)
    sigma = math.sqrt(max(var, 0.0))
    means = s / count
    threshold = mu + float(eta) * sigma
    layers = [int(i) for i in np.flatnonzero(means - mu > float(eta) * sigma)]
    return MvlDetail(layers, mu, sigma, float(eta), threshold, [float(m) for m in means])


def most_vulnerable_layers(table: object, eta: float = DEFAULT_ETA) -> list[int]:
    """Indices of the layers whose mean CM − μ > η·σ (Algorithm 1), sorted by layer index."""
    return mvl_detail(table, eta).layers


def rank_layers(table: object) -> list[int]:
    """All layer indices ordered by mean CM, most vulnerable (largest) first; ties by index."""
    count, s, _ = layer_stats(table)
    means = s / count
    return [int(i) for i in sorted(range(means.size), key=lambda i: (-means[i], i))]
