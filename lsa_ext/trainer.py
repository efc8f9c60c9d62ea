"""Layer-wise regularized adversarial training, AT-LR (Khalooei et al., arXiv 2202.02626,
Algorithm 3): the :class:`Trainer` loop and plain training, :func:`fit`. The functional entry
point :func:`lsa_ext.training.train` (which also chooses ``lr_layers="mvl"``) and the
re-exports live in :mod:`lsa_ext.training`.

For each minibatch ``(x, y)``::

    x̂ ← attack(F_θ, x, y)
    θ ← θ − lr · ∇θ [ J(θ, x, x̂, y) + Σ_{l∈M} γ_l · CM(φ_l(x), φ_l(x̂)) ]

The LR term is :class:`lsa_ext.regularizer.LRTerm`; the settings, name tables and run names
are in :mod:`lsa_ext.train_config`; the checkpoint format is :mod:`lsa_ext.checkpoint`. All of
their public names are re-exported by :mod:`lsa_ext.training`.

Base objectives ``J``:

* ``at="none"``: ``CE(f(x), y)`` — plain training, no attack, no LR term;
* ``fgsm``, ``pgd``, ``fast``, ``apgd``: ``CE(f(x̂), y)`` (Madry-style AT);
* ``trades``: ``CE(f(x), y) + β · KL(f(x) ‖ f(x̂))`` with ``β = 6`` by default (the value of
  Zhang et al. 2019's MNIST/CIFAR experiments).

Choices (documented defaults):

* The attack runs with the model in **eval mode**: ``TrainConfig.attack_mode`` (CLI
  ``--attack-mode``) is the attack mode, the ``mode`` every attack takes
  (:data:`lsa_ext.modules.MODES`): ``"eval"`` (default; BatchNorm uses its running statistics
  and dropout is off while x̂ is searched) or ``"train"``. Attacks restore the model's mode and
  ``requires_grad`` flags.
* The training passes run in **train mode**. With an LR term the clean and the adversarial
  batch are each normalised by their own batch statistics (so the adversarial pass is exactly
  the base method's) and BatchNorm running statistics are updated by the clean, then the
  adversarial batch. ``TrainConfig.lr_pass`` (:data:`lsa_ext.regularizer.LR_PASSES`) says how
  the two batches go through the model: ``"two_pass"`` (two forwards), ``"concat"`` (one
  forward of both batches concatenated, BatchNorm run per half) or ``"auto"`` (default: concat
  when the clean forward would cover ≥ 90 % of the model's conv/linear work anyway, e.g. LR on
  every hidden layer, or when the clean logits are needed). TRADES uses the clean logits for
  its ``CE(f(x))`` and KL terms. For the other bases the clean logits are not needed, so by
  default (``full_clean_pass=False``) a two-pass clean forward stops right after the last
  regularized layer has produced its output: layers above it never see the clean batch (their
  BatchNorm statistics then come from the adversarial batches only, as in the base method) and
  no compute is spent on them. ``full_clean_pass=True`` runs the whole clean forward.
* ``DistributedDataParallel``: hooks are put on ``model.module`` and layer names are given
  without the ``module.`` prefix (a prefix is stripped). The clean pass calls ``model.module``
  directly; the adversarial pass goes through the wrapper. Under torchrun every rank draws the
  same global batch and trains on its slice (:func:`lsa_ext.distributed.shard_batch`).
* Layer monitoring (``config.monitor``, :mod:`lsa_ext.monitor`): before the first epoch and
  after each one, after its checkpoint, the CM of every monitored site on a fixed probe batch
  under the training attack, into ``out/monitor.csv`` and ``out/monitor.png``. It measures in
  eval mode and restores the model's mode and the global RNG: the weights do not change.
* Determinism: a fresh run seeds ``torch``, ``numpy`` and ``random`` with ``seed``; batches are
  drawn with a dedicated ``torch.Generator`` (seeded with ``seed``) and the attack of epoch ``e``
  is built with seed ``seed + 1000003·(e+1)``. All of these states go into every checkpoint, so
  a resumed run continues bit for bit.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lsa_ext import checkpoint as ckpt
from lsa_ext import distributed
from lsa_ext.batches import batches, first_input, num_samples
from lsa_ext.collapse import CollapseWatch
from lsa_ext.devices import resolve_device
from lsa_ext.errors import LsaUserError
from lsa_ext.losses import cross_entropy, kl_div, predict
from lsa_ext.modules import unwrap
from lsa_ext.monitor import LayerMonitor
from lsa_ext.outputs import OutputSelector, check_selector, logits_of
from lsa_ext.progress import progress as progress_bar
from lsa_ext.regularizer import LRTerm, gamma_tensor, resolve_layers
from lsa_ext.seeding import seed_everything
from lsa_ext.train_config import (
    TRAIN_ATTACK_DEFAULTS,
    TrainConfig,
    build_optimizer,
    build_scheduler,
    check_resume_epochs,
    lr_variant_suffix,
    run_name,
)
from lsa_ext.types import Perturbation

log = logging.getLogger("lsa_ext.trainer")

_EPOCH_SEED_STRIDE = 1_000_003

# The files of a training run in its folder: the Trainer's checkpoints (last.pt, prev.pt) and
# monitor.csv/.png, ``lsa train``'s config.json, history.json and model.pt, ``lsa evaluate``'s
# evaluation.json/.csv. What makes a folder a run, for lsa_ext.training.train and lsa train
# (lsa_ext.cli.runs) alike.
RUN_FILES = ("config.json", "history.json", ckpt.LAST, ckpt.PREVIOUS, "model.pt",
             "evaluation.json", "evaluation.csv", "monitor.csv", "monitor.png")


def run_files(out: str | os.PathLike) -> list[str]:
    """The names of the run files (:data:`RUN_FILES`) in folder ``out`` ([] when it does not
    exist): what makes a folder a training run."""
    return [name for name in RUN_FILES if (Path(out) / name).is_file()]


def clear_run(out: str | os.PathLike) -> list[str]:
    """Removes the run files (:data:`RUN_FILES`) of an old run from ``out`` (``overwrite``);
    other files are left alone. Returns the names removed."""
    removed = []
    for name in RUN_FILES:
        p = Path(out) / name
        if p.is_file():
            p.unlink()
            removed.append(name)
    return removed


class TrainingDivergedError(LsaUserError):
    """The training loss became NaN or infinite (the step is not applied; checkpoints kept)."""


def _join_and_place(model: nn.Module, device: str) -> tuple[torch.device, nn.Module]:
    """The device to train on and the model on it. Under torchrun: joins the job
    (:func:`lsa_ext.distributed.init_from_env`), takes ``cuda:LOCAL_RANK`` on GPUs and wraps
    an unwrapped model in DDP; in a plain process: ``resolve_device(device)``, model as is."""
    ctx = distributed.init_from_env(device=device)
    dev = ctx.device if ctx.distributed else resolve_device(device)
    model = model.to(dev)
    if ctx.distributed and unwrap(model) is model:
        model = distributed.wrap_model(model)
    return dev, model


# --------------------------------------------------------------------------- trainer
class Trainer:
    """Runs Algorithm 3 epoch by epoch, with checkpoints and resume.

    Args:
        model: the model to train (moved to ``config.device``); may be DDP-wrapped.
        train_data: ``(x, y)`` tensors, a ``TensorDataset``, a ``Dataset`` or a ``DataLoader``
            (:func:`lsa_ext.batches.batches`).
        config: a :class:`TrainConfig` (validated here).
        attack: optional callable ``(x, y) -> x̂`` replacing the attack built from
            ``config.at`` (whose base objective is still used).
        out: folder for checkpoints (``last.pt`` every epoch, ``prev.pt`` the one before);
            None: no checkpoints.
        meta: plain-typed information stored in checkpoints (dataset and model names, ...).
        progress: progress bars on (True), off (False) or per ``LSA_PROGRESS``/tty (None).
        on_epoch: called as ``on_epoch(trainer, record)`` after each epoch's checkpoint.
        output: logits selector for models returning tuples, dicts or objects
            (:func:`lsa_ext.outputs.logits_of`), used by every pass and the built attack.

    Raises:
        LsaUserError: an invalid config, an unknown device, an empty training set or LR layers
            that match nothing.
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
        output: OutputSelector = None,
    ) -> None:
        config.validate(custom_attack=attack is not None)
        self.output = check_selector(output)
        self.config = config
        self.device, self.model = _join_and_place(model, config.device)
        self.module = unwrap(self.model)
        self.train_data = train_data
        self.num_samples = num_samples(train_data)
        if self.num_samples == 0:
            raise LsaUserError("the training set is empty")
        # A<k> selectors and A<k> run-name labels count activation sites on one sample
        example = functools.partial(first_input, train_data)  # read only when needed
        self.layers = resolve_layers(self.module, config.lr_layers, example=example) \
            if config.lr_layers else []
        config.lr_layers = list(self.layers)
        self.gamma = gamma_tensor(config.gamma, len(self.layers), self.device) \
            if self.layers else None
        # the LR term, kept for the whole run: it remembers which site outputs need copies
        self.regularizer = LRTerm(
            self.layers, lr_pass=config.lr_pass, reduction=config.lr_reduction,
            detach_clean=config.lr_detach_clean) if self.layers else None
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
        self._wrote_last = False  # save(): out/last.pt is this trainer's own
        self.run_name = run_name("custom" if attack is not None and config.at == "none"
                                 else config.at, self.layers, self.module, example)
        if self.layers:
            self.run_name += lr_variant_suffix(config.lr_reduction, config.lr_detach_clean)
        # warns once when training collapses or diverges (lsa_ext.collapse)
        self.watch = CollapseWatch(train_data, config, self.layers,
                                   steps_per_epoch=-(-self.num_samples // config.batch_size),
                                   output=self.output)
        # config.monitor: per-site CM of a fixed probe batch after each epoch (lsa_ext.monitor)
        self.monitor = LayerMonitor(self.module, train_data, config, lr_sites=self.layers,
                                    attack=attack, out=self.out, output=self.output) \
            if config.monitor else None

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint dict of the current state (:func:`lsa_ext.checkpoint.training_state`)."""
        return ckpt.training_state(
            epoch=self.epoch, model=self.module, optimizer=self.optimizer,
            scheduler=self.scheduler, loader_generator=self.loader_generator,
            config=self.config.to_dict(), meta=self.meta, history=self.history,
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a state from :meth:`state_dict` (weights, optimizer, RNGs, epoch).

        Raises:
            LsaUserError: the state does not fit this model/optimizer, or ``config.epochs``
                differs from the run's where its scheduler's plan depends on the number of
                epochs, or is fewer than the epochs done
                (:func:`lsa_ext.train_config.check_resume_epochs`).
        """
        run = state.get("config") or {}
        if "epochs" in run and "epoch" in state:
            check_resume_epochs(str(run.get("scheduler", self.config.scheduler)),
                                int(run["epochs"]), self.config.epochs, int(state["epoch"]))
        self.epoch, self.history = ckpt.restore_training_state(
            state, model=self.module, optimizer=self.optimizer, scheduler=self.scheduler,
            loader_generator=self.loader_generator,
        )
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
        # a last.pt this trainer wrote is intact: only one found on disk is checked
        path = ckpt.save_checkpoint(self.out / ckpt.LAST, self.state_dict(),
                                    check_previous=not self._wrote_last)
        self._wrote_last = True
        return path

    def _diverged(self, what: str, done: int) -> TrainingDivergedError:
        """The error for a diverged run; names the kept checkpoint (after ``done`` epochs)."""
        last = None if self.out is None else self.out / ckpt.LAST
        kept = (f"; the last good checkpoint ({last}, after epoch {done}) is kept"
                if last is not None and last.exists() else "")
        return TrainingDivergedError(f"training diverged: {what} (try a smaller learning rate "
                                     f"than {self.config.lr}){kept}")

    # ----------------------------------------------------------------- steps
    def _attack_for_epoch(self, epoch: int) -> Perturbation | None:
        cfg = self.config
        if self.attack_override is not None:
            return self.attack_override
        if cfg.at == "none":
            return None
        from lsa_ext.attacks import build_attack

        return build_attack(
            cfg.at, self.module, cfg.eps,
            clip=None if cfg.clip is None else tuple(cfg.clip),
            mode=cfg.attack_mode,
            seed=cfg.seed + _EPOCH_SEED_STRIDE * (epoch + 1), output=self.output,
            **{**TRAIN_ATTACK_DEFAULTS.get(cfg.at, {}), **cfg.attack_kwargs},
        )

    def loss(self, x: torch.Tensor, y: torch.Tensor,
             attack: Perturbation | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training objective for one batch; returns ``(loss, parts)`` (parts detached:
        ``loss``, ``correct`` and, with an attack, ``base`` and ``lr_loss``)."""
        cfg = self.config
        if attack is None:
            logits = logits_of(self.model(x), self.output, batch=x.shape[0])
            loss = cross_entropy(logits, y)
            return loss, {"loss": loss.detach(), "correct": (predict(logits) == y).sum()}
        x_adv = attack(x, y).detach()
        trades = cfg.at == "trades"
        if self.regularizer is not None:
            lr_loss, logits_clean, logits_adv = self.regularizer(
                self.model, x, x_adv, self.gamma, clean_logits=trades or cfg.full_clean_pass,
                output=self.output,
            )
        else:
            lr_loss = None
            logits_clean = logits_of(self.module(x), self.output) if trades else None
            logits_adv = logits_of(self.model(x_adv), self.output, batch=x_adv.shape[0])
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

    def _step(self, x: torch.Tensor, y: torch.Tensor, attack: Perturbation | None,
              weight: float, batch: int) -> dict[str, torch.Tensor]:
        """One optimizer step on this rank's slice ``(x, y)`` of global batch ``batch``.

        ``weight`` (:func:`lsa_ext.distributed.shard_batch`) keeps DDP's gradient average equal
        to the gradient of the mean over the whole global batch. Returns the loss parts.
        """
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        loss, parts = self.loss(x, y, attack)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise self._diverged(f"the loss is {value} at epoch {self.epoch + 1}, batch "
                                 f"{batch + 1}", done=self.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        (loss * weight if weight != 1.0 else loss).backward()
        self.optimizer.step()
        return parts

    def train_epoch(self) -> dict[str, Any]:
        """Runs one epoch; returns its record: ``loss`` (total), ``base`` and ``lr_loss`` (the
        two parts, AT only), ``learning_rate`` (during the epoch), ``accuracy`` (% on the
        training batches — on x̂ for AT), ``epoch`` and ``seconds``; sample-weighted means over
        all ranks."""
        cfg = self.config
        attack = self._attack_for_epoch(self.epoch)
        self.model.train()
        sums: dict[str, float] = {}
        seen = 0
        t0 = time.perf_counter()
        loader, total = batches(self.train_data, cfg.batch_size, shuffle=True,
                                generator=self.loader_generator, epoch=self.epoch)
        desc = f"{self.run_name} epoch {self.epoch + 1}/{cfg.epochs}"
        for b, batch in enumerate(progress_bar(loader, desc=desc, total=total,
                                               enabled=self.progress)):
            # under torchrun: this rank's slice of the global batch
            part = distributed.shard_batch(batch[0], batch[1])
            if part is None:  # fewer samples than ranks: skipped by every rank
                continue
            (x, y), weight = part
            n = int(y.shape[0])
            for k, v in self._step(x, y, attack, weight, b).items():
                sums[k] = sums.get(k, 0.0) + (float(v) if k == "correct" else float(v) * n)
            seen += n
        sums, seen = distributed.all_reduce_stats((sums, seen))  # totals over ranks
        record = {k: v / max(seen, 1) for k, v in sums.items() if k != "correct"}
        record["learning_rate"] = float(self.optimizer.param_groups[0]["lr"])
        if self.scheduler is not None:
            self.scheduler.step()
        record["accuracy"] = 100.0 * sums.get("correct", 0.0) / max(seen, 1)
        record["epoch"] = self.epoch + 1
        record["seconds"] = time.perf_counter() - t0
        self.epoch += 1
        self.history.append(record)
        return record

    def fit(self) -> nn.Module:
        """Trains until ``config.epochs`` epochs are done (a checkpoint after each).

        Raises:
            TrainingDivergedError: the loss or the parameters became NaN/Inf (the last good
                checkpoint is kept).
        """
        if self._fresh and self.epoch == 0:
            seed_everything(self.config.seed)
            self._fresh = False
        if self.monitor is not None:
            self.monitor.start(self.epoch)  # rows of later epochs dropped; this one measured
        while self.epoch < self.config.epochs:
            record = self.train_epoch()
            bad = [n for n, p in self.module.named_parameters() if not torch.isfinite(p).all()]
            if bad:
                raise self._diverged(f"parameters {', '.join(bad[:3])} became NaN/Inf in epoch "
                                     f"{record['epoch']}", done=record["epoch"] - 1)
            self.save()
            if self.monitor is not None:  # after the checkpoint: an interrupted measurement
                self.monitor.record(self.epoch)  # loses no training (a resume re-measures)
            if distributed.is_main():
                self.watch.check(self.module, record)
            log.debug("%s epoch %d/%d: %s", self.run_name, record["epoch"],
                      self.config.epochs,
                      ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
            if self.on_epoch is not None:
                self.on_epoch(self, record)
        if self.monitor is not None:
            self.monitor.finish()  # monitor.png drawn if an epoch skipped it
        return self.model


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
    output: OutputSelector = None,
) -> nn.Module:
    """Plain (non-adversarial) training with cross-entropy: ``train(..., at="none")``.

    Deterministic for a given seed and initial model. Returns ``model`` (trained, in train mode).
    ``output``: logits selector (:func:`lsa_ext.outputs.logits_of`).

    Raises:
        LsaUserError: an invalid setting (see :meth:`TrainConfig.validate`);
            :class:`TrainingDivergedError` on NaN/Inf.
    """
    cfg = TrainConfig(at="none", epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                      lr=float(lr), seed=seed, device=device)
    return Trainer(model, train_data, cfg, progress=progress, output=output).fit()
