"""Scaling of analysis and AT-LR training under torchrun: 1 process vs N processes (gloo, CPU).

Usage::

    .venv/bin/python benchmarks/bench_distributed.py            # 1x1, 1x2 threads, 2x1 procs
    .venv/bin/python benchmarks/bench_distributed.py --procs 1 2 4 --threads 1

Each configuration is a fresh ``torchrun --nproc_per_node=P`` (``OMP_NUM_THREADS=T``) on
loopback running this file as a worker. The worker builds Model B (Khalooei et al., arXiv
2202.02626, Table 1) for MNIST-shaped random data and times, between barriers, after one
warm-up round:

- ``analysis``: ``lsa_ext.analyze`` of ``--samples`` samples under Gaussian noise, FGSM and
  PGD-5 (ε = 0.1), every ReLU probed (batches dealt round-robin to the ranks, statistics
  summed exactly);
- ``train``: one ``Trainer.train_epoch`` of AT-FGSM-LR-L2 over ``--steps`` global batches of
  ``--batch`` samples (DDP, each rank trains on its slice of every global batch).

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


def _worker(args: argparse.Namespace) -> None:
    import torch

    import lsa_ext
    from lsa_ext import distributed
    from lsa_ext.data import DatasetInfo
    from lsa_ext.models import build_model
    from lsa_ext.training import TrainConfig, Trainer

    ctx = distributed.init_from_env(device="cpu")
    info = DatasetInfo("mnist", (1, 28, 28), 10, (0.0, 1.0))
    g = torch.Generator().manual_seed(1)
    n = max(args.samples, args.batch)
    x_all = torch.rand(n, 1, 28, 28, generator=g)
    y_all = torch.randint(0, 10, (n,), generator=g)
    model = build_model("model_b", info, seed=0)

    def analysis() -> int:
        res = lsa_ext.analyze(model, (x_all[: args.samples], y_all[: args.samples]),
                              "gaussian,fgsm,pgd:steps=5", layers="activations",
                              batch_size=args.batch, device="cpu", clip=(0.0, 1.0),
                              progress=False)
        assert int(res.count.min()) == args.samples
        return args.samples

    cfg = TrainConfig(at="fgsm", eps=0.3, clip=[0.0, 1.0], lr_layers=["L2"], epochs=1,
                      batch_size=args.batch, optimizer="sgd", lr=0.01, device="cpu")
    n_train = args.steps * args.batch
    trainer = Trainer(build_model("model_b", info, seed=0),
                      (x_all[:n_train], y_all[:n_train]), cfg, progress=False)

    def train() -> int:
        trainer.train_epoch()  # AT-FGSM-LR-L2, DDP over the ranks
        return n_train

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
    if args.procs is None:  # 1 x 1 (the base), then the same cores as threads or processes
        configs = [(1, 1)] + ([(1, cores), (cores, 1)] if cores > 1 else [])
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
