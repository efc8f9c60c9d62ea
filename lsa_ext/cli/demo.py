"""`lsa demo`: a short demonstration of the fused ops and the active backends."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="demonstrate the fused relative-error ops and backends")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per contender (median)")
    p.set_defaults(func=run)


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(args: argparse.Namespace) -> int:
    import lsa_ext
    from lsa_ext import reference

    repeats = max(1, getattr(args, "repeats", 5))
    print("backends:", lsa_ext.backend())
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(128, 64, 32, 32, generator=g)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=g)

    def naive():
        return (clean - noisy).flatten(1).norm(dim=1) / clean.flatten(1).norm(dim=1)

    fused = lsa_ext.relative_error(clean, noisy)
    ref = reference.relative_error(clean.double(), noisy.double())
    t_fused = _median_ms(lambda: lsa_ext.relative_error(clean, noisy), repeats)
    t_naive = _median_ms(naive, repeats)
    print("relative error of a [128, 64, 32, 32] float32 pair, noise std 0.1:")
    print(f"  fused  mean={fused.mean():.6f}  {t_fused:7.2f} ms (median of {repeats})")
    speedup = t_naive / t_fused
    print(f"  naive  mean={naive().mean():.6f}  {t_naive:7.2f} ms  -> fused {speedup:.1f}x")
    print(f"  max |fused - float64 reference| = {(fused.double() - ref).abs().max():.2e}")

    layers = [torch.randn(8, c, s, s, generator=g) for c, s in ((64, 32), (128, 16), (256, 8))]
    perturbed = [x + 0.05 * torch.randn(x.shape, generator=g) for x in layers]
    per_layer = lsa_ext.relative_error_multi(layers, perturbed, reduction="mean")
    print("relative_error_multi over 3 layers of a batch of 8, one fused call:",
          [round(v, 5) for v in per_layer.tolist()])

    a = torch.randn(3, 5, generator=g).requires_grad_(True)
    b = (a.detach() + 0.1).requires_grad_(True)
    with torch.no_grad():
        a[0] = 0.0  # zero-norm clean sample
        b[2] = float("nan")  # NaN in one sample
    out = lsa_ext.relative_error(a, b)
    out[:2].sum().backward()
    finite = bool(a.grad[:2].isfinite().all() and b.grad[:2].isfinite().all())
    print("zero-norm sample 0 and NaN in sample 2:", [f"{v:.3g}" for v in out.tolist()],
          "| grads of samples 0, 1 finite:", finite)
    return 0
