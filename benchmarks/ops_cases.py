"""Benchmark cases for the fused relative-error ops: data and contenders, shared by
bench_ops.py (pytest-benchmark) and ops_table.py (one table, all contenders interleaved).

Every case holds one set of inputs; its contenders are zero-argument callables on that data:
``fused`` (lsa_ext), ``op`` (forward cases: the kernel alone,
``torch.ops.lsa_ext.relative_error``, no Python layer), ``sums+ratio`` (the public call as it was
before the ratio moved into the kernel: the same sums kernel, then the ratio as PyTorch ops on
``[B]`` tensors), ``before`` (the same public API on a baseline build's kernels, see
baseline.py; only when one is given), ``naive`` (the expression a user would write),
``compiled`` (torch.compile of that expression), ``loop`` (one fused call per layer),
``bandwidth`` (``a.sum() + b.sum()``: reads both inputs once).

torch.compile bakes the intra-op thread count into its C++ kernels (``#pragma omp parallel
num_threads(N)``, N = torch.get_num_threads() at compile time, no guard on it): build the cases
after torch.set_num_threads, and call :func:`reset_compiled` when the thread count changes.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

# A private Inductor cache per process: the compiled contender is compiled here, for this
# process's thread count, never loaded from a cache another process (another torch build, other
# flags, a half-written precompiled header) left in the shared default folder.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lsa_bench_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402

import lsa_ext  # noqa: E402
from lsa_ext import ops, reference  # noqa: E402

# Output shapes of the 16 conv layers of VGG-19 on a 3x32x32 (CIFAR) input: blocks of 2, 2, 4, 4,
# 4 convs with 64, 128, 256, 512, 512 channels, each block followed by a 2x2 max-pool.
VGG19_CIFAR_CONV_SHAPES: list[tuple[int, int, int]] = (
    [(64, 32, 32)] * 2 + [(128, 16, 16)] * 2 + [(256, 8, 8)] * 4 + [(512, 4, 4)] * 4
    + [(512, 2, 2)] * 4
)


def naive(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The expression a user would write."""
    return (a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)


def naive_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return naive(a, b).sum()


