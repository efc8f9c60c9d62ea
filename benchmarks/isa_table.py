"""Portable (SSE2) vs AVX2 CPU kernels, same process, interleaved: ops on [128, 64, 32, 32].

Usage:
    .venv/bin/python benchmarks/isa_table.py [--repeats 15] [--threads 1,2]

The kernels read LSA_EXT_CPU_ISA on every call ("generic" forces the portable loops), so both
paths run on the same data in one process, alternating call by call (which goes first alternates
too), after a 2 s warm-up per row. Prints, per intra-op thread count, median ms and generic/AVX2
ratios, and the load average before and after.
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
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds (median)")
    p.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    args = p.parse_args()
    old = os.environ.get("LSA_EXT_CPU_ISA")
    try:
        for n in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(n)
            print(f"\n**{n} thread{'s' if n > 1 else ''}** (load average {load_average()}, "
                  f"median of {args.repeats} interleaved rounds)\n")
            table(args.repeats)
            print(f"\n(load average after: {load_average()})")
    finally:
        if old is None:
            os.environ.pop("LSA_EXT_CPU_ISA", None)
        else:
            os.environ["LSA_EXT_CPU_ISA"] = old
    return 0


def load_average() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def table(repeats: int) -> None:
    print("| dtype | op | generic ms | avx2 ms | generic / avx2 |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        a = torch.randn(128, 64, 32, 32).to(dtype)
        b = (a.float() + 0.1).to(dtype)
        g = torch.ones(128, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        for op, fn in (("fwd", lambda a=a, b=b: torch.ops.lsa_ext.sq_sums(a, b)),
                       ("bwd", lambda a=a, b=b, g=g: torch.ops.lsa_ext.sq_sums_backward(
                           g, g, a, b))):
            times: dict[str, list[float]] = {"generic": [], "avx2": []}
            start = time.perf_counter()  # warm-up: >= 2 s (see ops_table.measure)
            while time.perf_counter() - start < 2.0:
                for isa in times:
                    os.environ["LSA_EXT_CPU_ISA"] = isa
                    fn()
            for r in range(repeats):
                for isa in list(times) if r % 2 == 0 else list(times)[::-1]:
                    os.environ["LSA_EXT_CPU_ISA"] = isa
                    t0 = time.perf_counter()
                    fn()
                    times[isa].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            name = str(dtype).replace("torch.", "")
            print(f"| {name} | {op} | {med['generic']:.2f} | {med['avx2']:.2f} | "
                  f"{med['generic'] / med['avx2']:.2f}x |", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
