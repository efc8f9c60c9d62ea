"""Figures of ``lsa reproduce``: R&G per training run beside the paper's (Fig. 6 of arXiv
2202.02626) and two-moons decision boundaries (Fig. 7). Each figure is a
``matplotlib.figure.Figure`` on its own Agg canvas (no pyplot, no global backend), written
atomically as PNG.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lsa_ext.evaluation import format_eps
from lsa_ext.io import atomic_write_with
from lsa_ext.losses import log_probs
from lsa_ext.paper import PAPER, PAPER_TABLE

_COLORS = {"none": "#7f7f7f", "fgsm": "#1f77b4", "pgd": "#d62728", "trades": "#2ca02c",
           "fast": "#ff7f0e", "apgd": "#9467bd"}


def _figure(width: float, height: float) -> Any:
    """A ``matplotlib.figure.Figure`` on its own Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_rg(res: Any, path: str | os.PathLike) -> None:
    """Writes :func:`rg_figure` as a PNG."""
    fig = rg_figure(res)
    atomic_write_with(path, lambda fh: fig.savefig(fh, format="png", dpi=120))


def rg_figure(res: Any) -> Any:
    """Bar chart of R&G per training (mean over seeds, std as error bar), like Fig. 6, with the
    paper's R&G (grey dashed outline, no fill) beside ours for the runs the paper reports; the
    R&G under PGD as black diamonds; runs with a masking flag hatched and their labels marked
    †. The y axis starts at 0, so bar heights compare; each bar is labelled with its value."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = res.summary()
    paper = PAPER.get(res.protocol.dataset, {})
    fig = _figure(max(7.0, 0.75 * len(rows) + 2.5), 4.8)
    ax = fig.subplots()
    xs = np.arange(len(rows))
    multi = len(res.seeds) > 1
    w = 0.4
    ours = [r["rg"] for r in rows]
    bars = ax.bar(xs - w / 2, ours, w, yerr=[r["rg_std"] for r in rows] if multi else None,
                  color=[_COLORS.get(r["method"], "#333") for r in rows],
                  edgecolor=["black" if r["lr_layer"] else "none" for r in rows], capsize=2)
    for bar, r in zip(bars, rows, strict=True):
        if r["masking"]:
            bar.set_hatch("///")
    theirs = [(x, sum(paper[r["name"]]), r) for x, r in zip(xs, rows, strict=True)
              if r["name"] in paper]
    if theirs:
        ax.bar([x + w / 2 for x, _, _ in theirs], [v for _, v, _ in theirs], w,
               facecolor="none", edgecolor="0.4", linestyle="--", linewidth=1.0)
    pgd_rows = [(x, r) for x, r in zip(xs, rows, strict=True) if r["rg_pgd"] is not None]
    if pgd_rows:
        ax.errorbar([x - w / 2 for x, _ in pgd_rows], [r["rg_pgd"] for _, r in pgd_rows],
                    yerr=[r["rg_pgd_std"] for _, r in pgd_rows] if multi else None,
                    fmt="D", color="black", ms=4, capsize=2, lw=0.8)
    top = max(ours + [v for _, v, _ in theirs] + [r["rg_pgd"] for _, r in pgd_rows])
    for x, v in zip(xs - w / 2, ours, strict=True):
        ax.text(x, v + top * 0.01, f"{v:.0f}", ha="center", va="bottom", fontsize=6.5)
    for x, v, _ in theirs:
        ax.text(x + w / 2, v + top * 0.01, f"{v:.0f}", ha="center", va="bottom", fontsize=6.5,
                color="0.35")
    ax.set_ylim(0, top * 1.25)  # room for the value labels and the legend above the bars
    ax.set_xticks(xs, [r["name"].replace("AT-", "") + (" †" if r["masking"] else "")
                       for r in rows], rotation=60, ha="right", fontsize=8)
    grid = res.protocol.eval_eps
    ax.set_ylabel(f"R&G: sum of FGSM accuracies (%)\nover ε = "
                  f"{', '.join(map(format_eps, grid))}",
                  fontsize=9)
    seeds = f"{len(res.seeds)} seed{'s' if multi else ''}"
    ax.set_title(f"R&G on {res.protocol.dataset} (max {100 * len(grid)}): here "
                 f"({seeds}) and in the paper", fontsize=10)
    handles = [Patch(facecolor="0.55", label=f"here (mean of {seeds}, ± std)" if multi
                     else "here"),
               Patch(facecolor="none", edgecolor="0.4", linestyle="--",
                     label=f"paper ({PAPER_TABLE.get(res.protocol.dataset, 'its table')})"),
               Patch(facecolor="white", edgecolor="black", label="with LR (black edge)")]
    if pgd_rows:
        handles.append(Line2D([], [], marker="D", color="black", ms=4, linestyle="none",
                              label=f"R&G under PGD-{res.protocol.pgd_steps}"))
    if any(r["masking"] for r in rows):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///",
                             label="† masking flag raised"))
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
