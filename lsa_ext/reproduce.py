"""The paper's experiment protocol in one call (Khalooei et al., arXiv 2202.02626: Tables 2
and 3, Figs. 6 and 7).

For a dataset, train: ``Normal``; each base AT method; each base AT method with LR on each
learnable layer (``AT-<M>-LR-L<k>``). Evaluate every model against FGSM on the paper's ε grid,
sum the accuracies into the R&G score, and write a table (paper layout), a CSV, a JSON, a bar
chart of R&G (Fig. 6) and, for two-moons, the decision boundary of every model (Fig. 7).

Settings (:data:`PROTOCOLS`): model, FGSM ε grid and training ε come from
:mod:`lsa_ext.presets`; the paper does not state the rest, so they are our choices:

* ``moons``: Model A, 2000 train / 1000 test points (noise 0.2), Adam lr 1e-3, batch 128,
  50 epochs, training ε = 0.3, γ = 1 on one layer, methods FGSM, PGD-10, TRADES (β = 6,
  10 steps), FAST; LR on L0…L2 (the hidden learnable layers, as the paper's rows).
* ``digits`` (scikit-learn 8×8 digits, the offline stand-in for MNIST): Model B ("same"
  padding), 1437 train / 360 test, Adam lr 1e-3, batch 128, 20 epochs, training ε = 0.2,
  γ = 1, methods APGD-CE (10 iterations) as in Table 3; LR on L0…L3.

Every run is cached under ``out/runs/<name>-s<seed>.{pt,json}``: a rerun with the same
settings skips finished runs (so a killed reproduction continues where it stopped).
Figures are drawn on a ``matplotlib.figure.Figure`` with its own Agg canvas: matplotlib's
global backend and pyplot state are never touched.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lsa_ext._version import versions
from lsa_ext.checkpoint import torch_load
from lsa_ext.data import DataSplits, load_dataset
from lsa_ext.devices import resolve_device
from lsa_ext.errors import LsaUserError
from lsa_ext.evaluation import fgsm_accuracy_grid, format_eps
from lsa_ext.io import (
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    atomic_write_with,
    check_dir,
    ensure_dir,
)
from lsa_ext.losses import log_probs
from lsa_ext.models import build_model
from lsa_ext.presets import DEFAULT_MODEL, EPS_GRIDS, PAPER_GRID, TRAIN_EPS
from lsa_ext.probes import select_layers
from lsa_ext.progress import progress as progress_bar
from lsa_ext.training import AT_METHODS, TrainConfig, Trainer, resolve_layers, run_name

log = logging.getLogger("lsa_ext.reproduce")


@dataclass(frozen=True)
class Protocol:
    """Settings of one reproduction (see the module docstring)."""

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


def _preset_protocol(dataset: str, methods: tuple[str, ...], epochs: int) -> Protocol:
    """A protocol with the dataset's presets: the paper's model and ε grid, our training ε."""
    return Protocol(dataset, DEFAULT_MODEL[dataset], methods, eps=TRAIN_EPS[dataset],
                    epochs=epochs, eval_eps=EPS_GRIDS[dataset])


PROTOCOLS: dict[str, Protocol] = {
    "moons": _preset_protocol("moons", ("fgsm", "pgd", "trades", "fast"), epochs=50),
    "digits": _preset_protocol("digits", ("apgd",), epochs=20),
}

# The paper's FGSM accuracies per ε (arXiv 2202.02626, Table 2: Model A on two-moons; Table 3:
# Model B on MNIST, which our digits protocol stands in for), for side-by-side reports.
PAPER: dict[str, dict[str, list[float]]] = {
    "moons": {
        "Normal": [97.07, 93.63, 82.5, 76.83, 63.79, 52.35],
        "AT-FGSM": [95.86, 91.98, 87.88, 81.33, 70.54, 58.69],
        "AT-PGD": [86.5, 83.89, 80.87, 76.61, 72.57, 60.02],
        "AT-TRADES": [96.17, 93.06, 85.78, 74.2, 68.62, 59.68],
        "AT-FAST": [94.32, 89.72, 84.91, 78.35, 70.18, 61.65],
        "AT-FGSM-LR-L2": [93.98, 93.01, 89.12, 84.01, 75.15, 63.25],
        "AT-PGD-LR-L2": [88.78, 86.93, 81.25, 77.01, 72.81, 66.58],
        "AT-FAST-LR-L2": [92.91, 90.31, 86.26, 81.53, 75.09, 67.65],
        "AT-TRADES-LR-L2": [96.67, 93.2, 86.56, 81.25, 79.5, 68.65],
    },
    "digits": {  # MNIST in the paper
        "Normal": [98.82, 82.1, 47.2, 17.87, 6.96, 4.25],
        "AT-APGD": [99.36, 98.54, 97.67, 96.97, 71.72, 33.73],
        "AT-APGD-LR-L0": [98.97, 98.11, 97.36, 97.17, 94.6, 55.52],
    },
}


@dataclass
class RunResult:
    """One trained and evaluated model."""

    name: str
    method: str
    lr_layer: str | None
    seed: int
    accuracies: list[float]
    rg: float
    seconds: float

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
        """Per run name: mean accuracies and R&G over seeds, and the R&G std."""
        rows = []
        for name in self.names:
            rs = [r for r in self.runs if r.name == name]
            acc = np.mean([r.accuracies for r in rs], axis=0)
            rg = np.array([r.rg for r in rs])
            rows.append({"name": name, "method": rs[0].method, "lr_layer": rs[0].lr_layer,
                         "accuracies": [float(a) for a in acc], "rg": float(rg.mean()),
                         "rg_std": float(rg.std()) if len(rg) > 1 else 0.0, "seeds": len(rs)})
        return rows

    def table(self) -> str:
        """A Markdown table in the paper's layout (FGSM accuracy % per ε, then R&G)."""
        eps = self.protocol.eval_eps
        multi = len(self.seeds) > 1
        head = ["training", *[format_eps(e) for e in eps], "R&G"] + (["± std"] if multi else [])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.summary():
            cells = [row["name"], *[f"{a:.2f}" for a in row["accuracies"]], f"{row['rg']:.2f}"]
            if multi:
                cells.append(f"{row['rg_std']:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def comparison(self) -> str:
        """Our R&G next to the paper's for the runs the paper reports."""
        paper = PAPER.get(self.protocol.dataset, {})
        ours = {r["name"]: r for r in self.summary()}
        lines = ["| training | R&G here | R&G paper | Δ vs own base (here) | Δ vs base (paper) |",
                 "|---|---|---|---|---|"]
        for name, accs in paper.items():
            mine = ours.get(name)
            base = name.split("-LR-")[0]
            d_here = (f"{mine['rg'] - ours[base]['rg']:+.2f}"
                      if mine is not None and "-LR-" in name and base in ours else "")
            d_paper = (f"{sum(accs) - sum(paper[base]):+.2f}"
                       if "-LR-" in name and base in paper else "")
            lines.append(f"| {name} | {mine['rg']:.2f} | {sum(accs):.2f} | {d_here} | "
                         f"{d_paper} |" if mine else f"| {name} | — | {sum(accs):.2f} | | |")
        return "\n".join(lines)

    def to_csv(self, path: str | os.PathLike) -> None:
        """One row per (run, seed): name, method, lr_layer, seed, acc@ε…, rg, seconds."""
        acc_cols = [f"acc@{format_eps(e)}" for e in self.protocol.eval_eps]
        rows = [{"name": r.name, "method": r.method, "lr_layer": r.lr_layer or "", "seed": r.seed,
                 **{c: f"{a:.4f}" for c, a in zip(acc_cols, r.accuracies, strict=True)},
                 "rg": f"{r.rg:.4f}", "seconds": f"{r.seconds:.2f}"} for r in self.runs]
        atomic_write_csv(path, rows, ["name", "method", "lr_layer", "seed", *acc_cols, "rg",
                                      "seconds"])

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


# --------------------------------------------------------------------------- evaluation
def fgsm_accuracies(model: torch.nn.Module, test: Any, eps_grid: Sequence[float],
                    clip: tuple[float, float] | None, device: str = "cpu") -> list[float]:
    """FGSM accuracy (%) at each ε of ``eps_grid`` (ε = 0: clean), via lsa_ext.evaluation."""
    grid = fgsm_accuracy_grid(model, test, eps_grid, clip=clip, device=device)
    return [float(a) for a in grid.values()]


# --------------------------------------------------------------------------- protocol
def plan(protocol: Protocol, model: torch.nn.Module,
         methods: Sequence[str] | None = None,
         layers: Sequence[str] | None = None) -> list[tuple[str, str, str | None]]:
    """``[(name, method, lr_layer)]``: Normal, each method, each method × each LR layer.

    Default LR layers: every learnable layer except the output layer (the paper's rows for
    Model A are L0–L2; the CM of a one-logit output is unbounded near the decision boundary).
    Names are :func:`lsa_ext.training.run_name`'s (the paper's ``AT-<M>-LR-L<k>``).
    """
    methods = list(methods or protocol.methods)
    if layers is None:
        n = len(select_layers(model, "learnable"))
        layers = protocol.lr_layers or [f"L{k}" for k in range(max(1, n - 1))]
    for layer in layers:  # a typo fails here, not after the runs before it
        resolve_layers(model, layer)
    out: list[tuple[str, str, str | None]] = [(run_name("none", []), "none", None)]
    out += [(run_name(m, []), m, None) for m in methods]
    out += [(run_name(m, [layer]), m, layer) for m in methods for layer in layers]
    return out


def _protocol(dataset: str, *, quick: bool, methods: Sequence[str] | None, epochs: int | None,
              eps: float | None, gamma: float | None) -> Protocol:
    """The protocol for ``dataset`` with :func:`reproduce`'s overrides applied."""
    key = dataset.strip().lower()
    if key not in PROTOCOLS:
        raise LsaUserError(f"no reproduction protocol for {dataset!r}; choose one of "
                           f"{', '.join(PROTOCOLS)}")
    changes: dict[str, Any] = {}
    if quick:
        changes.update(epochs=2, data_options={"limit_train": 256, "limit_test": 200})
    if epochs is not None:
        changes["epochs"] = int(epochs)
    if eps is not None:
        changes["eps"] = float(eps)
    if gamma is not None:
        changes["gamma"] = float(gamma)
    if methods is not None:
        known = [m for m in AT_METHODS if m != "none"]
        bad = [m for m in methods if m not in known]
        if bad:
            raise LsaUserError(f"unknown method(s) {bad}; choose from {', '.join(known)}")
        changes["methods"] = tuple(methods)
    return dataclasses.replace(PROTOCOLS[key], **changes)


def _train_config(proto: Protocol, method: str, layer: str | None, seed: int,
                  clip: tuple[float, float] | None, device: str) -> TrainConfig:
    """The checked :class:`TrainConfig` of one run of the protocol."""
    cfg = TrainConfig(
        at=method, eps=proto.eps, attack_kwargs=dict(proto.attack_kwargs.get(method, {})),
        clip=None if clip is None else list(clip),
        lr_layers=[layer] if layer else [], gamma=proto.gamma if layer else 1.0,
        epochs=proto.epochs, batch_size=proto.batch_size, optimizer=proto.optimizer,
        lr=proto.lr, seed=seed, device=device,
    )
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
    device: str = "cpu",
    progress: bool | None = None,
    figures: bool = True,
    on_run: Callable[[RunResult, bool], None] | None = None,
) -> ReproduceResult:
    """Runs the paper's protocol for ``dataset`` (``"moons"`` or ``"digits"``).

    Args:
        out: output folder (``results.csv``, ``results.json``, ``table.md``, ``rg.png``,
            ``boundaries.png`` for moons, ``runs/`` cache).
        seeds: training seeds; the table averages over them (default ``(0,)``).
        quick: a tiny version for tests (2 epochs, 256 training / 200 test samples).
        methods, layers, epochs, eps, gamma: override the protocol's.
        on_run: called as ``on_run(result, cached)`` after each run.

    Returns:
        :class:`ReproduceResult`.

    Raises:
        LsaUserError: an unknown dataset, method or layer, a bad setting or output folder —
            all before the first run starts.
    """
    proto = _protocol(dataset, quick=quick, methods=methods, epochs=epochs, eps=eps,
                      gamma=gamma)
    out = Path(out)
    check_dir(out)
    data = load_dataset(proto.dataset, seed=0, **proto.data_options)
    clip = data.info.data_range
    runs_plan = plan(proto, build_model(proto.model, data.info, seed=0), proto.methods, layers)
    seeds = [int(s) for s in seeds]
    resolve_device(device)
    # every setting is checked before the first run starts
    jobs = [(name, method, layer, seed, _train_config(proto, method, layer, seed, clip, device))
            for seed in seeds for name, method, layer in runs_plan]
    ensure_dir(out / "runs")
    results: list[RunResult] = []
    models: dict[str, nn.Module] = {}
    for name, method, layer, seed, cfg in progress_bar(jobs, desc=f"reproduce {proto.dataset}",
                                                        total=len(jobs), enabled=progress):
        model, result, cached = _run_one(proto, data, name, method, layer, cfg,
                                         out / "runs" / f"{name}-s{seed}", progress)
        results.append(result)
        if seed == seeds[0]:
            models[name] = model.cpu()
        if on_run is not None:
            on_run(result, cached)
    res = ReproduceResult(proto, seeds, results, {"device": device, "quick": quick,
                                                  "versions": versions()})
    res.to_csv(out / "results.csv")
    res.to_json(out / "results.json")
    atomic_write_text(out / "table.md", res.table() + "\n\n" + res.comparison() + "\n")
    if figures:
        plot_rg(res, out / "rg.png")
        if data.info.name == "moons":
            layout = [["Normal"]] + [[n for n, m, _ in runs_plan if m == method]
                                     for method in proto.methods]
            plot_boundaries(models, data.test, out / "boundaries.png", rows=layout,
                            accuracy={r.name: r.accuracies[0] for r in results
                                      if r.seed == seeds[0]})
    return res