def naive_multi(cleans: list[torch.Tensor], perturbeds: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([naive(a, b) for a, b in zip(cleans, perturbeds, strict=True)])


def sums_then_ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``lsa_ext.relative_error(a, b)`` as commit e57d722 computed it: validation, the sums
    kernel (``torch.ops.lsa_ext.sq_sums``), then the ratio as PyTorch ops on ``[B]`` tensors."""
    ops._check_pair(a, b)
    d, n = torch.ops.lsa_ext.sq_sums(a, b)
    return reference.reduce(d, n, "none", reference.eps_floor(1e-12, a.dtype))


def sums_then_ratio_multi(cleans: list[torch.Tensor], perturbeds: list[torch.Tensor]):
    """:func:`sums_then_ratio` for L layers (``relative_error_multi`` of e57d722)."""
    cleans, perturbeds = ops._check_lists(cleans, perturbeds)
    d, n = torch.ops.lsa_ext.sq_sums_multi(cleans, perturbeds)
    return reference.reduce(d, n, "none", reference.eps_floor(1e-12, cleans[0].dtype))


def _pair(shape, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    b = a + 0.1 * torch.randn(shape, generator=g)
    return a.requires_grad_(requires_grad), b.requires_grad_(requires_grad)


def _backward(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor,
              b: torch.Tensor) -> Callable[[], None]:
    """One training-style step of ``loss(a, b).backward()`` on the contender's own copies of the
    leaves ``a``, ``b`` (same values): each step frees that contender's previous gradients
    (``grad = None``, as ``zero_grad(set_to_none=True)``), never another contender's, whose
    freeing cost would otherwise be charged to whichever contender runs next."""
    a = a.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()

    def run():
        a.grad = None
        b.grad = None
        loss(a, b).backward()

    return run


@dataclass
class Case:
    name: str
    contenders: dict[str, Callable[[], object]]
    bytes_read: int  # bytes of input the op must read at least once
    targets: dict[str, float] = field(default_factory=dict)  # contender -> min speedup of fused


_COMPILED: dict[str, Callable] = {}


def reset_compiled() -> None:
    """Forgets the torch.compile contenders, so the next calls compile for the current number of
    intra-op threads (Inductor's CPU kernels have it baked in)."""
    _COMPILED.clear()
    torch._dynamo.reset()
    torch._inductor.config.cpp.threads = torch.get_num_threads()


def _compiled(kind: str) -> Callable:
    """torch.compile of the naive expression (compiled once per kind until reset_compiled)."""
    if kind not in _COMPILED:
        fn = {"fwd": naive, "loss": naive_loss, "multi": naive_multi}[kind]
        _COMPILED[kind] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _COMPILED[kind]


def forward_case(name: str, shape, targets=None, before=None) -> Case:
    a, b = _pair(shape)
    return Case(
        name=name,
        contenders={
            "fused": lambda: lsa_ext.relative_error(a, b),
            "op": lambda: torch.ops.lsa_ext.relative_error(a, b, 1e-12),
            "sums+ratio": lambda: sums_then_ratio(a, b),
            **({"before": lambda: before.relative_error(a, b)} if before else {}),
            "naive": lambda: naive(a, b),
            "compiled": lambda: _compiled("fwd")(a, b),
            "bandwidth": lambda: a.sum() + b.sum(),
        },
        bytes_read=2 * a.numel() * a.element_size(),
        targets=targets or {},
    )


def backward_case(name: str, shape, targets=None, before=None) -> Case:
    a, b = _pair(shape)
    return Case(
        name=name,
        contenders={
            "fused": _backward(lambda x, y: lsa_ext.relative_error(x, y).sum(), a, b),
            "sums+ratio": _backward(lambda x, y: sums_then_ratio(x, y).sum(), a, b),
            **({"before": _backward(lambda x, y: before.relative_error(x, y).sum(), a, b)}
               if before else {}),
            "naive": _backward(naive_loss, a, b),
            "compiled": _backward(lambda x, y: _compiled("loss")(x, y), a, b),
        },
        bytes_read=2 * a.numel() * a.element_size(),
        targets=targets or {},
    )


def multi_case(name: str, batch: int, targets=None, before=None) -> Case:
    pairs = [_pair((batch, *s), seed=i) for i, s in enumerate(VGG19_CIFAR_CONV_SHAPES)]
    cleans = [a for a, _ in pairs]
    perturbeds = [b for _, b in pairs]
    return Case(
        name=name,
        contenders={
            "fused": lambda: lsa_ext.relative_error_multi(cleans, perturbeds),
            "sums+ratio": lambda: sums_then_ratio_multi(cleans, perturbeds),
            **({"before": lambda: before.relative_error_multi(cleans, perturbeds)}
               if before else {}),
            "loop": lambda: torch.stack(
                [lsa_ext.relative_error(a, b) for a, b in zip(cleans, perturbeds, strict=True)]
            ),
            "naive": lambda: naive_multi(cleans, perturbeds),
            "compiled": lambda: _compiled("multi")(cleans, perturbeds),
            "bandwidth": lambda: sum(a.sum() + b.sum() for a, b in pairs),
        },
        bytes_read=sum(2 * a.numel() * a.element_size() for a in cleans),
        targets=targets or {},
    )


def all_cases(before=None) -> list[Case]:
    """The table's rows: issue #2's and #11's targets on [128, 64, 32, 32] float32 and on the
    VGG-19/CIFAR conv outputs. ``before``: a baseline.Baseline for the "before" contender."""
    return [
        forward_case(
            "forward [128,64,32,32] f32", (128, 64, 32, 32), before=before,
            targets={"naive": 5.0, "compiled": 1.0, "bandwidth": 0.9},
        ),
        backward_case(
            "fwd+bwd [128,64,32,32] f32", (128, 64, 32, 32), before=before,
            targets={"naive": 3.0, "compiled": 2.0},
        ),
        multi_case("multi VGG-19 16 convs B=128", 128, targets={"loop": 1.0}, before=before),
        multi_case("multi VGG-19 16 convs B=8", 8, targets={"loop": 1.0}, before=before),
        multi_case("multi VGG-19 16 convs B=1", 1, targets={"loop": 1.0}, before=before),
        forward_case("forward B=1 [1,8388608] f32", (1, 8_388_608), before=before),
        forward_case("forward B=4096 [4096,3,4,4] f32", (4096, 3, 4, 4), before=before),
        # Call overhead: validation, dispatch, autograd wrapper ("fused" - "op": the Python layer)
        forward_case("forward tiny [8,16] f32", (8, 16), before=before),
    ]
