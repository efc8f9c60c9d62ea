"""`lsa reproduce moons|mnist5k|digits`: the paper's protocol in one command (Khalooei et al.,
arXiv 2202.02626: Tables 2 and 3, Figs. 6 and 7; see :mod:`lsa_ext.reproduce`), with the R&G
under PGD-20 and gradient-masking flags beside the paper's FGSM R&G."""

from __future__ import annotations

import argparse
import sys

from lsa_ext.cli.options import (
    add_device_option,
    add_moons_options,
    dataset_options,
    parse_list,
    plural,
)
from lsa_ext.errors import LsaUserError
from lsa_ext.reproduce import LR_VARIANTS, PROTOCOLS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce",
        help="reproduce the paper's tables (moons: Table 2, mnist5k and digits: Table 3)",
        description="Trains Normal, each AT method and each AT method with LR on each "
                    "learnable layer, evaluates them with FGSM on the paper's ε grid and, "
                    "beside it, with PGD-20 (random start) and random sign noise, and prints "
                    "the table with R&G, R&G under PGD and gradient-masking flags. Writes "
                    "results.csv, results.json, table.md, rg.png (Fig. 6) and, for moons, "
                    "boundaries.png (Fig. 7) under --out. Finished runs are cached in "
                    "--out/runs and skipped on a rerun.",
    )
    p.add_argument("dataset", nargs="?", choices=tuple(PROTOCOLS),
                   help=f"the protocol: {' or '.join(PROTOCOLS)}")
    p.add_argument("--out", default=None, help="output folder (default runs/reproduce-DATASET)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    p.add_argument("--quick", action="store_true",
                   help="tiny version (2 epochs, 256 training samples) for tests")
    defaults = "; ".join(f"{k} {','.join(v.methods)}" for k, v in PROTOCOLS.items())
    p.add_argument("--methods", default=None,
                   help=f"comma-separated base methods (default: {defaults})")
    p.add_argument("--layers", default=None,
                   help="comma-separated LR layers, e.g. L0,L2 or A1 (k-th activation site) "
                        "(default: every learnable layer but the output layer)")
    p.add_argument("--lr-variants", default=None,
                   help="comma-separated LR variants each LR row is trained with: "
                        f"{', '.join(LR_VARIANTS)}, or all (default: mean — per-sample CM, "
                        "gradient through both passes; batch: whole-batch CM as the authors' "
                        "code; detach: no gradient through the clean pass)")
    p.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs")
    p.add_argument("--eps", type=float, default=None, help="override the training ε")
    p.add_argument("--gamma", type=float, default=None,
                   help="override γ (default 1, the protocol's; lsa train's default is 0.1)")
    add_moons_options(p)
    # cpu, unlike analyze/train/evaluate (auto): the protocol's models are tiny, run fastest on
    # the CPU, and the tables of docs/results.md were measured there
    add_device_option(p, default="cpu")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lsa_ext.reproduce import reproduce, table_notes

    if args.dataset is None:
        raise LsaUserError(f"name a dataset: lsa reproduce {{{','.join(PROTOCOLS)}}} [options], "
                           f"e.g. lsa reproduce {next(iter(PROTOCOLS))} --quick")
    seeds = parse_list(args.seeds, int, "--seeds")
    if not seeds:
        raise LsaUserError(f"--seeds needs at least one seed, got {args.seeds!r} (e.g. --seeds "
                           "0,1,2)")
    if len(set(seeds)) != len(seeds):
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        raise LsaUserError(f"--seeds lists {', '.join(map(str, twice))} more than once "
                           "(each seed is one run per table row; the spread over copies is 0)")
    out = Path(args.out or f"runs/reproduce-{args.dataset}")

    def on_run(r, cached):
        accs = " ".join(f"{a:6.2f}" for a in r.accuracies)
        tag = "cached" if cached else f"{r.seconds:.1f} s"
        flags = f"  masking: {';'.join(r.masking_flags)}" if r.masking_flags else ""
        print(f"{r.name:<22} seed {r.seed}: {accs}  R&G {r.rg:7.2f}  PGD R&G "
              f"{r.rg_pgd:7.2f}  ({tag}){flags}", file=sys.stderr)

    res = reproduce(args.dataset, out=out, seeds=seeds, quick=args.quick,
                    methods=parse_list(args.methods, str, "--methods"),
                    layers=parse_list(args.layers, str, "--layers"),
                    epochs=args.epochs, eps=args.eps, gamma=args.gamma,
                    data_options=dataset_options(args, args.dataset),
                    lr_variants=parse_list(args.lr_variants, str, "--lr-variants"),
                    device=args.device,
                    figures=not args.no_figures, on_run=on_run)
    p = res.protocol
    print(f"\n{args.dataset}: {p.model}, {plural(p.epochs, 'epoch')}, training ε = {p.eps:g}, "
          f"γ = {p.gamma:g}, seeds {','.join(map(str, seeds))}; FGSM accuracy (%) per ε\n")
    print(res.table())
    print("\n" + table_notes(p))
    print("\nR&G next to the paper's:\n")
    print(res.comparison())
    figs = "" if args.no_figures else ", rg.png" + (", boundaries.png"
                                                     if args.dataset == "moons" else "")
    print(f"\nwritten: {out}/results.csv, results.json, table.md{figs}")
    return 0
