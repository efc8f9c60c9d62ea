"""`lsa train`: normal, adversarial (FGSM/PGD/FAST/TRADES/APGD) and AT-LR training
(Khalooei et al., arXiv 2202.02626, Algorithm 3).

Writes under ``--out`` (default ``runs/<dataset>-<run name>``, e.g. ``runs/moons-AT-PGD``):
``config.json`` (the run's settings), ``last.pt`` before the first batch and after every epoch
(atomically; the one before is kept as ``prev.pt``), ``history.json`` (per-epoch losses) and
``model.pt`` (final weights, a plain state_dict) at the end; with ``--monitor``, ``monitor.csv``
and ``monitor.png`` (each layer's relative error on a fixed probe under the training attack,
per epoch: :mod:`lsa_ext.monitor`). A folder that is not empty is
refused unless ``--overwrite`` (the old run's files are removed) or ``--resume``, which
continues ``--out/last.pt`` (or a given checkpoint) with the settings stored in it: options
that contradict them are an error naming them; ``--epochs``, ``--device`` and ``--data-dir``
may be changed — ``--epochs`` not with a ``cosine`` schedule, nor a ``step`` one whose step
size would change (their plan is fixed by the run's epochs:
:func:`lsa_ext.train_config.check_resume_epochs`). Ctrl-C prints the command that resumes the run.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any

from lsa_ext.cli.monitoring import (
    add_monitor_options,
    check_monitor_args,
    monitor_settings,
    print_monitor,
)
from lsa_ext.cli.options import (
    Interrupted,
    add_moons_options,
    attack_kwargs,
    dataset_options,
    parse_list,
    plural,
)
from lsa_ext.cli.runs import CONFIG, clear_run, default_out, nothing_to_resume, prepare_out
from lsa_ext.errors import LsaUserError
from lsa_ext.presets import TRAIN_EPS

# Training-attack ε per dataset when --eps is not given (lsa_ext.presets).
DEFAULT_EPS = TRAIN_EPS
DEFAULT_EPOCHS = 10
# moons, unlike `lsa analyze` (digits, whose Model B has more layers to compare): the paper's
# Table 2 dataset, where adversarial training works within a few epochs (3 epochs of AT-PGD:
# ~80 % clean test accuracy on moons, 28 % on digits, whose models need ~10 epochs)
DEFAULT_DATASET = "moons"
DEFAULT_GAMMA = "0.1"  # lsa_ext.train's default too; README, "AT-LR training": γ measured


def _epochs(args: argparse.Namespace) -> int:
    """--epochs, or the default when not given (an explicit 0 is kept, and rejected later)."""
    return DEFAULT_EPOCHS if args.epochs is None else args.epochs


# --------------------------------------------------------------------------- shared options
def add_data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    """--dataset, --data-dir, --model, --data-seed, --limit-train, --limit-test and the moons
    options (--moons-scale, --moons-noise, --moons-samples)."""
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default=None if required else DEFAULT_DATASET,
                   help="moons, digits, mnist5k, mnist or cifar10"
                        + ("" if required else f" (default: {DEFAULT_DATASET})"))
    g.add_argument("--data-dir", default=None, help="folder with the MNIST/CIFAR-10 files")
    g.add_argument("--model", default=None,
                   help="model_a, model_b, vgg19, wrn28_10 or package.module:factory "
                        "(default: the paper's model for the dataset)")
    g.add_argument("--data-seed", type=int, default=0,
                   help="seed of the data generation/split (default 0)")
    g.add_argument("--limit-train", type=int, default=None, help="use a random training subset")
    g.add_argument("--limit-test", type=int, default=None, help="use a random test subset")
    add_moons_options(g)


def load_data(dataset: str, data_dir: str | None, data_seed: int,
              limit_train: int | None = None, limit_test: int | None = None,
              options: dict[str, Any] | None = None):
    """``lsa_ext.data.load_dataset`` with the CLI's options (``options``: dataset options such
    as moons' ``scale``, ``noise``, ``n_train``)."""
    from lsa_ext.data import load_dataset

    opts: dict[str, Any] = dict(options or {})
    if limit_train is not None:
        opts["limit_train"] = limit_train
    if limit_test is not None:
        opts["limit_test"] = limit_test
    return load_dataset(dataset, data_dir, seed=data_seed, **opts)


