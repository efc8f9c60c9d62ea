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


# The ops the Python layer (lsa_ext.ops) registers fake kernels and autograd for.
OPS = ("sq_sums", "sq_sums_backward", "sq_sums_multi", "sq_sums_multi_backward",
       "relative_error", "relative_error_multi")


def missing_ops(namespace: object) -> list[str]:
    """The names of :data:`OPS` that ``namespace`` (``torch.ops.lsa_ext``) lacks: a build of an
    older revision of the C++ sources."""
    return [name for name in OPS if not hasattr(namespace, name)]


if LOADED and (_missing := missing_ops(torch.ops.lsa_ext)):
    LOADED = False
    LOAD_ERROR = (f"the compiled extension is older than this lsa_ext (it lacks "
                  f"{', '.join('lsa_ext::' + n for n in _missing)})")
    warnings.warn(
        f"lsa_ext: {LOAD_ERROR}; using the pure-PyTorch reference implementation (slower). "
        "Rebuild it with `make build` or `pip install --no-build-isolation -e .`.",
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


def cpu_openmp_version() -> int:
    """``_OPENMP`` version (e.g. 201511) the compiled CPU kernels were built with; 0 when they were
    built without OpenMP (they then run on one thread) or the extension is not loaded."""
    return _C.cpu_openmp_version() if LOADED else 0


def cpu_threads_last_call() -> int:
    """Threads that ran the calling thread's last compiled CPU kernel call: ``1`` when it ran
    serially (work under ~1M elements per input, one intra-op thread, a forked child), up to
    ``torch.get_num_threads()``; 0 before any call or when the extension is not loaded."""
    return _C.cpu_threads_last_call() if LOADED else 0