def _run_one(proto: Protocol, data: DataSplits, name: str, method: str, layer: str | None,
             cfg: TrainConfig, stem: Path, progress: bool | None
             ) -> tuple[nn.Module, RunResult, bool]:
    """Trains and evaluates one run, or takes it from the cache at ``stem``.

    Returns ``(model in eval mode, result, whether it came from the cache)``.
    """
    model = build_model(proto.model, data.info, seed=cfg.seed)
    settings = {"config": cfg.to_dict(), "model": proto.model, "dataset": proto.dataset,
                "data_options": proto.data_options, "eval_eps": list(proto.eval_eps)}
    cached = _load_cached(stem, settings)
    if cached is not None:
        model.load_state_dict(cached[0])
        result = cached[1]
    else:
        t0 = time.perf_counter()
        Trainer(model, data.train, cfg, progress=progress).fit()
        seconds = time.perf_counter() - t0
        model.eval()
        accs = fgsm_accuracies(model, data.test, proto.eval_eps, data.info.data_range,
                               cfg.device)
        result = RunResult(name, method, layer, cfg.seed, accs, float(sum(accs)), seconds)
        atomic_write_with(stem.with_suffix(".pt"),
                          lambda fh: torch.save(model.state_dict(), fh))
        atomic_write_json(stem.with_suffix(".json"),
                          {"settings": _jsonable(settings), "result": result.to_dict()})
    model.eval()
    return model, result, cached is not None


