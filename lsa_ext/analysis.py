"""Layer Sustainability Analysis (Khalooei et al., arXiv 2202.02626, Algorithm 2): per-layer CM
of clean vs perturbed inputs, streamed over the data.

Pipeline: for each batch ``(x, y)`` of the data and each perturbation ``P``, compute
``x̂ = P(x, y)``, run the model (eval mode, ``torch.no_grad``) on the clean and perturbed inputs,
compare every probed layer's representations with the measure (default: relative error, fused
kernel) per sample (:mod:`lsa_ext.paired_capture`), and accumulate per (perturbation, layer)
``count``, ``sum`` and ``sumsq`` of the per-sample values in float64 (:mod:`lsa_ext.cm_stats`).
From those the result (:mod:`lsa_ext.result`) gives mean/std tables, the MVL list per
perturbation (Algorithm 1, :mod:`lsa_ext.mvl`) and a ranking of the layers.

This module holds the entry point :func:`analyze` and the streaming loop :func:`accumulate`; it
re-exports the names that used to live here (``CMStats``, ``build_perturbations``,
``paired_measures``, ``AnalysisResult``, ``load_result``, ...), so
``from lsa_ext.analysis import ...`` keeps working.

Distributed use: :func:`accumulate` returns ``(sites, CMStats)`` for the batches it was given
(e.g. one rank's shard from a ``DistributedSampler`` loader); sum every tensor of
``stats.tensors()`` (``count``, ``sum``, ``sumsq``, ``correct``) over ranks
(``torch.distributed.all_reduce``) and build the result with :meth:`AnalysisResult.from_stats`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lsa_ext import distributed
from lsa_ext.batches import auto_clip, batches, first_input
from lsa_ext.checks import check_batch_size, check_clip, check_int, check_number
from lsa_ext.cm_stats import CMStats
from lsa_ext.devices import resolve_device
from lsa_ext.errors import LsaUserError
from lsa_ext.losses import predict
from lsa_ext.measures import Measure, MeasureFn, get_measure
from lsa_ext.modules import model_device
from lsa_ext.outputs import OutputSelector, check_selector, logits_of
from lsa_ext.paired_capture import PASS_MODES, check_pass_mode, paired_measures
from lsa_ext.perturbations import (
    DEFAULT_EPS,
    build_perturbation,
    build_perturbations,
    parse_perturbation_specs,
    perturbation_names,
)
from lsa_ext.probes import LayerSpec, select_layers, site_labels
from lsa_ext.progress import progress
from lsa_ext.result import AnalysisResult, load_result
from lsa_ext.seeding import batch_seeding, rng_scope
from lsa_ext.types import Perturbation

__all__ = [
    "DEFAULT_EPS",
    "PASS_MODES",
    "AnalysisResult",
    "CMStats",
    "accumulate",
    "analyze",
    "build_perturbation",
    "build_perturbations",
    "load_result",
    "paired_measures",
    "parse_perturbation_specs",
    "perturbation_names",
]

log = logging.getLogger("lsa_ext.analysis")

MODES = PASS_MODES  # former name of PASS_MODES, kept for existing imports


def _unpack(
    batch: Any, model: nn.Module, device: torch.device, output: OutputSelector = None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(x, y, labelled)`` on ``device`` from a batch; unlabelled batches get the model's
    predictions as ``y`` (``labelled`` False)."""
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
        with torch.no_grad():
            y = predict(logits_of(model(x), output, batch=x.shape[0]))
        return x, y.to(device), False
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.is_floating_point() \
            or y.is_complex():
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        dtype = f" {y.dtype}" if isinstance(y, torch.Tensor) else ""
        raise LsaUserError(
            f"labels y must be integer class indices of shape [B] matching x {tuple(x.shape)}, "
            f"got{dtype} {shape} (one-hot labels: pass y.argmax(1))"
        )
    return x, y.to(device), True


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    return int(batch[0].shape[0])


