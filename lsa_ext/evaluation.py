"""Evaluation: FGSM accuracy over an ε grid, the R&G score, PGD and APGD robust accuracy, and
checks for gradient masking.

The paper (Khalooei et al., arXiv 2202.02626, Tables 2–4) reports a model's accuracy (%) under
FGSM at a grid of ε values including ε = 0 (clean accuracy); its R&G ("robustness and
generalization") score is the plain sum of those accuracies (the last column of each table).
:func:`evaluate` computes that grid and the score; by default also the same grid under PGD-20
(random start) and under random sign noise ±ε, the R&G under PGD (``rg_pgd``) and the masking
flags of :mod:`lsa_ext.masking` (an FGSM-only score cannot tell robustness from a useless
gradient); optionally PGD / APGD robust accuracy at other ε. It returns an
:class:`EvaluationResult` that writes JSON / CSV and prints as a table.

Data may be given as a ``torch.utils.data.DataLoader`` (or any re-iterable of ``(x, y)``
batches; it is read once per attack), a ``Dataset`` yielding ``(x, y)`` pairs, a pair of tensors
``(x, y)``, or a ``DataSplits`` from :func:`lsa_ext.data.load_dataset` (its ``test`` split is
used, and its ``info`` gives the dataset name and data range). The model is moved to ``device``
(``nn.Module.to``, in place) and put in eval mode for the evaluation; its previous train/eval
flags and its parameters' ``requires_grad`` are restored. Its output is read by
:func:`lsa_ext.outputs.logits_of` (``output=``: how to select the logits from a tuple, dict or
object output).
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lsa_ext._version import versions
from lsa_ext.attacks import APGD, PGD
from lsa_ext.batches import batches
from lsa_ext.checks import Clip, check_batch_size, check_clip, check_in_clip_range, check_number
from lsa_ext.devices import resolve_device
from lsa_ext.errors import LsaUserError
from lsa_ext.io import atomic_write_csv, atomic_write_json
from lsa_ext.losses import cross_entropy, predict
from lsa_ext.masking import DEFAULT_TOL, MaskingFlag, format_flags, masking_flags
from lsa_ext.modules import model_mode
from lsa_ext.outputs import OutputSelector, check_selector, logits_of
from lsa_ext.presets import DATA_RANGES, EPS_GRIDS
from lsa_ext.progress import progress
from lsa_ext.types import Perturbation

__all__ = [
    "EPS_GRIDS",
    "EvaluationResult",
    "accuracy",
    "check_settings",
    "evaluate",
    "fgsm_accuracy_grid",
    "format_eps",
    "rg_score",
    "sign_noise_accuracy_grid",
]

log = logging.getLogger("lsa_ext.evaluation")

# EPS_GRIDS (imported from lsa_ext.presets, re-exported here): the paper's FGSM ε grids
# (Tables 2–4) per dataset; digits uses the moons/MNIST grid.


# ----------------------------------------------------------------------------- data handling
def _test_split(data: Any) -> Any:
    """A ``DataSplits``-like object (``.test`` and ``.info``) gives its test split."""
    if hasattr(data, "test") and hasattr(data, "info"):
        return data.test
    return data


def _prepare(
    model: Any, data: Any, batch_size: Any, device: str | torch.device
) -> tuple[torch.device, Iterable, int | None]:
    """Checks the settings, moves ``model`` (an ``nn.Module``) to ``device`` and batches the
    test split of ``data``: ``(device, batches, number_of_batches_or_None)``."""
    batch_size = check_batch_size(batch_size)
    dev = resolve_device(device)
    if isinstance(model, nn.Module):
        model.to(dev)
    return (dev, *batches(_test_split(data), batch_size))


def _batch(xy: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        x, y = xy[0], xy[1]
    except (TypeError, IndexError, KeyError):
        raise LsaUserError("each batch must be a pair (x, y)") from None
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise LsaUserError("each batch must be a pair of tensors (x, y)")
    return x.to(device), y.to(device=device, dtype=torch.long)


def _correct(model: Any, x: torch.Tensor, y: torch.Tensor,
             output: OutputSelector = None) -> torch.Tensor:
    with torch.no_grad():
        logits = logits_of(model(x), output, batch=x.shape[0])
    if not bool(torch.isfinite(logits).all()):
        raise LsaUserError("the model produced NaN/Inf logits during evaluation")
    return (predict(logits) == y).sum()


def _check_grid(eps_grid: Any) -> tuple[float, ...]:
    if isinstance(eps_grid, (str, bytes)) or not isinstance(eps_grid, Iterable):
        raise LsaUserError(f"eps_grid must be a sequence of numbers, got {eps_grid!r}")
    grid = [check_number("eps", e) for e in eps_grid]
    if not grid:
        raise LsaUserError("eps_grid is empty")
    if len(set(grid)) != len(grid):
        raise LsaUserError(f"eps_grid has duplicate values: {grid}")
    return tuple(grid)


# ----------------------------------------------------------------------------- metrics
def accuracy(
    model: Callable[[torch.Tensor], torch.Tensor],
    dataset_or_loader: Any,
    *,
    perturb: Perturbation | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    desc: str = "accuracy",
    output: OutputSelector = None,
) -> float:
    """Accuracy in percent of ``model`` on the data, optionally on ``perturb(x, y)`` inputs.

    ``perturb`` is any callable ``(x, y) -> x̂`` (an attack from :mod:`lsa_ext.attacks`, a noise,
    another library's attack object). The model is in eval mode throughout (restored afterwards).
    ``output``: logits selector (:func:`lsa_ext.outputs.logits_of`; default: a tensor, a dict's
    ``"logits"`` or an object's ``.logits``).

    Raises:
        LsaUserError: bad batch size or device, empty data, NaN/Inf logits, or a model output
            that holds no logits (the message names its type).
    """
    output = check_selector(output)
    device, data, total = _prepare(model, dataset_or_loader, batch_size, device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    n = 0
    with model_mode(model, "eval"):
        for xy in progress(data, desc=desc, total=total):
            x, y = _batch(xy, device)
            if perturb is not None:
                x = perturb(x, y)
            correct += _correct(model, x, y, output)
            n += y.shape[0]
    if n == 0:
        raise LsaUserError("the evaluation data is empty")
    return 100.0 * int(correct) / n


def fgsm_accuracy_grid(
    model: Callable[[torch.Tensor], torch.Tensor],
    data: Any,
    eps_grid: Sequence[float],
    *,
    clip: tuple[float, float] | None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    output: OutputSelector = None,
) -> dict[float, float]:
    """FGSM accuracy (%) at each ε of ``eps_grid``: ``{eps: accuracy}`` in grid order.

    One gradient per batch serves the whole grid (FGSM's direction ``sign(∇ₓ CE)`` at the clean
    point does not depend on ε), so the result equals ``accuracy(model, data,
    perturb=FGSM(model, eps, clip=clip))`` for each ε at the cost of one backward pass per batch.
    ``clip``: the data range ``(lo, hi)`` or ``None`` (two-moons); ε = 0 is clean accuracy.
    ``output``: logits selector (:func:`lsa_ext.outputs.logits_of`).
    """
    return _fgsm_grid(model, data, eps_grid, clip, batch_size, device, output)[0]


def _gradient_sign(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   y: torch.Tensor, output: OutputSelector = None) -> torch.Tensor:
    """FGSM's direction ``sign(∇ₓ CE(model(x), y))`` (``output``: the logits selector)."""
    with torch.enable_grad():
        x_req = x.detach().requires_grad_(True)
        logits = logits_of(model(x_req), output, batch=x.shape[0])
        loss = cross_entropy(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_req)
    return grad.sign()


def _fgsm_grid(model, data, eps_grid, clip, batch_size, device,
               output: OutputSelector = None) -> tuple[dict[float, float], int]:
    return _step_grid(model, data, eps_grid, clip, batch_size, device,
                      lambda x, y: _gradient_sign(model, x, y, output), "FGSM grid", output)


def sign_noise_accuracy_grid(
    model: Callable[[torch.Tensor], torch.Tensor],
    data: Any,
    eps_grid: Sequence[float],
    *,
    clip: tuple[float, float] | None,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    output: OutputSelector = None,
) -> dict[float, float]:
    """Accuracy (%) under random sign noise ``clip(x + ε·s)`` at each ε of ``eps_grid``.

    ``s`` is uniform on ``{−1, +1}`` per element (a random corner of the L∞ ball: FGSM's step
    size with a random direction), drawn once per batch from a ``torch.Generator`` seeded with
    ``seed`` (on the CPU, so the draw does not depend on the device) and shared by every ε.
    The baseline an attack must beat (:mod:`lsa_ext.masking`). ``output``: logits selector
    (:func:`lsa_ext.outputs.logits_of`).
    """
    gen = torch.Generator().manual_seed(int(seed))

    def direction(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bits = torch.randint(0, 2, x.shape, generator=gen, dtype=torch.int8)
        return (2 * bits - 1).to(device=x.device, dtype=x.dtype)

    return _step_grid(model, data, eps_grid, clip, batch_size, device, direction,
                      "noise grid", output)[0]


def _step_grid(model, data, eps_grid, clip, batch_size, device,
               direction_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               desc: str, output: OutputSelector = None) -> tuple[dict[float, float], int]:
    """Accuracy (%) at ``clip(x + ε·direction_of(x, y))`` for each ε (one direction per batch,
    shared by the grid), and the number of samples."""
    grid = _check_grid(eps_grid)
    clip = check_clip(clip)
    output = check_selector(output)
    device, data, total = _prepare(model, data, batch_size, device)
    correct = torch.zeros(len(grid), dtype=torch.long, device=device)
    n = 0
    with model_mode(model, "eval"):
        for xy in progress(data, desc=desc, total=total):
            x, y = _batch(xy, device)
            check_in_clip_range(x, clip)
            direction = direction_of(x, y) if any(e > 0 for e in grid) else None
            for i, eps in enumerate(grid):
                if eps == 0:
                    x_adv = x
                else:
                    x_adv = x + eps * direction
                    if clip is not None:
                        x_adv = x_adv.clamp(clip[0], clip[1])
                correct[i] += _correct(model, x_adv, y, output)
            n += y.shape[0]
    if n == 0:
        raise LsaUserError("the evaluation data is empty")
    counts = correct.tolist()
    return {eps: 100.0 * c / n for eps, c in zip(grid, counts, strict=True)}, n


def rg_score(acc_by_eps: Mapping[float, float] | Sequence[float]) -> float:
    """The paper's robustness-and-generalization score: the sum of the accuracies (%)."""
    values = acc_by_eps.values() if isinstance(acc_by_eps, Mapping) else acc_by_eps
    return float(sum(float(v) for v in values))


# ----------------------------------------------------------------------------- result
def format_eps(eps: float) -> str:
    """ε as written in tables, file and column names: ``0``, ``0.1``, ``0.0313725`` (``%g``)."""
    return f"{eps:g}"


@dataclass
class EvaluationResult:
    """Outcome of :func:`evaluate`. Accuracies are percentages.

    Attributes:
        dataset: dataset name or None. n_samples: number of evaluated samples.
        fgsm: ``{eps: accuracy}`` over the grid. rg: R&G score (sum of ``fgsm``).
        clean: clean accuracy. pgd / apgd: ``{eps: accuracy}`` (empty when not run; with the
            masking checks ``pgd`` holds every ε > 0 of the grid).
        noise: ``{eps: accuracy}`` under random sign noise ±ε over the grid (masking checks).
        rg_pgd: R&G under PGD: the sum over the grid, as :attr:`rg` — the clean accuracy at
            ε = 0 (when the grid holds 0), the PGD accuracy at each ε > 0 (None without the
            masking checks).
        masking: the raised :class:`~lsa_ext.masking.MaskingFlag` s (empty: none, or not run).
        config: the settings used (clip, steps, batch size, device, seed, versions).
    """

    dataset: str | None
    n_samples: int
    fgsm: dict[float, float]
    rg: float
    clean: float
    pgd: dict[float, float] = field(default_factory=dict)
    apgd: dict[float, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    noise: dict[float, float] = field(default_factory=dict)
    rg_pgd: float | None = None
    masking: list[MaskingFlag] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"dataset", "n_samples", "clean_accuracy", "fgsm": [{"eps",
        "accuracy"}], "rg_score", "pgd": [...], "apgd": [...], "noise": [...], "rg_pgd",
        "masking_flags": [{"flag", "eps"}], "config"}``."""

        def rows(d: dict[float, float]) -> list[dict[str, float]]:
            return [{"eps": e, "accuracy": a} for e, a in d.items()]

        return {
            "dataset": self.dataset,
            "n_samples": self.n_samples,
            "clean_accuracy": self.clean,
            "fgsm": rows(self.fgsm),
            "rg_score": self.rg,
            "pgd": rows(self.pgd),
            "apgd": rows(self.apgd),
            "noise": rows(self.noise),
            "rg_pgd": self.rg_pgd,
            "masking_flags": [f.to_dict() for f in self.masking],
            "config": dict(self.config),
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> EvaluationResult:
        """Inverse of :meth:`to_dict` (e.g. to read back a written ``eval.json``)."""
        try:
            def table(key: str) -> dict[float, float]:
                return {float(r["eps"]): float(r["accuracy"]) for r in doc.get(key, [])}

            return cls(
                dataset=doc.get("dataset"),
                n_samples=int(doc["n_samples"]),
                fgsm=table("fgsm"),
                rg=float(doc["rg_score"]),
                clean=float(doc["clean_accuracy"]),
                pgd=table("pgd"),
                apgd=table("apgd"),
                config=dict(doc.get("config", {})),
                noise=table("noise"),
                rg_pgd=None if doc.get("rg_pgd") is None else float(doc["rg_pgd"]),
                masking=[MaskingFlag(str(f["flag"]), tuple(float(e) for e in f["eps"]))
                         for f in doc.get("masking_flags", [])],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LsaUserError(f"not an evaluation result: {exc!r}") from None

    def to_json(self, path: str) -> None:
        """Writes :meth:`to_dict` as JSON to ``path`` (atomically)."""
        atomic_write_json(path, self.to_dict())

    def csv_rows(self) -> list[dict[str, Any]]:
        """Rows ``{metric, eps, steps, value}``: one per FGSM ε, one ``rg_score``, PGD, APGD,
        and with the masking checks: noise accuracy per ε, ``rg_pgd`` and ``masking_flags``
        (value: the flag names ``;``-separated, empty for none)."""
        out: list[dict[str, Any]] = [
            {"metric": "fgsm_accuracy", "eps": e, "steps": 1, "value": a}
            for e, a in self.fgsm.items()
        ]
        out.append({"metric": "rg_score", "eps": "", "steps": "", "value": self.rg})
        for name, d in (("pgd", self.pgd), ("apgd", self.apgd), ("noise", self.noise)):
            steps = self.config.get(f"{name}_steps", "")
            out += [
                {"metric": f"{name}_accuracy", "eps": e, "steps": steps, "value": a}
                for e, a in d.items()
            ]
        if self.rg_pgd is not None:
            out.append({"metric": "rg_pgd", "eps": "", "steps": self.config.get("pgd_steps", ""),
                        "value": self.rg_pgd})
            out.append({"metric": "masking_flags", "eps": "", "steps": "",
                        "value": format_flags(self.masking)})
        return out

    def to_csv(self, path: str) -> None:
        """Writes :meth:`csv_rows` as CSV (header ``metric,eps,steps,value``) atomically."""
        atomic_write_csv(path, self.csv_rows(), ["metric", "eps", "steps", "value"])

    def table(self) -> str:
        """A text table in the paper's layout: ε columns, then R&G (FGSM; with the masking
        checks also PGD's, whose ε = 0 column is the clean accuracy).

        One row per attack run (FGSM, then PGD-<steps>, APGD-CE-<steps> and the sign noise when
        evaluated), then the masking flags; ``-`` marks an ε at which an attack was not run.
        """
        name = self.dataset or "data"
        eps_all = sorted(set(self.fgsm) | set(self.pgd) | set(self.apgd))
        rows: list[tuple[str, dict[float, float], str]] = [
            ("FGSM", self.fgsm, f"{self.rg:.2f}")
        ]
        if self.rg_pgd is not None:  # masking checks: PGD over the grid, with its R&G
            rows.append((f"PGD-{self.config.get('pgd_steps', '?')}",
                         {**({0.0: self.clean} if 0.0 in self.fgsm else {}), **self.pgd},
                         f"{self.rg_pgd:.2f}"))
        elif self.pgd:
            rows.append((f"PGD-{self.config.get('pgd_steps', '?')}", self.pgd, ""))
        if self.apgd:
            rows.append((f"APGD-CE-{self.config.get('apgd_steps', '?')}", self.apgd, ""))
        if self.noise:
            rows.append(("noise ±eps", self.noise, ""))
        head = ["accuracy %"] + [format_eps(e) for e in eps_all] + ["R&G"]
        body = [
            [label] + [f"{d[e]:.2f}" if e in d else "-" for e in eps_all] + [rg]
            for label, d, rg in rows
        ]
        widths = [max(len(r[c]) for r in [head, *body]) for c in range(len(head))]

        def fmt(r: list[str]) -> str:
            first = r[0].ljust(widths[0])
            rest = [v.rjust(w) for v, w in zip(r[1:], widths[1:], strict=True)]
            return "  ".join([first, *rest]).rstrip()

        norm = self.config.get("norm", "Linf")
        title = f"Accuracy (%) on {name}, {self.n_samples} samples, {norm} attacks; eps columns"
        lines = [title, fmt(head), *(fmt(r) for r in body)]
        if self.rg_pgd is not None:
            tol = self.config.get("masking_tol", DEFAULT_TOL)
            lines.append("masking flags (tolerance " + f"{tol:g} points): "
                         + (", ".join(str(f) for f in self.masking) or "none"))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- evaluate
def _dataset_name(data: Any, dataset: str | None) -> str | None:
    if dataset is not None:
        if not isinstance(dataset, str):
            raise LsaUserError(f"dataset must be a name, got {dataset!r}")
        return dataset
    info = getattr(data, "info", None)
    return getattr(info, "name", None)


def _resolve_clip(data: Any, dataset: str | None, clip: Any) -> Clip:
    """``clip``, or for ``"auto"`` ``data.info.data_range``, else the dataset's preset range."""
    if not (isinstance(clip, str) and clip == "auto"):
        return check_clip(clip)
    info = getattr(data, "info", None)
    if info is not None and hasattr(info, "data_range"):
        return check_clip(info.data_range)
    if dataset in DATA_RANGES:
        return DATA_RANGES[dataset]
    raise LsaUserError(
        "cannot infer the data range: pass clip=(lo, hi) or clip=None, or a known dataset name "
        f"({', '.join(DATA_RANGES)})"
    )


def _eps_list(value: Any) -> tuple[float, ...]:
    if value is None:
        return ()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = (value,)
    return _check_grid(value) if value else ()


def _default_grid(dataset: str | None) -> tuple[float, ...]:
    if dataset not in EPS_GRIDS:
        raise LsaUserError(f"no default eps grid for dataset {dataset!r}; pass eps_grid= or one "
                           f"of {', '.join(EPS_GRIDS)}")
    return EPS_GRIDS[dataset]


def _robust_accuracy(
    model: Callable[[torch.Tensor], torch.Tensor], test: Any, attack: type[PGD] | type[APGD],
    eps_list: tuple[float, ...], steps: int, *, clip: Clip, seed: int, batch_size: int,
    device: str | torch.device, output: OutputSelector,
) -> dict[float, float]:
    """``{eps: accuracy under attack(model, eps, steps=steps)}`` (PGD or APGD) for each ε.

    Every attack is built (and so checked) before the first one runs."""
    attacks = {eps: attack(model, eps, steps=steps, clip=clip, seed=seed, output=output)
               for eps in eps_list}
    return {eps: accuracy(model, test, batch_size=batch_size, device=device, perturb=atk,
                          desc=f"{attack.name.upper()}-{steps} eps={format_eps(eps)}",
                          output=output)
            for eps, atk in attacks.items()}


def _settings(model, data, dataset, eps_grid, clip, pgd_eps, apgd_eps, pgd_steps, apgd_steps,
              batch_size, device, seed, output, masking_checks, masking_tol):
    """:func:`evaluate`'s checked settings: ``(dataset name, FGSM grid, clip, PGD ε list, APGD
    ε list, batch size, output selector, masking tolerance)``; with ``masking_checks`` the PGD
    list includes every ε > 0 of the grid. ``data`` may be None (only its ``info`` is read)."""
    name = _dataset_name(data, dataset)
    grid = _check_grid(_default_grid(name) if eps_grid is None else eps_grid)
    clip_range = _resolve_clip(data, name, clip)
    pgd_list = _eps_list(pgd_eps)
    apgd_list = _eps_list(apgd_eps)
    if masking_checks:
        masking_tol = check_number("masking_tol", masking_tol)
        pgd_list = tuple(sorted(set(pgd_list) | {e for e in grid if e > 0}))
    batch_size = check_batch_size(batch_size)
    output = check_selector(output)
    resolve_device(device)
    # the PGD/APGD settings fail here, not after the FGSM grid has run
    for cls, eps_list, steps in ((PGD, pgd_list, pgd_steps), (APGD, apgd_list, apgd_steps)):
        for eps in eps_list:
            cls(model, eps, steps=steps, clip=clip_range, seed=seed, output=output)
    return name, grid, clip_range, pgd_list, apgd_list, batch_size, output, masking_tol


def check_settings(
    model: Callable[[torch.Tensor], torch.Tensor],
    *,
    dataset: str | None = None,
    eps_grid: Sequence[float] | None = None,
    clip: tuple[float, float] | None | str = "auto",
    pgd_eps: float | Sequence[float] | None = None,
    apgd_eps: float | Sequence[float] | None = None,
    pgd_steps: int = 20,
    apgd_steps: int = 100,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    output: OutputSelector = None,
    masking_checks: bool = True,
    masking_tol: float = DEFAULT_TOL,
) -> None:
    """Checks :func:`evaluate`'s settings (same arguments, no data) without running anything,
    e.g. before the data is loaded; ``clip="auto"`` takes the range of ``dataset``.

    Raises:
        LsaUserError: the first bad setting, worded as :func:`evaluate` words it.
    """
    _settings(model, None, dataset, eps_grid, clip, pgd_eps, apgd_eps, pgd_steps, apgd_steps,
              batch_size, device, seed, output, masking_checks, masking_tol)


def evaluate(  # long: the public docstring is most of it; the body delegates to helpers
    model: Callable[[torch.Tensor], torch.Tensor],
    data: Any,
    *,
    dataset: str | None = None,
    eps_grid: Sequence[float] | None = None,
    clip: tuple[float, float] | None | str = "auto",
    pgd_eps: float | Sequence[float] | None = None,
    apgd_eps: float | Sequence[float] | None = None,
    pgd_steps: int = 20,
    apgd_steps: int = 100,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    output: OutputSelector = None,
    masking_checks: bool = True,
    masking_tol: float = DEFAULT_TOL,
) -> EvaluationResult:
    """FGSM accuracy over an ε grid, R&G score, PGD R&G and masking flags, and optional PGD /
    APGD-CE robust accuracy.

    Args:
        model: classifier returning logits ``[B, K]`` or ``[B, 1]`` (binary).
        data: test data (see module docstring); a ``DataSplits`` also supplies ``dataset`` and
            ``clip``.
        dataset: name used to pick the default grid (:data:`EPS_GRIDS`) and data range.
        eps_grid: FGSM ε values (default: the paper's grid for ``dataset``).
        clip: ``"auto"`` (from ``data.info.data_range`` or the dataset name: ``None`` for moons,
            ``(0, 1)`` for images), ``None`` or ``(lo, hi)``.
        pgd_eps / apgd_eps: ε (or several) at which to report PGD / APGD robust accuracy;
            ``None`` skips them. PGD is L∞ with ``pgd_steps`` steps (default 20), step
            ``2.5·ε/steps`` and a random start; APGD-CE uses ``apgd_steps`` (default 100) and one
            restart (Croce & Hein's defaults).
        batch_size, device: evaluation batch size and device (the model is moved there).
        seed: seed of the PGD / APGD random starts and of the sign noise.
        output: logits selector (:func:`lsa_ext.outputs.logits_of`; default: a tensor, a
            dict's ``"logits"`` or an object's ``.logits``).
        masking_checks: also run PGD (``pgd_steps``) at every ε > 0 of the grid and random
            sign noise ±ε over the grid, and report ``rg_pgd`` and the masking flags
            (:func:`lsa_ext.masking.masking_flags`; default True: about ``pgd_steps`` times
            the cost of the FGSM grid).
        masking_tol: percentage points a masking check must exceed (default 0.5).

    Raises:
        LsaUserError: unknown dataset without ``eps_grid`` / ``clip``, bad ε, steps, seed,
            batch size, device or ``output`` (all checked before any data is read), empty
            data, NaN, a model output that holds no logits.
    """
    name, grid, clip_range, pgd_list, apgd_list, batch_size, output, masking_tol = _settings(
        model, data, dataset, eps_grid, clip, pgd_eps, apgd_eps, pgd_steps, apgd_steps,
        batch_size, device, seed, output, masking_checks, masking_tol)
    test = _test_split(data)

    fgsm, n = _fgsm_grid(model, test, grid, clip_range, batch_size, device, output)
    clean = fgsm[0.0] if 0.0 in fgsm else accuracy(
        model, test, batch_size=batch_size, device=device, desc="clean", output=output
    )
    common = {"clip": clip_range, "seed": seed, "batch_size": batch_size, "device": device,
              "output": output}
    pgd = _robust_accuracy(model, test, PGD, pgd_list, pgd_steps, **common)
    apgd = _robust_accuracy(model, test, APGD, apgd_list, apgd_steps, **common)
    noise: dict[float, float] = {}
    rg_pgd = None
    flags: list[MaskingFlag] = []
    if masking_checks:
        noise = sign_noise_accuracy_grid(model, test, grid, clip=clip_range, seed=seed,
                                         batch_size=batch_size, device=device, output=output)
        # the same sum over the grid as the FGSM R&G: ε = 0 (when in the grid) is the clean
        # accuracy, as for FGSM; a grid without 0 has no clean term in either
        rg_pgd = rg_score([clean if e == 0 else pgd[e] for e in grid])
        flags = masking_flags(fgsm, {e: pgd[e] for e in grid if e > 0}, noise, masking_tol)
    config = {
        "eps_grid": list(grid),
        "clip": None if clip_range is None else list(clip_range),
        "norm": "Linf",
        "pgd_steps": pgd_steps,
        "pgd_alpha": "2.5*eps/steps",
        "pgd_random_start": True,
        "apgd_steps": apgd_steps,
        "apgd_restarts": 1,
        "masking_checks": bool(masking_checks),
        "masking_tol": masking_tol if masking_checks else None,
        "noise": "sign" if masking_checks else None,
        "batch_size": batch_size,
        "device": str(device),
        "seed": seed,
        "versions": versions(),
    }
    result = EvaluationResult(
        dataset=name, n_samples=n, fgsm=fgsm, rg=rg_score(fgsm), clean=clean,
        pgd=pgd, apgd=apgd, config=config, noise=noise, rg_pgd=rg_pgd, masking=flags,
    )
    log.debug("evaluation on %s: R&G %.2f, clean %.2f%%", name, result.rg, result.clean)
    if flags:
        log.warning("possible gradient masking on %s: %s", name, ", ".join(map(str, flags)))
    return result