def stored_data_options(meta: dict[str, Any]) -> dict[str, Any]:
    """The dataset options a training run recorded (``meta["data_options"]``). Runs recorded
    before the options existed used make_moons' raw coordinates (two-moons was not yet
    standardized)."""
    from lsa_ext.data import dataset_info

    if "data_options" in meta:
        return dict(meta["data_options"] or {})
    return {"scale": "raw"} if dataset_info(meta["dataset"]).name == "moons" else {}


def default_model(dataset: str) -> str:
    from lsa_ext.models import DEFAULT_MODEL

    return DEFAULT_MODEL.get(dataset.lower().replace("-", "").replace("_", ""), "model_a")


def parse_gamma(text: str) -> float | list[float]:
    """``"0.5"`` → 0.5; ``"0.1,0.2"`` → [0.1, 0.2]."""
    values = parse_list(text, float, "--gamma")
    if not values:
        raise LsaUserError("--gamma is empty")
    return values[0] if len(values) == 1 else values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model normally, adversarially, or with AT-LR",
        description="Train with Algorithm 3 (AT-LR) or a base method. Checkpoints before the "
                    "first batch and every epoch under --out; --resume continues a killed or "
                    "interrupted run bit for bit.",
    )
    from lsa_ext.cli.options import add_device_option
    from lsa_ext.mvl_select import MVL_KINDS
    from lsa_ext.train_config import (
        AT_METHODS,
        ATTACK_MODES,
        LR_PASSES,
        LR_REDUCTIONS,
        OPTIMIZERS,
        SCHEDULERS,
    )

    add_data_args(p)
    g = p.add_argument_group("adversarial training")
    g.add_argument("--at", default="none", choices=AT_METHODS,
                   help="base method (default none = normal training)")
    g.add_argument("--eps", type=float, default=None,
                   help="L∞ budget (default: 0.3 moons/mnist, 0.2 digits, 8/255 cifar10)")
    g.add_argument("--steps", type=int, default=None,
                   help="attack iterations (pgd/trades default 10, apgd 10 for training)")
    g.add_argument("--alpha", type=float, default=None, help="attack step size")
    g.add_argument("--restarts", type=int, default=None, help="APGD restarts (default 1)")
    g.add_argument("--attack-mode", default="eval", choices=ATTACK_MODES,
                   help="attack mode: the model's mode while the attack runs (default eval)")
    g.add_argument("--trades-beta", type=float, default=6.0, help="TRADES β (default 6)")
    g = p.add_argument_group("layer-wise regularization (LR)")
    g.add_argument("--lr-layers", default=None,
                   help="regularized layers: comma-separated names, name#k sites, L<k> (k-th "
                        "learnable layer), A<k> (k-th activation site, as lsa analyze numbers "
                        "its rows), or 'mvl' (most vulnerable layers; see --mvl-report, "
                        "--mvl-kind, --eta; the top-ranked layer when none passes η)")
    g.add_argument("--mvl-report", default=None,
                   help="with --lr-layers mvl: an 'lsa analyze' report.json to take the MVL "
                        "from (default: analyze a normally trained copy on the fly, output "
                        "layer left out)")
    g.add_argument("--mvl-perturbation", default=None, metavar="NAME",
                   help="with --mvl-report: the report's perturbation to take the MVL from "
                        "(default: its only one, else the one named after --at, e.g. pgd; "
                        "an error lists the names when neither fits)")
    g.add_argument("--mvl-kind", default=MVL_KINDS[0], choices=MVL_KINDS,
                   help="with --lr-layers mvl on the fly: the layers probed — activations "
                        "(default, as lsa analyze: activation outputs) or learnable (Conv/"
                        "Linear outputs)")
    g.add_argument("--eta", type=float, default=1.0, help="MVL cut-off η ≥ 0 (default 1.0)")
    g.add_argument("--gamma", default=DEFAULT_GAMMA,
                   help="LR weight γ: one value, or one per layer comma-separated "
                        f"(default {DEFAULT_GAMMA}; γ = 1 collapsed training in our runs)")
    g.add_argument("--full-clean-pass", action="store_true",
                   help="run the whole clean forward for LR (default: stop after the last "
                        "regularized layer unless TRADES needs clean logits)")
    g.add_argument("--lr-pass", default="auto", choices=LR_PASSES,
                   help="LR term: one forward of clean+adversarial batches (concat), two "
                        "forwards (two_pass), or auto (default; see README)")
    g.add_argument("--lr-reduction", default="mean", choices=LR_REDUCTIONS,
                   help="CM of a layer over the batch: mean of the per-sample relative errors "
                        "(default; the paper's formula) or one ratio over the whole batch "
                        "(batch; the authors' published code)")
    g.add_argument("--lr-detach-clean", action="store_true",
                   help="no gradient through the clean pass of the LR term (default: both "
                        "passes, as Algorithm 3 is written)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help=f"default {DEFAULT_EPOCHS}")
    g.add_argument("--batch-size", type=int, default=128, help="default 128")
    g.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--scheduler", default="none", choices=SCHEDULERS)
    g.add_argument("--seed", type=int, default=0, help="seed of init, order, attacks (default 0)")
    add_device_option(g, default="auto")
    add_monitor_options(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None,
                   help="run folder (default: runs/<dataset>-<run name>, e.g. "
                        "runs/moons-AT-PGD-LR-mvl); must be empty or new")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run in a non-empty --out (its run files are removed)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue the run in --out (its last.pt), or CHECKPOINT, with its "
                        "settings; --epochs, --device and --data-dir may be changed")
    from lsa_ext import distributed

    distributed.add_cli_options(p)
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- checks
def check_data_args(dataset: str, data_dir: str | None, data_seed: int,
                    limit_train: int | None = None, limit_test: int | None = None,
                    options: dict[str, Any] | None = None):
    """:func:`lsa_ext.data.check_dataset_args` with the CLI's options (as :func:`load_data`
    takes them): the dataset's info, every data option checked, nothing read."""
    from lsa_ext.data import check_dataset_args

    return check_dataset_args(dataset, data_dir, seed=data_seed, limit_train=limit_train,
                              limit_test=limit_test, **(options or {}))


