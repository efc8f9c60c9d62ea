"""`lsa evaluate --checkpoint PATH`: FGSM accuracy over the paper's ε grid (Khalooei et al.,
arXiv 2202.02626, Tables 2–4), R&G score, and optionally PGD / APGD robust accuracy. Prints
the table; writes evaluation.json and evaluation.csv under --out.

The dataset, model, data folder and data seed of an ``lsa train`` run are read from its
``config.json`` (or the checkpoint) when present (:func:`lsa_ext.cli.runs.run_meta`); options
that contradict them are an error; ``--dataset`` (and ``--model``) are required for a plain
state_dict file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lsa_ext.cli.options import add_device_option, dataset_options, parse_list
from lsa_ext.cli.runs import from_run, run_meta
from lsa_ext.cli.train import (
    add_data_args,
    check_data_args,
    default_model,
    load_data,
    stored_data_options,
)
from lsa_ext.errors import LsaUserError
from lsa_ext.evaluation import format_eps
from lsa_ext.presets import EPS_GRIDS


def _grids_text() -> str:
    """``moons/digits/mnist: 0, 0.1, …; cifar10: 0, 0.01, …`` from :data:`EPS_GRIDS`."""
    by_grid: dict[tuple[float, ...], list[str]] = {}
    for name, grid in EPS_GRIDS.items():
        by_grid.setdefault(grid, []).append(name)
    return "; ".join(f"{'/'.join(names)}: {', '.join(map(format_eps, grid))}"
                     for grid, names in by_grid.items())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="FGSM ε-grid accuracy, R&G score, PGD/APGD robust accuracy",
        description=f"Evaluates a trained model: FGSM accuracy on the paper's ε grid "
                    f"({_grids_text()}), the R&G score (their sum), the same grid under PGD "
                    "(random start; R&G under PGD) and under random sign noise ±ε, flags of "
                    "gradient masking (FGSM accuracy rising with ε, PGD above FGSM, an attack "
                    "above random noise), and optional PGD/APGD robust accuracy at other ε.",
    )
    p.add_argument("--checkpoint", required=True,
                   help="an 'lsa train' checkpoint (last.pt), model.pt, or any state_dict file")
    add_data_args(p, required=True)
    p.add_argument("--eps-grid", default=None, help="FGSM ε values, comma-separated "
                                                   "(default: the paper's grid for the dataset)")
    p.add_argument("--pgd-eps", default=None, help="ε value(s) for PGD robust accuracy")
    p.add_argument("--pgd-steps", type=int, default=20,
                   help="PGD steps, also of the masking checks (default 20)")
    p.add_argument("--no-masking-checks", action="store_true",
                   help="skip PGD over the grid, the sign noise and the masking flags")
    p.add_argument("--masking-tol", type=float, default=0.5,
                   help="percentage points a masking check must exceed (default 0.5)")
    p.add_argument("--apgd-eps", default=None, help="ε value(s) for APGD-CE robust accuracy")
    p.add_argument("--apgd-steps", type=int, default=100, help="APGD steps (default 100)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="seed of PGD/APGD random starts")
    add_device_option(p, default="auto")
    p.add_argument("--out", default=None,
                   help="folder for evaluation.json/.csv (default: the checkpoint's folder)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lsa_ext.evaluation import check_settings, evaluate
    from lsa_ext.io import check_dir
    from lsa_ext.models import build_model, load_weights
    from lsa_ext.outputs import check_model_output

    # every argument is checked before any data is read
    path = Path(args.checkpoint)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pt"))
        raise LsaUserError(f"--checkpoint {path} is a folder: name a file in it"
                           + (f" ({', '.join(inside)})" if inside else " (it holds no .pt file)"))
    if not path.is_file():
        raise LsaUserError(f"checkpoint {path} does not exist")
    out = check_dir(args.out) if args.out else path.parent
    meta = run_meta(path)
    if meta.get("dataset") and "dataset" in args.given:
        from lsa_ext.data import dataset_info

        args.dataset = dataset_info(args.dataset).name
    for dest, value in from_run(args.given, args, meta, path, {
            "dataset": "dataset", "model": "model", "data_seed": "data_seed"}).items():
        setattr(args, dest, value)
    if args.dataset is None:
        raise LsaUserError(f"{path} is not an 'lsa train' checkpoint: name its --dataset "
                           "(and --model)")
    if meta.get("dataset") and args.dataset == meta["dataset"]:
        # the run's own data options, with any given here on top
        options = {**stored_data_options(meta),
                   **dataset_options(args, args.dataset, name_scale=False)}
    else:  # another dataset named here: the data options are this command's
        options = dataset_options(args, args.dataset)
    data_dir = args.data_dir or meta.get("data_dir")
    info = check_data_args(args.dataset, data_dir, args.data_seed, None, args.limit_test, options)
    model_name = args.model or default_model(info.name)
    model = build_model(model_name, info)
    load_weights(model, path)
    check_model_output(model, info.input_shape, info.num_classes)
    pgd = parse_list(args.pgd_eps, float, "--pgd-eps")
    apgd = parse_list(args.apgd_eps, float, "--apgd-eps")
    settings = {"eps_grid": parse_list(args.eps_grid, float, "--eps-grid"),
                "pgd_eps": pgd or None, "apgd_eps": apgd or None, "pgd_steps": args.pgd_steps,
                "apgd_steps": args.apgd_steps, "batch_size": args.batch_size,
                "device": args.device, "seed": args.seed,
                "masking_checks": not args.no_masking_checks, "masking_tol": args.masking_tol}
    check_settings(model, dataset=info.name, **settings)
    data = load_data(args.dataset, data_dir, args.data_seed, None, args.limit_test, options)
    result = evaluate(model, data, **settings)
    result.config["checkpoint"] = str(path)  # which weights these numbers are of
    result.to_json(str(out / "evaluation.json"))
    result.to_csv(str(out / "evaluation.csv"))
    print(f"{model_name} from {path} on {data.info.name} test ({len(data.test)} samples)")
    print(result.table())
    print(f"R&G score: {result.rg:.2f}"
          + (f"; under PGD-{args.pgd_steps}: {result.rg_pgd:.2f}" if result.rg_pgd is not None
             else ""))
    print(f"written: {out / 'evaluation.json'}, {out / 'evaluation.csv'}")
    return 0
