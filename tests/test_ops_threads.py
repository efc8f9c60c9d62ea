"""The CPU kernels run on PyTorch's intra-op threads, with results independent of their number.

Parallelism is checked by what the kernels report (threads that ran the last call, OpenMP compiled
in), not by timing; determinism by bitwise comparison at 1, 2 and 4 threads on inputs that are
cut into many work items (split samples, grouped samples, several layers).
"""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
import torch

import lsa_ext
from lsa_ext import _extension

THREADS = (1, 2, 4)  # 4 threads work on a 2-core machine too (oversubscribed, same results)


def random_pair(shape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g) + 1.0
    return a, a + 0.3 * torch.randn(shape, generator=g)


def at_threads(n: int, fn: Callable[[], object]) -> tuple[object, int]:
    """``fn()`` with ``n`` intra-op threads, and the threads that ran its last kernel call."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        out = fn()
        return out, _extension.cpu_threads_last_call()
    finally:
        torch.set_num_threads(old)


def flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for x in out for t in flat(x)]


# Every case is above the kernels' serial threshold (~1M elements per input) and has many items.
HUGE = random_pair([1, 2_000_003], seed=1)             # one sample split into ~62 chunks
SPLIT = random_pair([3, 64, 80, 80], seed=2)           # 409600-element samples, 13 chunks each
GROUPED = random_pair([4096, 300], seed=3)             # tiny samples, ~109 per item
LAYERS = [random_pair([3, *s], seed=4 + i)
          for i, s in enumerate([(64, 40, 40), (7,), (300, 300), (4, 1000, 70)])]
BWD = random_pair([2, 1_500_001], seed=8)              # backward items are 2 MiB: 6 items



def _relative_error_grads(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The public measure's value and the gradients of its mean."""
    x, y = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    r = lsa_ext.relative_error(x, y)
    return (r.detach(), *torch.autograd.grad(r.mean(), (x, y)))


CALLS: dict[str, Callable[[], object]] = {
    "sq_sums huge sample": lambda: lsa_ext.sq_sums(*HUGE),
    "sq_sums split samples": lambda: lsa_ext.sq_sums(*SPLIT),
    "sq_sums grouped samples": lambda: lsa_ext.sq_sums(*GROUPED),
    "sq_sums_multi": lambda: lsa_ext.sq_sums_multi([a for a, _ in LAYERS], [b for _, b in LAYERS]),
    "relative_error split samples": lambda: torch.ops.lsa_ext.relative_error(*SPLIT, 1e-12),
    "relative_error_multi": lambda: torch.ops.lsa_ext.relative_error_multi(
        [a for a, _ in LAYERS], [b for _, b in LAYERS], 1e-12),
    "relative_error fwd+bwd": lambda: _relative_error_grads(*BWD),
    "sq_sums_backward": lambda: torch.ops.lsa_ext.sq_sums_backward(
        torch.ones(2), torch.full((2,), 0.5), *BWD),
    "sq_sums_multi_backward": lambda: torch.ops.lsa_ext.sq_sums_multi_backward(
        torch.ones(4, 3), torch.full((4, 3), 0.5), [a for a, _ in LAYERS],
        [b for _, b in LAYERS]),
}


def test_cpu_kernels_are_compiled_with_openmp():
    """PyTorch's CPU build parallelises with OpenMP; so must the kernels' at::parallel_for."""
    assert "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    assert _extension.cpu_openmp_version() >= 200805  # OpenMP 3.0 or newer


_OPENMP_RUNTIMES = """
def runtimes():
    with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f
                if any(name in line for name in ("libgomp", "libomp", "libiomp"))}
import torch
before = runtimes()
import lsa_ext._C
print(len(before), runtimes() == before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")
def test_extension_loads_no_second_openmp_runtime():
    """Loading the extension adds no OpenMP runtime: it uses PyTorch's libgomp (one thread pool,
    one torch.set_num_threads setting). A fresh interpreter, as other libraries (scikit-learn)
    bring their own."""
    out = subprocess.run([sys.executable, "-c", _OPENMP_RUNTIMES], capture_output=True,
                         text=True, check=True, timeout=120).stdout.split()
    assert out == ["1", "True"]


@pytest.mark.parametrize("name", list(CALLS))
def test_kernels_run_on_every_intra_op_thread(name):
    for n in THREADS:
        _, threads = at_threads(n, CALLS[name])
        assert threads == n, f"{name}: {threads} threads ran the call with {n} intra-op threads"


def test_small_work_runs_on_the_calling_thread():
    a, b = random_pair([8, 1000])
    _, threads = at_threads(2, lambda: lsa_ext.sq_sums(a, b))
    assert threads == 1


@pytest.mark.parametrize("name", list(CALLS))
def test_results_do_not_depend_on_thread_count(name):
    runs = {n: at_threads(n, CALLS[name]) for n in THREADS}
    assert [runs[n][1] for n in THREADS] == list(THREADS)  # the parallel path really ran
    one = flat(runs[1][0])
    for n in THREADS[1:]:
        for x, y in zip(one, flat(runs[n][0]), strict=True):
            assert torch.equal(x, y), f"{name}: {n} threads differ from 1 thread"


def _forked_child(a, b, want, want_ga, want_ratio, queue):
    # Only lsa_ext ops and numpy here: PyTorch's own OpenMP-parallel ops (torch.equal on large
    # tensors...) hang in a forked child once the parent used them (libgomp is not fork-safe).
    torch.set_num_threads(2)
    got = lsa_ext.sq_sums(a, b)
    threads = _extension.cpu_threads_last_call()
    ratio = lsa_ext.relative_error(a, b)
    same_ratio = np.array_equal(ratio.numpy(), want_ratio.numpy())
    ga, _ = torch.ops.lsa_ext.sq_sums_backward(torch.ones(2), torch.zeros(2), a, b)
    same = np.array_equal(got[0].numpy(), want[0].numpy())
    queue.put((bool(same and same_ratio and np.array_equal(ga.numpy(), want_ga.numpy())),
               threads))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_parallel_kernels_work_in_a_forked_child():
    """DataLoader-style fork after the parallel kernels ran: no hang, same results, one thread."""
    a, b = random_pair([2, 1_500_000], seed=10)
    (want_ratio, want, want_ga), threads = at_threads(2, lambda: (
        lsa_ext.relative_error(a, b),
        lsa_ext.sq_sums(a, b),
        torch.ops.lsa_ext.sq_sums_backward(torch.ones(2), torch.zeros(2), a, b)[0]))
    assert threads == 2  # the parent's pool ran, so a fork-unsafe child would hang
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_forked_child, args=(a, b, want, want_ga, want_ratio, queue))
    proc.start()
    proc.join(timeout=60)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
    assert proc.exitcode == 0, "forked child hung or failed"
    same, child_threads = queue.get(timeout=5)
    assert same
    assert child_threads == 1