def _check_args(args: argparse.Namespace) -> None:
    check_monitor_args(args)
    mvl = args.lr_layers is not None and args.lr_layers.strip().lower() == "mvl"
    if args.mvl_report and not mvl:
        raise LsaUserError("--mvl-report is read only with --lr-layers mvl")
    if args.mvl_perturbation is not None and not args.mvl_report:
        raise LsaUserError("--mvl-perturbation picks a perturbation of the --mvl-report report "
                           "(MVL on the fly uses the --at attack): give --lr-layers mvl "
                           "--mvl-report too")
    if "mvl_kind" in args.given and not mvl:
        raise LsaUserError("--mvl-kind is read only with --lr-layers mvl")
    if "mvl_kind" in args.given and args.mvl_report:
        raise LsaUserError("--mvl-kind picks what MVL on the fly probes; with --mvl-report the "
                           "report's layers count: give one of them")
    if mvl and args.at == "none":
        raise LsaUserError("--lr-layers mvl needs an --at method other than 'none'")
    variant = [f"--{d.replace('_', '-')}" for d in ("lr_reduction", "lr_detach_clean")
               if d in args.given]
    if variant and not (args.lr_layers and args.lr_layers.strip()):
        raise LsaUserError(f"{' and '.join(variant)} set{'s' if len(variant) == 1 else ''} "
                           "how the LR term is computed: give --lr-layers too")


