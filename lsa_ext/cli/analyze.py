"""``lsa analyze``: Layer Sustainability Analysis (Khalooei et al., arXiv 2202.02626, Algorithm 2)
from the command line.

With no arguments: Model B on the embedded 8×8 digits, trained for a few epochs (or reused from
the cache), the test set perturbed by Gaussian, salt, pepper and speckle noise, FGSM and PGD
(ε = 0.1), relative error per layer (the ReLUs), MVL with η = 1. Prints the per-layer table and
the MVL and writes ``report.json``, ``layers.csv`` and ``lsa.png`` into ``--out`` (``./lsa-out``).

With ``--checkpoint`` of an ``lsa train`` run, the run's dataset, model, data folder and data
seed are read from its ``config.json`` (:func:`lsa_ext.cli.runs.run_meta`); options given
that contradict them are an error.

Trained models are cached in ``$LSA_CACHE_DIR``, else ``$XDG_CACHE_HOME/lsa_ext``, else
``~/.cache/lsa_ext``, as ``<model>-<dataset>-seed<seed>-ep<epochs>.pt`` (see
:func:`lsa_ext.model_cache.cache_name`; a state dict, read back with ``weights_only=True``);
``--no-cache`` trains afresh and writes nothing there.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from lsa_ext.cli.options import add_device_option, plural
from lsa_ext.errors import LsaUserError
from lsa_ext.model_cache import cache_dir, cache_name, load_or_train
from lsa_ext.paired_capture import PASS_MODES
from lsa_ext.presets import ANALYZE_EPS

log = logging.getLogger("lsa_ext.cli.analyze")

DEFAULT_PERTURBATIONS = "gaussian,salt,pepper,speckle,fgsm,pgd"
DEFAULT_EPOCHS = {"moons": 30, "digits": 15, "mnist5k": 5, "mnist": 2, "cifar10": 10}
DEFAULT_EPS = ANALYZE_EPS  # attack ε per dataset where a spec sets none (lsa_ext.presets)
CSV_NAME, JSON_NAME, PNG_NAME = "layers.csv", "report.json", "lsa.png"
DESCRIPTION = """\
Layer Sustainability Analysis: compare every probed layer's clean and perturbed representations
and list the most vulnerable layers (MVL: mean CM - mu > eta * sigma).

With no arguments: Model B on the embedded 8x8 digits (trained in seconds, then cached),
Gaussian, salt, pepper and speckle noise, FGSM and PGD (eps 0.1), relative error at every ReLU.
Writes report.json, layers.csv and lsa.png into --out.

examples:
  lsa analyze
  lsa analyze --perturbations "gaussian:std=0.2,fgsm:eps=0.05,pgd:eps=0.05,steps=20" --eta 0.5
  lsa analyze --layers learnable --measure cosine --out runs/cos
  lsa analyze --dataset mnist --data-dir ~/data/mnist --max-samples 2000
  lsa analyze --checkpoint runs/digits-AT-PGD/model.pt   # dataset and model from the run
  PYTHONPATH=examples lsa analyze --model mypkg.nets:make_net --layers "block*.act,head.fc"

