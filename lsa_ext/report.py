"""Writers of an analysis report: JSON (``report.json``), CSV, plain-text table and figure.

They take any object with the tables of :class:`lsa_ext.result.AnalysisResult` (the
:class:`AnalysisTables` protocol) and know nothing else of the analysis, so the result calls them
and they never import it. Figures are drawn on a ``matplotlib.figure.Figure`` with its own Agg
canvas: matplotlib's global state (``pyplot``, the backend) is never touched.

All files are written atomically (:mod:`lsa_ext.io`). Reports hold no timestamps or paths of
the machine, so the same settings and seed give byte-identical ``report.json`` files.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from lsa_ext._version import versions
from lsa_ext.io import atomic_write_json, atomic_write_text, atomic_write_with
from lsa_ext.probes import labelled_site

# report.json's "schema"; lsa_ext.result.load_result reads "lsa_ext.analysis/1" and every 1.x.
# 1.1 added "accuracy_percent" (percent, like every other accuracy lsa_ext prints or writes);
# "accuracy" keeps the fraction 0–1 of schema 1 for the readers of 1.
# 1.2 added "labels": each layer's short label (A<k>, L<k>, ...; null when not known).
SCHEMA = "lsa_ext.analysis/1.2"
SCHEMA_FAMILY = "lsa_ext.analysis/1"


class _MvlDetail(Protocol):
    layers: list[int]
    mu: float
    sigma: float


class AnalysisTables(Protocol):
    """What the writers read (:class:`lsa_ext.result.AnalysisResult` provides it)."""

    layers: list[str]
    perturbations: list[str]
    measure: str
    config: dict[str, Any]
    labels: list[str] | None  # aligned with layers (A<k>, L<k>, ...), None: not known

    @property
    def mean(self) -> np.ndarray: ...  # [P, L] float64
    @property
    def std(self) -> np.ndarray: ...  # [P, L] float64
    @property
    def count(self) -> np.ndarray: ...  # [P, L] int64
    @property
    def accuracy(self) -> Mapping[str, float] | None: ...
    def mvl(self, eta: float) -> Mapping[str, Sequence[str]]: ...
    def mvl_detail(self, perturbation: str, eta: float) -> _MvlDetail: ...
    def ranking(self) -> Mapping[str, Sequence[str]]: ...


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def analysis_report(result: AnalysisTables, eta: float) -> dict[str, Any]:
    """The JSON-serialisable report of an analysis (schema: README, "report.json")."""
    mean, std, count = result.mean, result.std, result.count
    perts: dict[str, Any] = {}
    mvl_layers: dict[str, list[str]] = {}
    mvl_stats: dict[str, Any] = {}
    ranking = result.ranking()
    for p, name in enumerate(result.perturbations):
        perts[name] = {
            "description": result.config.get("perturbations", {}).get(name, name),
            "mean": [_finite(v) for v in mean[p]],
            "std": [_finite(v) for v in std[p]],
            "count": [int(c) for c in count[p]],
        }
        d = result.mvl_detail(name, eta)
        mvl_layers[name] = [result.layers[i] for i in d.layers]
        mvl_stats[name] = {"mu": d.mu, "sigma": d.sigma, "threshold": d.threshold}
    return {
        "schema": SCHEMA,
        "measure": result.measure,
        "layers": list(result.layers),
        "labels": None if result.labels is None else list(result.labels),
        "perturbations": perts,
        "mvl": {"eta": float(eta), "layers": mvl_layers, "stats": mvl_stats},
        "ranking": ranking,
        "accuracy": result.accuracy,
        "accuracy_percent": None if result.accuracy is None else {
            k: round(100.0 * v, 10) for k, v in result.accuracy.items()},
        "config": result.config,
        "versions": versions(),
    }


def write_analysis_json(result: AnalysisTables, path: str | os.PathLike, eta: float) -> None:
    """Writes :func:`analysis_report` as indented JSON, atomically."""
    atomic_write_json(path, analysis_report(result, eta))


def write_analysis_csv(result: AnalysisTables, path: str | os.PathLike, eta: float) -> None:
    """One row per (perturbation, layer): perturbation, layer_index (the row's position in
    the report, 0-based), layer, mean, std, count, rank (1 = most vulnerable for that
    perturbation), in_mvl (0/1 for ``eta``), label (the layer's label ``A<k>`` / ``L<k>`` /
    its name, :attr:`lsa_ext.result.AnalysisResult.labels`; empty when not known)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["perturbation", "layer_index", "layer", "mean", "std", "count", "rank", "in_mvl",
                "label"])
    mvl = result.mvl(eta)
    ranking = result.ranking()
    labels = result.labels or [""] * len(result.layers)
    for p, name in enumerate(result.perturbations):
        ranks = {layer: r + 1 for r, layer in enumerate(ranking[name])}
        for i, layer in enumerate(result.layers):
            w.writerow([
                name, i, layer, repr(float(result.mean[p, i])), repr(float(result.std[p, i])),
                int(result.count[p, i]), ranks[layer], int(layer in mvl[name]), labels[i],
            ])
    atomic_write_text(path, buf.getvalue())


