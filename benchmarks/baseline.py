"""Loads a baseline build (benchmarks/build_baseline.py) beside the current one.

``load(path, ns)`` loads the library, registers autograd for its forward ops (its own backward
ops, as lsa_ext.ops does for ``lsa_ext``) and returns a :class:`Baseline` whose
``relative_error`` / ``relative_error_multi`` run the same Python layer as the public API
(validation, then the ratio of the sums) on the baseline's kernels: the "before" contender.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lsa_ext import ops, reference


@dataclass
class Baseline:
    ns: str
    path: str

    @property
    def lib(self):
        return getattr(torch.ops, self.ns)

    def relative_error(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ops._check_pair(a, b)
        d, n = self.lib.sq_sums(a, b)
        return reference.reduce(d, n, "none", 1e-12)

    def relative_error_multi(self, cleans, perturbeds) -> torch.Tensor:
        cleans, perturbeds = ops._check_lists(cleans, perturbeds)
        d, n = self.lib.sq_sums_multi(cleans, perturbeds)
        return reference.reduce(d, n, "none", 1e-12)


_LOADED: dict[str, Baseline] = {}


def load(path: str, ns: str = "lsa_ext_base") -> Baseline:
    """Loads the baseline library at ``path`` (op namespace ``ns``) once per process."""
    if ns in _LOADED:
        return _LOADED[ns]
    torch.ops.load_library(os.path.abspath(path))
    lib = getattr(torch.ops, ns)

    def single_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def single_backward(ctx, grad_diff, grad_norm):
        clean, perturbed = ctx.saved_tensors
        return lib.sq_sums_backward(grad_diff, grad_norm, clean, perturbed)

    def multi_setup(ctx, inputs, output):
        ctx.num_layers = len(inputs[0])
        ctx.save_for_backward(*inputs[0], *inputs[1])

    def multi_backward(ctx, grad_diff, grad_norm):
        saved, n = ctx.saved_tensors, ctx.num_layers
        ga, gb = lib.sq_sums_multi_backward(grad_diff, grad_norm, list(saved[:n]),
                                            list(saved[n:]))
        return list(ga), list(gb)

    torch.library.register_autograd(f"{ns}::sq_sums", single_backward, setup_context=single_setup)
    torch.library.register_autograd(f"{ns}::sq_sums_multi", multi_backward,
                                    setup_context=multi_setup)
    _LOADED[ns] = Baseline(ns, path)
    return _LOADED[ns]