Trained models are cached in $LSA_CACHE_DIR, else $XDG_CACHE_HOME/lsa_ext, else
~/.cache/lsa_ext (--no-cache: train afresh, write nothing there).
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="per-layer sustainability analysis (CM per layer, MVL) of a model",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", default="digits",
                   help="moons, digits, mnist5k, mnist or cifar10 (default: digits)")
    from lsa_ext.cli.options import add_moons_options

    add_moons_options(p)
    p.add_argument("--data-dir", default=None,
                   help="folder with the MNIST IDX / CIFAR-10 python files (no download)")
    p.add_argument("--model", default=None,
                   help="model_a, model_b, vgg19, wrn28_10 or package.module:factory "
                        "(default: the paper's model for the dataset)")
    p.add_argument("--checkpoint", default=None,
                   help="state dict to load (weights_only); skips training. An 'lsa train' "
                        "run's last.pt/model.pt: its dataset and model are used")
    p.add_argument("--layers", default="activations",
                   help="probes: activations, learnable, leaves, L<k> (k-th learnable layer), "
                        "A<k> (k-th activation site: row k of the default), names, name#k "
                        "sites or globs, comma-separated (default: activations)")
    p.add_argument("--perturbations", default=DEFAULT_PERTURBATIONS,
                   help="comma-separated specs, e.g. 'gaussian:std=0.1,fgsm:eps=0.1,pgd:steps=20' "
                        f"(default: {DEFAULT_PERTURBATIONS}); also salt_pepper, fast, trades, "
                        "apgd")
    p.add_argument("--eps", type=float, default=None,
                   help="attack budget ε (L∞) where a spec sets none (default: 0.1; cifar10 8/255)")
    p.add_argument("--measure", default="relative_error",
                   help="relative_error, mse, cosine or relative_linf (default: relative_error)")
    p.add_argument("--eta", type=float, default=1.0, help="MVL cut-off η ≥ 0 (default: 1.0)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    p.add_argument("--max-samples", type=int, default=None,
                   help="analyze only the first N test samples (default: all)")
    p.add_argument("--mode", default="concat", choices=PASS_MODES,
                   help="pass mode of the paired clean/perturbed capture: concat (default) or "
                        "two_pass (batch-coupled models)")
    add_device_option(p, default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of data, training, noise (default 0)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs when no checkpoint is given "
                        f"(default: {', '.join(f'{k} {v}' for k, v in DEFAULT_EPOCHS.items())})")
    p.add_argument("--out", default="lsa-out", help="output folder (default: ./lsa-out)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the model cache")
    p.add_argument("--no-plot", action="store_true", help="skip lsa.png")
    from lsa_ext import distributed

    distributed.add_cli_options(p)
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if args.eps is not None and not args.eps >= 0:
        raise LsaUserError(f"--eps must be >= 0, got {args.eps}")
    if args.batch_size < 1:
        raise LsaUserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.epochs is not None and args.epochs < 1 and not args.checkpoint:
        raise LsaUserError(f"--epochs must be >= 1, got {args.epochs}")
    if args.max_samples is not None and args.max_samples < 1:
        raise LsaUserError(f"--max-samples must be >= 1, got {args.max_samples}")
    if not args.eta >= 0 or args.eta == float("inf"):
        raise LsaUserError(f"--eta must be a number >= 0, got {args.eta}")
    if args.seed < 0:
        raise LsaUserError(f"--seed must be >= 0, got {args.seed}")


def _checked_model(args, info, model_name: str, eps: float):
    """The model, built and checked with everything the arguments decide, before any data is
    read or any training starts: the layer selection, the model's output (one forward on two
    zero inputs: logits that fit the dataset's classes), the perturbation specs (names,
    parameters, and whether they fit the class count, e.g. APGD's DLR loss) and
    ``--checkpoint`` (loaded here)."""
    from lsa_ext.analysis import check_sites_reached
    from lsa_ext.models import build_model, load_weights
    from lsa_ext.outputs import check_model_output
    from lsa_ext.perturbations import build_perturbations
    from lsa_ext.probes import select_layers

    model = build_model(model_name, info, seed=args.seed)
    check_sites_reached(model, select_layers(model, args.layers, example=info.input_shape),
                        info.input_shape)
    check_model_output(model, info.input_shape, info.num_classes)
    build_perturbations(args.perturbations, model=model, clip=info.data_range, eps=eps,
                        seed=args.seed, num_classes=info.num_classes)
    if args.checkpoint:
        load_weights(model, args.checkpoint)
    return model


def _trained_model(args, model, splits, model_name: str, epochs: int, device, data_options):
    """``(model, source)``: the --checkpoint model as is, else the cache, else trained (and
    cached)."""
    if args.checkpoint:
        return model, "checkpoint"
    path = None if args.no_cache else cache_dir() / cache_name(
        model_name, splits.info.name, args.seed, epochs, args.batch_size, args.data_dir,
        data_options=data_options)
    return load_or_train(model, splits.train, path, epochs=epochs, batch_size=args.batch_size,
                         seed=args.seed, device=device)


