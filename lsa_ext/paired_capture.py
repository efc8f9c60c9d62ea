"""Paired capture: per-sample CM of every probed layer, a clean batch vs its perturbed twins.

Khalooei et al. (arXiv 2202.02626), Algorithm 2, compares a layer's representation of a clean
input ``φ_l(x)`` with that of its perturbed twin ``φ_l(x̂)`` through a comparison measure (CM;
default: relative error ``‖φ_l(x) − φ_l(x̂)‖ / ‖φ_l(x)‖``, :mod:`lsa_ext.measures`).

Pass mode (the ``mode=`` keyword; :data:`PASS_MODES`) — how the clean and perturbed inputs go
through the model:

* ``"concat"`` (default): the clean chunk and its P perturbed twins are concatenated into one
  batch of ``(P+1)·c`` samples (``c = max(1, forward_batch // (P+1))``) and run in one forward;
  a hook on every probed layer reduces the layer's output at once with the measure on
  ``(out[:c], out[(p+1)c:(p+2)c])`` (for relative error: the fused ``lsa_ext.sq_sums`` kernel)
  and keeps only ``[c]`` numbers. Nothing else is held, so the peak memory is that of one plain
  forward of ``forward_batch`` samples. Since every value is reduced as soon as it is produced,
  later in-place ops (``ReLU(inplace=True)``) cannot corrupt it. Valid only when samples are
  independent in eval mode, which holds for the usual layers (BatchNorm uses running statistics
  in eval mode).
* ``"two_pass"``: for models whose forward couples the samples of a batch (e.g. a custom layer
  normalising over the batch, or a model that checks its batch size), the clean chunk runs
  alone (each probed output is cloned and kept), then each perturbed chunk runs alone and is
  reduced against the kept clean output. Peak memory: one forward plus the clean outputs of all
  probed layers.

("mode" elsewhere in lsa_ext means something else: :data:`lsa_ext.modules.MODES` is the
model's train/eval mode during an attack.)

Sites: probes are reported by qualified module name in the order they run in the forward; a
module called k times per forward gives the sites ``name``, ``name#2``, …, ``name#k``
(:class:`lsa_ext.probes.Capture`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lsa_ext.errors import LsaUserError
from lsa_ext.losses import predict
from lsa_ext.measures import Measure, MeasureFn, get_measure
from lsa_ext.probes import Capture

PASS_MODES = ("concat", "two_pass")


def check_pass_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`PASS_MODES`, else :class:`LsaUserError`."""
    if mode not in PASS_MODES:
        raise LsaUserError(f"unknown mode {mode!r}; choices: {', '.join(PASS_MODES)}")
    return mode


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

    def stacked(self) -> torch.Tensor:
        """The collected values ``[P, S, c]`` in site order."""
        if self.mode == "concat":
            return torch.stack([self.values[s][0] for s in self.order], dim=1)
        for s in self.order:
            if len(self.values.get(s, [])) != self.num_perturbed:
                raise LsaUserError(f"layer {s!r} did not run on every perturbed pass")
        return torch.stack([torch.stack(self.values[s]) for s in self.order], dim=1)


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
        model: the network (its train/eval mode is used as is; :func:`lsa_ext.analysis.analyze`
            sets eval).
        layer_names: qualified module names to probe.
        x: clean inputs ``[B, ...]``; x_hats: P perturbed versions, each like ``x``.
        measure: registry name, :class:`Measure` or callable ``(a, b) -> [B]``.
        mode: pass mode, ``"concat"`` or ``"two_pass"`` (module docstring).
        forward_batch: most samples per forward (default: ``B·(P+1)`` for concat, i.e. one
            forward; ``B`` for two_pass).
        predictions: also return the model's predicted classes ``[P+1, B]`` (int64; row 0
            clean, row p+1 perturbed p; :func:`lsa_ext.losses.predict` on the output), or None
            when the output is not a ``[N, K]``/``[N, 1]``/``[N]`` tensor.

    Returns:
        ``(sites, values)``: sites in execution order and values ``[P, S, B]`` (float32, or
        float64 for float64 activations); ``(sites, values, preds)`` with ``predictions``.

    Raises:
        LsaUserError: unknown mode or measure, no perturbed input, ``forward_batch < 1``, no
            probed layer ran, the probed layers ran differently from one chunk to the next, a
            layer output that is not batch-first floating point, a measure of the wrong shape.
    """
    check_pass_mode(mode)
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
        inputs = [t[start:start + chunk] for t in (x, *x_hats)]
        col, outs = _run_chunk(model, layer_names, meas, inputs, mode)
        if preds is not None:
            p_chunk = _predictions(outs, P + 1, inputs[0].shape[0])
            preds = None if p_chunk is None else preds + [p_chunk]
        if sites is None:
            sites = list(col.order)
        elif col.order != sites:
            raise LsaUserError(
                "the probed layers ran differently from one batch to the next "
                f"({sites} vs {col.order}); LSA needs the same layers on every forward"
            )
        parts.append(col.stacked())
    assert sites is not None
    values = torch.cat(parts, dim=2)
    if predictions:
        return sites, values, (torch.cat(preds, dim=1) if preds else None)
    return sites, values


def _run_chunk(
    model: nn.Module, layer_names: Sequence[str], meas: Measure,
    inputs: list[torch.Tensor], mode: str,
) -> tuple[_Collector, list]:
    """Runs one clean chunk ``inputs[0]`` and its twins ``inputs[1:]`` under the probes."""
    col = _Collector(meas, inputs[0].shape[0], len(inputs) - 1, mode)
    with Capture(model, layer_names, on_output=col, detach=True, copy="never") as cap:
        if mode == "concat":
            cap.reset()
            outs = [model(torch.cat(inputs))]
        else:
            outs = []
            for k, xin in enumerate(inputs):
                col.pass_index = k
                cap.reset()
                outs.append(model(xin))
    if not col.order:
        raise LsaUserError(
            f"none of the probed layers ran in the forward: {', '.join(layer_names)}"
        )
    return col, outs


def _predictions(outs: list, groups: int, c: int) -> torch.Tensor | None:
    """Predicted classes ``[groups, c]`` from the forward outputs, or None if not logits."""
    if not all(isinstance(o, torch.Tensor) and o.dim() in (1, 2) for o in outs):
        return None
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    if out.shape[0] != groups * c:
        return None
    return predict(out.detach()).reshape(groups, c)
