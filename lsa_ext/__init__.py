"""lsa_ext: Layer Sustainability Analysis and layer-wise regularized adversarial training.

Fused ops (C++/CUDA, registered as ``torch.ops.lsa_ext.*``) under a thin Python layer.
"""

from __future__ import annotations

from lsa_ext import attacks, measures, noise, outputs, probes
from lsa_ext._version import __version__
from lsa_ext.analysis import AnalysisResult, analyze
from lsa_ext.data import DatasetInfo, DataSplits, load_dataset
from lsa_ext.evaluation import EvaluationResult, evaluate
from lsa_ext.models import build_model, load_weights
from lsa_ext.ops import (
    backend,
    relative_error,
    relative_error_multi,
    sq_sums,
    sq_sums_multi,
)
from lsa_ext.training import TrainConfig, Trainer, lr_term, train

__all__ = [
    "__version__",
    "AnalysisResult",
    "DataSplits",
    "DatasetInfo",
    "EvaluationResult",
    "analyze",
    "attacks",
    "build_model",
    "evaluate",
    "load_dataset",
    "load_weights",
    "measures",
    "noise",
    "outputs",
    "probes",
    "backend",
    "relative_error",
    "relative_error_multi",
    "sq_sums",
    "sq_sums_multi",
    "Trainer",
    "TrainConfig",
    "lr_term",
    "train",
]