def format_analysis(result: AnalysisTables, eta: float) -> str:
    """Plain-text table: one row per layer, one column of mean CM per perturbation; MVL rows
    marked ``*`` per cell; followed by the MVL list per perturbation.

    When the result has labels, the first column ``label`` holds each layer's label (``A<k>``,
    ``L<k>``, ...: what ``--layers`` / ``--lr-layers`` take; ``-`` for a site without one,
    named by its layer name alone) and the MVL lists name layers ``A3 (relu4)``; without
    labels (a report of schema 1 or 1.1) the table has no such column."""
    names = result.perturbations
    acc = result.accuracy
    labels = result.labels
    layer_w = max(len("layer") if acc is None else len("accuracy %"),
                  *(len(s) for s in result.layers))
    col_w = max(10, *(len(n) for n in names))
    mvl = result.mvl(eta)
    shown = None if labels is None else [
        "-" if lbl == layer else lbl for lbl, layer in zip(labels, result.layers, strict=True)]
    site_w = 0 if shown is None else max(len("label"), *(len(x) for x in shown))

    def row(site: str, layer: str, cells: Sequence[str]) -> str:
        lead = f"{site:<{site_w}}  " if shown is not None else ""
        return f"{lead}{layer:<{layer_w}}  " + "  ".join(cells)

    head = row("label", "layer", [f"{n:>{col_w}}" for n in names])
    title = (f"mean {result.measure} per layer (* = in MVL, eta={eta:g}); "
             f"{int(result.count.max()) if result.count.size else 0} samples")
    if acc is not None:
        title += f"; clean accuracy {100 * acc['clean']:.2f} %"
    lines = [title, head, "-" * len(head)]
    for i, layer in enumerate(result.layers):
        cells = []
        for p, n in enumerate(names):
            mark = "*" if layer in mvl[n] else " "
            cells.append(f"{_fmt(result.mean[p, i]):>{col_w - 1}}{mark}")
        lines.append(row("" if shown is None else shown[i], layer, cells))
    if acc is not None:
        lines.append("-" * len(head))
        lines.append(row("", "accuracy %", [f"{100 * acc[n]:>{col_w - 1}.2f} " for n in names]))
    lines.append("")
    lines.append(f"Most vulnerable layers (mean CM - mu > eta*sigma, eta={eta:g}):")
    label_of = dict(zip(result.layers, labels or [None] * len(result.layers), strict=True))
    listed = {n: ", ".join(labelled_site(x, label_of[x]) for x in mvl[n]) if mvl[n]
              else "(none)" for n in names}
    list_w = max(len(v) for v in listed.values()) if listed else 0
    for n in names:
        d = result.mvl_detail(n, eta)
        lines.append(f"  {n:<{col_w}}  {listed[n]:<{list_w}}   "
                     f"[mu={_fmt(d.mu)}, sigma={_fmt(d.sigma)}]")
    return "\n".join(lines)


def _fmt(v: float) -> str:
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
        return f"{v:.3e}"
    return f"{v:.4f}"


# the parameters worth a legend, from a perturbation's description (its repr: "PGD(eps=0.1, ...")
_LEGEND_PARAMS = (("eps", "ε={}"), ("std", "std={}"), ("amount", "amount={}"),
                  ("steps", "{} steps"))


