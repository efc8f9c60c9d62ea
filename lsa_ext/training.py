"""Layer-wise regularized adversarial training, AT-LR (Khalooei et al., arXiv 2202.02626,
Algorithm 3): the functional entry points :func:`train` and :func:`fit`.

The pieces have their own homes and are re-exported here, so ``from lsa_ext.training import
Trainer, TrainConfig, lr_term, ...`` works:

* :mod:`lsa_ext.trainer` — the :class:`Trainer` loop (and the choices it makes: attack mode,
  train-mode passes, DDP, determinism), :func:`fit`;
* :mod:`lsa_ext.regularizer` — the LR term (:func:`lr_term`, :class:`LRTerm`), the regularised
  sites (:func:`resolve_layers`), γ (:func:`gamma_tensor`);
* :mod:`lsa_ext.train_config` — :class:`TrainConfig`, the name tables, run names, optimizers;
* :mod:`lsa_ext.mvl_select` — ``lr_layers="mvl"``: the most vulnerable layers (Algorithm 2).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from lsa_ext.batches import auto_clip
from lsa_ext.errors import LsaUserError
from lsa_ext.modules import unwrap
from lsa_ext.monitor import monitor_sites
from lsa_ext.mvl_select import choose_mvl
from lsa_ext.outputs import OutputSelector
from lsa_ext.regularizer import LR_PASSES, LRTerm, gamma_tensor, lr_term, resolve_layers
from lsa_ext.train_config import (
    AT_METHODS,
    ATTACK_MODES,
    OPTIMIZERS,
    SCHEDULERS,
    TRAIN_ATTACK_DEFAULTS,
    TrainConfig,
    build_optimizer,
    build_scheduler,
    check_resume_epochs,
    run_name,
)
from lsa_ext.trainer import Trainer, TrainingDivergedError, clear_run, fit, run_files
from lsa_ext.types import Perturbation

log = logging.getLogger("lsa_ext.training")


def train(
    model: nn.Module,
    train_data: Any,
    *,
    at: str = "none",
    eps: float = 0.3,
    lr_layers: str | Sequence[str] | None = None,
    gamma: float | Sequence[float] = 0.1,
    epochs: int = 10,
    batch_size: int = 128,
    optimizer: str = "adam",
    lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    scheduler: str = "none",
    seed: int = 0,
    device: str = "cpu",
    clip: tuple[float, float] | None | str = "auto",
    attack_kwargs: dict[str, Any] | None = None,
    attack_mode: str = "eval",
    trades_beta: float = 6.0,
    full_clean_pass: bool = False,
    lr_pass: str = "auto",
    lr_reduction: str = "mean",
    lr_detach_clean: bool = False,
    eta: float = 1.0,
    mvl_report: str | os.PathLike | None = None,
    mvl_perturbation: str | None = None,
    mvl_kind: str = "activations",
    attack: Perturbation | None = None,
    out: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    output: OutputSelector = None,
    monitor: bool = False,
    monitor_layers: str | Sequence[str] = "activations",
    monitor_samples: int = 256,
) -> nn.Module:
    """Trains ``model`` with Algorithm 3 (AT-LR) or one of its base methods; returns it.

    ``at`` picks the base method (``none, fgsm, pgd, fast, trades, apgd``); ``lr_layers``
    (None: no LR term) and ``gamma`` (scalar or one per layer) define the LR term. See
    :class:`TrainConfig` for every setting and :mod:`lsa_ext.trainer` for the choices made.

    Args:
        lr_layers: names, ``name#k`` sites (the k-th call of a module, as ``lsa analyze``
            reports it; a bare name is the first call), ``"L<k>"`` items, globs or kinds, as a
            list or a comma-separated string (:func:`resolve_layers`); or ``"mvl"``: the most
            vulnerable layers for cut-off ``eta`` (default 1.0), read from the ``lsa analyze``
            report ``mvl_report`` when given (its perturbation ``mvl_perturbation``; default:
            the report's only one, else the one named after ``at`` — ``"pgd"`` for
            ``at="pgd"`` —, else an error listing them:
            :func:`lsa_ext.mvl_select.report_perturbation`), else found by Algorithm 2 on a
            normally trained copy of ``model`` (``epochs`` epochs;
            :func:`lsa_ext.mvl_select.choose_mvl`), probing ``mvl_kind``: ``"activations"``
            (default, as ``lsa analyze``) or ``"learnable"``; the output layer is left out.
            ``mvl_report`` and ``mvl_perturbation`` without ``"mvl"`` are an error.
        lr_pass: how the clean and adversarial batches run for the LR term:
            ``"auto"`` (default), ``"concat"`` or ``"two_pass"`` (:mod:`lsa_ext.regularizer`).
        lr_reduction: the CM over the batch, ``"mean"`` (default: the paper's per-sample
            formula) or ``"batch"`` (the authors' published code); ``lr_detach_clean``: no
            gradient through the clean pass (default False). See :class:`TrainConfig`.
        out: checkpoint folder (``last.pt`` after every epoch, ``prev.pt`` the one before;
            None: no checkpoints). A folder that already holds a run's files (those of
            :data:`lsa_ext.trainer.RUN_FILES`: ``last.pt``, ``config.json``, ``model.pt``,
            ...; e.g. an ``lsa train --out`` folder) is refused — it is never silently
            mixed with another run's checkpoint — unless ``resume`` is given or
            ``overwrite`` is True.
        resume: a checkpoint to continue from. Its scheduler plan must fit ``epochs``:
            ``scheduler="cosine"`` (or ``"step"`` when its step size would change) cannot
            continue to another number of epochs than the run's
            (:func:`lsa_ext.train_config.check_resume_epochs`).
        overwrite: replace the run in ``out`` (default False): its run files are removed
            (:func:`lsa_ext.trainer.clear_run`, as ``lsa train --overwrite``; other files are
            kept) just before training starts, after every setting has been checked.
        output: logits selector for models returning tuples, dicts or objects
            (:func:`lsa_ext.outputs.logits_of`; default: a tensor, a dict's ``"logits"`` or an
            object's ``.logits``), used by every pass, the attack and the MVL search.
        monitor: layer monitoring (default False): the relative error of each site in
            ``monitor_layers`` (default ``"activations"``) and of the LR sites on
            ``monitor_samples`` (default 256) fixed training samples under the training attack
            (FGSM at ``eps`` when ``at="none"``), before the first epoch and after each, into
            ``out/monitor.csv`` and ``out/monitor.png`` (:mod:`lsa_ext.monitor`); the weights
            are bitwise those of an unmonitored run.

    ``train_data`` may be a :class:`lsa_ext.data.DataSplits` (its training set is used).
    ``clip``: the range adversarial inputs are clipped to; ``"auto"`` (default, as ``lsa
    train``): the dataset's range (:func:`lsa_ext.batches.auto_clip`: a DataSplits' data range,
    else [0, 1] for tensors within it, else none); ``None``: no clipping. ``attack``: a callable
    ``(x, y) -> x̂`` used instead of the one ``at`` builds; with ``at="none"`` the base loss is
    ``CE(f(x̂), y)`` (the run is named ``AT-CUSTOM``). ``gamma`` defaults to 0.1 (γ = 1
    collapsed training in our runs; README, "AT-LR training").

    Raises:
        LsaUserError: an invalid setting (see :meth:`TrainConfig.validate`), unknown layers,
            ``"mvl"`` without an attack (no layer past the MVL cut-off: the top-ranked one is
            taken, with a warning; :mod:`lsa_ext.mvl_select`), or an unreadable
            ``resume`` checkpoint, an ``out`` that holds a run without ``resume`` or
            ``overwrite``, ``resume`` with ``overwrite``, an ``epochs`` the resumed run's
            scheduler cannot be stretched to; :class:`TrainingDivergedError` on NaN/Inf.
    """
    _check_out(out, resume=resume, overwrite=overwrite)
    if hasattr(train_data, "info") and hasattr(train_data, "train"):  # a DataSplits
        clip = auto_clip(train_data) if isinstance(clip, str) and clip == "auto" else clip
        train_data = train_data.train
    if isinstance(clip, str):
        if clip != "auto":
            raise LsaUserError(f"clip must be 'auto', None or a pair (lo, hi), got {clip!r}")
        clip = auto_clip(train_data)
    if isinstance(lr_layers, str):
        lr_layers = [s.strip() for s in lr_layers.split(",") if s.strip()]
    layers = list(lr_layers or [])
    mvl = [s.lower() for s in layers] == ["mvl"]
    cfg = TrainConfig(
        at=at, eps=float(eps), attack_kwargs=dict(attack_kwargs or {}), attack_mode=attack_mode,
        clip=None if clip is None else [float(clip[0]), float(clip[1])],
        lr_layers=[] if mvl else layers,
        gamma=float(gamma) if isinstance(gamma, (int, float)) else [float(g) for g in gamma],
        trades_beta=float(trades_beta), full_clean_pass=full_clean_pass, lr_pass=lr_pass,
        lr_reduction=lr_reduction, lr_detach_clean=bool(lr_detach_clean),
        epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=float(lr),
        momentum=float(momentum), weight_decay=float(weight_decay), scheduler=scheduler,
        seed=seed, device=device, monitor=bool(monitor),
        monitor_layers=monitor_layers if isinstance(monitor_layers, str) else list(monitor_layers),
        monitor_samples=monitor_samples,
    )
    if not mvl and (mvl_report is not None or mvl_perturbation is not None):
        raise LsaUserError("mvl_report and mvl_perturbation are read only with lr_layers='mvl'")
    if cfg.monitor:  # a monitor selector naming no layer fails before the MVL search
        monitor_sites(unwrap(model), cfg.monitor_layers, None)
    if mvl:
        if at == "none":
            raise LsaUserError("lr_layers='mvl' needs an attack: choose an `at` method other "
                               "than 'none'")
        cfg.validate()  # every other setting is checked before the MVL search
        choice = choose_mvl(
            model, train_data, at=at, eps=float(eps), clip=clip, eta=eta, report=mvl_report,
            perturbation=mvl_perturbation, kind=mvl_kind, epochs=epochs, batch_size=batch_size,
            lr=float(lr), optimizer=optimizer, seed=seed, device=device, progress=progress,
            output=output,
        )
        log.info("lr_layers='mvl': %s", choice.describe())
        cfg.lr_layers = choice.sites
    trainer = Trainer(model, train_data, cfg, attack=attack, out=out, progress=progress,
                      output=output)
    if resume is not None:
        trainer.resume(resume)
    elif overwrite and out is not None:
        removed = clear_run(out)
        if removed:
            log.info("overwrite=True: removed the old run's %s from %s", ", ".join(removed), out)
    return trainer.fit()


def _check_out(out: str | os.PathLike | None, *, resume: str | os.PathLike | None,
               overwrite: bool) -> None:
    """Refuses an ``out`` holding a run (:func:`lsa_ext.trainer.run_files`) unless ``resume``
    or ``overwrite``; ``resume`` together with ``overwrite`` is refused too."""
    if not isinstance(overwrite, bool):
        raise LsaUserError(f"overwrite must be True or False, got {overwrite!r}")
    if resume is not None and overwrite:
        raise LsaUserError("resume= continues a run and overwrite=True replaces the one in out: "
                           "give one of them")
    if out is None or resume is not None or overwrite:
        return
    found = run_files(out)
    if found:
        raise LsaUserError(f"out={str(out)!r} already holds a run ({', '.join(found)}); "
                           "continue it with resume=, replace it with overwrite=True, or "
                           "choose another out")


__all__ = [
    "AT_METHODS",
    "ATTACK_MODES",
    "LR_PASSES",
    "LRTerm",
    "OPTIMIZERS",
    "SCHEDULERS",
    "TRAIN_ATTACK_DEFAULTS",
    "TrainConfig",
    "Trainer",
    "TrainingDivergedError",
    "build_optimizer",
    "build_scheduler",
    "check_resume_epochs",
    "fit",
    "gamma_tensor",
    "lr_term",
    "resolve_layers",
    "run_name",
    "train",
]
