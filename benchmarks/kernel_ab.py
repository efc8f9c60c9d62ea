"""Before/after comparison of two builds of the compiled ops (torch.ops.lsa_ext.*).

Two builds cannot load into one process (they register the same op names), so this script runs
a worker process per build, alternating ``--runs`` times, and reports per case the median over
runs of each run's median time, and the ratio before/after (> 1: "after" is faster).

Usage:
    .venv/bin/python benchmarks/kernel_ab.py --before /path/to/old/checkout --after . [--runs 4]

Each path is a checkout whose ``lsa_ext`` package has a built ``_C`` extension.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def cases():
    import torch

    import lsa_ext  # noqa: F401  (loads the build found on PYTHONPATH)

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
            out.append((f"fwd {name}", lambda a=a, b=b: torch.ops.lsa_ext.sq_sums(a, b)))
            out.append((f"bwd {name}",
                        lambda a=a, b=b, gd=gd: torch.ops.lsa_ext.sq_sums_backward(gd, gd, a, b)))
    a = torch.randn(128, 64, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    b = a + 0.1
    out.append(("fwd float32 channels_last [128, 64, 32, 32]",
                lambda: torch.ops.lsa_ext.sq_sums(a, b)))
    shapes = ([(64, 32, 32)] * 2 + [(128, 16, 16)] * 2 + [(256, 8, 8)] * 4 + [(512, 4, 4)] * 4
              + [(512, 2, 2)] * 4)
    for batch in (128, 1):
        cs = [torch.randn(batch, *s, generator=g) for s in shapes]
        ps = [c + 0.1 for c in cs]
        out.append((f"multi fwd VGG-19 B={batch}",
                    lambda cs=cs, ps=ps: torch.ops.lsa_ext.sq_sums_multi(cs, ps)))
    return out


def worker(repeats: int) -> None:
    res = {}
    for name, fn in cases():
        for _ in range(2):
            fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        res[name] = statistics.median(ts)
    print(json.dumps(res))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", help="checkout with the old build (required)")
    p.add_argument("--after", default=".", help="checkout with the new build")
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.repeats)
        return 0
    if not args.before:
        p.error("--before is required")
    results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for _ in range(args.runs):
        for label in ("before", "after"):
            env = dict(os.environ, PYTHONPATH=os.path.abspath(getattr(args, label)))
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--worker", "--repeats",
                 str(args.repeats)], env=env, capture_output=True, text=True, check=True,
                cwd="/",
            )
            results[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"# median over {args.runs} alternating runs of per-run medians ({args.repeats} calls)")
    print("| case | before ms | after ms | speedup |")
    print("|---|---|---|---|")
    for name in results["before"][0]:
        before = statistics.median(r[name] for r in results["before"])
        after = statistics.median(r[name] for r in results["after"])
        print(f"| {name} | {before * 1e3:.3f} | {after * 1e3:.3f} | {before / after:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
