"""Before/after the kernel work: raw ops of a baseline build against the current build.

Usage:
    .venv/bin/python benchmarks/build_baseline.py --rev main --out /tmp/lsa_ext_base
    .venv/bin/python benchmarks/kernel_ab.py --before /tmp/lsa_ext_base/lsa_ext/_C...so \
        [--threads 1,2] [--repeats 15]

The baseline (``torch.ops.lsa_ext_base.*``, see build_baseline.py) and the current build
(``torch.ops.lsa_ext.*``) are loaded into one process and called interleaved on the same
tensors, round after round, alternating which goes first; the table holds the medians and
before/after (> 1: "after" is faster). No Python layer: the ops themselves. "after CPU/wall":
process CPU time over wall time of the "after" calls (above 1 when they ran on several
threads). The load average (1, 5, 15 min) is printed before and after each thread count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import baseline  # noqa: E402
from ops_cases import VGG19_CIFAR_CONV_SHAPES  # noqa: E402

import lsa_ext  # noqa: E402, F401  (registers torch.ops.lsa_ext)
from lsa_ext import _extension  # noqa: E402


def cases(lib_before, lib_after):
    """(name, before(), after()) on shared tensors."""
    out = []
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        shapes = [(128, 64, 32, 32)]
        if dtype == torch.float32:
            shapes += [(1, 8_388_608), (4096, 2048), (4096, 3, 4, 4)]
        for shape in shapes:
            a = torch.randn(shape, generator=g).to(dtype)
            b = (a.float() + 0.1).to(dtype)
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            gd = torch.ones(shape[0], dtype=acc)
            name = f"{str(dtype).replace('torch.', '')} {list(shape)}"
            out.append((f"fwd {name}",
                        *(lambda lib=lib, a=a, b=b: lib.sq_sums(a, b)
                          for lib in (lib_before, lib_after))))
            out.append((f"bwd {name}",
                        *(lambda lib=lib, a=a, b=b, gd=gd: lib.sq_sums_backward(gd, gd, a, b)
                          for lib in (lib_before, lib_after))))
    a = torch.randn(128, 64, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    b = a + 0.1
    out.append(("fwd float32 channels_last [128, 64, 32, 32]",
                *(lambda lib=lib: lib.sq_sums(a, b) for lib in (lib_before, lib_after))))
    for batch in (128, 8, 1):
        cs = [torch.randn(batch, *s, generator=g) for s in VGG19_CIFAR_CONV_SHAPES]
        ps = [c + 0.1 for c in cs]
        out.append((f"multi fwd VGG-19 B={batch}",
                    *(lambda lib=lib, cs=cs, ps=ps: lib.sq_sums_multi(cs, ps)
                      for lib in (lib_before, lib_after))))
    return out


def load_average() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="baseline library (build_baseline.py)")
    p.add_argument("--ns", default="lsa_ext_base", help="op namespace of --before")
    p.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    p.add_argument("--repeats", type=int, default=15, help="interleaved rounds (median)")
    args = p.parse_args()
    base = baseline.load(args.before, args.ns)
    print(f"before = {args.before}, after = this checkout's build "
          f"(OpenMP {_extension.cpu_openmp_version()}); median of {args.repeats} interleaved "
          "rounds")
    for n in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(n)
        print(f"\n**{n} thread{'s' if n > 1 else ''}** (load average {load_average()})\n")
        print("| case | before ms | after ms | before / after | after CPU/wall | after thr |")
        print("|---|---|---|---|---|---|")
        for name, before, after in cases(base.lib, torch.ops.lsa_ext):
            start = time.perf_counter()  # warm-up: >= 2 calls each and >= 2 s (see ops_table)
            while time.perf_counter() - start < 2.0:
                for fn in (before, after, before, after):
                    fn()
            times: dict[str, list[float]] = {"before": [], "after": []}
            cpu = 0.0
            threads = 0
            for r in range(args.repeats):
                pair = (("before", before), ("after", after))
                for label, fn in pair if r % 2 == 0 else pair[::-1]:  # ABBA: no order bias
                    c0 = time.process_time()
                    t0 = time.perf_counter()
                    fn()
                    times[label].append(time.perf_counter() - t0)
                    if label == "after":
                        cpu += time.process_time() - c0
                        threads = _extension.cpu_threads_last_call()
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"| {name} | {med['before'] * 1e3:.3f} | {med['after'] * 1e3:.3f} | "
                  f"{med['before'] / med['after']:.2f}x | {cpu / sum(times['after']):.2f} | "
                  f"{threads} |", flush=True)
        print(f"\n(load average after: {load_average()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
