"""A training run that collapsed or diverged is said so, once, with its likely cause.

AT-LR (Khalooei et al., arXiv 2202.02626, Algorithm 3) adds ``γ · CM(φ_l(x), φ_l(x̂))`` to the
loss; the relative error CM is smallest when the layer's output no longer depends on the input,
so a large γ can make the model predict one class for every input (accuracy at chance) while
the loss looks fine. A too-large learning rate instead makes the loss explode (``--lr 1e6``
reached a loss of 4e25 on two-moons without becoming NaN), as do an attack budget as large as
the data's range and float16 parameters under Adam. :class:`CollapseWatch` looks at each
epoch's record and at the model's clean predictions on a fixed probe of training samples, and
logs one warning per run naming the symptom and the likely cause. It changes nothing.

Thresholds: *diverging* when the epoch's mean loss exceeds :data:`LOSS_LIMIT` (a cross-entropy
of 1000 needs logit gaps of 1000), or is over 10 and 10× the first epoch's; *collapsed* when
the model predicts one class for at least 99 % of the probe (that class being under 90 % of its
labels) or its clean accuracy on the probe is within 2 points of chance (the majority-class
share) — after it had learned (an earlier epoch was not so), or still after
:data:`MIN_STEPS` optimizer steps (a model that has just started predicts one class too).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lsa_ext.batches import as_tensors
from lsa_ext.losses import predict
from lsa_ext.outputs import OutputSelector, logits_of

log = logging.getLogger("lsa_ext.collapse")

LOSS_LIMIT = 1e3
PROBE_SAMPLES = 512
MIN_STEPS = 30


class CollapseWatch:
    """Watches a training run; :meth:`check` after each epoch.

    Args:
        train_data: the training set; when it is tensors or a ``TensorDataset``, up to
            ``samples`` of its samples (seeded choice) probe the clean predictions, else only
            the loss is watched.
        config: the run's :class:`lsa_ext.train_config.TrainConfig` (named in the cause).
        layers: the resolved LR layers.
        steps_per_epoch: optimizer steps per epoch.
        samples: probe size (default 512).
        output: the model's logits selector (:func:`lsa_ext.outputs.logits_of`).
    """

    def __init__(self, train_data: Any, config: Any, layers: Sequence[str],
                 steps_per_epoch: int, samples: int = PROBE_SAMPLES,
                 output: OutputSelector = None) -> None:
        self.config = config
        self.output = output
        self.layers = list(layers)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.first_loss: float | None = None
        self.learned: tuple[int, float] | None = None  # (epoch, clean accuracy %) once learnt
        self.warned = False
        self.probe: tuple[torch.Tensor, torch.Tensor] | None = None
        tensors = as_tensors(train_data)
        if tensors is not None and len(tensors) == 2 and tensors[1].dtype == torch.int64:
            x, y = tensors
            idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
            self.probe = (x[idx[:samples]], y[idx[:samples]])

    def check(self, model: nn.Module, record: dict[str, Any]) -> str | None:
        """Looks at epoch ``record`` (``loss``, ``epoch``) and ``model``; logs and returns the
        warning the first time a problem shows, else None."""
        if self.warned:
            return None
        msg = self._diagnose(model, record)
        if msg is not None:
            self.warned = True
            log.warning(msg)
        return msg

    def _diagnose(self, model: nn.Module, record: dict[str, Any]) -> str | None:
        loss, epoch = float(record.get("loss", float("nan"))), int(record.get("epoch", 0))
        if self.first_loss is None:
            self.first_loss = loss
        if math.isfinite(loss) and (loss > LOSS_LIMIT or (
                epoch >= 2 and loss > 10 and loss > 10 * (self.first_loss or 0.0))):
            return (f"training is diverging: the loss is {loss:.3g} after epoch {epoch}; likely "
                    f"cause: {self._divergence_cause(model)}")
        if self.probe is None:
            return None
        share, top, acc, chance = self._predictions(model)
        one_class = share >= 0.99 and chance < 90.0
        if not (one_class or acc <= chance + 2.0):
            if self.learned is None or acc > self.learned[1]:
                self.learned = (epoch, acc)
            return None
        if self.learned is None and epoch * self.steps_per_epoch < MIN_STEPS:
            return None  # not learnt yet, but early days
        what = (f"the model predicts class {top} for {100 * share:.0f} % of "
                f"{len(self.probe[1])} training samples" if one_class
                else "its clean accuracy is at chance")
        when = (f"after reaching {self.learned[1]:.1f} % at epoch {self.learned[0]}"
                if self.learned else f"after {epoch * self.steps_per_epoch} steps")
        return (f"training has collapsed at epoch {epoch}: {what} (clean accuracy {acc:.1f} %, "
                f"chance {chance:.1f} %, {when}); likely cause: {self._cause()}")

    def _divergence_cause(self, model: nn.Module) -> str:
        """The likeliest cause of an exploding loss: a learning rate above 1e-2; else an attack
        budget at least the data's range (or above 1 with no range); else float16 parameters
        with Adam/AdamW (their moment estimates overflow); else the learning rate."""
        cfg = self.config
        if cfg.lr > 1e-2:
            return f"the learning rate {cfg.lr:g} is too large (the default is 1e-3)"
        if cfg.at != "none":
            span = None if not cfg.clip else float(cfg.clip[1]) - float(cfg.clip[0])
            if cfg.eps >= (span if span is not None else 1.0):
                where = (f"the data range [{cfg.clip[0]:g}, {cfg.clip[1]:g}]" if cfg.clip
                         else "unclipped data")
                return (f"the attack budget eps {cfg.eps:g}, as large as {where}: inputs that "
                        "far from the data make the loss explode; try a smaller eps")
        dtype = next((p.dtype for p in model.parameters()), None)
        if dtype == torch.float16 and cfg.optimizer in ("adam", "adamw"):
            return (f"float16 parameters with {cfg.optimizer} (its moment estimates overflow "
                    "in float16): train in float32 or bfloat16, or use sgd")
        return (f"the learning rate {cfg.lr:g} is too large for this model (the default is "
                "1e-3)")

    def _cause(self) -> str:
        cfg = self.config
        gamma = cfg.gamma if isinstance(cfg.gamma, (int, float)) else max(cfg.gamma)
        if self.layers and gamma > 0:
            return (f"the LR term on {', '.join(self.layers)} with gamma {cfg.gamma}, which is "
                    "smallest when those layers' outputs no longer depend on the input: try a "
                    "smaller gamma (e.g. 0.01) or hidden layers instead of the output layer")
        if cfg.lr > 1e-2:
            return f"the learning rate {cfg.lr:g} (the default is 1e-3)"
        if cfg.at != "none":
            return f"an attack too strong for the model (eps {cfg.eps:g}): try a smaller eps"
        return "too few training steps or an unsuitable learning rate for this model"

    @torch.no_grad()
    def _predictions(self, model: nn.Module) -> tuple[float, int, float, float]:
        """(share of the most predicted class, that class, clean accuracy %, chance %)."""
        assert self.probe is not None
        x, y = self.probe
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        was_training = model.training
        model.eval()
        try:
            pred = torch.cat([predict(logits_of(model(xb.to(device)), self.output)).cpu()
                              for xb in x.split(256)])
        finally:
            model.train(was_training)
        counts = torch.bincount(pred.long().flatten())
        top = int(counts.argmax())
        share = float(counts[top]) / max(len(pred), 1)
        acc = 100.0 * float((pred.view_as(y) == y).double().mean())
        chance = 100.0 * float(torch.bincount(y).max()) / max(len(y), 1)
        return share, top, acc, chance
