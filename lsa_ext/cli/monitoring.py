"""The layer-monitoring options of `lsa train` (``--monitor``, ``--monitor-layers``,
``--monitor-samples``; :mod:`lsa_ext.monitor`): their registration, their TrainConfig fields and
the line naming what is monitored."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lsa_ext.cli.options import plural


def add_monitor_options(p: argparse.ArgumentParser) -> None:
    """Adds the "layer monitoring" option group to ``p``."""
    g = p.add_argument_group("layer monitoring")
    g.add_argument("--monitor", action="store_true",
                   help="before the first epoch and after each: every monitored layer's "
                        "relative error on a fixed probe of training samples under the "
                        "training attack (FGSM at --eps with --at none) → monitor.csv, "
                        "monitor.png in --out")
    g.add_argument("--monitor-layers", default=None,
                   help="layers to monitor besides the LR layers, as --layers of lsa analyze "
                        "(default: activations); turns --monitor on (the way to ask for it "
                        "under torchrun, which takes a bare --monitor for its own option)")
    g.add_argument("--monitor-samples", type=int, default=None,
                   help="probe size: training samples drawn once with --seed (default 256); "
                        "turns --monitor on")


def check_monitor_args(args: argparse.Namespace) -> None:
    """--monitor-layers or --monitor-samples turn monitoring on by themselves: under torchrun,
    whose parser reads a bare ``--monitor`` as an ambiguous abbreviation of its own
    ``--monitor-interval`` (and stops), they are the way to ask for it."""
    if args.monitor_layers is not None or args.monitor_samples is not None:
        args.monitor = True


def monitor_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields of --monitor, --monitor-layers, --monitor-samples (defaults:
    :data:`lsa_ext.monitor.DEFAULT_LAYERS`, :data:`lsa_ext.monitor.DEFAULT_SAMPLES`)."""
    from lsa_ext.monitor import DEFAULT_LAYERS, DEFAULT_SAMPLES

    return {"monitor": bool(args.monitor),
            "monitor_layers": args.monitor_layers or DEFAULT_LAYERS,
            "monitor_samples": (DEFAULT_SAMPLES if args.monitor_samples is None
                                else args.monitor_samples)}


def print_monitor(trainer, out: Path) -> None:
    """One line naming what the layer monitor measures and where it writes."""
    from lsa_ext.monitor import CSV_NAME, PNG_NAME

    mon = trainer.monitor
    if mon is not None:
        print(f"monitoring {plural(len(mon.names), 'layer')} ({', '.join(mon.names)}) under "
              f"{mon.description} → {out / CSV_NAME}, {PNG_NAME}", file=sys.stderr)
