"""Scaling of analysis and AT-LR training under torchrun: 1 process vs N processes (gloo, CPU).

Usage::

    .venv/bin/python benchmarks/bench_distributed.py            # 1x2 threads, 1x1, 2x1 procs
    .venv/bin/python benchmarks/bench_distributed.py --procs 1 2 4 --threads 1

Each configuration is a fresh ``torchrun --nproc_per_node=P`` (``OMP_NUM_THREADS=T``) on
loopback running this file as a worker. The worker builds a Model-B-style CNN (paper Table 1)
on MNIST-shaped random data and times, between barriers, after one warm-up round:

- ``analysis``: the LSA pass of ``--samples`` test samples: clean and FGSM-perturbed forward
  with every ReLU captured and the fused relative error reduced to per-layer statistics
  (batches dealt round-robin to ranks, statistics all-reduced exactly);
- ``train``: ``--steps`` AT-LR steps (FGSM + CE + γ·CM on the ReLUs) with DDP, global batch
  ``--batch`` split over the ranks.

Each time is the slowest rank's (between barriers), best of ``--repeat`` rounds.
Printed: one table (time, samples/s, speed-up against the first row) and a JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def _model():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.ReLU(), nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(64 * 3 * 3, 100), nn.ReLU(), nn.Linear(100, 10),
    )


def _worker(args: argparse.Namespace) -> None:
    import torch
    from torch.utils.data import BatchSampler, SequentialSampler

    from lsa_ext import distributed, losses, ops
    from lsa_ext.probes import Capture, select_layers

    ctx = distributed.init_from_env(device="cpu")
    torch.manual_seed(0)
    inner = _model()
    layers = select_layers(inner, "activations")
    g = torch.Generator().manual_seed(1)
    x_all = torch.rand(max(args.samples, args.batch), 1, 28, 28, generator=g)
    y_all = torch.randint(0, 10, (len(x_all),), generator=g)

    def fgsm(model, x, y, eps=0.1):
        xa = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(losses.cross_entropy(model(xa), y), xa)
        return (x + eps * grad.sign()).clamp(0, 1).detach()

    def analysis() -> int:
        inner.eval()
        batches = BatchSampler(SequentialSampler(range(args.samples)), args.batch, False)
        sampler = distributed.ShardedBatchSampler(batches)
        stats = distributed.Moments.zeros(len(layers))
        for idx in sampler:
            x, y = x_all[idx], y_all[idx]
            x_hat = fgsm(inner, x, y)
            with torch.no_grad(), Capture(inner, layers, detach=True) as cap:
                inner(x)
                clean = [cap.outputs[n] for n in layers]
                cap.reset()
                inner(x_hat)
                pert = [cap.outputs[n] for n in layers]
                stats.update(ops.relative_error_multi(clean, pert))
        stats = distributed.all_reduce_stats(stats)
        assert int(stats.count[0].item()) == args.samples
        return args.samples

    model = distributed.wrap_model(inner)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train() -> int:
        inner.train()
        for step in range(args.steps):
            start = (step * args.batch) % (len(x_all) - args.batch + 1)
            part = distributed.shard_batch(x_all[start : start + args.batch],
                                           y_all[start : start + args.batch])
            (x, y), weight = part
            x_hat = fgsm(inner, x, y)
            with Capture(inner, layers) as cap:
                model(x)
                clean = [cap.outputs[n] for n in layers]
                cap.reset()
                logits = model(x_hat)
                pert = [cap.outputs[n] for n in layers]
            loss = losses.cross_entropy(logits, y) + 0.1 * ops.relative_error_multi(
                clean, pert).mean(1).sum()
            opt.zero_grad()
            (loss * weight).backward()
            opt.step()
        return args.steps * args.batch

    results = {}
    for name, fn in (("analysis", analysis), ("train", train)):
        if name not in args.what:
            continue
        fn()  # warm-up (allocator, DDP buckets, thread pools)
        times = []
        for _ in range(args.repeat):
            distributed.barrier()
            t0 = time.perf_counter()
            n = fn()
            distributed.barrier()
            times.append(time.perf_counter() - t0)
        # the slowest rank's time, best of --repeat rounds (the machine may be shared)
        results[name] = {"seconds": min(times), "samples": n}
    if distributed.is_main():
        print("RESULT " + json.dumps({"procs": ctx.world_size,
                                      "threads": torch.get_num_threads(), **results}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(procs: int, threads: int, args: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), GLOO_SOCKET_IFNAME="lo",
               LSA_PROGRESS="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(HERE), "--worker",
           "--samples", str(args.samples), "--batch", str(args.batch), "--steps",
           str(args.steps), "--repeat", str(args.repeat), "--what", *args.what]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = proc.stdout[-2000:] + proc.stderr[-4000:]
        raise SystemExit(f"run with {procs} procs failed:\n{tail}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int, default=2048, help="analysis samples (default 2048)")
    p.add_argument("--batch", type=int, default=128, help="global batch (default 128)")
    p.add_argument("--steps", type=int, default=12, help="training steps (default 12)")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds, best kept (default 3)")
    p.add_argument("--procs", type=int, nargs="+", default=None, help="process counts")
    p.add_argument("--threads", type=int, default=None, help="OMP threads per process")
    p.add_argument("--what", nargs="+", default=["analysis", "train"],
                   choices=["analysis", "train"])
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    cores = os.cpu_count() or 1
    if args.procs is None:  # same cores: 1 proc x all threads, then 1x1 and P x 1
        configs = [(1, cores)] + [(n, 1) for n in sorted({1, cores})]
    else:
        configs = [(n, args.threads or max(1, cores // n)) for n in args.procs]
    load_before = os.getloadavg()[0]
    runs = [_launch(n, t, args) for n, t in configs]
    for r in runs:
        print(json.dumps(r))
    print(f"\n{cores} cores, load average {load_before:.1f} before / "
          f"{os.getloadavg()[0]:.1f} after; analysis: {args.samples} samples, batch {args.batch}; "
          f"train: {args.steps} AT-LR steps of global batch {args.batch}\n")
    print("| workload | procs × threads | time (s) | samples/s | vs first row |")
    print("|---|---|---|---|---|")
    for what in args.what:
        base = runs[0][what]["samples"] / runs[0][what]["seconds"]
        for r in runs:
            rate = r[what]["samples"] / r[what]["seconds"]
            print(f"| {what} | {r['procs']} × {r['threads']} | {r[what]['seconds']:.2f} | "
                  f"{rate:.0f} | {rate / base:.2f}× |")


if __name__ == "__main__":
    main()