def _perturb(
    perturbations: Mapping[str, Perturbation], model: nn.Module, x: torch.Tensor,
    y: torch.Tensor,
) -> tuple[list[torch.Tensor], str | None]:
    """``x̂`` of every perturbation (detached, like ``x``), and the name of the first one that
    left the model's train/eval mode changed (the mode is restored), if any."""
    training = model.training
    changed: str | None = None
    x_hats = []
    for name, perturb in perturbations.items():
        xh = perturb(x, y)
        if not isinstance(xh, torch.Tensor) or xh.shape != x.shape:
            shape = tuple(xh.shape) if isinstance(xh, torch.Tensor) else type(xh).__name__
            raise LsaUserError(
                f"perturbation {name!r} returned {shape}; expected a tensor of shape "
                f"{tuple(x.shape)}"
            )
        x_hats.append(xh.detach().to(device=x.device, dtype=x.dtype))
        if model.training != training:
            changed = changed or name
            model.train(training)
    return x_hats, changed


# A relative error above this is the denominator floor at work: the clean representation of
# the sample at that layer is zero or nearly (dead units), and such samples dominate the mean.
DEGENERATE_RELATIVE_ERROR = 1e6


def _scan_values(vals: torch.Tensor, sites: Sequence[str], names: Sequence[str],
                 measure: str, batch_index: int, warned: set[str]) -> None:
    """One look at a batch's CM values ``vals [P, L, B]`` (one device sync): raises, naming
    layer and perturbation, on NaN/inf; for the relative error, logs once per layer the samples
    above :data:`DEGENERATE_RELATIVE_ERROR` (``warned``: layers already named)."""
    bad = ~torch.isfinite(vals)
    big = vals > DEGENERATE_RELATIVE_ERROR if measure == "relative_error" else None
    any_bad, any_big = torch.stack([bad.any(), bad.any() if big is None else big.any()]).tolist()
    if any_bad:
        p, li, _ = (int(i) for i in bad.nonzero()[0])
        raise LsaUserError(
            f"non-finite {measure} (NaN or inf) at layer {sites[li]!r} under perturbation "
            f"{names[p]!r} in batch {batch_index}: the model produced NaN/inf activations"
        )
    if not any_big or big is None:
        return
    hits = big.any(dim=0)  # [L, B]
    for li in torch.nonzero(hits.any(dim=1)).flatten().tolist():
        if sites[li] in warned:
            continue
        warned.add(sites[li])
        under = [n for p, n in enumerate(names) if bool(big[p, li].any())]
        log.warning(
            "layer %s: %d of %d samples in batch %d have a relative error above %.0e (up to "
            "%.3g, under %s): their clean representation there is zero or nearly (dead "
            "units), so the ratio divides by the eps floor, and they dominate the layer's "
            "mean; the mse or cosine measure reads such a layer better", sites[li],
            int(hits[li].sum()), vals.shape[-1], batch_index, DEGENERATE_RELATIVE_ERROR,
            float(vals[:, li].max()), ", ".join(under))


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
    output: OutputSelector = None,
) -> tuple[list[str], CMStats]:
    """Streams ``batches`` and returns ``(sites, stats)`` (:class:`CMStats` ``[P, L]`` on device).

    The model should already be in eval mode (:func:`analyze` takes care of it). Attacks run with
    gradients enabled; the paired forwards (pass ``mode``, :mod:`lsa_ext.paired_capture`) under
    ``torch.no_grad``.

    ``reseed``: called with the global batch index ``k`` before batch ``k`` is perturbed
    (:func:`lsa_ext.seeding.batch_seeding` makes one), so randomness does not depend on how
    the batches are split over processes. ``output``: how the logits are read from the
    model's output (:func:`lsa_ext.outputs.logits_of`).

    Under torchrun (a process group with N > 1 ranks) batch ``k`` is processed by rank
    ``k mod N`` only (every rank reads all batches, nothing is padded) and the statistics are
    summed over the ranks; every rank returns the full result.

    Raises:
        LsaUserError: a perturbation returns a wrong shape, or a CM value is NaN/inf (the message
            names the layer and the perturbation), or there is no batch.
    """
    meas = get_measure(measure)
    dev = resolve_device(device) if device is not None else model_device(model)
    names = list(perturbations)
    stats: CMStats | None = None
    sites: list[str] | None = None
    seen = 0
    warned = unlabelled = False
    degenerate: set[str] = set()  # layers already warned about (_scan_values)
    rank, world = distributed.rank(), distributed.world_size()
    for bi, batch in enumerate(progress(batches, desc="LSA", total=total,
                                        enabled=progress_enabled)):
        if max_samples is not None and seen >= max_samples:
            break
        if bi % world != rank:  # another rank's batch
            seen += _batch_len(batch)
            continue
        x, y, labelled = _unpack(batch, model, dev, output)
        if max_samples is not None:
            x, y = x[: max_samples - seen], y[: max_samples - seen]
        seen += x.shape[0]
        if reseed is not None:
            reseed(bi)
        x_hats, changed = _perturb(perturbations, model, x, y)
        if changed is not None and not warned:
            log.warning("perturbation %r changed the model's train/eval mode; restored", changed)
            warned = True
        s, vals, preds = paired_measures(
            model, layer_names, x, x_hats, meas, mode=mode, forward_batch=forward_batch,
            predictions=True, output=output,
        )
        if sites is None:
            sites = s
            stats = CMStats.zeros(len(names), len(sites), device=vals.device)
        elif s != sites:
            raise LsaUserError(
                f"the probed layers ran differently in batch {bi} ({s} vs {sites})"
            )
        _scan_values(vals, sites, names, meas.name, bi, degenerate)
        assert stats is not None
        for p in range(len(names)):
            stats.update(p, vals[p])
        if preds is None and bi == rank:  # the first batch this rank analyses
            log.warning("the model's output holds no logits [B, K] (lsa_ext.outputs): no "
                        "accuracy is reported; pass output= to select them")
        if not labelled and not unlabelled:
            log.info("unlabelled data: the attacks use the model's own predictions as labels; "
                     "no accuracy is reported")
            unlabelled = True
        # agreement with the model's own predictions is not an accuracy: none for such data
        stats.update_correct(preds if labelled else None, y)
    if world > 1:  # exact sums over ranks (a rank without batches contributes None)
        sites, stats = distributed.all_reduce_stats((sites, stats))
    if stats is None or sites is None:
        raise LsaUserError("the data is empty: no batch to analyze")
    return sites, stats


