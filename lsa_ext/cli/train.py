"""`lsa train`: normal, adversarial (FGSM/PGD/FAST/TRADES/APGD) and AT-LR training
(Khalooei et al., arXiv 2202.02626, Algorithm 3).

Writes under ``--out``: ``config.json`` (the run's settings), ``last.pt`` after every epoch
(atomically; the one before is kept as ``prev.pt``), ``history.json`` (per-epoch losses) and
``model.pt`` (final weights, a plain state_dict) at the end. ``--resume`` continues from
``--out/last.pt`` (or a given checkpoint) with the settings stored in it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from lsa_ext.cli.options import add_moons_options, dataset_options, parse_list
from lsa_ext.errors import LsaUserError
from lsa_ext.presets import TRAIN_EPS

# Training-attack ε per dataset when --eps is not given (lsa_ext.presets).
DEFAULT_EPS = TRAIN_EPS
DEFAULT_EPOCHS = 10


def _epochs(args: argparse.Namespace) -> int:
    """--epochs, or the default when not given (an explicit 0 is kept, and rejected later)."""
    return DEFAULT_EPOCHS if args.epochs is None else args.epochs


# --------------------------------------------------------------------------- shared options
def add_data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    """--dataset, --data-dir, --model, --data-seed, --limit-train, --limit-test and the moons
    options (--moons-scale, --moons-noise, --moons-samples)."""
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default=None if required else "moons",
                   help="moons, digits, mnist5k, mnist or cifar10 (default: moons)")
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


def attack_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Attack parameters given on the command line (only those set)."""
    kw: dict[str, Any] = {}
    if args.steps is not None:
        kw["steps"] = args.steps
    if args.alpha is not None:
        kw["alpha"] = args.alpha
    if args.restarts is not None:
        kw["n_restarts"] = args.restarts
    return kw


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model normally, adversarially, or with AT-LR",
        description="Train with Algorithm 3 (AT-LR) or a base method. Checkpoints every epoch "
                    "under --out; --resume continues a killed run bit for bit.",
    )
    from lsa_ext.train_config import AT_METHODS, ATTACK_MODES, LR_PASSES, OPTIMIZERS, SCHEDULERS

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
                   help="regularized layers: comma-separated names or L<k> (k-th learnable "
                        "layer), or 'mvl' (most vulnerable layers; see --mvl-report, --eta)")
    g.add_argument("--mvl-report", default=None,
                   help="with --lr-layers mvl: an 'lsa analyze' report.json to take the MVL "
                        "from (default: analyze a normally trained copy on the fly)")
    g.add_argument("--eta", type=float, default=1.0, help="MVL cut-off η (default 1.0)")
    g.add_argument("--gamma", default="1.0",
                   help="LR weight γ: one value, or one per layer comma-separated (default 1)")
    g.add_argument("--full-clean-pass", action="store_true",
                   help="run the whole clean forward for LR (default: stop after the last "
                        "regularized layer unless TRADES needs clean logits)")
    g.add_argument("--lr-pass", default="auto", choices=LR_PASSES,
                   help="LR term: one forward of clean+adversarial batches (concat), two "
                        "forwards (two_pass), or auto (default; see README)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help=f"default {DEFAULT_EPOCHS}")
    g.add_argument("--batch-size", type=int, default=128, help="default 128")
    g.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--scheduler", default="none", choices=SCHEDULERS)
    g.add_argument("--seed", type=int, default=0, help="seed of init, order, attacks (default 0)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/train", help="output folder (default runs/train)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT (default: --out/last.pt) with its settings; "
                        "--epochs and --device may be changed")
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
    mvl = args.lr_layers is not None and args.lr_layers.strip().lower() == "mvl"
    if args.mvl_report and not mvl:
        raise LsaUserError("--mvl-report is read only with --lr-layers mvl")
    if mvl and args.at == "none":
        raise LsaUserError("--lr-layers mvl needs an --at method other than 'none'")
    if not math.isfinite(args.eta):
        raise LsaUserError(f"--eta must be a finite number, got {args.eta}")


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
    from lsa_ext import checkpoint as ckpt
    from lsa_ext import distributed
    from lsa_ext.io import atomic_write_json, check_dir
    from lsa_ext.models import build_model
    from lsa_ext.outputs import check_model_output
    from lsa_ext.training import TrainConfig, Trainer, gamma_tensor

    _check_args(args)
    out = check_dir(args.out)
    # under torchrun: join the job (DDP, one GPU per rank); only rank 0 prints and writes
    distributed.init_from_env(args.dist_backend, args.device, args.dist_timeout)
    main = distributed.is_main()
    if args.resume is not None:
        path = out / ckpt.LAST if args.resume == "auto" else Path(args.resume)
        state = ckpt.load_checkpoint(path)
        meta = state.get("meta") or {}
        cfg = TrainConfig.from_dict(state["config"])
        if args.epochs is not None:
            cfg.epochs = args.epochs
        cfg.device = args.device
        cfg.validate()
        data = load_data(meta["dataset"], args.data_dir or meta.get("data_dir"),
                         meta.get("data_seed", 0), meta.get("limit_train"), meta.get("limit_test"),
                         stored_data_options(meta))
        model = build_model(meta["model"], data.info, seed=cfg.seed)
        trainer = Trainer(model, data.train, cfg, out=out, meta=meta,
                          on_epoch=_on_epoch(out))
        trainer.load_state_dict(state)
        if main:
            print(f"resuming {trainer.run_name} from {path} after epoch "
                  f"{trainer.epoch}/{cfg.epochs}", file=sys.stderr)
    else:
        # every argument is checked before any data is read or any training starts
        # shape, classes, range and the data options: known without reading any data
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
            lr_layers=[] if mvl else resolve_lr_layers(args, model, None, eps),
            gamma=parse_gamma(args.gamma), trades_beta=args.trades_beta,
            full_clean_pass=args.full_clean_pass, lr_pass=args.lr_pass, epochs=_epochs(args),
            batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
            momentum=args.momentum, weight_decay=args.weight_decay, scheduler=args.scheduler,
            seed=args.seed, device=args.device,
        )
        cfg.validate()
        check_training_attack(cfg, model, info.num_classes)
        if cfg.lr_layers:
            gamma_tensor(cfg.gamma, len(cfg.lr_layers))
        mvl_names = (mvl_from_report_layers(args, model) if mvl and args.mvl_report else None)
        data = load_data(args.dataset, args.data_dir, args.data_seed, args.limit_train,
                         args.limit_test, options)
        if mvl:
            cfg.lr_layers = mvl_names or resolve_lr_layers(args, model, data, eps)
        meta = {"dataset": name, "model": model_name, "data_dir": args.data_dir,
                "data_seed": args.data_seed, "limit_train": args.limit_train,
                "limit_test": args.limit_test, "data_options": data.options}
        trainer = Trainer(model, data.train, cfg, out=out, meta=meta, on_epoch=_on_epoch(out))
        if main:
            atomic_write_json(out / "config.json", {"config": cfg.to_dict(), "meta": meta})
            procs = distributed.world_size()
            print(f"training {trainer.run_name} ({model_name} on {name}, {len(data.train)} "
                  f"samples, {cfg.epochs} epochs"
                  + (f", {procs} processes" if procs > 1 else "") + f") → {out}",
                  file=sys.stderr)
    trainer.fit()
    if not main:
        return 0
    import torch

    from lsa_ext.io import atomic_write_with

    atomic_write_with(out / "model.pt", lambda fh: torch.save(trainer.module.state_dict(), fh))
    from lsa_ext.evaluation import accuracy

    acc = accuracy(trainer.module, data.test, batch_size=512, device=trainer.device,
                   desc="test accuracy")
    last = trainer.history[-1] if trainer.history else {}
    print(f"{trainer.run_name}: train loss {last.get('loss', float('nan')):.4f}, "
          f"train acc {last.get('accuracy', float('nan')):.2f}%, clean test acc {acc:.2f}%")
    print(f"checkpoint: {out / ckpt.LAST}  weights: {out / 'model.pt'}")
    return 0


