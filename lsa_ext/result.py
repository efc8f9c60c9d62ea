"""The outcome of an analysis: :class:`AnalysisResult`, its tables, MVL and writers, and
:func:`load_result`, the one reader of ``report.json``.

Khalooei et al. (arXiv 2202.02626): Algorithm 2 yields per (perturbation, layer) CM statistics;
Algorithm 1 (:mod:`lsa_ext.mvl`) turns them into the most vulnerable layers (MVL). The writers
(JSON, CSV, plain-text table, figure) live in :mod:`lsa_ext.report`; this module only calls them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lsa_ext import mvl as _mvl
from lsa_ext import report
from lsa_ext.cm_stats import CMStats
from lsa_ext.errors import LsaUserError


@dataclass
class AnalysisResult:
    """Outcome of :func:`lsa_ext.analysis.analyze`.

    Attributes:
        layers: probed sites (qualified module names, execution order).
        perturbations: perturbation names, in the order given.
        stats: :class:`CMStats` ``[P, L]`` (CPU, float64).
        measure: measure name.
        config: JSON-serialisable settings (model, data, perturbation descriptions, seed, ...).
        labels: the short label of each site, aligned with ``layers``
            (:func:`lsa_ext.probes.site_labels`): ``A<k>`` for the k-th activation site of a
            forward, ``L<k>`` (``L<k>#j``) for the k-th learnable layer (its j-th call), the
            site itself otherwise — what ``--layers`` / ``--lr-layers`` take. None when not
            known (a result built without them, a report of schema 1 or 1.1).
        eta: the MVL cut-off η that :meth:`mvl`, :meth:`mvl_detail`, :meth:`format_table`,
            :meth:`to_dict`, :meth:`to_json` and :meth:`to_csv` use when given none: the
            report's own η for a result read by :func:`load_result`, else
            :data:`lsa_ext.mvl.DEFAULT_ETA` (1.0).
    """

    layers: list[str]
    perturbations: list[str]
    stats: CMStats
    measure: str = "relative_error"
    config: dict[str, Any] = field(default_factory=dict)
    labels: list[str] | None = None
    eta: float = _mvl.DEFAULT_ETA

    def _eta(self, eta: float | None) -> float:
        return self.eta if eta is None else eta

    @classmethod
    def from_stats(
        cls,
        layers: Sequence[str],
        perturbations: Sequence[str],
        stats: CMStats,
        measure: str = "relative_error",
        config: Mapping[str, Any] | None = None,
        labels: Sequence[str] | None = None,
    ) -> AnalysisResult:
        """Builds a result from (possibly all-reduced) statistics; ``labels``: one per layer
        (:attr:`labels`), or None.

        Raises:
            LsaUserError: the statistics' shape or the number of labels does not match.
        """
        stats = stats.to("cpu")
        if tuple(stats.count.shape) != (len(perturbations), len(layers)):
            raise LsaUserError(
                f"statistics of shape {tuple(stats.count.shape)} do not match "
                f"{len(perturbations)} perturbations x {len(layers)} layers"
            )
        if labels is not None and len(labels) != len(layers):
            raise LsaUserError(f"{len(labels)} site labels for {len(layers)} layers")
        return cls(list(layers), list(perturbations), stats, measure, dict(config or {}),
                   None if labels is None else [str(x) for x in labels])

    # ---- tables
    @property
    def mean(self) -> np.ndarray:
        """Mean CM ``[P, L]`` (float64)."""
        return self.stats.mean.numpy()

    @property
    def std(self) -> np.ndarray:
        """Population std of CM over samples ``[P, L]`` (float64)."""
        return self.stats.std.numpy()

    @property
    def count(self) -> np.ndarray:
        """Number of samples ``[P, L]`` (int64)."""
        return self.stats.count.numpy().astype(np.int64)

    @property
    def accuracy_percent(self) -> dict[str, float] | None:
        """:attr:`accuracy` in percent (the unit lsa_ext prints and writes elsewhere)."""
        acc = self.accuracy
        return None if acc is None else {k: 100.0 * v for k, v in acc.items()}

    @property
    def accuracy(self) -> dict[str, float] | None:
        """Classification accuracy as a fraction 0–1 (schema-1 compatible; percent:
        :attr:`accuracy_percent`) ``{"clean": a, perturbation: a, ...}`` on the analysed
        samples (labels as given), or None when the model's output is not logits."""
        acc = self.stats.accuracy()
        if acc is None:
            return None
        return dict(zip(["clean", *self.perturbations], (float(a) for a in acc), strict=True))

    def _p(self, perturbation: str) -> int:
        try:
            return self.perturbations.index(perturbation)
        except ValueError:
            raise LsaUserError(
                f"unknown perturbation {perturbation!r}; have {', '.join(self.perturbations)}"
            ) from None

    def table(self, perturbation: str) -> list[dict[str, Any]]:
        """Rows ``{"layer", "mean", "std", "count"}`` for one perturbation, layer order."""
        p = self._p(perturbation)
        return [
            {"layer": name, "mean": float(self.mean[p, i]), "std": float(self.std[p, i]),
             "count": int(self.count[p, i])}
            for i, name in enumerate(self.layers)
        ]

    # ---- Algorithm 1
    def mvl_detail(self, perturbation: str, eta: float | None = None) -> _mvl.MvlDetail:
        """Algorithm 1 with μ, σ and the threshold, for one perturbation (``eta`` None:
        :attr:`eta`)."""
        return _mvl.mvl_detail(self.stats.row(self._p(perturbation)), self._eta(eta))

    def mvl(
        self, eta: float | None = None, perturbation: str | None = None
    ) -> dict[str, list[str]] | list[str]:
        """MVL (Algorithm 1): layers whose mean CM − μ > η·σ, in layer order.

        Returns ``{perturbation: [layer, ...]}`` for all perturbations, or the list of one
        ``perturbation`` when it is given.
        """
        if perturbation is not None:
            return [self.layers[i] for i in self.mvl_detail(perturbation, eta).layers]
        return {
            name: [self.layers[i] for i in self.mvl_detail(name, eta).layers]
            for name in self.perturbations
        }

    def ranking(self, perturbation: str | None = None) -> dict[str, list[str]] | list[str]:
        """All layers by mean CM, most vulnerable first: ``{perturbation: [...]}``, or the list
        of one ``perturbation`` when it is given."""
        if perturbation is not None:
            return [self.layers[i] for i in _mvl.rank_layers(self.stats.row(self._p(perturbation)))]
        return {
            name: [self.layers[i] for i in _mvl.rank_layers(self.stats.row(p))]
            for p, name in enumerate(self.perturbations)
        }

    # ---- output
    def to_dict(self, eta: float | None = None) -> dict[str, Any]:
        """The report (schema in README, section "report.json")."""
        return report.analysis_report(self, self._eta(eta))

    def to_json(self, path: str | os.PathLike, eta: float | None = None) -> None:
        """Writes :meth:`to_dict` as JSON, atomically."""
        report.write_analysis_json(self, path, self._eta(eta))

    def to_csv(self, path: str | os.PathLike, eta: float | None = None) -> None:
        """Writes one row per (perturbation, layer), atomically."""
        report.write_analysis_csv(self, path, self._eta(eta))

    def plot(
        self, path: str | os.PathLike, eta: float | None = _mvl.DEFAULT_ETA,
        title: str | None = None, log_scale: bool | None = None,
    ) -> None:
        """Writes a PNG like the paper's Fig. 2: mean CM per layer, one line per perturbation.

        MVL layers (for ``eta``; ``None`` to skip) are ringed. ``log_scale=None`` picks a log
        y axis when the values span more than two decades.
        """
        report.plot_analysis(self, path, eta=eta, title=title, log_scale=log_scale)

    def format_table(self, eta: float | None = None) -> str:
        """A plain-text table (layers × perturbations, mean CM) followed by the MVL lists."""
        return report.format_analysis(self, self._eta(eta))


def load_result(path: str | os.PathLike) -> AnalysisResult:
    """Reads a ``report.json`` written by :meth:`AnalysisResult.to_json` / ``lsa analyze``.

    The statistics are rebuilt from the stored mean, std and count (``sum = mean·count``,
    ``sumsq = (std² + mean²)·count``), so ``.mvl()`` and ``.ranking()`` give the report's answers;
    the report's η is the result's :attr:`AnalysisResult.eta`, the default cut-off of ``.mvl()``.
    ``labels`` are the report's ``"labels"`` (schema 1.2); None for schemas 1 and 1.1, which
    did not record them (they are not recounted: the model is not at hand).

    Raises:
        LsaUserError: missing file, invalid JSON or not an analysis report.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            rep = json.load(fh)
    except FileNotFoundError:
        raise LsaUserError(f"report {str(path)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise LsaUserError(f"report {str(path)!r} is not valid JSON: {exc}") from None
    schema = rep.get("schema") if isinstance(rep, dict) else None
    if not (isinstance(schema, str) and (schema == report.SCHEMA_FAMILY
                                         or schema.startswith(report.SCHEMA_FAMILY + "."))):
        raise LsaUserError(
            f"{str(path)!r} is not an LSA analysis report (schema {report.SCHEMA_FAMILY}.x)"
        )
    try:
        layers = list(rep["layers"])
        names = list(rep["perturbations"])
        cols = {k: torch.tensor([[float("nan") if v is None else v
                                  for v in rep["perturbations"][n][k]] for n in names],
                                dtype=torch.float64) for k in ("mean", "std", "count")}
        labels = rep.get("labels")  # 1.2; absent in 1 and 1.1, null when not known
        if labels is not None and not (isinstance(labels, list) and len(labels) == len(layers)
                                       and all(isinstance(x, str) for x in labels)):
            raise ValueError(f"'labels' must be null or {len(layers)} strings, got {labels!r}")
    except (KeyError, TypeError, ValueError) as exc:
        raise LsaUserError(f"report {str(path)!r} is malformed: {exc!r}") from None
    m, sd, c = cols["mean"], cols["std"], cols["count"]
    stats = CMStats(c, m * c, (sd * sd + m * m) * c)
    acc = rep.get("accuracy")  # fraction in every 1.x; 1.1 adds "accuracy_percent"
    if isinstance(rep.get("accuracy_percent"), dict):
        acc = {k: v / 100.0 for k, v in rep["accuracy_percent"].items()}
    if isinstance(acc, dict) and c.numel() and all(k in acc for k in ["clean", *names]):
        n = c[:, 0]
        stats.correct = torch.tensor([acc[k] for k in ["clean", *names]],
                                     dtype=torch.float64) * torch.cat([n[:1], n])
    result = AnalysisResult.from_stats(layers, names, stats, rep.get("measure", "relative_error"),
                                       rep.get("config", {}), labels)
    eta = rep.get("mvl", {}).get("eta") if isinstance(rep.get("mvl"), dict) else None
    if isinstance(eta, (int, float)) and not isinstance(eta, bool) and math.isfinite(eta):
        result.eta = float(eta)  # the report's own cut-off is the default of .mvl() etc.
    return result
