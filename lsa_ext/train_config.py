"""Settings of a training run: :class:`TrainConfig`, its name tables, run names, optimizers.

The one home of the names training accepts (``AT_METHODS``, ``OPTIMIZERS``, ``SCHEDULERS``,
``ATTACK_MODES``), of the attack settings used for training (``TRAIN_ATTACK_DEFAULTS``), of the
paper's run names (``Normal``, ``AT-PGD``, ``AT-PGD-LR-L2``; Khalooei et al., arXiv 2202.02626,
Tables 2–4) and of the optimizer/scheduler a configuration builds. The CLI, the trainer and
the reproduction protocol import them from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from lsa_ext.errors import LsaUserError
from lsa_ext.modules import MODES, unwrap
from lsa_ext.probes import Example, site_labels

# Base methods of Algorithm 3 ("none": plain training without attack and LR term).
AT_METHODS = ("none", "fgsm", "pgd", "fast", "trades", "apgd")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine", "step")
# The attack mode (the model's mode while x̂ is searched, lsa_ext.modules.MODES, passed to the
# attack as its ``mode``). "keep" is not offered: the training loop holds the model in train
# mode, so "keep" would be "train".
ATTACK_MODES = tuple(m for m in MODES if m != "keep")
# How the LR term runs the clean and adversarial batches (lsa_ext.regularizer).
LR_PASSES = ("auto", "concat", "two_pass")
# How the LR term reduces a layer's CM over the batch (lsa_ext.regularizer): "mean" of the
# per-sample relative errors (the paper's Eq. for CM, Algorithm 3) or one "batch" ratio
# ||A − Â||_F / ||A||_F over the whole batch (the authors' published LSA code).
LR_REDUCTIONS = ("mean", "batch")
# Attack settings used for *training* unless given in ``attack_kwargs``: Madry et al.'s PGD
# returns its last iterate; APGD runs 10 iterations (torchattacks' default, far cheaper than the
# 100 of the evaluation setting). Everything else is the attack's own default.
TRAIN_ATTACK_DEFAULTS: dict[str, dict[str, Any]] = {
    "pgd": {"steps": 10, "return_best": False},
    "apgd": {"steps": 10},
    "trades": {"steps": 10},
}


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise LsaUserError(f"unknown {what} {value!r}; expected one of {', '.join(choices)}")


@dataclass
class TrainConfig:
    """Settings of one training run (plain types only: stored in checkpoints and JSON).

    Attributes:
        at: base method, one of :data:`AT_METHODS` (``none, fgsm, pgd, fast, trades, apgd``).
        eps: L∞ budget of the training attack.
        attack_kwargs: extra keyword arguments for :func:`lsa_ext.attacks.build_attack`
            (steps, step size, ...).
        attack_mode: the attack mode, i.e. the model's mode while x̂ is searched — the attack's
            ``mode`` (:data:`lsa_ext.modules.MODES`): ``"eval"`` (default) or ``"train"``
            (:data:`ATTACK_MODES`).
        clip: valid input range ``(lo, hi)`` or None (no clipping, e.g. two-moons).
        lr_layers: the regularized sites M (empty: no LR term): module names (a module's
            first call) or ``name#k`` (its k-th call), as :func:`lsa_ext.regularizer.
            resolve_layers` gives them; the trainer resolves ``"L<k>"``, globs and kinds.
        gamma: γ, one value for all layers or one per layer (default 1.0: Algorithm 3's plain
            sum, so a config built by hand regularises with the CM itself; the entry points
            ``lsa_ext.train`` and ``lsa train`` default to 0.1 instead — γ = 1 collapsed
            training on MVL-chosen layers in our runs, README "AT-LR training").
        trades_beta: β of the TRADES objective (default 6.0).
        full_clean_pass: see :mod:`lsa_ext.trainer` (default False; TRADES always runs it).
        lr_pass: how the clean and adversarial batches run for the LR term: ``"auto"``
            (default), ``"concat"`` (one forward of both) or ``"two_pass"``
            (:data:`lsa_ext.regularizer.LR_PASSES`).
        lr_reduction: the CM of a layer over the batch: ``"mean"`` (default) of the per-sample
            relative errors — the paper's formula — or ``"batch"``, one ratio over the whole
            batch as the authors' published code computes it (:data:`LR_REDUCTIONS`).
        lr_detach_clean: stop the gradient through the clean pass φ_l(x) (default False: the
            paper's Algorithm 3 differentiates both passes, it does not say otherwise). With
            True only the adversarial pass is pulled toward the clean one, and the clean
            forward runs without autograd where no clean logits are needed.
        epochs, batch_size: default 10, 128.
        optimizer: ``adam`` (default), ``adamw`` or ``sgd``; ``lr`` (1e-3), ``momentum`` (0.9,
            SGD only), ``weight_decay`` (0).
        scheduler: ``none`` (default), ``cosine`` (to 0 over ``epochs``), ``step`` (×0.1 every
            ``max(1, epochs // 3)`` epochs); stepped once per epoch.
        seed: seeds everything (default 0).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        monitor: layer monitoring (default False): after every epoch (and before the first)
            the CM of each monitored site on a fixed probe batch under the training attack,
            into ``monitor.csv`` / ``monitor.png`` of the run's folder (:mod:`lsa_ext.monitor`).
        monitor_layers: the monitored sites besides the LR sites (default ``"activations"``,
            as ``lsa analyze`` probes; any :func:`lsa_ext.probes.select_layers` selector).
        monitor_samples: probe size, training samples drawn once with ``seed`` (default 256).
    """

    at: str = "none"
    eps: float = 0.3
    attack_kwargs: dict[str, Any] = field(default_factory=dict)
    attack_mode: str = "eval"
    clip: list[float] | None = None
    lr_layers: list[str] = field(default_factory=list)
    gamma: float | list[float] = 1.0
    trades_beta: float = 6.0
    full_clean_pass: bool = False
    lr_pass: str = "auto"
    lr_reduction: str = "mean"
    lr_detach_clean: bool = False
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "none"
    seed: int = 0
    device: str = "cpu"
    monitor: bool = False
    monitor_layers: str | list[str] = "activations"
    monitor_samples: int = 256

    def validate(self, custom_attack: bool = False) -> None:
        """Raises :class:`LsaUserError` on an invalid setting (``custom_attack``: an attack is
        given besides ``at``, so LR layers need no ``at``)."""
        _check_choice("training method", self.at, AT_METHODS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("scheduler", self.scheduler, SCHEDULERS)
        _check_choice("lr_pass", self.lr_pass, LR_PASSES)
        _check_choice("lr_reduction", self.lr_reduction, LR_REDUCTIONS)
        if not isinstance(self.lr_detach_clean, bool):
            raise LsaUserError(f"lr_detach_clean must be True or False, got "
                               f"{self.lr_detach_clean!r}")
        if self.attack_mode not in ATTACK_MODES:
            raise LsaUserError(f"attack_mode must be one of {', '.join(ATTACK_MODES)}, got "
                               f"{self.attack_mode!r}")
        if self.lr_layers and self.at == "none" and not custom_attack:
            raise LsaUserError("an LR term needs adversarial examples: set at= to one of "
                               f"{', '.join(AT_METHODS[1:])}, or pass attack=, or drop "
                               "lr_layers")
        if not isinstance(self.monitor, bool):
            raise LsaUserError(f"monitor must be True or False, got {self.monitor!r}")
        for name, v, lo in (("epochs", self.epochs, 1), ("batch_size", self.batch_size, 1),
                            ("seed", self.seed, 0), ("monitor_samples", self.monitor_samples, 1)):
            if not isinstance(v, int) or v < lo:
                raise LsaUserError(f"{name} must be an integer ≥ {lo}, got {v!r}")
        for name, v in (("eps", self.eps), ("lr", self.lr), ("weight_decay", self.weight_decay),
                        ("trades_beta", self.trades_beta), ("momentum", self.momentum)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise LsaUserError(f"{name} must be a finite non-negative number, got {v!r}")
        gammas = self.gamma if isinstance(self.gamma, (list, tuple)) else [self.gamma]
        if not gammas or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
                                 for v in gammas):
            raise LsaUserError(f"gamma must be finite and non-negative, got {self.gamma!r}")
        if self.at != "none" and self.eps <= 0:
            raise LsaUserError(f"eps must be positive for adversarial training, got {self.eps}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (JSON and checkpoint friendly)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """A config from :meth:`to_dict`'s output; unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def run_name(self) -> str:
        """The paper's naming: ``Normal``, ``AT-PGD``, ``AT-PGD-LR-<layers>``, plus the LR
        variant's suffix (:func:`lr_variant_suffix`)."""
        name = run_name(self.at, self.lr_layers)
        if self.lr_layers:
            name += lr_variant_suffix(self.lr_reduction, self.lr_detach_clean)
        return name


def lr_variant_suffix(reduction: str = "mean", detach_clean: bool = False) -> str:
    """The run-name suffix of an LR variant: ``""`` (the default: per-sample mean, gradient
    through both passes), ``"-batch"``, ``"-detach"`` or ``"-batch-detach"`` — as ``lsa
    reproduce --lr-variants`` names its rows."""
    return ("-batch" if reduction == "batch" else "") + ("-detach" if detach_clean else "")


def run_name(at: str, layers: Sequence[str], model: nn.Module | None = None,
             example: Example = None) -> str:
    """The paper's run name (arXiv 2202.02626, Tables 2–4): ``Normal``, ``AT-PGD``,
    ``AT-PGD-LR-L2``.

    ``layers`` are written as given, or — with ``model`` — as
    :func:`lsa_ext.probes.site_labels` labels them: learnable layers ``L<k>``, activation
    sites ``A<k>`` when ``example`` (an input batch or shape, for the one forward that counts
    them) is given too (``AT-PGD-LR-A2``), other sites by name; several are joined with ``+``.
    """
    if at == "none":
        return "Normal"
    base = f"AT-{at.upper()}"
    if not layers:
        return base
    labels = list(layers)
    if model is not None:
        labels = site_labels(unwrap(model), labels, example)
    return f"{base}-LR-{'+'.join(labels)}"


def build_optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over ``params`` (lr, momentum, weight decay
    from ``cfg``)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _scheduler_plan(scheduler: str, epochs: int) -> dict[str, Any]:
    """The settings of the scheduler named ``scheduler`` planned for ``epochs`` epochs."""
    if scheduler == "cosine":
        return {"T_max": epochs}
    if scheduler == "step":
        return {"step_size": max(1, epochs // 3), "gamma": 0.1}
    return {}


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig
                    ) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-epoch LR scheduler named by ``cfg.scheduler`` (None for ``"none"``), planned
    for ``cfg.epochs`` epochs."""
    plan = _scheduler_plan(cfg.scheduler, cfg.epochs)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, **plan)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, **plan)
    return None


def check_resume_epochs(scheduler: str, run_epochs: int, epochs: int, done: int) -> None:
    """Checks that a run planned for ``run_epochs`` epochs, ``done`` of them done, may be
    continued to ``epochs`` epochs in all.

    A scheduler whose plan depends on the total (``cosine``: ``T_max``; ``step``: its step
    size ``max(1, epochs // 3)``) keeps the plan of ``run_epochs`` in the checkpoint; it cannot
    be re-planned exactly, because the epochs already done ran at the old plan's learning
    rates, which a fresh run for ``epochs`` epochs would not have used. Raises rather than
    continue with a wrong schedule (a cosine run planned for 2 epochs would run epochs 3–5 at
    lr 0, lr/2, lr). ``none`` (constant lr), and ``step`` when the step size stays, may be
    extended.

    Raises:
        LsaUserError: ``epochs`` is fewer than ``done``, or the scheduler's plan would change.
    """
    if epochs < done:
        raise LsaUserError(f"epochs={epochs} is fewer than the {done} epoch"
                           f"{'' if done == 1 else 's'} the run has done")
    if epochs != run_epochs and (_scheduler_plan(scheduler, epochs)
                                 != _scheduler_plan(scheduler, run_epochs)):
        raise LsaUserError(
            f"the run's {scheduler!r} learning-rate schedule is planned for its {run_epochs} "
            f"epochs and cannot be stretched to {epochs}: the {done} epoch"
            f"{'' if done == 1 else 's'} done followed the "
            f"{run_epochs}-epoch plan, so no schedule for {epochs} epochs continues them "
            f"exactly; resume it without changing its number of epochs, or start a new run "
            f"with {epochs} epochs")