def check_training_attack(cfg, model, num_classes: int) -> None:
    """Builds the training attack of ``cfg`` once (as :class:`lsa_ext.training.Trainer` will at
    each epoch), so bad attack settings (--steps, --alpha, --restarts) and an attack unfit for
    the dataset's class count fail before any data is read or any training starts."""
    if cfg.at == "none":
        return
    from lsa_ext.attacks import build_attack
    from lsa_ext.train_config import TRAIN_ATTACK_DEFAULTS

    attack = build_attack(cfg.at, model, cfg.eps,
                          clip=None if cfg.clip is None else tuple(cfg.clip),
                          mode=cfg.attack_mode, seed=cfg.seed,
                          **{**TRAIN_ATTACK_DEFAULTS.get(cfg.at, {}), **cfg.attack_kwargs})
    attack.check_num_classes(num_classes)


# --------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    if not args.eta >= 0 or not math.isfinite(args.eta):
        raise LsaUserError(f"--eta must be a number >= 0, got {args.eta}")
    if args.resume is not None:
        if args.overwrite:
            raise LsaUserError("--resume continues the run in --out and --overwrite replaces "
                               "it: give one of them")
        return _resume(args)
    return _new_run(args)


def _out_name(dataset: str, args: argparse.Namespace) -> Path:
    """The default --out: ``runs/<dataset>-<run name>`` with the layers as typed
    (``runs/moons-AT-PGD-LR-mvl``, ``runs/moons-AT-FGSM-LR-L1+fc3``)."""
    from lsa_ext.data import dataset_info
    from lsa_ext.train_config import lr_variant_suffix, run_name

    items = parse_list(args.lr_layers, str, "--lr-layers") or []
    name = run_name(args.at, items)
    if items:
        name += lr_variant_suffix(args.lr_reduction, args.lr_detach_clean)
    return default_out(dataset_info(dataset).name, re.sub(r"[^A-Za-z0-9_.+=-]+", "_", name))