def _on_epoch(out: Path):
    from lsa_ext.io import atomic_write_json

    def on_epoch(trainer, record) -> None:
        from lsa_ext import distributed

        if not distributed.is_main():
            return
        atomic_write_json(out / "history.json", trainer.history)
        print(f"epoch {record['epoch']}/{trainer.config.epochs}: "
              + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch"),
              file=sys.stderr)

    return on_epoch


def mvl_from_report_layers(args: argparse.Namespace, model) -> list[str]:
    """The LR layers from --mvl-report (read before any data; no training)."""
    from lsa_ext.mvl_select import mvl_from_report
    from lsa_ext.training import resolve_layers

    names = mvl_from_report(args.mvl_report, args.eta)
    print(f"most vulnerable layers (η={args.eta}): {', '.join(names)}", file=sys.stderr)
    return resolve_layers(model, names)


def resolve_lr_layers(args: argparse.Namespace, model, data, eps: float) -> list[str]:
    """The LR layer names from --lr-layers (names, L<k>, or mvl; ``data`` is needed only for
    mvl computed on the fly)."""
    from lsa_ext.mvl_select import mvl_from_report, mvl_on_the_fly
    from lsa_ext.training import resolve_layers

    spec = args.lr_layers
    if spec is None or not spec.strip():
        return []
    if spec.strip().lower() == "mvl":
        if args.at == "none":
            raise LsaUserError("--lr-layers mvl needs an --at method other than 'none'")
        if args.mvl_report:
            names = mvl_from_report(args.mvl_report, args.eta)
        else:
            names = mvl_on_the_fly(
                model, data.train, at=args.at, eps=eps,
                clip=None if data.info.data_range is None else tuple(data.info.data_range),
                eta=args.eta, epochs=_epochs(args), batch_size=args.batch_size, lr=args.lr,
                optimizer=args.optimizer, seed=args.seed, device=args.device,
            )
        print(f"most vulnerable layers (η={args.eta}): {', '.join(names)}", file=sys.stderr)
        return resolve_layers(model, names)
    return resolve_layers(model, spec)

