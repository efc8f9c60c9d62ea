"""Figures a reviewer would accept (issue 13, point 8): rg.png's axis starts at 0 and shows the
paper's R&G beside ours; boundaries.png has axes, a class legend and the accuracy per panel;
lsa.png's legend names each perturbation's parameters. Read from the Figure objects the PNG
writers save."""

from __future__ import annotations

import json

import torch
from torch import nn

from lsa_ext.report import analysis_figure, perturbation_params
from lsa_ext.reproduce import (
    PAPER,
    PROTOCOLS,
    ReproduceResult,
    RunResult,
    boundaries_figure,
    plot_rg,
    rg_figure,
)


def test_rg_axis_from_zero_with_the_papers_values_beside_ours(tmp_path):
    accs = {"Normal": [90.0, 80, 70, 60, 50, 40], "AT-PGD": [85.0, 80, 75, 70, 60, 50],
            "AT-PGD-LR-L0": [84.0, 79, 74, 69, 59, 49]}
    runs = [RunResult(n, "none" if n == "Normal" else "pgd", "L0" if "LR" in n else None, 0, a,
                      sum(a), 1.0) for n, a in accs.items()]
    res = ReproduceResult(PROTOCOLS["moons"], [0], runs, {})
    fig = rg_figure(res)
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0.0
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    ours = [sum(a) for a in accs.values()]
    paper = [sum(PAPER["moons"][n]) for n in ("Normal", "AT-PGD")]  # no paper row for LR-L0
    assert heights == sorted(round(v, 6) for v in ours + paper)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["here", "paper (Table 2, two-moons)", "with LR (black edge)"]
    assert {t.get_text() for t in ax.texts} >= {f"{v:.0f}" for v in ours + paper}
    plot_rg(res, tmp_path / "rg.png")
    assert (tmp_path / "rg.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



def test_rg_flagged_runs_hatched_paper_values_outlined_pgd_as_diamonds():
    """Masking-flagged runs (hatched, †) and the paper's values (grey dashed outline, no fill,
    no hatch) are told apart; the R&G under PGD is one black diamond per run."""
    from matplotlib.colors import to_rgba

    accs = {"Normal": [90.0, 80, 70, 60, 50, 40], "AT-FGSM": [88.0, 86, 84, 82, 80, 78]}
    pgd = {"Normal": [20.0, 10, 5, 0, 0], "AT-FGSM": [1.0, 0, 0, 0, 0]}
    flags = {"Normal": [], "AT-FGSM": ["pgd_above_fgsm@0.1,0.2"]}
    runs = [RunResult(n, "none" if n == "Normal" else "fgsm", None, 0, a, sum(a), 1.0,
                      pgd_accuracies=pgd[n], rg_pgd=a[0] + sum(pgd[n]), masking_flags=flags[n])
            for n, a in accs.items()]
    fig = rg_figure(ReproduceResult(PROTOCOLS["moons"], [0], runs, {}))
    ax = fig.axes[0]
    ours = {round(sum(a), 6): n for n, a in accs.items()}
    paper = {round(sum(PAPER["moons"][n]), 6) for n in accs}
    by_height = {round(p.get_height(), 6): p for p in ax.patches}
    assert set(by_height) == set(ours) | paper
    assert by_height[round(sum(accs["AT-FGSM"]), 6)].get_hatch() == "///"
    assert not by_height[round(sum(accs["Normal"]), 6)].get_hatch()
    for h in paper:
        bar = by_height[h]
        assert not bar.get_hatch() and bar.get_facecolor()[3] == 0.0
        assert bar.get_edgecolor() == to_rgba("0.4") and bar.get_linestyle() == "--"
    (diamonds,) = [line for line in ax.lines if line.get_marker() == "D"]
    assert sorted(diamonds.get_ydata()) == sorted(r.rg_pgd for r in runs)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Normal", "FGSM †"]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["here", "paper (Table 2, two-moons)", "with LR (black edge)",
                      "R&G under PGD-20", "† masking flag raised"]
    assert ax.get_ylim()[0] == 0.0

def test_boundaries_have_axes_class_legend_and_accuracy_per_panel():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.5]])
    test = torch.utils.data.TensorDataset(x, torch.tensor([0, 1, 1]))
    models = {"Normal": nn.Linear(2, 1), "AT-PGD": nn.Linear(2, 1)}
    fig = boundaries_figure(models, test, resolution=20, accuracy={"Normal": 97.0,
                                                                    "AT-PGD": 81.25})
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["Normal\nclean accuracy 97.0 %",
                                                 "AT-PGD\nclean accuracy 81.2 %"]
    assert all(ax.get_xlabel() == "x₁" for ax in panels)
    assert panels[0].get_ylabel() == "x₂"
    assert all(ax.axison for ax in panels)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "class 0", "class 1", "decision boundary (p = 0.5)"]
    assert any(ax.get_ylabel() == "p(class 1)" for ax in fig.axes)  # the colour bar


def test_lsa_legend_names_each_perturbations_parameters(tmp_path):
    from lsa_ext.result import load_result

    assert perturbation_params("PGD(eps=0.1, clip=(0.0, 1.0), alpha=0.025, steps=10)") == \
        "ε=0.1, 10 steps"
    assert perturbation_params("Gaussian(std=0.2, clip=None, seed=0)") == "std=0.2"
    assert perturbation_params("<function blur>") == ""
    table = {"mean": [0.1, 0.3], "std": [0.0, 0.0], "count": [10, 10]}
    rep = {"schema": "lsa_ext.analysis/1.1", "layers": ["a", "b"], "measure": "relative_error",
           "perturbations": {"gaussian": table, "pgd": table, "mine": table},
           "accuracy_percent": {"clean": 90.0, "gaussian": 80.0, "pgd": 12.5, "mine": 50.0},
           "config": {"perturbations": {
               "gaussian": "Gaussian(std=0.1, clip=(0.0, 1.0), seed=0)",
               "pgd": "PGD(eps=0.03, clip=(0.0, 1.0), steps=20)", "mine": "<function mine>"}}}
    (tmp_path / "r.json").write_text(json.dumps(rep))
    fig = analysis_figure(load_result(tmp_path / "r.json"), eta=None)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["gaussian, std=0.1 (accuracy 80.0 %)",
                      "pgd, ε=0.03, 20 steps (accuracy 12.5 %)", "mine (accuracy 50.0 %)"]
