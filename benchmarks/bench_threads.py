"""Whole-command wall and CPU time of `lsa` on the embedded datasets under each thread setting.

Contenders, interleaved round by round in a new (seeded) random order every round (median of
--rounds):
  auto      lsa ... (default --threads auto)
  omp1      OMP_NUM_THREADS=1 lsa ...           (the reference the README recommended)
  default   lsa ... --threads <torch's default> (what every run did before --threads)

"wall" is the command's elapsed time (what a user waits for), "CPU" the child process's user +
system time (resource.getrusage): on a shared machine wall time includes time spent waiting for
a core, CPU time does not, but CPU time also counts threads spinning for work, so it is not a
speed measure on its own. The load average (1, 5, 15 min) is printed before and after each job.

    .venv/bin/python benchmarks/bench_threads.py --rounds 11
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

JOBS = {
    "moons AT-PGD, 1 epoch": ["train", "--dataset", "moons", "--at", "pgd", "--epochs", "1"],
    "digits AT-PGD, 1 epoch": ["train", "--dataset", "digits", "--at", "pgd", "--epochs", "1"],
    "mnist5k AT-PGD, 1 epoch of 1000": ["train", "--dataset", "mnist5k", "--at", "pgd",
                                        "--epochs", "1", "--limit-train", "1000"],
}


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, child CPU seconds) of one ``lsa`` command."""
    with tempfile.TemporaryDirectory() as out:
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lsa_ext.cli", *cmd, "--out", out], env=env,
                       check=True, capture_output=True)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--only", default="", help="run only jobs whose name contains this")
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    default = str(torch.get_num_threads())
    contenders = {
        "auto": ([], base),
        "omp1": ([], {**base, "OMP_NUM_THREADS": "1"}),
        "default": (["--threads", default], base),
    }
    print(f"cores {os.cpu_count()}, torch default threads {default}, rounds {args.rounds}, "
          "medians")
    print()
    print("| job | load avg before | auto wall s | OMP_NUM_THREADS=1 wall s | "
          f"{default} threads wall s | auto / omp1 wall | {default} thr / omp1 wall | "
          f"auto / omp1 CPU | {default} thr / omp1 CPU | load avg after |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    order = list(contenders)
    shuffle = random.Random(0).shuffle
    for job, cmd in JOBS.items():
        if args.only not in job:
            continue
        before = _load()
        wall: dict[str, list[float]] = {k: [] for k in contenders}
        cpu: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(args.rounds):
            shuffle(order)
            for name in order:
                extra, env = contenders[name]
                w, c = run(cmd + extra, env)
                wall[name].append(w)
                cpu[name].append(c)
        mw = {k: statistics.median(v) for k, v in wall.items()}
        mc = {k: statistics.median(v) for k, v in cpu.items()}
        print(f"| {job} | {before} | {mw['auto']:.2f} | {mw['omp1']:.2f} | "
              f"{mw['default']:.2f} | {mw['auto'] / mw['omp1']:.2f} | "
              f"{mw['default'] / mw['omp1']:.2f} | {mc['auto'] / mc['omp1']:.2f} | "
              f"{mc['default'] / mc['omp1']:.2f} | {_load()} |", flush=True)


if __name__ == "__main__":
    main()
