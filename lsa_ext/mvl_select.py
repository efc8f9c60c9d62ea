"""The layers to regularise in AT-LR, chosen by Layer Sustainability Analysis.

Khalooei et al. (arXiv 2202.02626): Algorithm 3 (AT-LR) regularises the most vulnerable layers
(MVL) that Algorithm 2 finds — train the model normally, attack it, run Algorithm 1 with cut-off
η and return the MVL list. ``lsa train --lr-layers mvl`` takes that list either from an
``lsa analyze`` report (:func:`mvl_from_report`) or by running Algorithm 2 on a copy of the
model first (:func:`mvl_on_the_fly`); :func:`choose_mvl` picks between the two (what
``lsa_ext.train(..., lr_layers="mvl")`` runs). The layers come back as the sites the analysis
reports — ``name`` for a module's first call, ``name#k`` for its k-th call (:mod:`lsa_ext.probes`)
— each once, so AT-LR regularises exactly the calls found vulnerable
(:func:`lsa_ext.regularizer.resolve_layers` takes them as they are).

When no layer passes the cut-off η, the top-ranked layer (largest mean CM) is taken and a
warning says so, so ``--lr-layers mvl`` always yields a layer. The on-the-fly search leaves
the output layer (the model's last learnable layer, which produces the logits) out: its CM is
minimised by collapsing the logits, and AT-LR on it collapsed training (measured, 10 epochs,
AT-PGD: two-moons' one-logit fc4 at every γ from 1 down to 0.001; digits' fc2 at γ = 1 and 0.1).
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from lsa_ext.analysis import analyze
from lsa_ext.attacks import ATTACKS, build_attack
from lsa_ext.batches import as_tensors, num_samples
from lsa_ext.errors import LsaUserError
from lsa_ext.modules import unwrap
from lsa_ext.probes import canonical_site, select_layers
from lsa_ext.result import load_result
from lsa_ext.train_config import TRAIN_ATTACK_DEFAULTS
from lsa_ext.trainer import fit

log = logging.getLogger("lsa_ext.mvl_select")


def _sites(names: list[str]) -> list[str]:
    """Reported sites in order, each once (``act#1`` is ``act``)."""
    out: list[str] = []
    for s in map(canonical_site, names):
        if s not in out:
            out.append(s)
    return out


def mvl_from_report(path: str | os.PathLike, eta: float, perturbation: str | None = None
                    ) -> list[str]:
    """The most vulnerable layers (Algorithm 1, cut-off ``eta``) from an ``lsa analyze``
    report.json, recomputed from its per-layer mean/std/count (read by
    :func:`lsa_ext.result.load_result`, which checks the schema).

    ``perturbation``: which of the report's perturbations to use; default: the only one, or the
    only adversarial one (name starting with an attack name of :data:`lsa_ext.attacks.ATTACKS`).

    Raises:
        LsaUserError: the file is missing or not an analysis report, or the perturbation is
            ambiguous or unknown.
    """
    result = load_result(path)
    perts = result.perturbations
    if perturbation is None:
        adversarial = [p for p in perts if p.split(":")[0].lower() in ATTACKS]
        choice = adversarial if len(adversarial) == 1 else list(perts)
        if len(choice) != 1:
            raise LsaUserError(f"{path} has several perturbations ({', '.join(perts)}); "
                               "name the one to take the MVL from")
        perturbation = choice[0]
    if perturbation not in perts:
        raise LsaUserError(f"{path} has no perturbation {perturbation!r} "
                           f"(have {', '.join(perts)})")
    return _sites(_mvl_or_top(result, eta, perturbation, f" in {path}"))


def mvl_on_the_fly(
    model: nn.Module,
    train_data: Any,
    *,
    at: str,
    eps: float,
    clip: tuple[float, float] | None,
    eta: float,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    optimizer: str = "adam",
    seed: int = 0,
    device: str = "cpu",
    samples: int = 512,
    progress: bool | None = None,
    output: Any = None,
) -> list[str]:
    """Algorithm 2 on the fly: trains a copy of ``model`` normally (``epochs``), attacks a
    seeded subset of ``samples`` training points with ``at`` (ε = ``eps``, the training attack
    settings of :data:`lsa_ext.train_config.TRAIN_ATTACK_DEFAULTS`) and returns the most vulnerable
    learnable layers for cut-off ``eta``, the output layer left out (module docstring);
    ``model`` itself is not changed. ``output``: the logits selector
    (:func:`lsa_ext.outputs.logits_of`).

    Raises:
        LsaUserError: bad training or attack settings.
    """
    probe = copy.deepcopy(unwrap(model))
    fit(probe, train_data, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
        seed=seed, device=device, progress=progress, output=output)
    attack = build_attack(at, probe, eps, clip=clip, seed=seed, output=output,
                          **TRAIN_ATTACK_DEFAULTS.get(at, {}))
    learnable = select_layers(probe, "learnable")
    result = analyze(probe, _subset(train_data, samples, seed), {at: attack},
                     layers=learnable[:-1] if len(learnable) > 1 else learnable, seed=seed,
                     device=device, progress=progress, output=output)
    return _sites(_mvl_or_top(result, eta, at, ""))


def _mvl_or_top(result: Any, eta: float, perturbation: str, where: str) -> list[str]:
    """The MVL of ``perturbation`` for cut-off ``eta``, else (none passes) the top-ranked
    layer, with a warning saying so."""
    names = result.mvl(eta, perturbation)
    if names:
        return names
    top = result.ranking(perturbation)[0]
    log.warning("no layer passes the MVL cut-off eta=%g%s: taking the top-ranked layer %s "
                "(a lower eta selects by the cut-off)", eta, where, top)
    return [top]


def choose_mvl(
    model: nn.Module,
    train_data: Any,
    *,
    at: str,
    eps: float,
    clip: tuple[float, float] | None,
    eta: float,
    report: str | os.PathLike | None = None,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    optimizer: str = "adam",
    seed: int = 0,
    device: str = "cpu",
    progress: bool | None = None,
    output: Any = None,
) -> list[str]:
    """The regularised sites for ``lr_layers="mvl"``: :func:`mvl_from_report` on ``report``
    when given, else :func:`mvl_on_the_fly` (the other arguments, ``output`` the logits
    selector included, are its settings).

    Raises:
        LsaUserError: see the two functions.
    """
    if report is not None:
        names = mvl_from_report(report, eta)
    else:
        names = mvl_on_the_fly(model, train_data, at=at, eps=eps, clip=clip, eta=eta,
                               epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                               seed=seed, device=device, progress=progress, output=output)
    log.info("most vulnerable layers (eta=%g): %s", eta, ", ".join(names))
    return names


def _subset(data: Any, n: int, seed: int) -> Any:
    """At most ``n`` samples of ``data`` (tensors or a Dataset), drawn without replacement
    from a generator seeded with ``seed``, in the drawn order; all of ``data`` when it has
    no more than ``n``."""
    total = num_samples(data)
    if total <= n:
        return data
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
    tensors = as_tensors(data)
    if tensors is not None:
        picked = tuple(t[idx] for t in tensors)
        return picked if len(picked) == 2 else picked[0]
    return Subset(data, idx.tolist())