def _new_run(args: argparse.Namespace) -> int:
    from lsa_ext import distributed
    from lsa_ext.devices import resolve_device
    from lsa_ext.io import atomic_write_json
    from lsa_ext.models import build_model
    from lsa_ext.outputs import check_model_output
    from lsa_ext.seeding import seed_everything
    from lsa_ext.training import TrainConfig, Trainer, gamma_tensor

    if args.lr_layers and args.lr_layers.strip() and args.at == "none":
        raise LsaUserError("--lr-layers needs adversarial examples: add --at with one of fgsm, "
                           "pgd, fast, trades, apgd")
    _check_args(args)
    resolve_device(args.device)
    # every argument is checked before any data is read or any training starts:
    # shape, classes, range and the data options are known without reading any data
    options = dataset_options(args, args.dataset)
    info = check_data_args(args.dataset, args.data_dir, args.data_seed, args.limit_train,
                           args.limit_test, options)
    name = info.name
    model_name = args.model or default_model(name)
    model = build_model(model_name, info, seed=args.seed)
    check_model_output(model, info.input_shape, info.num_classes)
    eps = args.eps if args.eps is not None else DEFAULT_EPS.get(name, 0.3)
    mvl = args.lr_layers is not None and args.lr_layers.strip().lower() == "mvl"
    cfg = TrainConfig(
        at=args.at, eps=float(eps), attack_kwargs=attack_kwargs(args),
        attack_mode=args.attack_mode,
        clip=None if info.data_range is None else list(info.data_range),
        lr_layers=[] if mvl else _lr_layers(args, model, info.input_shape),
        gamma=parse_gamma(args.gamma), trades_beta=args.trades_beta,
        full_clean_pass=args.full_clean_pass, lr_pass=args.lr_pass,
        lr_reduction=args.lr_reduction, lr_detach_clean=args.lr_detach_clean, epochs=_epochs(args),
        batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, scheduler=args.scheduler,
        seed=args.seed, device=args.device, **monitor_settings(args),
    )
    cfg.validate()
    check_training_attack(cfg, model, info.num_classes)
    if cfg.monitor:  # a selector naming no layer fails here (mvl's LR sites come later)
        from lsa_ext.monitor import monitor_sites

        monitor_sites(model, cfg.monitor_layers, None if mvl else cfg.lr_layers,
                      input_shape=info.input_shape)
    if cfg.lr_layers:
        gamma_tensor(cfg.gamma, len(cfg.lr_layers))
        from lsa_ext.probes import sites_not_run

        if missing := sites_not_run(model, cfg.lr_layers, info.input_shape):
            raise LsaUserError(f"--lr-layers: {', '.join(missing)} never run in a forward of "
                               "the model (name#k needs k calls of name)")
    # MVL from a report: read before any data (the on-the-fly search needs the data)
    chosen = _mvl_layers(args, model, None, eps, info) if mvl and args.mvl_report else None
    perturbation = chosen[1] if chosen else None
    out = prepare_out(args.out or _out_name(args.dataset, args), overwrite=args.overwrite)
    data = load_data(args.dataset, args.data_dir, args.data_seed, args.limit_train,
                     args.limit_test, options)
    # every rank has checked --out before any rank writes: joining is a rendezvous
    distributed.init_from_env(args.dist_backend, args.device, args.dist_timeout)
    main = distributed.is_main()
    if mvl:
        cfg.lr_layers = (chosen or _mvl_layers(args, model, data.train, eps, info))[0]
    meta = {"dataset": name, "model": model_name, "data_dir": args.data_dir,
            "data_seed": args.data_seed, "limit_train": args.limit_train,
            "limit_test": args.limit_test, "data_options": data.options,
            "lr_layers_spec": args.lr_layers, "eta": args.eta, "mvl_report": args.mvl_report,
            "mvl_perturbation": perturbation,
            "mvl_kind": args.mvl_kind if mvl and not args.mvl_report else None}
    trainer = Trainer(model, data.train, cfg, out=out, meta=meta, on_epoch=_on_epoch(out))
    if main:
        removed = clear_run(out) if args.overwrite and out.is_dir() else []
        if removed:
            print(f"--overwrite: removed the old run's {', '.join(removed)} from {out}",
                  file=sys.stderr)
        atomic_write_json(out / CONFIG, {"config": cfg.to_dict(), "meta": meta})
        procs = distributed.world_size()
        print(f"training {trainer.run_name} ({model_name} on {name}, {len(data.train)} "
              f"samples, {plural(cfg.epochs, 'epoch')}"
              + (f", {procs} processes" if procs > 1 else "") + f") → {out}",
              file=sys.stderr)
        print_monitor(trainer, out)
    # a resumable state before the first batch (the RNGs as fit() seeds them), so an
    # interrupted run can always be resumed, bit for bit
    seed_everything(cfg.seed)
    trainer.save()
    return _fit_and_report(trainer, data, out)


