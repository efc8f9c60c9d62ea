"""Loads the compiled extension ``lsa_ext._C``; records why when it cannot be loaded."""

from __future__ import annotations

import logging
import warnings

import torch

log = logging.getLogger("lsa_ext")

LOAD_ERROR: str | None = None
try:
    from lsa_ext import _C  # noqa: F401  (static initialisers register torch.ops.lsa_ext.*)

    LOADED = True
except ImportError as exc:  # pragma: no cover - exercised only without a build
    LOADED = False
    LOAD_ERROR = str(exc)
    warnings.warn(
        "lsa_ext: the compiled extension could not be loaded "
        f"({exc}); using the pure-PyTorch reference implementation (slower). "
        "Build it with `make build` or `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def _registered(dispatch_key: str) -> bool:
    if not LOADED:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("lsa_ext::sq_sums", dispatch_key)


# Looked up once at import (kernels register when the library loads), so that has_kernel() is a
# plain dict lookup that torch.compile (dynamo) can trace without a graph break.
_KERNELS: dict[str, bool] = {"cpu": _registered("CPU"), "cuda": _registered("CUDA")}


def has_kernel(device_type: str) -> bool:
    """True when a compiled kernel of ``lsa_ext::sq_sums`` is registered for ``device_type``."""
    return _KERNELS.get(device_type, False)
