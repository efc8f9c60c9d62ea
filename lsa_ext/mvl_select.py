"""The layers to regularise in AT-LR, chosen by Layer Sustainability Analysis.

Khalooei et al. (arXiv 2202.02626): Algorithm 3 (AT-LR) regularises the most vulnerable layers
(MVL) that Algorithm 2 finds — train the model normally, attack it, run Algorithm 1 with cut-off
η and return the MVL list. ``lsa train --lr-layers mvl`` takes that list either from an
``lsa analyze`` report (:func:`mvl_from_report`) or by running Algorithm 2 on a copy of the
model first (:func:`mvl_on_the_fly`); :func:`choose_mvl` picks between the two (what
``lsa_ext.train(..., lr_layers="mvl")`` and ``lsa train`` run). Both return an
:class:`MvlChoice`: the sites as the analysis reports them — ``name`` for a module's first
call, ``name#k`` for its k-th call (:mod:`lsa_ext.probes`) — each once, so AT-LR regularises
exactly the calls found vulnerable (:func:`lsa_ext.regularizer.resolve_layers` takes them as
they are), with their ``A<k>`` / ``L<k>`` labels, the kind of layers probed and a one-line
:meth:`MvlChoice.describe`.

Kinds (:data:`MVL_KINDS`): on the fly probes the same kind as ``lsa analyze`` does by default,
the activation outputs (``"activations"``: every call of a ReLU/ELU/… module, the authors' LSA
tool's points), or the learnable layers' outputs (``"learnable"``: Conv/Linear, before their
activation); a report's kind is whatever its ``--layers`` probed.

Both paths pick by the same rule (:func:`_pick`): Algorithm 1 over the probed sites but the
output layer — the model's last learnable layer, and any site whose output is the logits tensor
itself (a final activation) — which is left out of μ, σ and the choice: its CM is minimised by
collapsing the logits, and AT-LR on it collapsed training (measured, 10 epochs, AT-PGD:
two-moons' one-logit fc4 at every γ from 1 down to 0.001; digits' fc2 at γ = 1 and 0.1). An
activation-kind analysis normally has no such site. A model whose probed sites are all output
layers keeps them. When no site passes the cut-off η, the top-ranked site (largest mean CM)
is taken and a warning says so, so ``--lr-layers mvl`` always yields a layer.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from lsa_ext import mvl as _mvl
from lsa_ext.analysis import analyze
from lsa_ext.attacks import ATTACKS, build_attack
from lsa_ext.batches import as_tensors, first_input, num_samples
from lsa_ext.errors import LsaUserError
from lsa_ext.modules import unwrap
from lsa_ext.probes import (
    LEARNABLE,
    Example,
    canonical_site,
    forward_sites,
    labelled_site,
    parse_site,
    select_layers,
    site_labels,
)
from lsa_ext.result import AnalysisResult, load_result
from lsa_ext.train_config import TRAIN_ATTACK_DEFAULTS
from lsa_ext.trainer import fit

log = logging.getLogger("lsa_ext.mvl_select")

# The kinds of layers MVL on the fly probes; the first is the default (lsa analyze's).
MVL_KINDS = ("activations", "learnable")
_KIND_WORDS = {"activations": "activation outputs, as lsa analyze",
               "learnable": "learnable-layer outputs"}
ON_THE_FLY = "on the fly"


@dataclass(frozen=True)
class MvlChoice:
    """The regularised sites chosen by LSA, and how.

    Attributes:
        sites: the sites (``name`` / ``name#k``, each once, in forward order) AT-LR regularises.
        labels: their ``A<k>`` / ``L<k>`` labels (:func:`lsa_ext.probes.site_labels`; the site
            itself where none applies or no model was given).
        kind: the probes: ``"activations"``, ``"learnable"``, or a report's layer selection
            (None: the report does not record it).
        source: :data:`ON_THE_FLY`, or the report's path.
        perturbation: the perturbation whose CM was used.
        eta: the cut-off η.
        left_out: output-layer sites left out of the choice (module docstring).
        top_ranked: no site passed η, the top-ranked one was taken.
    """

    sites: list[str]
    labels: list[str]
    kind: str | None
    source: str
    perturbation: str
    eta: float
    left_out: list[str]
    top_ranked: bool = False

    def describe(self) -> str:
        """One line, e.g. ``MVL on the fly (activation outputs, as lsa analyze; pgd, η=1):
        A2 (relu#2), A3 (act3)``."""
        where = "MVL on the fly" if self.source == ON_THE_FLY else f"MVL from {self.source}"
        what = _KIND_WORDS.get(self.kind or "", f"layers {self.kind}" if self.kind else
                               "layers not recorded")
        if self.left_out:
            what += f"; output layer {', '.join(self.left_out)} left out"
        named = ", ".join(labelled_site(s, lbl)
                          for lbl, s in zip(self.labels, self.sites, strict=True))
        return (f"{where} ({what}; {self.perturbation}, η={self.eta:g}): {named}"
                + (" (top-ranked: no layer passes η)" if self.top_ranked else ""))


def check_kind(kind: str) -> str:
    """``kind`` if it is one of :data:`MVL_KINDS`.

    Raises:
        LsaUserError: another value, naming the choices.
    """
    if kind not in MVL_KINDS:
        raise LsaUserError(f"unknown MVL kind {kind!r}; choices: {', '.join(MVL_KINDS)}")
    return kind


def output_sites(model: nn.Module, sites: list[str], example: Example = None,
                 output: Any = None) -> list[str]:
    """The output-layer sites among ``sites``: those of the model's last learnable layer
    (registration order; only when it has more than one) and, with ``example`` (one
    forward, :func:`lsa_ext.probes.forward_sites`), those whose output is the logits tensor
    itself (``output``: the logits selector)."""
    module = unwrap(model)
    learnable = [n for n, m in module.named_modules() if n and isinstance(m, LEARNABLE)]
    last = learnable[-1] if len(learnable) > 1 else None
    out = [s for s in sites if parse_site(s)[0] == last]
    if example is not None:
        names = sorted({parse_site(s)[0] for s in sites})
        same = set(forward_sites(module, names, example, output)[1])
        out += [s for s in sites if canonical_site(s) in same and s not in out]
    return out


def mvl_from_report(path: str | os.PathLike, eta: float, perturbation: str | None = None,
                    *, attack: str | None = None, model: nn.Module | None = None,
                    example: Example = None, output: Any = None) -> MvlChoice:
    """The most vulnerable layers (Algorithm 1, cut-off ``eta``) from an ``lsa analyze``
    report.json, recomputed from its per-layer mean/std/count (read by
    :func:`lsa_ext.result.load_result`, which checks the schema).

    ``perturbation``: which of the report's perturbations to use, by its name in the report
    (:func:`report_perturbation` gives the default: the report's only perturbation, else the
    one named as the training ``attack`` — ``"pgd"`` or ``"pgd:eps=0.3"`` for ``attack="pgd"``
    — when exactly one is; without ``attack``, the only adversarial one).
    ``model``: the model to be trained; with it the output layer is left out (as on the fly,
    module docstring; ``example``, an input batch or shape, also finds a final activation)
    and the sites are labelled ``A<k>`` / ``L<k>``. Without it the report's sites are taken
    as they are.

    Raises:
        LsaUserError: the file is missing or not an analysis report, or the perturbation is
            ambiguous or unknown.
    """
    result = load_result(path)
    perturbation = report_perturbation(result.perturbations, perturbation, attack, path)
    spec = result.config.get("layers_spec")
    kind = spec if isinstance(spec, str) or spec is None else ",".join(map(str, spec))
    return _pick(result, perturbation, eta, kind=kind, source=str(path), model=model,
                 example=example, output=output)


def report_perturbation(perturbations: list[str], name: str | None, attack: str | None,
                        path: str | os.PathLike) -> str:
    """The perturbation of a report (``perturbations``: its names, ``path``: for messages)
    to take the MVL from: ``name`` when given; else the only one; else, with the training
    ``attack`` (an ``at`` method, e.g. ``"pgd"``), the one whose name is the attack's
    (``"pgd"``, or ``"pgd:..."``), when exactly one is; else, without ``attack``, the only
    adversarial one (named after an attack of :data:`lsa_ext.attacks.ATTACKS`).

    Raises:
        LsaUserError: ``name`` is not in the report, or no single perturbation fits (the
            message lists the names and how to give one).
    """
    perts = list(perturbations)
    if name is not None:
        if name not in perts:
            raise LsaUserError(f"{path} has no perturbation {name!r} (have {', '.join(perts)})")
        return name
    if len(perts) == 1:
        return perts[0]
    if attack is not None:
        fits = [p for p in perts if p.split(":")[0].strip().lower() == attack.lower()]
        why = f"{'none' if not fits else 'more than one'} is named after the training attack " \
              f"{attack!r}"
    else:
        fits = [p for p in perts if p.split(":")[0].strip().lower() in ATTACKS]
        why = f"{'none' if not fits else 'more than one'} is adversarial"
    if len(fits) == 1:
        return fits[0]
    raise LsaUserError(f"{path} has several perturbations ({', '.join(perts)}) and {why}: name "
                       "the one to take the MVL from (lsa train --mvl-perturbation NAME; "
                       "mvl_perturbation= in lsa_ext.train, perturbation= in mvl_from_report)")


def mvl_on_the_fly(
    model: nn.Module,
    train_data: Any,
    *,
    at: str,
    eps: float,
    clip: tuple[float, float] | None,
    eta: float,
    epochs: int,
    kind: str = "activations",
    batch_size: int = 128,
    lr: float = 1e-3,
    optimizer: str = "adam",
    seed: int = 0,
    device: str = "cpu",
    samples: int = 512,
    progress: bool | None = None,
    output: Any = None,
) -> MvlChoice:
    """Algorithm 2 on the fly: trains a copy of ``model`` normally (``epochs``), attacks a
    seeded subset of ``samples`` training points with ``at`` (ε = ``eps``, the training attack
    settings of :data:`lsa_ext.train_config.TRAIN_ATTACK_DEFAULTS`), probes the layers of
    ``kind`` (:data:`MVL_KINDS`; default ``"activations"``, as ``lsa analyze``) and returns the
    most vulnerable sites for cut-off ``eta``, the output layer left out (module docstring);
    ``model`` itself is not changed. ``output``: the logits selector
    (:func:`lsa_ext.outputs.logits_of`).

    Raises:
        LsaUserError: an unknown ``kind``, a model without layers of that kind (checked
            before training), bad training or attack settings.
    """
    check_kind(kind)
    probe = copy.deepcopy(unwrap(model))
    try:
        select_layers(probe, kind)
    except LsaUserError:
        other = [k for k in MVL_KINDS if k != kind][0]
        raise LsaUserError(f"MVL on the fly probes {kind}, and {type(probe).__name__} has "
                           f"none: choose the {other} kind") from None
    fit(probe, train_data, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
        seed=seed, device=device, progress=progress, output=output)
    attack = build_attack(at, probe, eps, clip=clip, seed=seed, output=output,
                          **TRAIN_ATTACK_DEFAULTS.get(at, {}))
    subset = _subset(train_data, samples, seed)
    result = analyze(probe, subset, {at: attack}, layers=kind, seed=seed, device=device,
                     progress=progress, output=output)
    return _pick(result, at, eta, kind=kind, source=ON_THE_FLY, model=probe,
                 example=first_input(subset), output=output)


def _pick(result: AnalysisResult, perturbation: str, eta: float, *, kind: str | None,
          source: str, model: nn.Module | None, example: Example, output: Any) -> MvlChoice:
    """Algorithm 1 on ``result``'s ``perturbation`` over its sites but the output layer (when
    ``model`` is known), else (none passes ``eta``) the top-ranked site, with a warning."""
    sites = list(result.layers)
    left_out = output_sites(model, sites, example, output) if model is not None else []
    keep = [i for i, s in enumerate(sites) if s not in left_out] or list(range(len(sites)))
    if len(keep) == len(sites):
        left_out = []
    row = result.stats.row(result.perturbations.index(perturbation))
    table = {k: np.asarray(getattr(row, k), dtype=np.float64)[keep]
             for k in ("count", "sum", "sumsq")}
    chosen = [sites[keep[i]] for i in _mvl.most_vulnerable_layers(table, eta)]
    top = not chosen
    if top:
        chosen = [sites[keep[_mvl.rank_layers(table)[0]]]]
        where = "" if source == ON_THE_FLY else f" in {source}"
        hint = ("a lower eta selects by the cut-off" if eta > 0 else
                "at eta=0 this means every layer has the same mean CM")
        log.warning("no layer passes the MVL cut-off eta=%g%s: taking the top-ranked layer %s "
                    "(%s)", eta, where, chosen[0], hint)
    out: list[str] = []
    for s in map(canonical_site, chosen):
        if s not in out:
            out.append(s)
    labels = site_labels(unwrap(model), out, example) if model is not None else list(out)
    return MvlChoice(out, labels, kind, source, perturbation, float(eta), left_out, top)


def choose_mvl(
    model: nn.Module,
    train_data: Any,
    *,
    at: str,
    eps: float,
    clip: tuple[float, float] | None,
    eta: float,
    report: str | os.PathLike | None = None,
    perturbation: str | None = None,
    kind: str = "activations",
    example: Example = None,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    optimizer: str = "adam",
    seed: int = 0,
    device: str = "cpu",
    progress: bool | None = None,
    output: Any = None,
) -> MvlChoice:
    """The regularised sites for ``lr_layers="mvl"``: :func:`mvl_from_report` on ``report``
    when given (for ``model``: output layer left out, labels; its ``perturbation``, default
    the one named after ``at``: :func:`report_perturbation`), else :func:`mvl_on_the_fly`
    probing ``kind`` (the other arguments, ``output`` the logits selector included, are its
    settings; ``kind`` is checked in both cases, a report's kind is its own). ``example``: an
    input batch or shape for the report path (default: the first sample of ``train_data``,
    which may then be None: the report path reads no data). Logs nothing: the callers say
    :meth:`MvlChoice.describe` (``lsa_ext.train`` logs it at INFO, ``lsa train`` prints it).

    Raises:
        LsaUserError: see the two functions; ``perturbation`` without ``report``.
    """
    check_kind(kind)
    if perturbation is not None and report is None:
        raise LsaUserError("the MVL perturbation picks one of a report's perturbations (MVL on "
                           "the fly uses the training attack): give the report too")
    if report is not None:
        if example is None and train_data is not None:
            example = functools.partial(first_input, train_data)  # read only when needed
        choice = mvl_from_report(report, eta, perturbation, attack=at, model=model,
                                 example=example, output=output)
    else:
        choice = mvl_on_the_fly(model, train_data, at=at, eps=eps, clip=clip, eta=eta,
                                epochs=epochs, kind=kind, batch_size=batch_size, lr=lr,
                                optimizer=optimizer, seed=seed, device=device,
                                progress=progress, output=output)
    return choice


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