def _resume(args: argparse.Namespace) -> int:
    from lsa_ext import checkpoint as ckpt
    from lsa_ext import distributed
    from lsa_ext.models import build_model
    from lsa_ext.training import TrainConfig, Trainer, check_resume_epochs

    if args.resume == "auto":
        from lsa_ext.io import check_dir

        out = check_dir(args.out or _out_name(args.dataset, args))
        path = out / ckpt.LAST
        if not path.is_file():
            raise LsaUserError(nothing_to_resume(out, ckpt.LAST))
    else:
        path = Path(args.resume)
        out = Path(args.out) if args.out else path.parent
    state = ckpt.load_checkpoint(path)
    meta = state.get("meta") or {}
    if "dataset" not in meta or "model" not in meta:
        raise LsaUserError(f"{path} was not written by lsa train (no dataset and model recorded, "
                           "e.g. a run of lsa_ext.train): resume it from Python with "
                           "lsa_ext.train(..., resume=...)")
    cfg = TrainConfig.from_dict(state["config"])
    done = int(state["epoch"])
    if "epochs" in args.given:  # checked before any data is read
        if args.epochs < done:
            raise LsaUserError(f"--epochs {args.epochs} is fewer than the "
                               f"{plural(done, 'epoch')} the run in {path} has done")
        check_resume_epochs(cfg.scheduler, cfg.epochs, args.epochs, done)
    data = load_data(meta["dataset"], args.data_dir or meta.get("data_dir"),
                     meta.get("data_seed", 0), meta.get("limit_train"), meta.get("limit_test"),
                     stored_data_options(meta))
    model = build_model(meta["model"], data.info, seed=cfg.seed)
    _check_resume_options(args, cfg, meta, model, path, data.info.input_shape)
    if "epochs" in args.given:
        cfg.epochs = args.epochs
    if "device" in args.given:
        cfg.device = args.device
    _resume_monitor(args, cfg, path)
    distributed.init_from_env(args.dist_backend, cfg.device, args.dist_timeout)
    main = distributed.is_main()
    trainer = Trainer(model, data.train, cfg, out=out, meta=meta, on_epoch=_on_epoch(out))
    trainer.load_state_dict(state)
    if done >= cfg.epochs:
        if main:
            print(f"{trainer.run_name} in {out} is complete ({done} of "
                  f"{plural(cfg.epochs, 'epoch')} done): nothing to resume; to train longer, add "
                  f"--epochs N with N > {done}", file=sys.stderr)
        return 0
    if main:
        print(f"resuming {trainer.run_name} from {path}: {done} of {plural(cfg.epochs, 'epoch')} "
              f"done, continuing with epoch {done + 1}/{cfg.epochs}", file=sys.stderr)
        print_monitor(trainer, out)
    return _fit_and_report(trainer, data, out)


def _resume_monitor(args: argparse.Namespace, cfg, path: Path) -> None:
    """--monitor may be added when resuming (it does not change the weights); the layers and
    probe size of a run monitored before must stay as they were (one monitor.csv)."""
    check_monitor_args(args)
    given = monitor_settings(args)
    if cfg.monitor:
        clashes = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run: {getattr(cfg, k)})"
                   for k in ("monitor_layers", "monitor_samples")
                   if k in args.given and not _same(given[k], getattr(cfg, k))]
        if clashes:
            raise LsaUserError(f"--resume continues the layer monitoring of the run in {path}, "
                               f"and {'; '.join(clashes)} differ from it: drop them")
        return
    if args.monitor:
        cfg.monitor, cfg.monitor_layers = True, given["monitor_layers"]
        cfg.monitor_samples = given["monitor_samples"]
        cfg.validate()


# Options a resumed run takes from its checkpoint: dest → (where, key) in the stored state.
_FIXED = {
    "dataset": ("meta", "dataset"), "model": ("meta", "model"),
    "data_seed": ("meta", "data_seed"), "limit_train": ("meta", "limit_train"),
    "limit_test": ("meta", "limit_test"), "mvl_report": ("meta", "mvl_report"),
    "mvl_perturbation": ("meta", "mvl_perturbation"),
    "mvl_kind": ("meta", "mvl_kind"),
    "eta": ("meta", "eta"), "at": ("config", "at"), "eps": ("config", "eps"),
    "attack_mode": ("config", "attack_mode"), "trades_beta": ("config", "trades_beta"),
    "full_clean_pass": ("config", "full_clean_pass"), "lr_pass": ("config", "lr_pass"),
    "lr_reduction": ("config", "lr_reduction"), "lr_detach_clean": ("config", "lr_detach_clean"),
    "batch_size": ("config", "batch_size"),
    "optimizer": ("config", "optimizer"), "lr": ("config", "lr"),
    "momentum": ("config", "momentum"), "weight_decay": ("config", "weight_decay"),
    "scheduler": ("config", "scheduler"), "seed": ("config", "seed"),
    "steps": ("attack", "steps"), "alpha": ("attack", "alpha"),
    "restarts": ("attack", "n_restarts"),
}


