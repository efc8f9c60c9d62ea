"""`lsa reproduce moons|digits`: the paper's protocol (Tables 2/3, Figs. 6/7) in one command."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce", help="reproduce the paper's tables (moons: Table 2, digits: Table 3)",
        description="Trains Normal, each AT method and each AT method with LR on each "
                    "learnable layer, evaluates them with FGSM on the paper's ε grid and "
                    "prints the table with R&G. Writes results.csv, results.json, table.md, "
                    "rg.png (Fig. 6) and, for moons, boundaries.png (Fig. 7) under --out. "
                    "Finished runs are cached in --out/runs and skipped on a rerun.",
    )
    p.add_argument("dataset", choices=("moons", "digits"))
    p.add_argument("--out", default=None, help="output folder (default runs/reproduce-DATASET)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    p.add_argument("--quick", action="store_true",
                   help="tiny version (2 epochs, 256 training samples) for tests")
    p.add_argument("--methods", default=None,
                   help="comma-separated base methods (default: moons fgsm,pgd,trades,fast; "
                        "digits apgd)")
    p.add_argument("--layers", default=None,
                   help="comma-separated LR layers, e.g. L0,L2 (default: every learnable layer)")
    p.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs")
    p.add_argument("--eps", type=float, default=None, help="override the training ε")
    p.add_argument("--gamma", type=float, default=None, help="override γ (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.set_defaults(func=run)


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lsa_ext.errors import LsaUserError
    from lsa_ext.reproduce import reproduce

    try:
        seeds = [int(s) for s in _split(args.seeds) or ["0"]]
    except ValueError:
        raise LsaUserError(f"--seeds must be comma-separated integers, got {args.seeds!r}") \
            from None
    out = Path(args.out or f"runs/reproduce-{args.dataset}")

    def on_run(r, cached):
        accs = " ".join(f"{a:6.2f}" for a in r.accuracies)
        tag = "cached" if cached else f"{r.seconds:.1f}s"
        print(f"{r.name:<22} seed {r.seed}: {accs}  R&G {r.rg:7.2f}  ({tag})", file=sys.stderr)

    res = reproduce(args.dataset, out=out, seeds=seeds, quick=args.quick,
                    methods=_split(args.methods), layers=_split(args.layers),
                    epochs=args.epochs, eps=args.eps, gamma=args.gamma, device=args.device,
                    figures=not args.no_figures, on_run=on_run)
    p = res.protocol
    print(f"\n{args.dataset}: {p.model}, {p.epochs} epochs, training ε = {p.eps:g}, "
          f"γ = {p.gamma:g}, seeds {','.join(map(str, seeds))}; FGSM accuracy (%) per ε\n")
    print(res.table())
    print("\nR&G next to the paper's:\n")
    print(res.comparison())
    figs = "" if args.no_figures else ", rg.png" + (", boundaries.png"
                                                     if args.dataset == "moons" else "")
    print(f"\nwritten: {out}/results.csv, results.json, table.md{figs}")
    return 0