def perturbation_params(description: str) -> str:
    """``"ε=0.1, 10 steps"`` from ``"PGD(eps=0.1, clip=(0.0, 1.0), alpha=0.025, steps=10)"``;
    ``"std=0.1"`` from ``"Gaussian(std=0.1, ...)"``; ``""`` when none is found."""
    import re

    found = []
    for key, fmt in _LEGEND_PARAMS:
        m = re.search(rf"\b{key}=([-+0-9.eE]+)", description)
        if m:
            found.append(fmt.format(f"{float(m.group(1)):.4g}"))
    return ", ".join(found)


def wants_log_scale(values: np.ndarray, decades: float = 2.0) -> bool:
    """True when the finite positive ``values`` span more than ``decades`` powers of ten."""
    v = np.asarray(values, dtype=np.float64)
    positive = v[np.isfinite(v) & (v > 0)]
    return bool(positive.size > 0 and positive.max() / positive.min() > 10.0**decades)


def plot_analysis(
    result: AnalysisTables,
    path: str | os.PathLike,
    *,
    eta: float | None,
    title: str | None = None,
    log_scale: bool | None = None,
) -> None:
    """Writes :func:`analysis_figure` as a PNG, atomically."""
    fig = analysis_figure(result, eta=eta, title=title, log_scale=log_scale)
    atomic_write_with(path, lambda fh: fig.savefig(fh, format="png"))


def analysis_figure(
    result: AnalysisTables,
    *,
    eta: float | None,
    title: str | None = None,
    log_scale: bool | None = None,
) -> Any:
    """Line plot of mean CM per layer, one line per perturbation (paper Fig. 2): a
    ``matplotlib.figure.Figure`` on its own Agg canvas.

    Ticks name the layers with their labels when known (``A0 (act1)``,
    :func:`lsa_ext.probes.labelled_site`). MVL points (for ``eta``) are ringed; legend entries
    carry each perturbation's parameters (ε, std, amount, steps: :func:`perturbation_params`
    of its description in ``result.config["perturbations"]``) and the accuracy under it when
    known; a log y axis is used when ``log_scale`` is True, or when it is None and the positive
    values span more than two decades.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mean = result.mean
    L = len(result.layers)
    xs = np.arange(L)
    if log_scale is None:
        log_scale = wants_log_scale(mean)
    width = min(16.0, max(9.5, 0.45 * L + 5.5))  # room for the legend beside the axes
    fig = Figure(figsize=(width, 5.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    mvl = result.mvl(eta) if eta is not None else {}
    acc = result.accuracy
    descriptions = result.config.get("perturbations", {})
    markers = "osD^v<>ph*"
    for p, name in enumerate(result.perturbations):
        ys = mean[p].copy()
        if log_scale:
            ys = np.where(ys > 0, ys, np.nan)
        params = perturbation_params(str(descriptions.get(name, "")))
        label = name.split(":")[0] + (f", {params}" if params else "") + (
            "" if acc is None else f" (accuracy {100 * acc[name]:.1f} %)")
        (line,) = ax.plot(xs, ys, marker=markers[p % len(markers)], ms=5, lw=1.8,
                          label=label)
        if mvl.get(name):
            idx = [result.layers.index(s) for s in mvl[name]]
            ax.scatter(xs[idx], ys[idx], s=150, facecolors="none",
                       edgecolors=line.get_color(), linewidths=1.6, zorder=3)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xticks(xs)
    ticks = [labelled_site(s, None if result.labels is None else result.labels[i])
             for i, s in enumerate(result.layers)]
    rot = 0 if L <= 6 and max(len(s) for s in ticks) <= 12 else 45
    ax.set_xticklabels(ticks, rotation=rot, ha="right" if rot else "center",
                       fontsize=8 if L > 12 else 9)
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel(f"mean {result.measure.replace('_', ' ')} (CM)")
    ax.set_title(title or f"Layer sustainability: {result.measure.replace('_', ' ')} per "
                 "layer\nclean vs perturbed", fontsize=11)
    ax.grid(True, which="major", alpha=0.35)
    if log_scale:
        ax.grid(True, which="minor", alpha=0.12)
    handles, labels = ax.get_legend_handles_labels()
    if eta is not None and any(mvl.values()):
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], ls="none", marker="o", ms=10, mfc="none", mec="0.3"))
        labels.append(f"in MVL (η={eta:g})")
    ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.01, 0.5),
              frameon=False, fontsize=9)
    fig.tight_layout()
    return fig
