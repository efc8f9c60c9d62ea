"""Layer monitoring overhead: training epochs with and without ``monitor=True``, side by side.

Each case trains a fresh model twice per round — without, then with, the layer monitor (the
order alternates from round to round) — on the same data, with the same seed, in this process,
for ``--epochs`` + 1 epochs. The time of an epoch is taken between two consecutive ``on_epoch``
calls of :class:`lsa_ext.training.Trainer`, so it holds the training epoch, the monitor's
measurement and files (with monitoring) and the checkpoint (both); the first epoch, which
follows the epoch-0 measurement and the set-up, is left out. Wall time (``perf_counter``) and
process CPU time (``process_time``, all threads) are both recorded; the table shows medians over
the epochs of all rounds, and the monitor's own share (``LayerMonitor.record``: the attack on
the probe, the paired forward, ``monitor.csv``, and ``monitor.png`` when it is redrawn — after
an epoch only when that keeps its drawing under 10 % of the time since the last one,
``lsa_ext.monitor.PNG_SHARE``; the drawing after the last epoch is outside the timed epochs).

Cases (the embedded datasets, the paper's models, the default probe of 256 training samples
and the default monitored layers, i.e. the activations plus the LR site):

* ``moons``: Model A on two-moons (2000 training points), AT-PGD-LR-L2, ε = 0.3, and plain
  training (``at="none"``: the monitor then runs FGSM at ε = 0.3);
* ``digits``: Model B on 8×8 digits (1437 images), AT-PGD-LR-L2, ε = 0.2;
* ``mnist5k``: Model B on 5000 real MNIST digits (28×28), AT-PGD-LR-L2, ε = 0.3.

Run (prints the table of benchmarks/README.md, with the command and load averages)::

    .venv/bin/python benchmarks/bench_monitor.py [--rounds 3] [--epochs 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lsa_ext.data import load_dataset
from lsa_ext.models import build_model
from lsa_ext.presets import TRAIN_EPS
from lsa_ext.training import TrainConfig, Trainer, resolve_layers

# name -> (dataset, model, at, LR layer or None)
CASES = {
    "moons": ("moons", "model_a", "pgd", "L2"),
    "moons-normal": ("moons", "model_a", "none", None),
    "digits": ("digits", "model_b", "pgd", "L2"),
    "mnist5k": ("mnist5k", "model_b", "pgd", "L2"),
}


def run_once(case: str, data, monitor: bool, epochs: int, folder: Path
             ) -> tuple[list[float], list[float], list[float], list[float]]:
    """One training run; per-epoch wall and CPU seconds (the first epoch left out) and the
    monitor's own wall and CPU seconds per epoch."""
    dataset, model_name, at, layer = CASES[case]
    model = build_model(model_name, data.info, seed=0)
    cfg = TrainConfig(at=at, eps=TRAIN_EPS.get(dataset, 0.3),
                      clip=None if data.info.data_range is None else list(data.info.data_range),
                      lr_layers=resolve_layers(model, layer) if layer else [], gamma=0.1,
                      epochs=epochs + 1, seed=0, monitor=monitor)
    stamps: list[tuple[float, float]] = []
    trainer = Trainer(model, data.train, cfg, out=folder, progress=False,
                      on_epoch=lambda t, r: stamps.append((time.perf_counter(),
                                                           time.process_time())))
    own: list[float] = []
    own_cpu: list[float] = []
    if trainer.monitor is not None:
        record = trainer.monitor.record

        def timed(epoch: int):
            t0, c0 = time.perf_counter(), time.process_time()
            rows = record(epoch)
            own.append(time.perf_counter() - t0)
            own_cpu.append(time.process_time() - c0)
            return rows

        trainer.monitor.record = timed  # type: ignore[method-assign]
    trainer.fit()
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:], strict=False)]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:], strict=False)]
    return wall, cpu, own[2:], own_cpu[2:]  # [0]: epoch 0, [1]: the first epoch (left out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per run (default 2)")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (default 1: what --threads auto picks for these)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lsa_ext.collapse").setLevel(logging.ERROR)  # γ 0.1 on conv3 collapses
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    print("command: " + shlex.join([".venv/bin/python", *sys.argv]))
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} cores, "
          f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            data = load_dataset(CASES[case][0], seed=0)
            res: dict[bool, dict[str, list[float]]] = {
                m: {"wall": [], "cpu": [], "own": [], "own_cpu": []} for m in (False, True)}
            for r in range(args.rounds):
                for monitor in ((False, True) if r % 2 == 0 else (True, False)):
                    folder = Path(tmp) / f"{case}-{r}-{monitor}"
                    wall, cpu, own, own_cpu = run_once(case, data, monitor, args.epochs,
                                                       folder)
                    res[monitor]["wall"] += wall
                    res[monitor]["cpu"] += cpu
                    res[monitor]["own"] += own
                    res[monitor]["own_cpu"] += own_cpu
            med = {m: {k: statistics.median(v) if v else float("nan") for k, v in d.items()}
                   for m, d in res.items()}
            rows.append((case, len(data.train), med))
            print(f"  {case}: done, load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print()
    print("| case | training samples | epoch without (s, wall / CPU) | epoch with --monitor "
          "(s, wall / CPU) | ratio (wall) | ratio (CPU) | monitor's own (s, wall / CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case, n, med in rows:
        off, on = med[False], med[True]
        dataset, model_name, at, layer = CASES[case]
        label = f"{case}: {model_name}, " + ("normal" if at == "none" else
                                              f"AT-{at.upper()}-LR-{layer}")
        print(f"| {label} | {n} | {off['wall']:.3f} / {off['cpu']:.3f} | "
              f"{on['wall']:.3f} / {on['cpu']:.3f} | {on['wall'] / off['wall']:.2f}× | "
              f"{on['cpu'] / off['cpu']:.2f}× | {on['own']:.3f} / {on['own_cpu']:.3f} |")


if __name__ == "__main__":
    main()