def check_sites_reached(model: nn.Module, layer_names: Sequence[str],
                        input_shape: Sequence[int]) -> None:
    """Raises when a selected call site ``name#k`` (k ≥ 2, named explicitly) is not reached by
    one eval-mode, no-grad forward of zero inputs of ``input_shape``
    (:func:`lsa_ext.probes.sites_not_run`): such a site would be left out of the report
    silently. Whole modules that never run (e.g. an unused module matched by a kind or glob)
    are left to the analysis, which reports the sites that ran.

    Raises:
        LsaUserError: naming the sites not reached.
    """
    from lsa_ext.probes import parse_site, sites_not_run

    calls = [n for n in layer_names if (parse_site(n)[1] or 1) > 1]
    missing = sites_not_run(model, calls, input_shape) if calls else []
    if missing:
        raise LsaUserError(
            f"layer site{'s' if len(missing) > 1 else ''} {', '.join(missing)} never "
            f"run{'' if len(missing) > 1 else 's'} in a forward of this model (name#k is the "
            "k-th call of module name, and it is called fewer times): drop "
            f"{'them' if len(missing) > 1 else 'it'}, or name a call that runs"
        )


def _config(model: nn.Module, layers: LayerSpec, meas: Measure, descriptions: dict[str, str],
            device: torch.device, **settings: Any) -> dict[str, Any]:
    """The settings recorded in the result's ``config`` (JSON-serialisable, in report.json);
    ``settings`` are recorded as given, in order."""
    if isinstance(layers, str):
        layers_spec: Any = layers
    else:
        layers_spec = list(layers) if isinstance(layers, (list, tuple)) else "<predicate>"
    return {"layers_spec": layers_spec, "measure": meas.name,
            "measure_description": meas.description, "perturbations": descriptions,
            **settings, "device": str(device), "model_class": type(model).__name__}