def _from_run(args: argparse.Namespace) -> tuple[int, dict[str, Any] | None]:
    """With ``--checkpoint`` of an ``lsa train`` run: the run's dataset, model, data folder
    (unless given) and data seed fill the options not given; returns the data seed and the
    run's data options (None: not a run, or another dataset named here)."""
    from lsa_ext.cli.runs import from_run, run_meta
    from lsa_ext.cli.train import stored_data_options
    from lsa_ext.data import dataset_info

    if not args.checkpoint:
        return args.seed, None
    meta = run_meta(args.checkpoint)
    if meta.get("dataset"):
        meta = {**meta, "dataset": dataset_info(meta["dataset"]).name}
        if "dataset" in args.given:
            args.dataset = dataset_info(args.dataset).name
    settings = from_run(args.given, args, meta, args.checkpoint,
                        {"dataset": "dataset", "model": "model"})
    for dest, value in settings.items():
        setattr(args, dest, value)
    if args.data_dir is None and meta.get("data_dir"):
        args.data_dir = meta["data_dir"]
    if not meta.get("dataset"):
        return args.seed, None
    run_data = stored_data_options(meta) if args.dataset == meta["dataset"] else None
    return int(meta.get("data_seed", args.seed)), run_data


def run(args: argparse.Namespace) -> int:
    from lsa_ext.io import check_dir

    _check_args(args)
    check_dir(args.out)
    data_seed, run_data = _from_run(args)
    import lsa_ext
    from lsa_ext import distributed
    from lsa_ext.cli.options import dataset_options
    from lsa_ext.data import check_dataset_args, load_dataset
    from lsa_ext.devices import resolve_device
    from lsa_ext.measures import get_measure
    from lsa_ext.models import DEFAULT_MODEL
    from lsa_ext.perturbations import build_perturbations

    # every argument is checked before any data is read or any training starts
    get_measure(args.measure)
    device = resolve_device(args.device)
    # shape, classes, range, the data options (the run's own, with any given here on top),
    # and --data-dir given where files are needed: nothing read yet
    if run_data is not None:
        data_options = {**run_data, **dataset_options(args, args.dataset, name_scale=False)}
    else:
        data_options = dataset_options(args, args.dataset)
    info = check_dataset_args(args.dataset, args.data_dir, seed=data_seed, **data_options)
    model_name = args.model or DEFAULT_MODEL[info.name]
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS.get(info.name, 10)
    eps = args.eps if args.eps is not None else DEFAULT_EPS.get(info.name, 0.1)
    model = _checked_model(args, info, model_name, eps)
    # under torchrun: join the job (each rank on its own GPU); otherwise nothing changes
    device = distributed.init_from_env(args.dist_backend, device, args.dist_timeout).device
    main = distributed.is_main()  # only rank 0 prints and writes
    splits = load_dataset(args.dataset, args.data_dir, seed=data_seed, **data_options)
    model, source = _trained_model(args, model, splits, model_name, epochs, device, data_options)
    model.to(device)
    perts = build_perturbations(args.perturbations, model=model, clip=info.data_range, eps=eps,
                                seed=args.seed)
    n_test = len(splits.test) if args.max_samples is None else min(args.max_samples,
                                                                   len(splits.test))
    if main:
        print(f"LSA: {model_name} on {info.name} ({source}"
              + (f", {plural(epochs, 'epoch')}" if source != "checkpoint" else "")
              + f"), {n_test} test samples; device {device}"
              + (f", {distributed.world_size()} processes" if distributed.world_size() > 1
                 else ""),
              file=sys.stderr)
    config = {
        "dataset": info.name,
        "data_dir": args.data_dir,
        "data_options": splits.options,
        "model": model_name,
        "checkpoint": args.checkpoint,
        "data_seed": data_seed,
        "epochs": None if args.checkpoint else epochs,
        "test_samples": n_test,
    }
    result = lsa_ext.analyze(
        model, splits.test, perts, layers=args.layers, measure=args.measure,
        batch_size=args.batch_size, device=device, seed=args.seed, clip=info.data_range,
        eps=eps, mode=args.mode, max_samples=args.max_samples, config=config,
    )
    if not main:
        return 0
    out = Path(args.out)
    result.to_json(out / JSON_NAME, eta=args.eta)
    result.to_csv(out / CSV_NAME, eta=args.eta)
    if not args.no_plot:
        result.plot(out / PNG_NAME, eta=args.eta,
                    title=f"LSA: {result.measure.replace('_', ' ')} per layer\n{model_name} on "
                          f"{info.name}, {n_test} test samples, clean accuracy "
                          f"{100 * (result.accuracy or {}).get('clean', float('nan')):.1f} %")
    print(result.format_table(args.eta))
    files = [JSON_NAME, CSV_NAME] + ([] if args.no_plot else [PNG_NAME])
    print(f"\nwrote {', '.join(str(out / f) for f in files)}")
    return 0
