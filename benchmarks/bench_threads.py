"""Whole-command wall time of `lsa` on the embedded datasets under each thread setting.

Contenders, interleaved round by round (median of --rounds):
  auto      lsa ... (default --threads auto)
  omp1      OMP_NUM_THREADS=1 lsa ...           (the reference the README recommended)
  default   lsa ... --threads <torch's default> (what every run did before --threads)

    python benchmarks/bench_threads.py --rounds 11
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

JOBS = {
    "moons AT-PGD, 1 epoch": ["train", "--dataset", "moons", "--at", "pgd", "--epochs", "1"],
    "digits AT-PGD, 1 epoch": ["train", "--dataset", "digits", "--at", "pgd", "--epochs", "1"],
}


def run(cmd: list[str], env: dict[str, str]) -> float:
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lsa_ext.cli", *cmd, "--out", out], env=env,
                       check=True, capture_output=True)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    default = str(torch.get_num_threads())
    contenders = {
        "auto": ([], base),
        "omp1": ([], {**base, "OMP_NUM_THREADS": "1"}),
        "default": (["--threads", default], base),
    }
    print(f"load average {os.getloadavg()}, cores {os.cpu_count()}, torch default threads "
          f"{default}, rounds {args.rounds}")
    print("| job | auto (s) | OMP_NUM_THREADS=1 (s) | torch default (s) | auto / omp1 | "
          "default / omp1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for job, cmd in JOBS.items():
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(args.rounds):
            for name, (extra, env) in contenders.items():
                times[name].append(run(cmd + extra, env))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {job} | {med['auto']:.2f} | {med['omp1']:.2f} | {med['default']:.2f} | "
              f"{med['auto'] / med['omp1']:.2f} | {med['default'] / med['omp1']:.2f} |")
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
