"""Layer Sustainability Analysis (PAPER.md Algorithm 2): per-layer CM of clean vs perturbed inputs.

Pipeline: for each batch ``(x, y)`` of the data and each perturbation ``P``, compute
``x̂ = P(x, y)``, run the model (eval mode, ``torch.no_grad``) on the clean and perturbed inputs,
compare every probed layer's representations with the measure (default: relative error, fused
kernel) per sample, and accumulate per (perturbation, layer) ``count``, ``sum`` and ``sumsq`` of
the per-sample values in float64 (:class:`CMStats`). From those the result gives mean/std tables,
the MVL list per perturbation (Algorithm 1, :mod:`lsa_ext.mvl`) and a ranking of the layers.

Paired capture (``mode``):

* ``"concat"`` (default): the clean chunk and its P perturbed twins are concatenated into one
  batch of ``(P+1)·c`` samples (``c = max(1, forward_batch // (P+1))``) and run in one forward;
  a hook on every probed layer reduces the layer's output at once with the measure on
  ``(out[:c], out[(p+1)c:(p+2)c])`` (for relative error: the fused ``lsa_ext.sq_sums`` kernel)
  and keeps only ``[c]`` numbers. Nothing else is held, so the peak memory is that of one plain
  forward of ``forward_batch`` samples (default: ``batch_size``). Since every value is reduced as
  soon as it is produced, later in-place ops (``ReLU(inplace=True)``) cannot corrupt it. Valid
  only when samples are independent in eval mode, which holds for the usual layers
  (BatchNorm uses running statistics in eval mode).
* ``"two_pass"``: for models whose forward couples the samples of a batch (e.g. a custom layer
  normalising over the batch, or a model that checks its batch size), the clean chunk runs
  alone (each probed output is cloned and kept), then each perturbed chunk runs alone and is
  reduced against the kept clean output. Peak memory: one forward plus the clean outputs of all
  probed layers.

Layers and sites: probes are chosen by ``layers`` (see :func:`lsa_ext.probes.select_layers`) and
reported by qualified module name in the order they run in the forward (first batch); a module
called k times per forward gives the sites ``name``, ``name#2``, …, ``name#k``.

Distributed use: :func:`accumulate` returns ``(sites, CMStats)`` for the batches it was given
(e.g. one rank's shard from a ``DistributedSampler`` loader); sum every tensor of
``stats.tensors()`` (``count``, ``sum``, ``sumsq``, ``correct``) over ranks
(``torch.distributed.all_reduce``) and build the result with :meth:`AnalysisResult.from_stats`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lsa_ext import distributed
from lsa_ext import mvl as _mvl
from lsa_ext.batches import batches
from lsa_ext.devices import resolve_device
from lsa_ext.errors import LsaUserError
from lsa_ext.measures import Measure, MeasureFn, get_measure
from lsa_ext.modules import model_device
from lsa_ext.noise import NOISES
from lsa_ext.probes import Capture, LayerSpec, select_layers
from lsa_ext.progress import progress
from lsa_ext.seeding import batch_seeding
from lsa_ext.types import Perturbation

log = logging.getLogger("lsa_ext.analysis")

MODES = ("concat", "two_pass")
DEFAULT_EPS = 0.1


# =========================================================================== statistics
@dataclass
class CMStats:
    """Sufficient statistics of per-sample CM values, per (perturbation, layer).

    Attributes:
        count, sum, sumsq: float64 tensors ``[P, L]`` (number of samples, Σ CM, Σ CM²), on the
            device where they were accumulated.
        correct: float64 ``[P+1]`` or None: correctly classified samples, clean (index 0) and
            under each perturbation (index p+1); NaN when the model's output is not logits.

    Merging shards is elementwise addition: ``torch.distributed.all_reduce(t, op=SUM)`` on each
    tensor of :meth:`tensors` merges ranks.
    """

    count: torch.Tensor
    sum: torch.Tensor
    sumsq: torch.Tensor
    correct: torch.Tensor | None = None

    @classmethod
    def zeros(cls, num_perturbations: int, num_layers: int, device=None) -> CMStats:
        """All-zero statistics ``[P, L]`` (float64), ``correct`` ``[P+1]`` zeros."""
        z = torch.zeros(num_perturbations, num_layers, dtype=torch.float64, device=device)
        c = torch.zeros(num_perturbations + 1, dtype=torch.float64, device=device)
        return cls(z.clone(), z.clone(), z.clone(), c)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors to sum across shards/ranks (in place), e.g. with ``all_reduce``."""
        out = [self.count, self.sum, self.sumsq]
        return out if self.correct is None else out + [self.correct]

    def update_correct(self, preds: torch.Tensor | None, y: torch.Tensor) -> None:
        """Adds correct predictions ``preds`` ``[P+1, B]`` vs labels ``y`` ``[B]`` (None: NaN)."""
        if self.correct is None:
            return
        if preds is None:
            self.correct.fill_(float("nan"))
            return
        hits = (preds == y.to(preds.device).unsqueeze(0)).sum(dim=1)
        self.correct += hits.to(device=self.correct.device, dtype=torch.float64)

    def update(self, p: int, values: torch.Tensor) -> None:
        """Adds per-sample values ``[L, B]`` of perturbation ``p``."""
        v = values.detach().to(device=self.sum.device, dtype=torch.float64)
        self.count[p] += v.shape[1]
        self.sum[p] += v.sum(dim=1)
        self.sumsq[p] += v.square().sum(dim=1)

    def merge(self, other: CMStats) -> CMStats:
        """Statistics of the union of both sample sets (elementwise sum)."""
        if self.count.shape != other.count.shape:
            raise LsaUserError(
                f"cannot merge CM statistics of shapes {tuple(self.count.shape)} and "
                f"{tuple(other.count.shape)}"
            )
        dev = self.count.device
        correct = None
        if self.correct is not None and other.correct is not None:
            correct = self.correct + other.correct.to(dev)
        return CMStats(
            self.count + other.count.to(dev),
            self.sum + other.sum.to(dev),
            self.sumsq + other.sumsq.to(dev),
            correct,
        )

    def to(self, device) -> CMStats:
        correct = None if self.correct is None else self.correct.to(device)
        return CMStats(self.count.to(device), self.sum.to(device), self.sumsq.to(device), correct)

    def row(self, p: int) -> CMStats:
        """Statistics ``[L]`` of perturbation ``p`` (input form accepted by :mod:`lsa_ext.mvl`)."""
        return CMStats(self.count[p], self.sum[p], self.sumsq[p])

    def accuracy(self) -> torch.Tensor | None:
        """Accuracy ``[P+1]`` (clean first), or None when not recorded / not logits."""
        if self.correct is None or self.count.numel() == 0:
            return None
        n = self.count[:, 0]
        acc = self.correct / torch.cat([n[:1], n])
        return None if bool(torch.isnan(acc).any()) else acc

    @property
    def mean(self) -> torch.Tensor:
        """Mean CM per (perturbation, layer); NaN where count is 0."""
        return self.sum / self.count

    @property
    def std(self) -> torch.Tensor:
        """Population standard deviation of CM over samples (divides by count)."""
        m = self.mean
        return (self.sumsq / self.count - m * m).clamp_min(0).sqrt()


