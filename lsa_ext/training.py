"""Algorithm 3 of the paper: layer-wise regularized adversarial training (AT-LR).

For each minibatch ``(x, y)``::

    x̂ ← attack(F_θ, x, y)
    θ ← θ − lr · ∇θ [ J(θ, x, x̂, y) + Σ_{l∈M} γ_l · CM(φ_l(x), φ_l(x̂)) ]

with ``CM`` the per-sample relative error ``||φ_l(x) − φ_l(x̂)||_F / ||φ_l(x)||_F`` averaged over
the batch, computed for all layers of ``M`` by ONE fused :func:`lsa_ext.relative_error_multi`
call whose fused backward sends gradients into both the clean and the adversarial pass.

Base objectives ``J``:

* ``at="none"``: ``CE(f(x), y)`` — plain training, no attack, no LR term;
* ``fgsm``, ``pgd``, ``fast``, ``apgd``: ``CE(f(x̂), y)`` (Madry-style AT);
* ``trades``: ``CE(f(x), y) + β · KL(f(x) ‖ f(x̂))`` with ``β = 6`` by default (the value of
  Zhang et al. 2019's MNIST/CIFAR experiments).

Choices (documented defaults):

* The attack runs with the model in **eval mode** (``attack_mode="eval"``; BatchNorm uses its
  running statistics and dropout is off while x̂ is searched); ``"train"`` is available.
  Attacks restore the model's mode and ``requires_grad`` flags.
* The training passes run in **train mode**. With an LR term the clean pass runs first, then the
  adversarial pass, as two separate forwards: each is normalised by its own batch statistics
  (so the adversarial pass is exactly the base method's) and BatchNorm running statistics are
  updated by both the clean and the adversarial batch. TRADES uses the clean pass for its
  ``CE(f(x))`` and KL terms as well. For the other bases the clean logits are not needed, so by
  default (``full_clean_pass=False``) the clean forward stops right after the last regularized
  layer has produced its output: layers above it never see the clean batch (their BatchNorm
  statistics then come from the adversarial batches only, as in the base method) and no compute
  is spent on them. ``full_clean_pass=True`` runs the whole clean forward.
* ``DistributedDataParallel``: hooks are put on ``model.module`` and layer names are given
  without the ``module.`` prefix (a prefix is stripped). The clean pass calls ``model.module``
  directly; the adversarial pass goes through the wrapper.
* Determinism: a fresh run seeds ``torch``, ``numpy`` and ``random`` with ``seed``; batches are
  drawn with a dedicated ``torch.Generator`` (seeded with ``seed``) and the attack of epoch ``e``
  is built with seed ``seed + 1000003·(e+1)``. All of these states go into every checkpoint, so
  a resumed run continues bit for bit.

Use from your own loop::

    loss_lr, logits_clean, logits_adv = lsa_ext.training.lr_term(
        model, x, x_adv, ["layers.2"], gamma=1.0)
    loss = lsa_ext.losses.cross_entropy(logits_adv, y) + loss_lr
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lsa_ext import checkpoint as ckpt
from lsa_ext import distributed
from lsa_ext.batches import batches, num_samples
from lsa_ext.devices import resolve_device
from lsa_ext.errors import LsaUserError
from lsa_ext.losses import cross_entropy, kl_div, predict
from lsa_ext.modules import strip_prefix, unwrap
from lsa_ext.ops import relative_error_multi
from lsa_ext.probes import Capture, select_layers
from lsa_ext.progress import progress as progress_bar
from lsa_ext.seeding import seed_everything
from lsa_ext.types import Batch, Perturbation

log = logging.getLogger("lsa_ext.training")

AT_METHODS = ("none", "fgsm", "pgd", "fast", "trades", "apgd")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine", "step")
ATTACK_MODES = ("eval", "train")
_EPOCH_SEED_STRIDE = 1_000_003
# Attack settings used for *training* unless given in ``attack_kwargs``: Madry et al.'s PGD
# returns its last iterate; APGD runs 10 iterations (torchattacks' default, far cheaper than the
# 100 of the evaluation setting). Everything else is the attack's own default.
TRAIN_ATTACK_DEFAULTS: dict[str, dict[str, Any]] = {
    "pgd": {"steps": 10, "return_best": False},
    "apgd": {"steps": 10},
    "trades": {"steps": 10},
}



class TrainingDivergedError(LsaUserError):
    """The training loss became NaN or infinite (the step is not applied; checkpoints kept)."""


# --------------------------------------------------------------------------- helpers
def resolve_layers(model: nn.Module, spec: str | Sequence[str]) -> list[str]:
    """Qualified layer names from ``spec``.

    Args:
        spec: a list, or a comma-separated string, of items: ``"L<k>"`` (the k-th learnable
            layer, ``select_layers(model, "learnable")[k]``, as in the paper's "LR-L<k>"), a
            qualified module name (a leading ``module.`` is stripped), a glob, or a kind
            accepted by :func:`lsa_ext.probes.select_layers` (``"activations"``, ...).

    Returns:
        Names in the order given, without duplicates.

    Raises:
        LsaUserError: an index out of range or a name that matches no layer.
    """
    module = unwrap(model)
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if not items or any(not isinstance(s, str) or not s for s in items):
        raise LsaUserError(f"layer list must hold non-empty names, got {spec!r}")
    out: list[str] = []
    for item in items:
        item = strip_prefix(item)
        names = select_layers(module, item)
        out.extend(n for n in names if n not in out)
    return out


def _gamma_tensor(gamma: float | Sequence[float] | torch.Tensor, n: int,
                  device: torch.device) -> torch.Tensor:
    g = torch.as_tensor(gamma, dtype=torch.float32).flatten()
    if g.numel() == 1:
        g = g.expand(n)
    if g.numel() != n:
        raise LsaUserError(f"gamma has {g.numel()} values for {n} regularized layers")
    if not torch.isfinite(g).all() or (g < 0).any():
        raise LsaUserError(f"gamma must be finite and non-negative, got {g.tolist()}")
    return g.to(device)


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once every probed output has been produced."""


def lr_term(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    layers: Sequence[str],
    gamma: float | Sequence[float] | torch.Tensor = 1.0,
    *,
    clean_logits: bool = True,
    eps: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The LR term of Algorithm 3 for one batch: ``Σ_l γ_l · mean_i CM(φ_l(x_i), φ_l(x̂_i))``.

    Runs the model on ``x`` (clean pass) and on ``x_adv`` (adversarial pass) in its current
    train/eval mode, capturing the outputs of ``layers`` with gradients kept, and reduces all
    layers with one fused :func:`lsa_ext.relative_error_multi` call. Backpropagating the result
    sends gradients through both passes. Use ``logits_adv`` for your base loss so the adversarial
    forward is not run twice.

    Args:
        model: the model (a ``DistributedDataParallel`` wrapper is fine: hooks go on
            ``model.module``; the clean pass calls ``model.module``).
        x: clean batch ``[B, ...]`` float; ``x_adv``: its perturbed twin (same shape).
        layers: qualified layer names (see :func:`resolve_layers`), at least one.
        gamma: weight per layer, a scalar for all (default 1.0) or one value per layer.
        clean_logits: run the full clean forward and return its logits (default True). With
            False the clean forward stops after the last probed layer and ``None`` is returned.
        eps: denominator floor of the relative error (default 1e-12).

    Returns:
        ``(lr_loss, logits_clean, logits_adv)``: a scalar float32 tensor, ``[B, K]`` (or None),
        and ``[B, K]``.
    """
    module = unwrap(model)
    names = [strip_prefix(n) for n in layers]
    if not names:
        raise LsaUserError("lr_term needs at least one layer")
    if x.shape != x_adv.shape:
        raise LsaUserError(
            f"x and x_adv must have one shape, got {tuple(x.shape)} and {tuple(x_adv.shape)}"
        )
    wanted = set(names)
    store: dict[str, torch.Tensor] = {}
    stop_early = [False]

    def on_output(site: str, t: torch.Tensor) -> None:
        if site in wanted and site not in store:
            store[site] = t
            if stop_early[0] and len(store) == len(wanted):
                raise _StopForward

    with Capture(module, names, on_output=on_output, detach=False) as cap:
        stop_early[0] = not clean_logits
        logits_clean: torch.Tensor | None = None
        try:
            logits_clean = module(x)
        except _StopForward:
            pass
        clean = dict(store)
        store.clear()
        cap.reset()  # the adversarial pass' outputs are again the layers' first calls
        stop_early[0] = False
        logits_adv = model(x_adv)
        adv = dict(store)
    missing = [n for n in names if n not in clean or n not in adv]
    if missing:
        raise LsaUserError(f"layers {missing} produced no tensor output during the forward pass")
    cm = relative_error_multi([clean[n] for n in names], [adv[n] for n in names],
                              reduction="mean", eps=eps)
    g = _gamma_tensor(gamma, len(names), cm.device)
    return (g * cm.float()).sum(), (logits_clean if clean_logits else None), logits_adv


# --------------------------------------------------------------------------- data
def iterate_batches(
    data: Any, batch_size: int, generator: torch.Generator, shuffle: bool = True,
    epoch: int | None = None,
) -> Iterator[Batch]:
    """Minibatches ``(x, y)`` of ``data`` in an order drawn from ``generator``
    (:func:`lsa_ext.batches.batches`; a DataLoader keeps its own order, a
    ``DistributedSampler`` gets ``epoch``). The last batch may be smaller.
    """
    loader, _ = batches(data, batch_size, shuffle=shuffle, generator=generator, epoch=epoch)
    for batch in loader:
        yield batch[0], batch[1]


# --------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Settings of one training run (plain types only: stored in checkpoints and JSON).

    Attributes:
        at: base method, one of ``none, fgsm, pgd, fast, trades, apgd``.
        eps: L∞ budget of the training attack.
        attack_kwargs: extra keyword arguments for :func:`lsa_ext.attacks.build_attack`
            (steps, step size, ...).
        attack_mode: ``"eval"`` (default) or ``"train"``: the model's mode while x̂ is searched.
        clip: valid input range ``(lo, hi)`` or None (no clipping, e.g. two-moons).
        lr_layers: qualified names of the regularized layers M (empty: no LR term).
        gamma: γ, one value for all layers or one per layer.
        trades_beta: β of the TRADES objective (default 6.0).
        full_clean_pass: see the module docstring (default False; TRADES always runs it).
        epochs, batch_size: default 10, 128.
        optimizer: ``adam`` (default), ``adamw`` or ``sgd``; ``lr`` (1e-3), ``momentum`` (0.9,
            SGD only), ``weight_decay`` (0).
        scheduler: ``none`` (default), ``cosine`` (to 0 over ``epochs``), ``step`` (×0.1 every
            ``max(1, epochs // 3)`` epochs); stepped once per epoch.
        seed: seeds everything (default 0).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
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
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "none"
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        """Raises :class:`LsaUserError` on an invalid setting."""
        if self.at not in AT_METHODS:
            raise LsaUserError(f"unknown training method {self.at!r}; expected one of "
                               f"{', '.join(AT_METHODS)}")
        if self.optimizer not in OPTIMIZERS:
            raise LsaUserError(f"unknown optimizer {self.optimizer!r}; expected one of "
                               f"{', '.join(OPTIMIZERS)}")
        if self.scheduler not in SCHEDULERS:
            raise LsaUserError(f"unknown scheduler {self.scheduler!r}; expected one of "
                               f"{', '.join(SCHEDULERS)}")
        if self.attack_mode not in ATTACK_MODES:
            raise LsaUserError(f"attack_mode must be 'eval' or 'train', got {self.attack_mode!r}")
        if self.lr_layers and self.at == "none":
            raise LsaUserError("an LR term needs adversarial examples: choose an --at method "
                               "other than 'none' or drop the LR layers")
        for name, v, lo in (("epochs", self.epochs, 1), ("batch_size", self.batch_size, 1),
                            ("seed", self.seed, 0)):
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
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def run_name(self) -> str:
        """The paper's naming: ``Normal``, ``AT-PGD``, ``AT-PGD-LR-<layers>``."""
        return run_name(self.at, self.lr_layers)


def run_name(at: str, layers: Sequence[str], model: nn.Module | None = None) -> str:
    """``Normal``, ``AT-PGD``, ``AT-PGD-LR-L2`` (learnable layers of ``model`` as ``L<k>``,
    other layers by name, several joined with ``+``)."""
    if at == "none":
        return "Normal"
    base = f"AT-{at.upper()}"
    if not layers:
        return base
    labels = list(layers)
    if model is not None:
        learnable = select_layers(unwrap(model), "learnable")
        labels = [f"L{learnable.index(n)}" if n in learnable else n for n in layers]
    return f"{base}-LR-{'+'.join(labels)}"


def build_optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig):
    """The per-epoch LR scheduler named by ``cfg.scheduler`` (None for ``"none"``)."""
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.epochs // 3), gamma=0.1)
    return None


# --------------------------------------------------------------------------- trainer
class Trainer:
    """Runs Algorithm 3 epoch by epoch, with checkpoints and resume.

    Args:
        model: the model to train (moved to ``config.device``); may be DDP-wrapped.
        train_data: ``(x, y)`` tensors, a ``TensorDataset``, a ``Dataset`` or a ``DataLoader``.
        config: a :class:`TrainConfig` (validated here).
        attack: optional callable ``(x, y) -> x̂`` replacing the attack built from
            ``config.at`` (whose base objective is still used).
        out: folder for checkpoints (``last.pt`` every epoch, ``prev.pt`` the one before);
            None: no checkpoints.
        meta: plain-typed information stored in checkpoints (dataset and model names, ...).
        progress: progress bars on (True), off (False) or per ``LSA_PROGRESS``/tty (None).
        on_epoch: called as ``on_epoch(trainer, record)`` after each epoch's checkpoint.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Any,
        config: TrainConfig,
        *,
        attack: Perturbation | None = None,
        out: str | os.PathLike | None = None,
        meta: dict[str, Any] | None = None,
        progress: bool | None = None,
        on_epoch: Callable[[Trainer, dict[str, Any]], None] | None = None,
    ) -> None:
        config.validate()
        self.config = config
        # under torchrun: join the job, take cuda:LOCAL_RANK on GPUs, wrap the model in DDP
        dist_ctx = distributed.init_from_env(device=config.device)
        self.device = dist_ctx.device if dist_ctx.distributed else resolve_device(config.device)
        self.model = model.to(self.device)
        if dist_ctx.distributed and unwrap(self.model) is self.model:
            self.model = distributed.wrap_model(self.model)
        self.module = unwrap(self.model)
        self.train_data = train_data
        self.num_samples = num_samples(train_data)
        if self.num_samples == 0:
            raise LsaUserError("the training set is empty")
        self.layers = resolve_layers(self.module, config.lr_layers) if config.lr_layers else []
        config.lr_layers = list(self.layers)
        self.gamma = _gamma_tensor(config.gamma, len(self.layers), self.device) \
            if self.layers else None
        self.attack_override = attack
        self.out = Path(out) if out is not None else None
        self.meta = dict(meta or {})
        self.progress = progress
        self.on_epoch = on_epoch
        self.optimizer = build_optimizer(self.module.parameters(), config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.loader_generator = torch.Generator().manual_seed(config.seed)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self._fresh = True
        self.run_name = run_name(config.at, self.layers, self.module)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint dict of the current state (see :mod:`lsa_ext.checkpoint`)."""
        return {
            "epoch": self.epoch,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": ckpt.capture_rng_state(self.loader_generator),
            "config": self.config.to_dict(),
            "meta": self.meta,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a state from :meth:`state_dict` (weights, optimizer, RNGs, epoch)."""
        try:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state.get("scheduler") is not None:
                self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise LsaUserError(f"checkpoint does not match this model/optimizer: {exc}") from exc
        ckpt.restore_rng_state(state["rng"], self.loader_generator)
        self.epoch = int(state["epoch"])
        self.history = list(state.get("history", []))
        self._fresh = False

    def resume(self, path: str | os.PathLike) -> None:
        """Loads the checkpoint at ``path`` (see :func:`lsa_ext.checkpoint.load_checkpoint`)."""
        # loaded on the CPU: RNG states must stay CPU tensors; load_state_dict copies weights
        # and optimizer state to the parameters' device
        self.load_state_dict(ckpt.load_checkpoint(path, map_location="cpu"))
        log.info("resumed from %s after epoch %d", path, self.epoch)

    def save(self) -> Path | None:
        """Writes ``out/last.pt`` atomically (the previous one kept as ``prev.pt``)."""
        if self.out is None or not distributed.is_main():  # rank 0 writes for the job
            return None
        return ckpt.save_checkpoint(self.out / ckpt.LAST, self.state_dict())

    # ----------------------------------------------------------------- steps
    def _attack_for_epoch(self, epoch: int) -> Perturbation | None:
        cfg = self.config
        if cfg.at == "none":
            return None
        if self.attack_override is not None:
            return self.attack_override
        from lsa_ext.attacks import build_attack

        return build_attack(
            cfg.at, self.module, cfg.eps,
            clip=None if cfg.clip is None else tuple(cfg.clip),
            mode=cfg.attack_mode,
            seed=cfg.seed + _EPOCH_SEED_STRIDE * (epoch + 1),
            **{**TRAIN_ATTACK_DEFAULTS.get(cfg.at, {}), **cfg.attack_kwargs},
        )

    def loss(self, x: torch.Tensor, y: torch.Tensor,
             attack: Perturbation | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training objective for one batch; returns ``(loss, parts)`` (parts detached)."""
        cfg = self.config
        if attack is None:
            logits = self.model(x)
            loss = cross_entropy(logits, y)
            return loss, {"loss": loss.detach(), "correct": (predict(logits) == y).sum()}
        x_adv = attack(x, y).detach()
        trades = cfg.at == "trades"
        if self.layers:
            lr_loss, logits_clean, logits_adv = lr_term(
                self.model, x, x_adv, self.layers, self.gamma,
                clean_logits=trades or cfg.full_clean_pass,
            )
        else:
            lr_loss = None
            logits_clean = self.module(x) if trades else None
            logits_adv = self.model(x_adv)
        if trades:
            assert logits_clean is not None
            base = cross_entropy(logits_clean, y) + cfg.trades_beta * kl_div(logits_adv,
                                                                            logits_clean)
        else:
            base = cross_entropy(logits_adv, y)
        loss = base if lr_loss is None else base + lr_loss
        parts = {"loss": loss.detach(), "base": base.detach(),
                 "correct": (predict(logits_adv) == y).sum()}
        if lr_loss is not None:
            parts["lr_loss"] = lr_loss.detach()
        return loss, parts

    def train_epoch(self) -> dict[str, Any]:
        """Runs one epoch; returns its record: ``loss`` (total), ``base`` and ``lr_loss`` (the
        two parts, AT only), ``accuracy`` (% on the training batches — on x̂ for AT),
        ``learning_rate`` (during the epoch), ``epoch`` and ``seconds``; sample-weighted means."""
        cfg = self.config
        epoch = self.epoch
        attack = self._attack_for_epoch(epoch)
        self.model.train()
        sums: dict[str, float] = {}
        seen = 0
        t0 = time.perf_counter()
        nb = math.ceil(self.num_samples / cfg.batch_size) \
            if not isinstance(self.train_data, torch.utils.data.DataLoader) \
            else len(self.train_data)
        batches = iterate_batches(self.train_data, cfg.batch_size, self.loader_generator,
                                  epoch=epoch)
        desc = f"{self.run_name} epoch {epoch + 1}/{cfg.epochs}"
        for b, (x, y) in enumerate(progress_bar(batches, desc=desc, total=nb,
                                                enabled=self.progress)):
            # under torchrun: this rank's slice of the global batch; `weight` keeps DDP's
            # gradient average equal to the gradient of the mean over the whole batch
            part = distributed.shard_batch(x, y)
            if part is None:  # fewer samples than ranks: skipped by every rank
                continue
            (x, y), weight = part
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            loss, parts = self.loss(x, y, attack)
            value = float(loss.detach())
            if not math.isfinite(value):
                kept = (f"; the last good checkpoint ({self.out / ckpt.LAST}, after epoch "
                        f"{self.epoch}) is kept" if self.out is not None and
                        (self.out / ckpt.LAST).exists() else "")
                raise TrainingDivergedError(
                    f"training diverged: the loss is {value} at epoch {epoch + 1}, batch {b + 1} "
                    f"(try a smaller learning rate than {cfg.lr}){kept}"
                )
            self.optimizer.zero_grad(set_to_none=True)
            (loss * weight if weight != 1.0 else loss).backward()
            self.optimizer.step()
            n = int(y.shape[0])
            seen += n
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + (float(v) if k == "correct" else float(v) * n)
        sums, seen = distributed.all_reduce_stats((sums, seen))  # totals over ranks
        record = {k: v / max(seen, 1) for k, v in sums.items() if k != "correct"}
        record["learning_rate"] = float(self.optimizer.param_groups[0]["lr"])
        if self.scheduler is not None:
            self.scheduler.step()
        record["accuracy"] = 100.0 * sums.get("correct", 0.0) / max(seen, 1)
        record["epoch"] = epoch + 1
        record["seconds"] = time.perf_counter() - t0
        self.epoch = epoch + 1
        self.history.append(record)
        return record

    def fit(self) -> nn.Module:
        """Trains until ``config.epochs`` epochs are done (a checkpoint after each)."""
        if self._fresh and self.epoch == 0:
            seed_everything(self.config.seed)
            self._fresh = False
        while self.epoch < self.config.epochs:
            record = self.train_epoch()
            bad = [n for n, p in self.module.named_parameters() if not torch.isfinite(p).all()]
            if bad:
                kept = (f"; the last good checkpoint {self.out / ckpt.LAST} is kept"
                        if self.out is not None and (self.out / ckpt.LAST).exists() else "")
                raise TrainingDivergedError(
                    f"training diverged: parameters {', '.join(bad[:3])} became NaN/Inf in "
                    f"epoch {record['epoch']} (try a smaller learning rate than "
                    f"{self.config.lr}){kept}")
            self.save()
            log.debug("%s epoch %d/%d: %s", self.run_name, record["epoch"],
                     self.config.epochs,
                     ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
            if self.on_epoch is not None:
                self.on_epoch(self, record)
        return self.model


# --------------------------------------------------------------------------- functional API
def train(
    model: nn.Module,
    train_data: Any,
    *,
    at: str = "none",
    eps: float = 0.3,
    lr_layers: str | Sequence[str] | None = None,
    gamma: float | Sequence[float] = 1.0,
    epochs: int = 10,
    batch_size: int = 128,
    optimizer: str = "adam",
    lr: float = 1e-3,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    scheduler: str = "none",
    seed: int = 0,
    device: str = "cpu",
    clip: tuple[float, float] | None = None,
    attack_kwargs: dict[str, Any] | None = None,
    attack_mode: str = "eval",
    trades_beta: float = 6.0,
    full_clean_pass: bool = False,
    attack: Perturbation | None = None,
    out: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """Trains ``model`` with Algorithm 3 (AT-LR) or one of its base methods; returns it.

    ``at`` picks the base method (``none, fgsm, pgd, fast, trades, apgd``); ``lr_layers``
    (names, ``"L<k>"`` items, or a comma-separated string; None: no LR term) and ``gamma``
    (scalar or one per layer) define the LR term. See :class:`TrainConfig` for every setting and
    the module docstring for the choices made. ``out``: checkpoint folder; ``resume``: a
    checkpoint to continue from.
    """
    if isinstance(lr_layers, str):
        lr_layers = [s.strip() for s in lr_layers.split(",") if s.strip()]
    cfg = TrainConfig(
        at=at, eps=float(eps), attack_kwargs=dict(attack_kwargs or {}), attack_mode=attack_mode,
        clip=None if clip is None else [float(clip[0]), float(clip[1])],
        lr_layers=list(lr_layers or []),
        gamma=float(gamma) if isinstance(gamma, (int, float)) else [float(g) for g in gamma],
        trades_beta=float(trades_beta), full_clean_pass=full_clean_pass, epochs=epochs,
        batch_size=batch_size, optimizer=optimizer, lr=float(lr), momentum=float(momentum),
        weight_decay=float(weight_decay), scheduler=scheduler, seed=seed, device=device,
    )
    trainer = Trainer(model, train_data, cfg, attack=attack, out=out, progress=progress)
    if resume is not None:
        trainer.resume(resume)
    return trainer.fit()


def fit(
    model: nn.Module,
    train_data: Any,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    optimizer: str = "adam",
    seed: int = 0,
    device: str = "cpu",
    progress: bool | None = None,
) -> nn.Module:
    """Plain (non-adversarial) training with cross-entropy: ``train(..., at="none")``.

    Deterministic for a given seed and initial model. Returns ``model`` (trained, in train mode).
    """
    return train(model, train_data, at="none", epochs=epochs, batch_size=batch_size, lr=lr,
                 optimizer=optimizer, seed=seed, device=device, progress=progress)