def _check_resume_options(args: argparse.Namespace, cfg, meta: dict[str, Any], model,
                          path: Path, input_shape: tuple[int, ...] | None = None) -> None:
    """Raises when options given with --resume contradict the run's stored settings
    (``input_shape``: the data's, for counting A<k> in --lr-layers)."""
    from lsa_ext.data import dataset_info

    stored = {"meta": meta, "config": cfg.to_dict(), "attack": cfg.attack_kwargs}
    clashes = []
    for dest in sorted(args.given & (set(_FIXED) | {"gamma", "lr_layers"})):
        given = getattr(args, dest)
        if dest == "gamma":
            have, same = cfg.gamma, _same(parse_gamma(given), cfg.gamma)
        elif dest == "lr_layers":
            have = meta.get("lr_layers_spec") or ",".join(cfg.lr_layers) or None
            same = _same_layers(given, have, cfg.lr_layers, model, input_shape)
        else:
            where, key = _FIXED[dest]
            if where == "meta" and key not in meta:  # a run written before lsa_ext stored it
                continue
            have = stored[where].get(key)
            if dest == "dataset":
                given = dataset_info(given).name
            same = _same(given, have)
        if not same:
            shown = "not set" if have is None else have
            clashes.append(f"--{dest.replace('_', '-')} {getattr(args, dest)} (the run: {shown})")
    run_data = stored_data_options(meta) if "dataset" in meta else {}
    for key, value in (dataset_options(args, meta["dataset"], name_scale=False).items()
                       if "dataset" in meta else ()):
        if not _same(value, run_data.get(key)):
            flag = "samples" if key == "n_train" else key
            have = run_data.get(key)
            clashes.append(f"--moons-{flag} {value} (the run: "
                           f"{'the default' if have is None else have})")
    if clashes:
        one = len(clashes) == 1
        raise LsaUserError(f"--resume continues the run in {path} with its own settings, and "
                           f"{'; '.join(clashes)} {'differs' if one else 'differ'} from them: "
                           f"drop {'it' if one else 'them'}, or start a new run (another "
                           "--out, or --overwrite)")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _same_layers(given: str | None, spec: str | None, layers: list[str], model,
                 input_shape: tuple[int, ...] | None = None) -> bool:
    """Whether --lr-layers ``given`` names the run's LR layers (stored ``spec``/``layers``)."""
    from lsa_ext.training import resolve_layers

    norm = ",".join(parse_list(given, str, "--lr-layers") or [])
    if spec is not None and norm.lower() == ",".join(parse_list(spec, str, "lr") or []).lower():
        return True
    if not norm:
        return not layers
    if norm.lower() == "mvl":
        return False
    return list(resolve_layers(model, norm, example=input_shape)) == list(layers)


def _fit_and_report(trainer, data, out: Path) -> int:
    """Trains to the end (Ctrl-C: the hint that resumes), then writes model.pt and prints the
    summary (rank 0)."""
    from lsa_ext import checkpoint as ckpt
    from lsa_ext import distributed

    try:
        trainer.fit()
    except KeyboardInterrupt:
        last = out / ckpt.LAST
        if last.is_file():
            raise Interrupted(f"{trainer.run_name} stopped with {trainer.epoch} of "
                              f"{plural(trainer.config.epochs, 'epoch')} done (saved in {last}); "
                              f"resume with: lsa train --out {out} --resume") from None
        raise Interrupted("nothing was saved yet: nothing to resume, start again") from None
    if not distributed.is_main():
        return 0
    import torch

    from lsa_ext.evaluation import accuracy
    from lsa_ext.io import atomic_write_with

    atomic_write_with(out / "model.pt", lambda fh: torch.save(trainer.module.state_dict(), fh))
    acc = accuracy(trainer.module, data.test, batch_size=512, device=trainer.device,
                   desc="test accuracy")
    last = trainer.history[-1] if trainer.history else {}
    on = "clean" if trainer.config.at == "none" else "adversarial"
    print(f"{trainer.run_name}: train loss {_loss(last.get('loss', float('nan')))}, train accuracy "
          f"{last.get('accuracy', float('nan')):.1f} % ({on}), clean test accuracy {acc:.1f} %")
    print(f"checkpoint: {out / ckpt.LAST}  weights: {out / 'model.pt'}")
    return 0


