"""Prints the fused relative-error ops against every contender on the same data, per thread count.

Usage:
    .venv/bin/python benchmarks/ops_table.py [--repeats 21] [--threads 1,2] [--only SUBSTRING]
        [--before /tmp/lsa_ext_base/lsa_ext/_C...so]

For each intra-op thread count (torch.set_num_threads) one table; each row is one case
(benchmarks/ops_cases.py). Contenders of a row run interleaved, one call each per round (so a
noisy neighbour slows all of them alike), in a new (seeded) random order every round, after
warm-up calls that also compile the torch.compile contender for that thread count; the table
holds the median over rounds. "x" columns are contender time / fused time (> 1: fused is
faster); the last column checks the issue's targets.
"fused CPU/wall" is the process's CPU time (time.process_time, all threads) over wall time
summed over the fused calls: above 1 when the kernel ran on several threads; "thr" is the number
of threads that ran the last fused kernel call (lsa_ext._extension.cpu_threads_last_call).
``--before``: a baseline build (benchmarks/build_baseline.py) run as the "before" contender.
The load average (1 min) is printed before and after each table.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ops_cases import all_cases, reset_compiled  # noqa: E402

import lsa_ext  # noqa: E402
from lsa_ext import _extension  # noqa: E402

COLUMNS = ["fused", "op", "sums+ratio", "before", "naive", "compiled", "loop", "bandwidth"]


def load_average() -> str:
    if not hasattr(os, "getloadavg"):
        return "n/a"
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def measure(contenders, repeats: int, warmup: int = 3,
            warmup_s: float = 2.0) -> dict[str, tuple[float, float, int]]:
    """Per contender: (median wall seconds, CPU/wall ratio, threads of the last fused call).

    Warm-up: at least ``warmup`` rounds and ``warmup_s`` seconds of all contenders. It compiles
    the torch.compile contender, and on the development VM it gets a process past its slow start:
    the 2-thread backward of a [128, 65536] float32 pair took 9.7 ms for the first ~40 calls of a
    process and 5.0 ms from then on (fresh pages fault in slowly at first)."""
    start = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - start < warmup_s:
        for fn in contenders.values():
            fn()
        done += 1
    wall: dict[str, list[float]] = {k: [] for k in contenders}
    cpu: dict[str, float] = dict.fromkeys(contenders, 0.0)
    threads: dict[str, int] = dict.fromkeys(contenders, 0)
    order = list(contenders)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        # A new order every round (seeded): no contender always runs right after the same other
        # one, whose cache and memory state it would inherit (rotating would keep the cycle).
        shuffle(order)
        for name in order:
            fn = contenders[name]
            c0 = time.process_time()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            cpu[name] += time.process_time() - c0
            wall[name].append(t1 - t0)
            threads[name] = _extension.cpu_threads_last_call()
    return {k: (statistics.median(v), cpu[k] / sum(v), threads[k]) for k, v in wall.items()}


def _ms(seconds: float) -> str:
    """Milliseconds, with 3 decimals below 0.1 ms (µs-scale call overheads)."""
    return f"{seconds * 1e3:.3f}" if seconds < 1e-4 else f"{seconds * 1e3:.2f}"


def table(cases, repeats: int) -> bool:
    header = ["case", "fused ms", "fused CPU/wall", "thr", "fused GB/s"]
    header += [f"{c} ms (x)" for c in COLUMNS[1:]] + ["targets"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    all_met = True
    for case in cases:
        med = measure(case.contenders, repeats)
        fused, fused_cpu, fused_threads = med["fused"]
        row = [case.name, _ms(fused), f"{fused_cpu:.2f}", str(fused_threads),
               f"{case.bytes_read / fused / 1e9:.1f}"]
        for c in COLUMNS[1:]:
            row.append(f"{_ms(med[c][0])} ({med[c][0] / fused:.2f}x)" if c in med else "—")
        checks = []
        for c, want in case.targets.items():
            got = med[c][0] / fused
            ok = got >= want
            all_met &= ok
            verdict = f"≥ {want:.2f}x ok" if ok else f"< {want:.2f}x MISSED"
            checks.append(f"{c} {got:.2f}x {verdict}")
        row.append("; ".join(checks) or "—")
        print("| " + " | ".join(row) + " |", flush=True)
    return all_met


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=21, help="interleaved rounds (median)")
    p.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    p.add_argument("--only", default="", help="run only cases whose name contains this")
    p.add_argument("--before", default="", help="baseline library (build_baseline.py)")
    p.add_argument("--ns", default="lsa_ext_base", help="op namespace of --before")
    args = p.parse_args(argv)
    before = None
    if args.before:
        import baseline

        before = baseline.load(args.before, args.ns)

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, backend {lsa_ext.backend()}, "
          f"OpenMP {_extension.cpu_openmp_version()}, median of {args.repeats} interleaved rounds"
          + (f", before = {args.before}" if before else ""))
    all_met = True
    for n in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(n)
        reset_compiled()
        cases = [c for c in all_cases(before) if args.only in c.name]
        print(f"\n**{n} thread{'s' if n > 1 else ''}** (load average {load_average()})\n",
              flush=True)
        all_met &= table(cases, args.repeats)
        print(f"\n(load average after: {load_average()})")
        del cases
    print(f"\nAll targets met: {all_met}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
