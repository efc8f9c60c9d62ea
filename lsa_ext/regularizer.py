"""The LR term of AT-LR (Khalooei et al., arXiv 2202.02626, Algorithm 3) for one batch.

``LR(θ, x, x̂) = Σ_{l∈M} γ_l · mean_i CM(φ_l(x_i), φ_l(x̂_i))`` with ``CM`` the per-sample
relative error ``||φ_l(x) − φ_l(x̂)||_F / ||φ_l(x)||_F``, computed for all layers of ``M`` by ONE
fused :func:`lsa_ext.relative_error_multi` call whose fused backward sends gradients into both
the clean and the adversarial pass (both depend on θ).

Two points the paper leaves open are options (``TrainConfig.lr_reduction`` /
``lr_detach_clean``, ``lsa train --lr-reduction/--lr-detach-clean``):

* ``reduction``: ``"mean"`` (default) averages the per-sample relative errors, as the paper's
  formula for CM reads; ``"batch"`` takes one ratio ``||A − Â||_F / ||A||_F`` over the whole
  batch, as the authors' published LSA code computes it.
* ``detach_clean``: False (default) differentiates both passes; True treats ``φ_l(x)`` as a
  constant target (``φ_l(x).detach()``), so only the adversarial representation is pulled
  toward the clean one. The clean forward then runs under ``torch.no_grad()`` where no clean
  logits are needed (``"auto"`` picks ``"two_pass"`` for that), which makes the term cheaper.

- :func:`resolve_layers`: the regularized sites M from names, ``name#k`` sites, globs, kinds,
  ``"L<k>"`` or ``"A<k>"``.
- :func:`gamma_tensor`: γ as one float32 weight per layer.
- :class:`LRTerm`: the term for fixed sites, reused batch after batch (what the trainer holds:
  it remembers which sites need copies and which pass plan fits the model).
- :func:`lsa_ext.regularizer.lr_term`: the term for one batch, plus both passes' logits.

Sites (:mod:`lsa_ext.probes`): a regularised layer is one call of a module — ``name`` its first
call, ``name#k`` its k-th — exactly as ``lsa analyze`` reports it, so any reported site can be
regularised. Each site is counted once (duplicates are merged by :func:`resolve_layers` and
rejected by :class:`LRTerm`). :func:`lr_term` and :class:`LRTerm` take every selector
:func:`resolve_layers` takes (``L<k>``, ``A<k>`` counted on the call's clean batch, globs,
kinds) and resolve them against the model themselves. A module that runs several times per
forward and is named bare (its first call) gets a warning naming the calls left out; named
calls (``name#k``, ``A<k>``) are taken as meant.

In-place safety: the site outputs are held past their hooks through a
:class:`lsa_ext.probes.InplaceGuard`, so a later ``ReLU(inplace=True)`` or ``out += identity``
cannot change them: sites whose output is changed in place later in the forward are cloned
(found from the tensors' version counters on the first batch), the others held by reference.

Passes (``lr_pass``, :data:`LR_PASSES`):

* ``"two_pass"``: the clean batch runs first, then the adversarial batch, as two forwards (each
  BatchNorm normalises by its own batch's statistics; running statistics see the clean batch,
  then the adversarial one). With ``clean_logits=False`` the clean forward stops right after
  the last regularised site.
* ``"concat"``: ONE forward of ``cat([x, x̂])`` (``2B`` samples) through the whole model; each
  site's output is split into its clean and adversarial halves. Exact for layers that treat
  samples independently. BatchNorm (any ``_BatchNorm``, incl. SyncBatchNorm, when it normalises
  by batch statistics) and InstanceNorm tracking running statistics in train mode are run per
  half — the clean half, then the adversarial half, each with its own statistics — which is
  what ``"two_pass"`` computes, running-statistics updates included. Layers that couple the
  samples of a batch in other ways (custom normalisations, a forward that checks the batch
  size) need ``"two_pass"``. Dropout draws one mask for the ``2B`` samples.
* ``"auto"`` (default): ``"concat"`` when the clean logits are wanted (the whole clean forward
  runs anyway), or when the last regularised site comes after at least
  :data:`CONCAT_MIN_FRACTION` of the model's conv/linear multiply-accumulates (found once by a
  one-sample, eval-mode, no-grad forward); else ``"two_pass"`` with the early stop.

Use from your own loop::

    loss_lr, logits_clean, logits_adv = lsa_ext.training.lr_term(
        model, x, x_adv, ["layers.2"], gamma=1.0)
    loss = lsa_ext.losses.cross_entropy(logits_adv, y) + loss_lr

or, to pay the in-place detection and pass planning once, ``term = LRTerm(["layers.2"])`` before
the loop and ``term(model, x, x_adv, gamma)`` in it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lsa_ext import distributed
from lsa_ext.errors import LsaUserError
from lsa_ext.modules import model_mode, strip_prefix, unwrap
from lsa_ext.ops import relative_error_multi
from lsa_ext.outputs import OutputSelector, check_selector, logits_of
from lsa_ext.probes import (
    LEARNABLE,
    Capture,
    Example,
    InplaceGuard,
    canonical_site,
    parse_site,
    select_layers,
    site_name,
)
from lsa_ext.train_config import LR_PASSES, LR_REDUCTIONS

log = logging.getLogger("lsa_ext.regularizer")

# "auto" runs one concatenated forward when the early-stopped clean pass would cover at least
# this share of the model's conv/linear work anyway (a 2B forward then costs no more than the
# two passes, and fewer, larger ops run faster).
CONCAT_MIN_FRACTION = 0.9
# Layers whose train-mode forward couples the samples of a batch; "concat" runs them per half.
_PER_HALF = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def resolve_layers(model: nn.Module, spec: str | Sequence[str], *,
                   example: Example = None) -> list[str]:
    """Regularised sites from ``spec``.

    Args:
        spec: a list, or a comma-separated string, of items: ``"L<k>"`` (the k-th learnable
            layer, ``select_layers(model, "learnable")[k]``, as in the paper's "LR-L<k>"),
            ``"A<k>"`` (the k-th activation site of a forward, as ``lsa analyze`` numbers
            its rows — a reused ReLU's second call is its own site; needs ``example``), a
            qualified module name (a leading ``module.`` is stripped), a site ``name#k`` (the
            k-th call of a module called several times per forward, as analysis reports it),
            a glob, or a kind accepted by :func:`lsa_ext.probes.select_layers`
            (``"activations"``, ...). A module name selects its first call.
        example: an input batch or the input shape (:data:`lsa_ext.probes.Example`) for
            counting ``A<k>``; used only when an ``A<k>`` item is given.

    Returns:
        Sites (``name`` for a first call, ``name#k`` for the k-th) in the order given, each
        once (``name#1`` is ``name``).

    Raises:
        LsaUserError: an index out of range, a name that matches no layer, a bad ``#k``,
            ``A<k>`` without ``example``, or ``"mvl"`` (chosen by :func:`lsa_ext.training.train`
            and ``lsa train``, not here).
    """
    out: list[str] = []
    for _, chosen in _resolve_items(unwrap(model), spec, example):
        for site in map(canonical_site, chosen):
            if site not in out:
                out.append(site)
    return out


def _resolve_items(module: nn.Module, spec: str | Sequence[str],
                   example: Example) -> list[tuple[str, list[str]]]:
    """Each item of ``spec`` (a leading ``module.`` stripped) with the sites it selects, as
    :func:`lsa_ext.probes.select_layers` writes them: a bare module name where the item names
    no call (a name, glob, kind or ``L<k>``: the module's first call), ``name#k`` where it
    does (``name#k``, and ``A<k>``, which is one call). Raises as :func:`resolve_layers`."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if not items or any(not isinstance(s, str) or not s for s in items):
        raise LsaUserError(f"layer list must hold non-empty names, got {spec!r}")
    names = {n for n, _ in module.named_modules()}
    out: list[tuple[str, list[str]]] = []
    for item in items:
        if item.lower() == "mvl" and item not in names:
            raise LsaUserError(
                "lr_layers 'mvl' (the most vulnerable layers) is resolved by "
                "lsa_ext.train(..., lr_layers='mvl') and 'lsa train --lr-layers mvl'; for a "
                "Trainer or lr_term, get the list from lsa_ext.mvl_select (mvl_from_report, "
                "mvl_on_the_fly)"
            )
        item = strip_prefix(item)
        out.append((item, select_layers(module, item, example=example)))
    return out


def gamma_tensor(gamma: float | Sequence[float] | torch.Tensor, n: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """γ as a float32 ``[n]`` tensor on ``device``: a scalar is used for all ``n`` layers.

    Raises:
        LsaUserError: a number of values other than 1 or ``n``, or a negative/non-finite value.
    """
    g = torch.as_tensor(gamma, dtype=torch.float32).flatten()
    if g.numel() == 1:
        g = g.expand(n)
    if g.numel() != n:
        raise LsaUserError(f"gamma has {g.numel()} values for {n} regularized layers")
    if not torch.isfinite(g).all() or (g < 0).any():
        raise LsaUserError(f"gamma must be finite and non-negative, got {g.tolist()}")
    return g.to(device)


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once every probed output has been produced."""


class LRTerm:
    """The LR term for a fixed list of sites, reusable batch after batch.

    Args:
        layers: the regularised layers, at least one: sites (``name`` = a module's first
            call, ``name#k`` = its k-th call; a leading ``module.`` is stripped) or any other
            selector :func:`resolve_layers` takes (``L<k>``, ``A<k>``, globs, kinds). They are
            resolved against the model once, at the first call (:meth:`resolve`; ``A<k>``
            counted on one sample of that call's clean batch) and kept; plain sites need no
            forward for it. γ is given per resolved site, in the order the items select them.
            Each site once: an item given twice, or two items that select the same site
            (``L0`` and the layer's name), is an error.
        lr_pass: ``"auto"`` (default), ``"concat"`` or ``"two_pass"`` (module docstring).
        copy: mode of the :class:`lsa_ext.probes.InplaceGuard` holding the site outputs:
            ``"auto"`` (default: clone only sites changed in place later in the forward),
            ``"always"`` or ``"never"`` (unsafe with in-place ops; for measurements).
        eps: denominator floor of the relative error (default 1e-12).
        reduction: the CM over the batch, ``"mean"`` (default) or ``"batch"``
            (:data:`lsa_ext.train_config.LR_REDUCTIONS`; module docstring).
        detach_clean: no gradient through the clean pass (default False; module docstring).

    State kept between calls: the resolved :attr:`sites` (None before the first call), which
    sites need copies (decided on the first call, which
    clones every site) and, for ``"auto"``, the depth of the last site. If a later batch
    changes in place a site held by reference (a model whose in-place ops vary between
    forwards), that batch's passes are run again with the site copied (a warning is logged;
    BatchNorm running statistics then see that batch twice).

    Raises:
        LsaUserError: no layers, an item given twice, an unknown ``lr_pass``, ``copy`` or
            ``reduction``; at the first call, what :func:`resolve_layers` raises (an unknown
            name, an index out of range) and two items selecting one site.
    """

    def __init__(self, layers: Sequence[str], *, lr_pass: str = "auto", copy: str = "auto",
                 eps: float = 1e-12, reduction: str = "mean",
                 detach_clean: bool = False) -> None:
        if isinstance(layers, str):
            layers = [layers]
        if any(not isinstance(n, str) or not n for n in layers):
            raise LsaUserError(f"layers must be non-empty names, got {list(layers)!r}")
        items = [strip_prefix(n) for n in layers]
        if not items:
            raise LsaUserError("the LR term needs at least one layer")
        given = [canonical_site(n) for n in items]
        twice = sorted({s for s in given if given.count(s) > 1})
        if twice:
            raise LsaUserError(f"layers {', '.join(twice)} given more than once (a site is "
                               "regularised once; 'name' and 'name#1' are the same site)")
        if lr_pass not in LR_PASSES:
            raise LsaUserError(f"unknown lr_pass {lr_pass!r}; choices: {', '.join(LR_PASSES)}")
        if reduction not in LR_REDUCTIONS:
            raise LsaUserError(f"unknown LR reduction {reduction!r}; choices: "
                               f"{', '.join(LR_REDUCTIONS)}")
        self.reduction = reduction
        self.detach_clean = bool(detach_clean)
        self.layers = items
        self.sites: list[str] | None = None  # resolved at the first call
        self.lr_pass = lr_pass
        self.guard = InplaceGuard(copy)
        self.eps = eps
        self.fraction: float | None = None  # "auto": share of the MACs before the last site
        self._probe: list[str] = []
        self._bare: set[str] = set()  # first-call sites chosen without a call number
        self._warned = False
        self._warned_batch = False

    # ----------------------------------------------------------------- sites
    def resolve(self, model: nn.Module, example: Example = None) -> list[str]:
        """The regularised sites (``name`` / ``name#k``), resolved from :attr:`layers` against
        ``model`` on the first call and remembered (later calls return them as they are).

        ``example``: an input batch or shape (:data:`lsa_ext.probes.Example`) on which
        ``A<k>`` items are counted (one sample, eval mode, no gradients); read only for them.

        Raises:
            LsaUserError: what :func:`resolve_layers` raises, or two items that select one
                site (naming both).
        """
        if self.sites is not None:
            return self.sites
        origin: dict[str, str] = {}
        bare: set[str] = set()
        for item, chosen in _resolve_items(unwrap(model), self.layers, example):
            for raw in chosen:
                site = canonical_site(raw)
                if site in origin:
                    raise LsaUserError(
                        f"layers {origin[site]} and {item} select the same site {site} (a "
                        "site is regularised once): give it once"
                    )
                origin[site] = item
                if parse_site(raw)[1] is None:
                    bare.add(site)
        self.sites = list(origin)
        self._bare = bare
        self._probe = [f"{n}#{k or 1}" for n, k in map(parse_site, self.sites)]
        return self.sites

    # ----------------------------------------------------------------- plan
    def plan(self, model: nn.Module, x: torch.Tensor, clean_logits: bool) -> str:
        """The pass mode this call uses (``"concat"`` or ``"two_pass"``); resolves the sites
        on ``x`` first (:meth:`resolve`)."""
        self.resolve(model, x)
        if self.lr_pass != "auto":
            return self.lr_pass
        if clean_logits:
            return "concat"
        if self.detach_clean:
            return "two_pass"  # the clean forward runs without autograd: cheaper than 2B
        if self.fraction is None:
            self.fraction = _depth_fraction(unwrap(model), self.sites, x[:1])
        return "concat" if self.fraction >= CONCAT_MIN_FRACTION else "two_pass"

    # ----------------------------------------------------------------- call
    def __call__(
        self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor,
        gamma: float | Sequence[float] | torch.Tensor = 1.0, *, clean_logits: bool = True,
        output: OutputSelector = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(lr_loss, logits_clean, logits_adv)`` for one batch; see :func:`lr_term`
        (``output``: the logits selector, :func:`lsa_ext.outputs.logits_of`)."""
        output = check_selector(output)
        if x.shape != x_adv.shape:
            raise LsaUserError(
                f"x and x_adv must have one shape, got {tuple(x.shape)} and {tuple(x_adv.shape)}"
            )
        sites = self.resolve(model, x)
        g = gamma_tensor(gamma, len(sites), x.device)
        module = unwrap(model)
        mode = self.plan(model, x, clean_logits)
        for _ in range(2):
            try:
                if mode == "concat":
                    clean, adv, logits_clean, logits_adv, calls = self._concat(
                        model, module, x, x_adv, output)
                else:
                    clean, adv, logits_clean, logits_adv, calls = self._two_pass(
                        model, module, x, x_adv, clean_logits, output)
            except BaseException:
                self.guard.forget()
                raise
            bad = self.guard.check()
            if not bad:
                break
            log.warning("the outputs of %s were changed in place later in this forward, "
                        "unlike before: running the batch again with them copied",
                        ", ".join(bad))
        self._check_sites(clean, adv, calls)
        if self.reduction == "batch" and not self._warned_batch and distributed.world_size() > 1:
            self._warned_batch = True
            log.warning("lr_reduction='batch' under torchrun: each rank takes the ratio "
                        "||A - Â|| / ||A|| over its own slice of the batch, not the global "
                        "batch, so the weights differ from a 1-process run ('mean' does not)")
        cleans = [clean[s].detach() if self.detach_clean else clean[s] for s in self.sites]
        cm = relative_error_multi(cleans, [adv[s] for s in self.sites],
                                  reduction=self.reduction, eps=self.eps)
        return (g * cm.float()).sum(), (logits_clean if clean_logits else None), logits_adv

    def _two_pass(self, model: nn.Module, module: nn.Module, x: torch.Tensor,
                  x_adv: torch.Tensor, clean_logits: bool, output: OutputSelector):
        store: dict[str, torch.Tensor] = {}
        stop_early = [False]
        n = len(self.sites)

        def on_output(site: str, t: torch.Tensor) -> None:
            store.setdefault(site, t)
            if stop_early[0] and len(store) == n:
                raise _StopForward

        with Capture(module, self._probe, on_output=on_output, copy=self.guard) as cap:
            stop_early[0] = not clean_logits
            logits_clean = None
            no_grad = self.detach_clean and not clean_logits
            try:
                with torch.no_grad() if no_grad else contextlib.nullcontext():
                    logits_clean = logits_of(module(x), output, batch=x.shape[0])
            except _StopForward:
                pass
            clean = dict(store)
            store.clear()
            cap.reset()  # the adversarial pass' calls are counted afresh
            stop_early[0] = False
            logits_adv = logits_of(model(x_adv), output, batch=x_adv.shape[0])
            return clean, dict(store), logits_clean, logits_adv, cap.calls

    def _concat(self, model: nn.Module, module: nn.Module, x: torch.Tensor,
                x_adv: torch.Tensor, output: OutputSelector):
        b = x.shape[0]
        store: dict[str, torch.Tensor] = {}
        with Capture(module, self._probe, on_output=store.setdefault, copy=self.guard) as cap, \
                _per_half_norms(module, b):
            out = model(torch.cat([x, x_adv]))
            calls = cap.calls
        clean, adv = {}, {}
        for site, t in store.items():
            if t.dim() == 0 or t.shape[0] != 2 * b:
                raise LsaUserError(
                    f"layer {site!r} gave shape {tuple(t.shape)} on the concatenated clean + "
                    f"adversarial batch of {2 * b} samples; for a model that mixes the samples "
                    "of a batch use lr_pass='two_pass'"
                )
            clean[site], adv[site] = t.split(b)
        # the logits are selected from the whole output, then split into the two halves
        logits_clean, logits_adv = logits_of(out, output, batch=2 * b).split(b)
        return clean, adv, logits_clean, logits_adv, calls

    def _check_sites(self, clean: dict, adv: dict, calls: dict[str, int]) -> None:
        missing = [s for s in self.sites if s not in clean or s not in adv]
        if missing:
            ran = ", ".join(f"{n} ×{c}" for n, c in calls.items()) or "none"
            raise LsaUserError(f"layers {missing} produced no tensor output in the forward "
                               f"pass (calls of the regularised modules: {ran})")
        if self._warned:
            return
        self._warned = True
        # only a module named without a call number (its first call, as a bare name, glob,
        # kind or L<k>) may have been meant as all of its calls; named calls are exact
        for name, count in calls.items():
            if name not in self._bare:
                continue
            extra = [site_name(name, k) for k in range(2, count + 1)
                     if site_name(name, k) not in self.sites]
            if extra:
                log.warning("module %s runs %d times per forward; AT-LR regularises %s, its "
                            "first call, not %s (name the calls to regularise, e.g. %s)",
                            name, count, name, ", ".join(extra), extra[0])


def lr_term(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    layers: Sequence[str],
    gamma: float | Sequence[float] | torch.Tensor = 1.0,
    *,
    clean_logits: bool = True,
    eps: float = 1e-12,
    lr_pass: str = "auto",
    copy: str = "auto",
    output: OutputSelector = None,
    reduction: str = "mean",
    detach_clean: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The LR term of Algorithm 3 for one batch: ``Σ_l γ_l · mean_i CM(φ_l(x_i), φ_l(x̂_i))``
    (``reduction="batch"``: ``Σ_l γ_l · ||φ_l(X) − φ_l(X̂)||_F / ||φ_l(X)||_F`` over the batch).

    Runs the model on ``x`` (clean) and ``x_adv`` (adversarial) in its current train/eval mode
    (two forwards, or one of both batches concatenated: ``lr_pass``, module docstring),
    capturing the outputs of ``layers`` with gradients kept and safe from later in-place ops,
    and reduces all layers with one fused :func:`lsa_ext.relative_error_multi` call.
    Backpropagating the result sends gradients through both passes. Use ``logits_adv`` for
    your base loss so the adversarial forward is not run twice. In a loop, an :class:`LRTerm`
    made once saves the per-call in-place detection (a clone of every site) and planning.

    Args:
        model: the model (a ``DistributedDataParallel`` wrapper is fine: hooks go on
            ``model.module``; a separate clean pass calls ``model.module``).
        x: clean batch ``[B, ...]`` float; ``x_adv``: its perturbed twin (same shape).
        layers: the regularised layers, at least one: sites (``name`` = a module's first
            call, ``name#k`` its k-th) or any selector of :func:`resolve_layers` — ``L<k>``,
            ``A<k>`` (counted on one sample of ``x``), globs, kinds — each site once;
            resolved against ``model`` (plain sites without a forward).
        gamma: weight per layer, a scalar for all (default 1.0) or one value per layer.
        clean_logits: return the clean logits (default True). With False, ``None`` is
            returned and the clean forward may stop after the last probed layer.
        eps: denominator floor of the relative error (default 1e-12).
        lr_pass: ``"auto"`` (default), ``"concat"`` or ``"two_pass"``.
        copy: in-place guard mode, ``"auto"`` (default), ``"always"`` or ``"never"``.
        output: logits selector for models returning tuples, dicts or objects
            (:func:`lsa_ext.outputs.logits_of`; default: a tensor, a dict's ``"logits"`` or an
            object's ``.logits``).
        reduction: ``"mean"`` (default, per-sample CM averaged: the paper's formula) or
            ``"batch"`` (one ratio over the batch: the authors' published code).
        detach_clean: treat the clean representations as constants (default False: gradients
            flow through both passes, as Algorithm 3 is written).

    Returns:
        ``(lr_loss, logits_clean, logits_adv)``: a scalar float32 tensor, ``[B, K]`` (or None),
        and ``[B, K]``.

    Raises:
        LsaUserError: no layers or one given twice (also as two selectors of one site), a
            name matching no layer or an index out of range (:func:`resolve_layers`),
            ``x``/``x_adv`` of different shapes, a layer without a tensor output, a bad
            ``gamma`` (see :func:`gamma_tensor`), ``lr_pass``, ``copy`` or ``reduction``, or a
            model output that holds no logits (naming its type).
    """
    output = check_selector(output)
    term = LRTerm(layers, lr_pass=lr_pass, copy=copy, eps=eps, reduction=reduction,
                  detach_clean=detach_clean)
    return term(model, x, x_adv, gamma, clean_logits=clean_logits, output=output)


# --------------------------------------------------------------------------- helpers

def _couples_batch(m: nn.Module) -> bool:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.training or m.running_mean is None  # normalised by the batch's statistics
    return m.training and bool(getattr(m, "track_running_stats", False))  # InstanceNorm


@contextlib.contextmanager
def _per_half_norms(module: nn.Module, b: int) -> Iterator[None]:
    """Within the block, batch-coupled norm layers of ``module`` run each half of their
    ``2b``-sample input separately (first half first) and concatenate the results."""
    patched: list[tuple[nn.Module, bool, Any]] = []

    def per_half(forward, name: str):
        def run(inp: torch.Tensor, *args, **kwargs):
            if inp.dim() == 0 or inp.shape[0] != 2 * b:
                raise LsaUserError(
                    f"{name} got {tuple(inp.shape)} on the concatenated clean + adversarial "
                    f"batch of {2 * b} samples; use lr_pass='two_pass' for this model"
                )
            first, second = inp.split(b)
            return torch.cat([forward(first, *args, **kwargs), forward(second, *args, **kwargs)])

        return run

    try:
        for name, m in module.named_modules():
            if isinstance(m, _PER_HALF) and _couples_batch(m):
                own = "forward" in m.__dict__
                original = m.forward
                m.forward = per_half(original, name or type(m).__name__)
                patched.append((m, own, original))
        yield
    finally:
        for m, own, original in reversed(patched):
            if own:
                m.forward = original
            else:
                del m.forward


def _depth_fraction(module: nn.Module, sites: Sequence[str], x1: torch.Tensor) -> float:
    """Share of the conv/linear multiply-accumulates of one forward that are done when the last
    of ``sites`` has run, from one eval-mode, no-grad forward of ``x1`` (1 sample)."""
    wanted = {(n, k or 1) for n, k in map(parse_site, sites)}
    modules = dict(module.named_modules())
    macs = [0.0]
    at_site: list[float] = []
    calls: dict[str, int] = {}

    def count(m: nn.Module, _inputs, output) -> None:
        w = getattr(m, "weight", None)
        if isinstance(output, torch.Tensor) and isinstance(w, torch.Tensor) and w.dim() > 0:
            macs[0] += w.numel() * output.numel() / w.shape[0]

    def site_hook(name: str):
        def hook(_m, _inputs, _output) -> None:
            calls[name] = calls.get(name, 0) + 1
            if (name, calls[name]) in wanted:
                at_site.append(macs[0])

        return hook

    handles = [m.register_forward_hook(count) for m in module.modules()
               if isinstance(m, LEARNABLE)]
    try:
        handles += [modules[n].register_forward_hook(site_hook(n))
                    for n in {n for n, _ in wanted} if n in modules]
        with model_mode(module, "eval"), torch.no_grad():
            module(x1)
    finally:
        for h in handles:
            h.remove()
    if not at_site or macs[0] <= 0:
        return 1.0
    return max(at_site) / macs[0]