def _loss(v: float) -> str:
    """A loss with 4 decimals, or in scientific notation when huge (``7.131e+27``)."""
    return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.4g}"


def format_record(record: dict[str, Any], epochs: int, adversarial: bool) -> str:
    """``epoch 2/3: loss 0.4120 (base 0.3990 + LR 0.0130), accuracy 81.2 % (adversarial),
    learning rate 0.001, 4.1 s``."""
    loss = f"loss {_loss(record['loss'])}"
    if "lr_loss" in record:
        loss += f" (base {_loss(record['base'])} + LR {_loss(record['lr_loss'])})"
    return (f"epoch {record['epoch']}/{epochs}: {loss}, accuracy {record['accuracy']:.1f} % "
            f"({'adversarial' if adversarial else 'clean'}), learning rate "
            f"{record['learning_rate']:g}, {record['seconds']:.1f} s")


def _on_epoch(out: Path):
    from lsa_ext.io import atomic_write_json

    def on_epoch(trainer, record) -> None:
        from lsa_ext import distributed

        if not distributed.is_main():
            return
        atomic_write_json(out / "history.json", trainer.history)
        print(format_record(record, trainer.config.epochs, trainer.config.at != "none"),
              file=sys.stderr)
        if trainer.monitor is not None:
            rows = [r for r in trainer.monitor.rows if r["epoch"] == record["epoch"]]
            if rows:
                top = max(rows, key=lambda r: r["mean"])
                low = min(r["mean"] for r in rows)
                print(f"  monitor: relative error {low:.3g}–{top['mean']:.3g} over "
                      f"{plural(len(rows), 'layer')}, highest {top['layer']}", file=sys.stderr)

    return on_epoch


def _lr_layers(args: argparse.Namespace, model, input_shape: tuple[int, ...]) -> list[str]:
    """The LR sites of --lr-layers given as names, sites, L<k> or A<k> (A<k> counted on one
    zero input of the dataset's shape); [] when none."""
    from lsa_ext.training import resolve_layers

    spec = args.lr_layers
    if spec is None or not spec.strip():
        return []
    return resolve_layers(model, spec, example=input_shape)


def _mvl_layers(args: argparse.Namespace, model, train_data, eps: float,
                info) -> tuple[list[str], str]:
    """The LR sites of --lr-layers mvl (:func:`lsa_ext.mvl_select.choose_mvl`) and the
    perturbation they were chosen on: from --mvl-report, its --mvl-perturbation
    (``train_data`` None: nothing read, nothing trained), else on the fly on ``train_data``,
    probing --mvl-kind. Prints which kind and sites were chosen."""
    from lsa_ext.mvl_select import choose_mvl
    from lsa_ext.training import resolve_layers

    choice = choose_mvl(
        model, train_data, at=args.at, eps=eps,
        clip=None if info.data_range is None else tuple(info.data_range), eta=args.eta,
        report=args.mvl_report, perturbation=args.mvl_perturbation, kind=args.mvl_kind,
        example=info.input_shape,
        epochs=_epochs(args), batch_size=args.batch_size, lr=args.lr,
        optimizer=args.optimizer, seed=args.seed, device=args.device,
    )
    print(f"LR layers (--lr-layers mvl): {choice.describe()}", file=sys.stderr)
    return resolve_layers(model, choice.sites), choice.perturbation