def _resolve_clip(clip: Any, data: Any) -> tuple[float, float] | None:
    """``clip`` checked; ``"auto"`` the data's range (:func:`lsa_ext.batches.auto_clip`)."""
    if isinstance(clip, str):
        if clip != "auto":
            raise LsaUserError(f"clip must be 'auto', None or a pair (lo, hi), got {clip!r}")
        return auto_clip(data)
    return check_clip(clip)


# long only for its docstring: the full reference of the public entry point's arguments
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
    clip: tuple[float, float] | None | str = "auto",
    eps: float = DEFAULT_EPS,
    mode: str = "concat",
    forward_batch: int | None = None,
    max_samples: int | None = None,
    sampler: Any = None,
    progress: bool | None = None,
    config: Mapping[str, Any] | None = None,
    output: OutputSelector = None,
) -> AnalysisResult:
    """Layer Sustainability Analysis of ``model`` on ``data`` under ``perturbations``.

    Args:
        model: any ``nn.Module`` returning logits (or an output :func:`lsa_ext.outputs.logits_of`
            reads: a dict with ``"logits"``, an object with ``.logits``; else see ``output``);
            run in eval mode (restored afterwards) and moved to ``device`` when one is given.
        data: a ``DataLoader`` (used as is: pass one with a ``DistributedSampler`` to shard), a
            ``Dataset`` of ``(x, y)``, a pair ``(x, y)`` of tensors, a tensor ``x`` (the
            attacks then take the model's predictions as labels, and ``accuracy`` is None:
            agreement with the model's own predictions is not an accuracy), or any iterable
            of ``(x, y)`` batches.
        perturbations: callables ``(x, y) -> x̂`` (noise, attacks, another library's attack
            object), as a dict ``{name: callable}``, a list, or spec strings such as
            ``"gaussian:std=0.1,salt,fgsm:eps=0.1,pgd:eps=0.1,steps=10"`` (see
            :func:`lsa_ext.perturbations.build_perturbations`).
        layers: probe selection (:func:`lsa_ext.probes.select_layers`), default
            ``"activations"``; ``A<k>`` items are counted on the first sample of ``data``.
        measure: ``"relative_error"`` (default), ``"mse"``, ``"cosine"``, ``"relative_linf"`` or
            a callable ``(a, b) -> [B]``.
        batch_size: batch size when ``data`` is not already a loader (default 128).
        device: where to run (default: the model's device).
        seed: seeds PyTorch's global RNG inside the call (restored afterwards) and the built-in
            perturbations (``seed + i``), so the same seed gives the same result. Randomness is
            reseeded per batch ``k`` from ``(seed, k)`` and each perturbation's own seed
            (:func:`lsa_ext.seeding.batch_seeding`), so a run split over several processes
            (torchrun) gives the same result as one process.
        clip: the range spec-built perturbations keep their outputs in (and their inputs must
            lie in): ``"auto"`` (default) the data's range, the rule of :func:`lsa_ext.train`
            (:func:`lsa_ext.batches.auto_clip`: ``data.info.data_range`` when ``data`` has one,
            else ``(0.0, 1.0)`` when ``data`` is tensors whose values all lie in [0, 1], else
            none: a ``DataLoader`` or ``Dataset`` gets no clipping — pass the range there);
            a pair ``(lo, hi)``; ``None``: no clipping. A spec's own ``clip=lo:hi`` or
            ``clip=none`` wins. Perturbation objects passed in keep their own ``clip`` (the
            classes default to ``(0, 1)``). The result's ``config["clip"]`` records the range
            used.
        eps: ε of spec-built attacks that do not set their own (default 0.1).
        mode: the pass mode, ``"concat"`` (default) or ``"two_pass"``
            (:data:`lsa_ext.paired_capture.PASS_MODES`; see :mod:`lsa_ext.paired_capture`).
        forward_batch: most samples per forward (default ``batch_size``); bounds peak memory.
        max_samples: stop after this many samples (default: all).
        sampler: a ``torch.utils.data.Sampler`` (e.g. ``DistributedSampler``) used to batch
            ``data`` when it is a Dataset or tensors; the result then covers this shard only
            (see :func:`accumulate` for merging ranks).
        progress: show a progress bar (default: when stderr is a terminal; env LSA_PROGRESS).
        config: extra JSON-serialisable entries recorded in the result's ``config``.
        output: logits selector for models returning tuples, dicts or objects (an index, a
            key, or a callable; :mod:`lsa_ext.outputs`), used for the accuracy, unlabelled
            data and spec-built attacks. Default None: the rule of
            :func:`lsa_ext.outputs.logits_of`. An output without logits under that rule (a
            feature extractor's tuple, a tensor of another shape than ``[B, K]``) gives
            ``accuracy`` None (logged); attacks and unlabelled data need logits and raise.

    Returns:
        :class:`AnalysisResult` with per (perturbation, layer) mean, std and count of CM, and
        each site's label (``A<k>``, ``L<k>``, :attr:`AnalysisResult.labels`), counted on
        the first sample of ``data`` in one more eval-mode, no-grad forward.

    Raises:
        LsaUserError: unknown layer/measure/perturbation names, no probed layer, NaN from the
            model (naming layer and perturbation), empty data, a bad batch size, ε, clip or
            max_samples, a model output that holds no logits (naming its type), inputs outside
            a spec-built attack's clip range.
    """
    output = check_selector(output)
    check_batch_size(batch_size)
    check_number("eps", eps)
    if max_samples is not None:
        check_int("max_samples", max_samples, minimum=1)
    check_pass_mode(mode)
    clip = _resolve_clip(clip, data)
    meas = get_measure(measure)
    if device is not None:
        device = resolve_device(device)
        model.to(device)
    dev = model_device(model) if device is None else device
    try:  # one sample: A<k> selectors, the sites' check and their labels (no random draw)
        example = first_input(data)
    except LsaUserError:  # a one-shot iterator: A<k> refused (the same error, from the
        example = None      # selector), sites not checked ahead and labelled by name
    layer_names = select_layers(model, layers, example=example if example is not None
                                else lambda: first_input(data))
    if example is not None:
        check_sites_reached(model, layer_names, tuple(example.shape[1:]))
    perts = build_perturbations(perturbations, model=model, clip=clip, eps=eps, seed=seed,
                                output=output)
    loader, total = batches(data, batch_size, sampler=sampler, allow_unlabelled=True)
    if forward_batch is None:
        forward_batch = getattr(loader, "batch_size", None) or batch_size
    was_training = model.training
    descriptions = {n: repr(p) for n, p in perts.items()}  # before per-batch reseeding
    try:
        with rng_scope(seed, dev), batch_seeding(perts, seed) as reseed_batch:
            model.eval()
            sites, stats = accumulate(
                model, loader, perts, layer_names, meas, device=dev, mode=mode,
                forward_batch=forward_batch, max_samples=max_samples, total=total,
                progress_enabled=progress, reseed=reseed_batch, output=output,
            )
            # inside the seeded scope, after the batches: cannot change their randomness
            labels = site_labels(model, sites, example)
    finally:
        model.train(was_training)
    cfg = _config(model, layers, meas, descriptions, dev, batch_size=batch_size,
                  forward_batch=forward_batch, mode=mode, seed=seed,
                  clip=list(clip) if clip is not None else None, eps=eps,
                  max_samples=max_samples)
    cfg.update(config or {})
    return AnalysisResult.from_stats(sites, list(perts), stats, meas.name, cfg, labels)
