"""Portable (SSE2) vs AVX2 CPU kernels, same process, interleaved: forward of [128, 64, 32, 32].

Usage:
    .venv/bin/python benchmarks/isa_table.py [--repeats 15]

The kernels read LSA_EXT_CPU_ISA on every call ("generic" forces the portable loops), so both
paths run on the same data in one process. Prints median ms and generic/AVX2 ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import lsa_ext  # noqa: F401  (registers torch.ops.lsa_ext)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    old = os.environ.get("LSA_EXT_CPU_ISA")
    print("| dtype | op | generic ms | avx2 ms | generic / avx2 |")
    print("|---|---|---|---|---|")
    try:
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            a = torch.randn(128, 64, 32, 32).to(dtype)
            b = (a.float() + 0.1).to(dtype)
            g = torch.ones(128, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            for op, fn in (("fwd", lambda a=a, b=b: torch.ops.lsa_ext.sq_sums(a, b)),
                           ("bwd", lambda a=a, b=b, g=g: torch.ops.lsa_ext.sq_sums_backward(
                               g, g, a, b))):
                times: dict[str, list[float]] = {"generic": [], "avx2": []}
                for _ in range(args.repeats + 2):
                    for isa in times:
                        os.environ["LSA_EXT_CPU_ISA"] = isa
                        t0 = time.perf_counter()
                        fn()
                        times[isa].append(time.perf_counter() - t0)
                med = {k: statistics.median(v[2:]) * 1e3 for k, v in times.items()}
                name = str(dtype).replace("torch.", "")
                print(f"| {name} | {op} | {med['generic']:.2f} | {med['avx2']:.2f} | "
                      f"{med['generic'] / med['avx2']:.2f}x |")
    finally:
        if old is None:
            os.environ.pop("LSA_EXT_CPU_ISA", None)
        else:
            os.environ["LSA_EXT_CPU_ISA"] = old
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
