"""The LR term of AT-LR (Khalooei et al., arXiv 2202.02626, Algorithm 3) for one batch.

``LR(θ, x, x̂) = Σ_{l∈M} γ_l · mean_i CM(φ_l(x_i), φ_l(x̂_i))`` with ``CM`` the per-sample
relative error ``||φ_l(x) − φ_l(x̂)||_F / ||φ_l(x)||_F``, computed for all layers of ``M`` by ONE
fused :func:`lsa_ext.relative_error_multi` call whose fused backward sends gradients into both
the clean and the adversarial pass (both depend on θ).

- :func:`resolve_layers`: the regularized layers M from names, globs, kinds or ``"L<k>"``.
- :func:`gamma_tensor`: γ as one float32 weight per layer.
- :func:`lr_term`: the term itself, plus both passes' logits.

Use from your own loop::

    loss_lr, logits_clean, logits_adv = lsa_ext.training.lr_term(
        model, x, x_adv, ["layers.2"], gamma=1.0)
    loss = lsa_ext.losses.cross_entropy(logits_adv, y) + loss_lr
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lsa_ext.errors import LsaUserError
from lsa_ext.modules import strip_prefix, unwrap
from lsa_ext.ops import relative_error_multi
from lsa_ext.outputs import OutputSelector, check_selector, logits_of
from lsa_ext.probes import Capture, select_layers


def resolve_layers(model: nn.Module, spec: str | Sequence[str]) -> list[str]:
    """Qualified layer names from ``spec``.

    Args:
        spec: a list, or a comma-separated string, of items: ``"L<k>"`` (the k-th learnable
            layer, ``select_layers(model, "learnable")[k]``, as in the paper's "LR-L<k>"), a
            qualified module name (a leading ``module.`` is stripped), a glob, or a kind
            accepted by :func:`lsa_ext.probes.select_layers` (``"activations"``, ...).

    Returns:
        Names in the order given, without duplicates.

    Raises:
        LsaUserError: an index out of range or a name that matches no layer.
    """
    module = unwrap(model)
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if not items or any(not isinstance(s, str) or not s for s in items):
        raise LsaUserError(f"layer list must hold non-empty names, got {spec!r}")
    out: list[str] = []
    for item in items:
        names = select_layers(module, strip_prefix(item))
        out.extend(n for n in names if n not in out)
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


def lr_term(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    layers: Sequence[str],
    gamma: float | Sequence[float] | torch.Tensor = 1.0,
    *,
    clean_logits: bool = True,
    eps: float = 1e-12,
    output: OutputSelector = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The LR term of Algorithm 3 for one batch: ``Σ_l γ_l · mean_i CM(φ_l(x_i), φ_l(x̂_i))``.

    Runs the model on ``x`` (clean pass) and on ``x_adv`` (adversarial pass) in its current
    train/eval mode, capturing the outputs of ``layers`` with gradients kept, and reduces all
    layers with one fused :func:`lsa_ext.relative_error_multi` call. Backpropagating the result
    sends gradients through both passes. Use ``logits_adv`` for your base loss so the adversarial
    forward is not run twice.

    Args:
        model: the model (a ``DistributedDataParallel`` wrapper is fine: hooks go on
            ``model.module``; the clean pass calls ``model.module``).
        x: clean batch ``[B, ...]`` float; ``x_adv``: its perturbed twin (same shape).
        layers: qualified layer names (see :func:`resolve_layers`), at least one.
        gamma: weight per layer, a scalar for all (default 1.0) or one value per layer.
        clean_logits: run the full clean forward and return its logits (default True). With
            False the clean forward stops after the last probed layer and ``None`` is returned.
        eps: denominator floor of the relative error (default 1e-12).
        output: logits selector for models returning tuples, dicts or objects
            (:func:`lsa_ext.outputs.logits_of`; default: a tensor, a dict's ``"logits"`` or an
            object's ``.logits``).

    Returns:
        ``(lr_loss, logits_clean, logits_adv)``: a scalar float32 tensor, ``[B, K]`` (or None),
        and ``[B, K]``.

    Raises:
        LsaUserError: no layers, ``x``/``x_adv`` of different shapes, a layer without a tensor
            output, a bad ``gamma`` (see :func:`gamma_tensor`), or a model output that holds
            no logits (naming its type).
    """
    output = check_selector(output)
    module = unwrap(model)
    names = [strip_prefix(n) for n in layers]
    if not names:
        raise LsaUserError("lr_term needs at least one layer")
    if x.shape != x_adv.shape:
        raise LsaUserError(
            f"x and x_adv must have one shape, got {tuple(x.shape)} and {tuple(x_adv.shape)}"
        )
    wanted = set(names)
    store: dict[str, torch.Tensor] = {}
    stop_early = [False]

    def on_output(site: str, t: torch.Tensor) -> None:
        if site in wanted and site not in store:
            store[site] = t
            if stop_early[0] and len(store) == len(wanted):
                raise _StopForward

    with Capture(module, names, on_output=on_output, detach=False) as cap:
        stop_early[0] = not clean_logits
        logits_clean: torch.Tensor | None = None
        try:
            logits_clean = logits_of(module(x), output, batch=x.shape[0])
        except _StopForward:
            pass
        clean = dict(store)
        store.clear()
        cap.reset()  # the adversarial pass' outputs are again the layers' first calls
        stop_early[0] = False
        logits_adv = logits_of(model(x_adv), output, batch=x_adv.shape[0])
        adv = dict(store)
    missing = [n for n in names if n not in clean or n not in adv]
    if missing:
        raise LsaUserError(f"layers {missing} produced no tensor output during the forward pass")
    cm = relative_error_multi([clean[n] for n in names], [adv[n] for n in names],
                              reduction="mean", eps=eps)
    g = gamma_tensor(gamma, len(names), cm.device)
    return (g * cm.float()).sum(), (logits_clean if clean_logits else None), logits_adv