# =========================================================================== perturbations
def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text.strip()


def parse_perturbation_specs(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Parses ``"gaussian:std=0.1,fgsm:eps=0.1,pgd:eps=0.1,steps=20,salt"``.

    A token ``name`` or ``name:key=value`` starts a perturbation; a following ``key=value``
    token without ``:`` adds a parameter to the previous one.

    Returns:
        ``[(name, params), ...]`` in order.
    """
    out: list[tuple[str, dict[str, Any]]] = []
    for raw in text.split(","):
        tok = raw.strip()
        if not tok:
            continue
        if ":" in tok or "=" not in tok:
            name, _, rest = tok.partition(":")
            out.append((name.strip().lower(), {}))
            tok = rest.strip()
            if not tok:
                continue
        if not out:
            raise LsaUserError(f"perturbation parameter {tok!r} given before any perturbation name")
        key, sep, value = tok.partition("=")
        if not sep or not key.strip():
            raise LsaUserError(f"malformed perturbation parameter {tok!r}; expected key=value")
        out[-1][1][key.strip()] = _parse_value(value)
    if not out:
        raise LsaUserError("no perturbation given")
    return out


def _attack_names() -> tuple[str, ...]:
    try:
        from lsa_ext import attacks
    except ImportError:  # pragma: no cover - attacks land separately
        return ()
    return tuple(getattr(attacks, "ATTACKS", {}))


def perturbation_names() -> list[str]:
    """Names accepted in perturbation specs: the noises, then the attacks."""
    return list(NOISES) + list(_attack_names())


def build_perturbation(
    name: str,
    params: Mapping[str, Any] | None = None,
    *,
    model: nn.Module | None = None,
    clip: tuple[float, float] | None = None,
    eps: float = DEFAULT_EPS,
    seed: int = 0,
) -> Perturbation:
    """One perturbation from its name and parameters.

    Noises (:data:`lsa_ext.noise.NOISES`) get ``clip`` and ``seed``; attacks
    (:data:`lsa_ext.attacks.ATTACKS`) get ``model``, ``eps`` (unless given in ``params``),
    ``clip`` and ``seed``.

    Raises:
        LsaUserError: unknown name (listing the choices) or bad parameters.
    """
    params = dict(params or {})
    key = name.strip().lower()
    if key in NOISES:
        params.setdefault("clip", clip)
        params.setdefault("seed", seed)
        try:
            return NOISES[key](**params)
        except TypeError as exc:
            raise LsaUserError(f"bad parameters for noise {key!r}: {exc}") from None
    if key in _attack_names():
        from lsa_ext import attacks

        if model is None:
            raise LsaUserError(f"attack {key!r} needs the model")
        eps_value = params.pop("eps", eps)
        if isinstance(eps_value, (int, float)) and eps_value < 0:
            raise LsaUserError(f"eps must be >= 0, got {eps_value} for {key!r}")
        params.setdefault("clip", clip)
        params.setdefault("seed", seed)
        return attacks.build_attack(key, model, eps_value, **params)
    raise LsaUserError(
        f"unknown perturbation {name!r}; choices: {', '.join(perturbation_names())}"
    )


def _label(name: str, params: Mapping[str, Any]) -> str:
    if not params:
        return name
    return name + ":" + ";".join(f"{k}={v}" for k, v in params.items())


def build_perturbations(
    specs: str | Sequence[Any] | Mapping[str, Perturbation],
    *,
    model: nn.Module | None = None,
    clip: tuple[float, float] | None = None,
    eps: float = DEFAULT_EPS,
    seed: int = 0,
) -> dict[str, Perturbation]:
    """Named perturbations from any accepted form.

    Accepted: a dict ``{name: callable}``; a spec string (:func:`parse_perturbation_specs`);
    or a list mixing spec strings, callables ``(x, y) -> x̂`` (named by their ``name``
    attribute or lower-cased class/function name) and ``(name, callable)`` pairs. The i-th
    built-in perturbation gets ``seed + i``. Names are the bare perturbation names, or
    ``name:key=value;...`` when two share a name.
    """
    if isinstance(specs, Mapping):
        items = list(specs.items())
        for n, fn in items:
            if not callable(fn):
                raise LsaUserError(f"perturbation {n!r} is not callable")
        return {str(n): fn for n, fn in items}
    if isinstance(specs, str):
        entries: list[Any] = list(parse_perturbation_specs(specs))
    else:
        entries = []
        for s in specs:
            if isinstance(s, str):
                entries.extend(parse_perturbation_specs(s))
            else:
                entries.append(s)
    if not entries:
        raise LsaUserError("no perturbation given")
    built: list[tuple[str, str, Perturbation]] = []
    for i, e in enumerate(entries):
        if isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str) and callable(e[1]):
            built.append((e[0], e[0], e[1]))
        elif isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str):
            name, params = e
            fn = build_perturbation(name, params, model=model, clip=clip, eps=eps, seed=seed + i)
            built.append((name, _label(name, params), fn))
        elif callable(e):
            n = getattr(e, "name", None)
            if not isinstance(n, str):
                n = getattr(e, "__name__", type(e).__name__).lower()
            built.append((n, n, e))
        else:
            raise LsaUserError(f"cannot use {e!r} as a perturbation")
    short = [b[0] for b in built]
    out: dict[str, Perturbation] = {}
    for (s, long, fn) in built:
        label = s if short.count(s) == 1 else long
        if label in out:
            raise LsaUserError(f"perturbation {label!r} given twice")
        out[label] = fn
    return out


# =========================================================================== paired capture
class _Collector:
    """Hook target: reduces each probed output at once into per-sample values."""

    def __init__(self, measure: Measure, chunk: int, num_perturbed: int, mode: str):
        self.measure = measure
        self.chunk = chunk
        self.num_perturbed = num_perturbed
        self.mode = mode
        self.values: dict[str, list[torch.Tensor]] = {}
        self.order: list[str] = []
        self.clean: dict[str, torch.Tensor] = {}
        self.pass_index = 0  # two_pass: 0 = clean, p+1 = perturbed p

    def _check(self, site: str, t: torch.Tensor, expected: int) -> None:
        if t.dim() == 0 or t.shape[0] != expected:
            raise LsaUserError(
                f"layer {site!r} output has shape {tuple(t.shape)}, expected a batch-first "
                f"output with {expected} samples; LSA needs batch-first layer outputs"
                + (" (try mode='two_pass' if the model mixes samples)"
                   if self.mode == "concat" else "")
            )
        if not t.is_floating_point():
            raise LsaUserError(f"layer {site!r} output is {t.dtype}, not floating point")

    def _measure(self, site: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        v = self.measure(a, b)
        if not isinstance(v, torch.Tensor) or v.shape != (a.shape[0],):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise LsaUserError(
                f"measure {self.measure.name!r} returned {shape} for layer {site!r}; "
                f"expected per-sample values of shape [{a.shape[0]}]"
            )
        return v

    def __call__(self, site: str, t: torch.Tensor) -> None:
        c = self.chunk
        if self.mode == "concat":
            self._check(site, t, (self.num_perturbed + 1) * c)
            a = t[:c]
            vals = [self._measure(site, a, t[(p + 1) * c:(p + 2) * c])
                    for p in range(self.num_perturbed)]
            self._store(site, torch.stack(vals))
        elif self.pass_index == 0:
            self._check(site, t, c)
            self.clean[site] = t.detach().clone()
            self._note(site)
        else:
            self._check(site, t, c)
            a = self.clean.get(site)
            if a is None:
                raise LsaUserError(
                    f"layer {site!r} ran on the perturbed pass but not on the clean one"
                )
            self.values.setdefault(site, []).append(self._measure(site, a, t))
            if self.pass_index == self.num_perturbed:
                del self.clean[site]

    def _note(self, site: str) -> None:
        if site not in self.order:
            self.order.append(site)

    def _store(self, site: str, v: torch.Tensor) -> None:
        self._note(site)
        self.values.setdefault(site, []).append(v)


@torch.no_grad()
def paired_measures(
    model: nn.Module,
    layer_names: Sequence[str],
    x: torch.Tensor,
    x_hats: Sequence[torch.Tensor],
    measure: str | MeasureFn | Measure = "relative_error",
    *,
    mode: str = "concat",
    forward_batch: int | None = None,
    predictions: bool = False,
) -> tuple[list[str], torch.Tensor] | tuple[list[str], torch.Tensor, torch.Tensor | None]:
    """Per-sample CM of every probed site for one clean batch and its perturbed twins.

    Args:
        model: the network (its train/eval mode is used as is; :func:`analyze` sets eval).
        layer_names: qualified module names to probe.
        x: clean inputs ``[B, ...]``; x_hats: P perturbed versions, each like ``x``.
        measure: registry name, :class:`Measure` or callable ``(a, b) -> [B]``.
        mode: ``"concat"`` or ``"two_pass"`` (module docstring).
        forward_batch: most samples per forward (default: ``B·(P+1)`` for concat, i.e. one
            forward; ``B`` for two_pass).
        predictions: also return the model's predicted classes ``[P+1, B]`` (int64; row 0
            clean, row p+1 perturbed p; :func:`lsa_ext.losses.predict` on the output), or None
            when the output is not a ``[N, K]``/``[N, 1]``/``[N]`` tensor.

    Returns:
        ``(sites, values)``: sites in execution order and values ``[P, S, B]`` (float32, or
        float64 for float64 activations); ``(sites, values, preds)`` with ``predictions``.
    """
    if mode not in MODES:
        raise LsaUserError(f"unknown mode {mode!r}; choices: {', '.join(MODES)}")
    meas = get_measure(measure)
    P, B = len(x_hats), x.shape[0]
    if P == 0:
        raise LsaUserError("no perturbed inputs given")
    if forward_batch is None:
        forward_batch = B * (P + 1) if mode == "concat" else B
    if forward_batch < 1:
        raise LsaUserError(f"forward_batch must be >= 1, got {forward_batch}")
    chunk = max(1, forward_batch // (P + 1)) if mode == "concat" else forward_batch
    sites: list[str] | None = None
    parts: list[torch.Tensor] = []
    preds: list[torch.Tensor] | None = [] if predictions else None
    for start in range(0, B, chunk):
        xs = x[start:start + chunk]
        c = xs.shape[0]
        col = _Collector(meas, c, P, mode)
        with Capture(model, layer_names, on_output=col, detach=True) as cap:
            if mode == "concat":
                cap.reset()
                outs = [model(torch.cat([xs] + [xh[start:start + chunk] for xh in x_hats]))]
            else:
                outs = []
                for k, xin in enumerate([xs] + [xh[start:start + chunk] for xh in x_hats]):
                    col.pass_index = k
                    cap.reset()
                    outs.append(model(xin))
        if preds is not None:
            p_chunk = _predictions(outs, P + 1, c)
            preds = None if p_chunk is None else preds + [p_chunk]
        if not col.order:
            raise LsaUserError(
                f"none of the probed layers ran in the forward: {', '.join(layer_names)}"
            )
        if sites is None:
            sites = list(col.order)
        elif col.order != sites:
            raise LsaUserError(
                "the probed layers ran differently from one batch to the next "
                f"({sites} vs {col.order}); LSA needs the same layers on every forward"
            )
        if mode == "concat":
            part = torch.stack([col.values[s][0] for s in sites], dim=1)  # [P, S, c]
        else:
            for s in sites:
                if len(col.values.get(s, [])) != P:
                    raise LsaUserError(f"layer {s!r} did not run on every perturbed pass")
            part = torch.stack([torch.stack(col.values[s]) for s in sites], dim=1)
        parts.append(part)
    assert sites is not None
    values = torch.cat(parts, dim=2)
    if predictions:
        return sites, values, (torch.cat(preds, dim=1) if preds else None)
    return sites, values


def _predictions(outs: list, groups: int, c: int) -> torch.Tensor | None:
    """Predicted classes ``[groups, c]`` from the forward outputs, or None if not logits."""
    from lsa_ext.losses import predict

    if not all(isinstance(o, torch.Tensor) and o.dim() in (1, 2) for o in outs):
        return None
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    if out.shape[0] != groups * c:
        return None
    return predict(out.detach()).reshape(groups, c)


# =========================================================================== data
def _unpack(
    batch: Any, model: nn.Module, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        x, y = batch, None
    elif isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        x, y = batch[0], (batch[1] if len(batch) == 2 else None)
    else:
        raise LsaUserError("each batch must be (x, y) or (x,) tensors")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise LsaUserError("inputs x must be floating point tensors")
    x = x.to(device)
    if y is None:
        from lsa_ext.losses import predict

        with torch.no_grad():
            y = predict(model(x))
    return x, y.to(device)


# =========================================================================== accumulation
def accumulate(
    model: nn.Module,
    batches: Iterable,
    perturbations: Mapping[str, Perturbation],
    layer_names: Sequence[str],
    measure: str | MeasureFn | Measure = "relative_error",
    *,
    device: torch.device | str | None = None,
    mode: str = "concat",
    forward_batch: int | None = None,
    max_samples: int | None = None,
    total: int | None = None,
    progress_enabled: bool | None = None,
    reseed: Callable[[int], None] | None = None,
) -> tuple[list[str], CMStats]:
    """Streams ``batches`` and returns ``(sites, stats)`` (:class:`CMStats` ``[P, L]`` on device).

    The model should already be in eval mode (:func:`analyze` takes care of it). Attacks run with
    gradients enabled; the paired forwards under ``torch.no_grad``.

    ``reseed``: called with the global batch index ``k`` before batch ``k`` is perturbed
    (:func:`lsa_ext.distributed.batch_seeding` makes one), so randomness does not depend on how
    the batches are split over processes.

    Under torchrun (a process group with N > 1 ranks) batch ``k`` is processed by rank
    ``k mod N`` only (every rank reads all batches, nothing is padded) and the statistics are
    summed over the ranks; every rank returns the full result.

    Raises:
        LsaUserError: a perturbation returns a wrong shape, or a CM value is NaN/inf (the message
            names the layer and the perturbation).
    """
    meas = get_measure(measure)
    dev = resolve_device(device) if device is not None else model_device(model)
    names = list(perturbations)
    stats: CMStats | None = None
    sites: list[str] | None = None
    seen = 0
    training = model.training
    warned = False
    rank, world = distributed.rank(), distributed.world_size()
    bar = progress(batches, desc="LSA", total=total, enabled=progress_enabled)
    for bi, batch in enumerate(bar):
        if max_samples is not None and seen >= max_samples:
            break
        if bi % world != rank:  # another rank's batch
            seen += _batch_len(batch)
            continue
        x, y = _unpack(batch, model, dev)
        if max_samples is not None:
            x, y = x[: max_samples - seen], y[: max_samples - seen]
        seen += x.shape[0]
        if reseed is not None:
            reseed(bi)
        x_hats = []
        for name in names:
            xh = perturbations[name](x, y)
            if not isinstance(xh, torch.Tensor) or xh.shape != x.shape:
                shape = tuple(xh.shape) if isinstance(xh, torch.Tensor) else type(xh).__name__
                raise LsaUserError(
                    f"perturbation {name!r} returned {shape}; expected a tensor of shape "
                    f"{tuple(x.shape)}"
                )
            x_hats.append(xh.detach().to(device=x.device, dtype=x.dtype))
            if model.training != training:  # a perturbation that does not restore the mode
                if not warned:
                    log.warning("perturbation %r changed the model's train/eval mode; restored",
                                name)
                    warned = True
                model.train(training)
        s, vals, preds = paired_measures(
            model, layer_names, x, x_hats, meas, mode=mode, forward_batch=forward_batch,
            predictions=True,
        )
        if sites is None:
            sites = s
            stats = CMStats.zeros(len(names), len(sites), device=vals.device)
        elif s != sites:
            raise LsaUserError(
                f"the probed layers ran differently in batch {bi} ({s} vs {sites})"
            )
        bad = ~torch.isfinite(vals)
        if bool(bad.any()):
            p, li, _ = (int(i) for i in bad.nonzero()[0])
            raise LsaUserError(
                f"non-finite {meas.name} (NaN or inf) at layer {sites[li]!r} under perturbation "
                f"{names[p]!r} in batch {bi}: the model produced NaN/inf activations"
            )
        assert stats is not None
        for p in range(len(names)):
            stats.update(p, vals[p])
        stats.update_correct(preds, y)
    if world > 1:  # exact sums over ranks (a rank without batches contributes None)
        sites, stats = distributed.all_reduce_stats((sites, stats))
    if stats is None or sites is None:
        raise LsaUserError("the data is empty: no batch to analyze")
    return sites, stats


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    return int(batch[0].shape[0])


# =========================================================================== result
@dataclass
class AnalysisResult:
    """Outcome of :func:`analyze`.

    Attributes:
        layers: probed sites (qualified module names, execution order).
        perturbations: perturbation names, in the order given.
        stats: :class:`CMStats` ``[P, L]`` (CPU, float64).
        measure: measure name.
        config: JSON-serialisable settings (model, data, perturbation descriptions, seed, ...).
    """

    layers: list[str]
    perturbations: list[str]
    stats: CMStats
    measure: str = "relative_error"
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_stats(
        cls,
        layers: Sequence[str],
        perturbations: Sequence[str],
        stats: CMStats,
        measure: str = "relative_error",
        config: Mapping[str, Any] | None = None,
    ) -> AnalysisResult:
        """Builds a result from (possibly all-reduced) statistics."""
        stats = stats.to("cpu")
        if tuple(stats.count.shape) != (len(perturbations), len(layers)):
            raise LsaUserError(
                f"statistics of shape {tuple(stats.count.shape)} do not match "
                f"{len(perturbations)} perturbations x {len(layers)} layers"
            )
        return cls(list(layers), list(perturbations), stats, measure, dict(config or {}))

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
    def accuracy(self) -> dict[str, float] | None:
        """Classification accuracy ``{"clean": a, perturbation: a, ...}`` on the analysed
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
    def mvl_detail(self, perturbation: str, eta: float = _mvl.DEFAULT_ETA) -> _mvl.MvlDetail:
        """Algorithm 1 with μ, σ and the threshold, for one perturbation."""
        return _mvl.mvl_detail(self.stats.row(self._p(perturbation)), eta)

    def mvl(
        self, eta: float = _mvl.DEFAULT_ETA, perturbation: str | None = None
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
    def to_dict(self, eta: float = _mvl.DEFAULT_ETA) -> dict[str, Any]:
        """The report (schema in README, section "report.json")."""
        from lsa_ext import report

        return report.analysis_report(self, eta)

    def to_json(self, path: str | os.PathLike, eta: float = _mvl.DEFAULT_ETA) -> None:
        """Writes :meth:`to_dict` as JSON, atomically."""
        from lsa_ext import report

        report.write_json(path, self.to_dict(eta))

    def to_csv(self, path: str | os.PathLike, eta: float = _mvl.DEFAULT_ETA) -> None:
        """Writes one row per (perturbation, layer), atomically."""
        from lsa_ext import report

        report.write_analysis_csv(self, path, eta)

    def plot(
        self, path: str | os.PathLike, eta: float | None = _mvl.DEFAULT_ETA,
        title: str | None = None, log_scale: bool | None = None,
    ) -> None:
        """Writes a PNG like the paper's Fig. 2: mean CM per layer, one line per perturbation.

        MVL layers (for ``eta``; ``None`` to skip) are ringed. ``log_scale=None`` picks a log
        y axis when the values span more than two decades.
        """
        from lsa_ext import report

        report.plot_analysis(self, path, eta=eta, title=title, log_scale=log_scale)

    def format_table(self, eta: float = _mvl.DEFAULT_ETA) -> str:
        """A plain-text table (layers × perturbations, mean CM) followed by the MVL lists."""
        from lsa_ext import report

        return report.format_analysis(self, eta)


def load_result(path: str | os.PathLike) -> AnalysisResult:
    """Reads a ``report.json`` written by :meth:`AnalysisResult.to_json` / ``lsa analyze``.

    The statistics are rebuilt from the stored mean, std and count (``sum = mean·count``,
    ``sumsq = (std² + mean²)·count``), so ``.mvl()`` and ``.ranking()`` give the report's answers.

    Raises:
        LsaUserError: missing file, invalid JSON or not an analysis report.
    """
    import json

    from lsa_ext.report import SCHEMA

    try:
        with open(path, encoding="utf-8") as fh:
            rep = json.load(fh)
    except FileNotFoundError:
        raise LsaUserError(f"report {str(path)!r} does not exist") from None
    except (OSError, ValueError) as exc:
        raise LsaUserError(f"report {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(rep, dict) or rep.get("schema") != SCHEMA:
        raise LsaUserError(f"{str(path)!r} is not an LSA analysis report (schema {SCHEMA})")
    try:
        layers = list(rep["layers"])
        names = list(rep["perturbations"])
        cols = {k: torch.tensor([[float("nan") if v is None else v
                                  for v in rep["perturbations"][n][k]] for n in names],
                                dtype=torch.float64) for k in ("mean", "std", "count")}
    except (KeyError, TypeError, ValueError) as exc:
        raise LsaUserError(f"report {str(path)!r} is malformed: {exc!r}") from None
    m, sd, c = cols["mean"], cols["std"], cols["count"]
    stats = CMStats(c, m * c, (sd * sd + m * m) * c)
    acc = rep.get("accuracy")
    if isinstance(acc, dict) and c.numel() and all(k in acc for k in ["clean", *names]):
        n = c[:, 0]
        stats.correct = torch.tensor([acc[k] for k in ["clean", *names]],
                                     dtype=torch.float64) * torch.cat([n[:1], n])
    return AnalysisResult.from_stats(layers, names, stats, rep.get("measure", "relative_error"),
                                     rep.get("config", {}))


# =========================================================================== entry point
def analyze(
    model: nn.Module,
    data: Any,
    perturbations: str | Sequence[Any] | Mapping[str, Perturbation],
    *,
    layers: LayerSpec = "activations",
    measure: str | MeasureFn | Measure = "relative_error",
    batch_size: int = 128,
    device: torch.device | str | None = None,
    seed: int = 0,
    clip: tuple[float, float] | None = None,
    eps: float = DEFAULT_EPS,
    mode: str = "concat",
    forward_batch: int | None = None,
    max_samples: int | None = None,
    sampler: Any = None,
    progress: bool | None = None,
    config: Mapping[str, Any] | None = None,
) -> AnalysisResult:
    """Layer Sustainability Analysis of ``model`` on ``data`` under ``perturbations``.

    Args:
        model: any ``nn.Module`` returning logits; run in eval mode (restored afterwards) and
            moved to ``device`` when one is given.
        data: a ``DataLoader`` (used as is: pass one with a ``DistributedSampler`` to shard), a
            ``Dataset`` of ``(x, y)``, a pair ``(x, y)`` of tensors, a tensor ``x`` (labels are then
            the model's predictions), or any iterable of ``(x, y)`` batches.
        perturbations: callables ``(x, y) -> x̂`` (noise, attacks, another library's attack
            object), as a dict ``{name: callable}``, a list, or spec strings such as
            ``"gaussian:std=0.1,salt,fgsm:eps=0.1,pgd:eps=0.1,steps=10"`` (see
            :func:`build_perturbations`).
        layers: probe selection (:func:`lsa_ext.probes.select_layers`), default
            ``"activations"``.
        measure: ``"relative_error"`` (default), ``"mse"``, ``"cosine"``, ``"relative_linf"`` or
            a callable ``(a, b) -> [B]``.
        batch_size: batch size when ``data`` is not already a loader (default 128).
        device: where to run (default: the model's device).
        seed: seeds PyTorch's global RNG inside the call (restored afterwards) and the built-in
            perturbations (``seed + i``), so the same seed gives the same result. Randomness is
            reseeded per batch ``k`` from ``(seed, k)`` and each perturbation's own seed
            (:func:`lsa_ext.distributed.batch_seeding`), so a run split over several processes
            (torchrun) gives the same result as one process.
        clip: data range for spec-built perturbations, e.g. ``(0.0, 1.0)`` for images; default
            ``None`` (no clipping).
        eps: ε of spec-built attacks that do not set their own (default 0.1).
        mode: ``"concat"`` (default) or ``"two_pass"`` (module docstring).
        forward_batch: most samples per forward (default ``batch_size``); bounds peak memory.
        max_samples: stop after this many samples (default: all).
        sampler: a ``torch.utils.data.Sampler`` (e.g. ``DistributedSampler``) used to batch
            ``data`` when it is a Dataset or tensors; the result then covers this shard only
            (see :func:`accumulate` for merging ranks).
        progress: show a progress bar (default: when stderr is a terminal; env LSA_PROGRESS).
        config: extra JSON-serialisable entries recorded in the result's ``config``.

    Returns:
        :class:`AnalysisResult` with per (perturbation, layer) mean, std and count of CM.

    Raises:
        LsaUserError: unknown layer/measure/perturbation names, no probed layer, NaN from the
            model (naming layer and perturbation), empty data.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LsaUserError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise LsaUserError(f"eps must be >= 0, got {eps!r}")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise LsaUserError(f"max_samples must be a positive integer, got {max_samples!r}")
    if mode not in MODES:
        raise LsaUserError(f"unknown mode {mode!r}; choices: {', '.join(MODES)}")
    meas = get_measure(measure)
    if device is not None:
        device = resolve_device(device)
        model.to(device)
    dev = model_device(model) if device is None else device
    layer_names = select_layers(model, layers)
    perts = build_perturbations(perturbations, model=model, clip=clip, eps=eps, seed=seed)
    loader, total = batches(data, batch_size, sampler=sampler, allow_unlabelled=True)
    if forward_batch is None:
        forward_batch = getattr(loader, "batch_size", None) or batch_size
    was_training = model.training
    fork_devices = [dev.index or 0] if dev.type == "cuda" else []
    descriptions = {n: repr(p) for n, p in perts.items()}  # before per-batch reseeding
    try:
        with torch.random.fork_rng(devices=fork_devices), \
                batch_seeding(perts, seed) as reseed_batch:
            torch.manual_seed(seed)
            model.eval()
            sites, stats = accumulate(
                model, loader, perts, layer_names, meas, device=dev, mode=mode,
                forward_batch=forward_batch, max_samples=max_samples, total=total,
                progress_enabled=progress, reseed=reseed_batch,
            )
    finally:
        model.train(was_training)
    cfg: dict[str, Any] = {
        "layers_spec": layers if isinstance(layers, str) else (
            list(layers) if isinstance(layers, (list, tuple)) else "<predicate>"),
        "measure": meas.name,
        "measure_description": meas.description,
        "perturbations": descriptions,
        "batch_size": batch_size,
        "forward_batch": forward_batch,
        "mode": mode,
        "seed": seed,
        "clip": list(clip) if clip is not None else None,
        "eps": eps,
        "max_samples": max_samples,
        "device": str(dev),
        "model_class": type(model).__name__,
    }
    cfg.update(config or {})
    return AnalysisResult.from_stats(sites, list(perts), stats, meas.name, cfg)