def _load_cached(stem: Path, settings: dict[str, Any]) -> tuple[dict, RunResult] | None:
    js, pt = stem.with_suffix(".json"), stem.with_suffix(".pt")
    if not (js.is_file() and pt.is_file()):
        return None
    try:
        saved = json.loads(js.read_text())
        if saved.get("settings") != _jsonable(settings):
            return None
        state = torch_load(pt, what="cached run")
        return state, RunResult(**saved["result"])
    except Exception as exc:  # noqa: BLE001 - a damaged cache entry is simply recomputed
        log.warning("ignoring cached run %s: %s", stem, exc)
        return None


# --------------------------------------------------------------------------- figures
_COLORS = {"none": "#7f7f7f", "fgsm": "#1f77b4", "pgd": "#d62728", "trades": "#2ca02c",
           "fast": "#ff7f0e", "apgd": "#9467bd"}


def _figure(width: float, height: float) -> Any:
    """A ``matplotlib.figure.Figure`` on its own Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


# where the paper's numbers of each protocol come from (arXiv 2202.02626)
_PAPER_TABLE = {"moons": "Table 2, two-moons", "digits": "Table 3, MNIST"}


def plot_rg(res: ReproduceResult, path: str | os.PathLike) -> None:
    """Writes :func:`rg_figure` as a PNG."""
    fig = rg_figure(res)
    atomic_write_with(path, lambda fh: fig.savefig(fh, format="png", dpi=120))


def rg_figure(res: ReproduceResult) -> Any:
    """Bar chart of R&G per training (mean over seeds, std as error bar), like Fig. 6, with the
    paper's R&G (hatched) beside ours for the runs the paper reports. The y axis starts at 0,
    so bar heights compare; each bar is labelled with its value."""
    from matplotlib.patches import Patch

    rows = res.summary()
    paper = PAPER.get(res.protocol.dataset, {})
    fig = _figure(max(7.0, 0.75 * len(rows) + 2.5), 4.8)
    ax = fig.subplots()
    xs = np.arange(len(rows))
    w = 0.4
    ours = [r["rg"] for r in rows]
    ax.bar(xs - w / 2, ours, w, yerr=[r["rg_std"] for r in rows] if len(res.seeds) > 1
           else None, color=[_COLORS.get(r["method"], "#333") for r in rows],
           edgecolor=["black" if r["lr_layer"] else "none" for r in rows], capsize=2)
    theirs = [(x, sum(paper[r["name"]]), r) for x, r in zip(xs, rows, strict=True)
              if r["name"] in paper]
    if theirs:
        ax.bar([x + w / 2 for x, _, _ in theirs], [v for _, v, _ in theirs], w,
               color=[_COLORS.get(r["method"], "#333") for _, _, r in theirs], alpha=0.35,
               hatch="///", edgecolor="0.3", linewidth=0.5)
    top = max(ours + [v for _, v, _ in theirs])
    for x, v in zip(xs - w / 2, ours, strict=True):
        ax.text(x, v + top * 0.01, f"{v:.0f}", ha="center", va="bottom", fontsize=6.5)
    for x, v, _ in theirs:
        ax.text(x + w / 2, v + top * 0.01, f"{v:.0f}", ha="center", va="bottom", fontsize=6.5,
                color="0.35")
    ax.set_ylim(0, top * 1.25)  # room for the value labels and the legend above the bars
    ax.set_xticks(xs, [r["name"].replace("AT-", "") for r in rows], rotation=60, ha="right",
                  fontsize=8)
    grid = res.protocol.eval_eps
    ax.set_ylabel(f"R&G: sum of FGSM accuracies (%)\nover ε = "
                  f"{', '.join(map(format_eps, grid))}",
                  fontsize=9)
    seeds = f"{len(res.seeds)} seed{'s' if len(res.seeds) > 1 else ''}"
    ax.set_title(f"R&G on {res.protocol.dataset} (max {100 * len(grid)}): here "
                 f"({seeds}) and in the paper", fontsize=10)
    handles = [Patch(facecolor="0.55", label=f"here (mean of {seeds}, ± std)"
                     if len(res.seeds) > 1 else "here"),
               Patch(facecolor="0.55", alpha=0.35, hatch="///", edgecolor="0.3",
                     label=f"paper ({_PAPER_TABLE.get(res.protocol.dataset, 'its table')})"),
               Patch(facecolor="white", edgecolor="black", label="with LR (black edge)")]
    ax.legend(handles=handles, loc="upper center", ncol=3, fontsize=7.5, framealpha=0.9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_boundaries(models: dict[str, torch.nn.Module], test: Any,
                    path: str | os.PathLike, resolution: int = 200,
                    rows: Sequence[Sequence[str]] | None = None,
                    accuracy: dict[str, float] | None = None) -> None:
    """Writes :func:`boundaries_figure` as a PNG."""
    fig = boundaries_figure(models, test, resolution, rows, accuracy)
    atomic_write_with(path, lambda fh: fig.savefig(fh, format="png", dpi=110))


def boundaries_figure(models: dict[str, torch.nn.Module], test: Any, resolution: int = 200,
                      rows: Sequence[Sequence[str]] | None = None,
                      accuracy: dict[str, float] | None = None) -> Any:
    """Decision boundary of each two-moons model, one panel per model (like Fig. 7): the
    probability of class 1 as colour, the boundary p = 0.5 as a black line, the test points
    coloured by class, axes x₁, x₂; a legend of the classes and a colour bar.

    ``rows``: names per figure row (default: five per row in the given order). ``accuracy``:
    clean test accuracy (%) per name, written in each panel's title."""
    from matplotlib.lines import Line2D

    x, y = test.tensors[0], test.tensors[1]
    lo = x.min(dim=0).values - 0.5
    hi = x.max(dim=0).values + 0.5
    gx, gy = torch.meshgrid(torch.linspace(float(lo[0]), float(hi[0]), resolution),
                            torch.linspace(float(lo[1]), float(hi[1]), resolution), indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    names = list(models)
    if rows is None:
        rows = [names[i:i + 5] for i in range(0, len(names), 5)]
    rows = [[n for n in r if n in models] for r in rows]
    rows = [r for r in rows if r]
    ncols = max(len(r) for r in rows)
    nrows = len(rows)
    height = 2.6 * nrows + 0.6
    fig = _figure(2.7 * ncols + 1.2, height)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    for ax in axes.flat:
        ax.set_visible(False)
    cells = [(i, j, name) for i, r in enumerate(rows) for j, name in enumerate(r)]
    image = None
    colors = {0: "#2166ac", 1: "#b2182b"}  # the ends of RdBu_r: class 0 blue, class 1 red
    for i, j, name in cells:
        ax = axes[i, j]
        ax.set_visible(True)
        with torch.no_grad():
            p1 = log_probs(models[name](grid))[:, 1].exp().reshape(resolution, resolution)
        image = ax.contourf(gx.numpy(), gy.numpy(), p1.numpy(), levels=np.linspace(0, 1, 21),
                            cmap="RdBu_r", vmin=0, vmax=1, alpha=0.75)
        ax.contour(gx.numpy(), gy.numpy(), p1.numpy(), levels=[0.5], colors="k", linewidths=1)
        for c, color in colors.items():
            pts = x[y == c]
            ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), color=color, s=4,
                       edgecolors="none")
        acc = (accuracy or {}).get(name)
        ax.set_title(name + ("" if acc is None else f"\nclean accuracy {acc:.1f} %"), fontsize=8)
        ax.tick_params(labelsize=6.5)
        if i == nrows - 1 or i + 1 >= len(rows) or j >= len(rows[i + 1]):
            ax.set_xlabel("x₁", fontsize=8)
            ax.xaxis.set_tick_params(labelbottom=True)
        if j == 0:
            ax.set_ylabel("x₂", fontsize=8)
    handles = [Line2D([], [], ls="none", marker="o", color=colors[c], label=f"class {c}")
               for c in colors] + [Line2D([], [], color="k", lw=1,
                                          label="decision boundary (p = 0.5)")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.4 / height, 0.92, 1))
    if image is not None:
        cax = fig.add_axes((0.93, 0.2, 0.015, 0.6))
        bar = fig.colorbar(image, cax=cax, ticks=[0, 0.5, 1])
        bar.set_label("p(class 1)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return fig
