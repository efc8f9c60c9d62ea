"""Prints one table: the fused relative-error ops against every contender on the same data.

Usage:
    .venv/bin/python benchmarks/ops_table.py [--repeats 21] [--only SUBSTRING]

Each row is one case (benchmarks/ops_cases.py). Contenders of a row run interleaved, one call
each per round (so a noisy neighbour slows all of them alike), after warm-up calls that also
compile the torch.compile contender; the table holds the median over rounds. "x" columns are
contender time / fused time (> 1: fused is faster); the last column checks the issue's targets.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ops_cases import all_cases  # noqa: E402

import lsa_ext  # noqa: E402

COLUMNS = ["fused", "naive", "compiled", "loop", "bandwidth"]


def measure(contenders, repeats: int, warmup: int = 3) -> dict[str, float]:
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--only", default="", help="run only cases whose name contains this")
    args = p.parse_args(argv)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, backend {lsa_ext.backend()}, "
          f"load average {load:.1f}, median of {args.repeats} interleaved rounds")
    header = ["case", "fused ms", "fused GB/s"] + [f"{c} ms (x)" for c in COLUMNS[1:]]
    header.append("targets")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    all_met = True
    for case in all_cases():
        if args.only and args.only not in case.name:
            continue
        med = measure(case.contenders, args.repeats)
        fused = med["fused"]
        row = [case.name, f"{fused * 1e3:.2f}", f"{case.bytes_read / fused / 1e9:.1f}"]
        for c in COLUMNS[1:]:
            row.append(f"{med[c] * 1e3:.2f} ({med[c] / fused:.2f}x)" if c in med else "—")
        checks = []
        for c, want in case.targets.items():
            got = med[c] / fused
            ok = got >= want
            all_met &= ok
            verdict = f"≥ {want:.2f}x ok" if ok else f"< {want:.2f}x MISSED"
            checks.append(f"{c} {got:.2f}x {verdict}")
        row.append("; ".join(checks) or "—")
        print("| " + " | ".join(row) + " |", flush=True)
    print(f"# all targets met: {all_met}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
