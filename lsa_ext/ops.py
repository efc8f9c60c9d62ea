"""Fused relative-error ops: argument validation, fake and autograd registrations, dispatch.

The comparison measure (CM) of Khalooei et al., arXiv 2202.02626 (used by Algorithms 1–3):
``CM(a, b) = ||a - b||_F / ||a||_F`` per sample, where ``a`` is a layer's
clean representation and ``b`` its perturbed twin. The compiled kernels (``torch.ops.lsa_ext``)
compute the per-sample squared sums ``D_i = sum (a_i - b_i)^2`` and ``N_i = sum a_i^2`` in one
read of each input, and ``lsa_ext::relative_error`` / ``relative_error_multi`` the ratio from
them in the same call (its backward: the ratio's chain rule on ``[B]`` tensors here, then the
sums' backward kernel). ``reduction="batch"`` (a ratio of sums over samples) uses the sums.
Higher-order gradients: a backward with ``create_graph=True`` computes the sums' gradient with
the same formula in differentiable PyTorch ops instead of the kernel, so autograd records it
(the ratio's chain rule, guard included, already is PyTorch ops); other backwards are unchanged.

Zero-norm guard: the result is ``sqrt(D) / max(sqrt(N), eps, tiny)`` with ``tiny`` the input
dtype's smallest normal number (:func:`lsa_ext.reference.eps_floor`), so a clean sample of zero
norm gives a finite value (``sqrt(D) / max(eps, tiny)``, or 0 when ``D == 0`` too) and gradients
that are finite in the input's dtype, float16 included; the gradient of ``sqrt`` at 0 is taken
as 0. NaN in a sample's inputs gives NaN in that sample only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lsa_ext import _extension, reference
from lsa_ext.reference import acc_dtype

REDUCTIONS = ("none", "mean", "sum", "batch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- validation
def _check_tensor(t: object, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{what} must be a floating point tensor (float16, bfloat16, float32, float64), "
            f"got {t.dtype}"
        )
    if t.dim() == 0:
        raise ValueError(f"{what} must have a batch dimension [B, ...], got a 0-dim tensor")
    return t


def _check_pair(a: object, b: object, prefix: str = "") -> None:
    a = _check_tensor(a, f"{prefix}clean")
    b = _check_tensor(b, f"{prefix}perturbed")
    if a.dtype != b.dtype:
        raise TypeError(
            f"{prefix}clean and perturbed must have the same dtype, got {a.dtype} and {b.dtype}"
        )
    if a.device != b.device:
        raise ValueError(
            f"{prefix}clean and perturbed must be on the same device, got {a.device} and {b.device}"
        )
    if a.shape != b.shape:
        raise ValueError(
            f"{prefix}clean and perturbed must have the same shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )


def _check_options(reduction: object, eps: object) -> None:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        choices = ", ".join(REDUCTIONS)
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {choices}")
    _check_eps(eps)


def _check_eps(eps: object) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def _check_lists(cleans: object, perturbeds: object) -> tuple[list, list]:
    for what, seq in (("cleans", cleans), ("perturbeds", perturbeds)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            raise TypeError(f"{what} must be a list or tuple of tensors, got {type(seq).__name__}")
    cleans, perturbeds = list(cleans), list(perturbeds)
    if not cleans:
        raise ValueError("expected at least one layer, got an empty list")
    if len(cleans) != len(perturbeds):
        raise ValueError(
            f"cleans and perturbeds must have the same length, got {len(cleans)} and "
            f"{len(perturbeds)}"
        )
    for i, (a, b) in enumerate(zip(cleans, perturbeds, strict=True)):
        _check_pair(a, b, f"layer {i}: ")
    first = cleans[0]
    for i, a in enumerate(cleans[1:], start=1):
        if a.shape[0] != first.shape[0]:
            raise ValueError(
                f"all layers must have the same batch size, layer 0 has {first.shape[0]} and "
                f"layer {i} has {a.shape[0]}"
            )
        if a.dtype != first.dtype:
            raise TypeError(
                f"all layers must have the same dtype, layer 0 is {first.dtype} and layer {i} "
                f"is {a.dtype}"
            )
        if a.device != first.device:
            raise ValueError(
                f"all layers must be on the same device, layer 0 is on {first.device} and "
                f"layer {i} on {a.device}"
            )
    return cleans, perturbeds


# --------------------------------------------------------------------------- registrations
if _extension.LOADED:

    # Fake (meta) kernels: output metadata for torch.compile / FakeTensor tracing. They validate
    # like the compiled kernels, so a bad call fails the same way when traced.
    @torch.library.register_fake("lsa_ext::sq_sums")
    def _sq_sums_fake(clean, perturbed):
        _check_pair(clean, perturbed)
        acc = acc_dtype(clean.dtype)
        shape = (clean.shape[0],)
        return clean.new_empty(shape, dtype=acc), clean.new_empty(shape, dtype=acc)

    @torch.library.register_fake("lsa_ext::sq_sums_backward")
    def _sq_sums_backward_fake(grad_diff, grad_norm, clean, perturbed):
        _check_pair(clean, perturbed)
        return torch.empty_like(clean), torch.empty_like(clean)

    @torch.library.register_fake("lsa_ext::sq_sums_multi")
    def _sq_sums_multi_fake(cleans, perturbeds):
        cleans, perturbeds = _check_lists(cleans, perturbeds)
        acc = acc_dtype(cleans[0].dtype)
        shape = (len(cleans), cleans[0].shape[0])
        first = cleans[0]
        return first.new_empty(shape, dtype=acc), first.new_empty(shape, dtype=acc)

    @torch.library.register_fake("lsa_ext::sq_sums_multi_backward")
    def _sq_sums_multi_backward_fake(grad_diff, grad_norm, cleans, perturbeds):
        cleans, perturbeds = _check_lists(cleans, perturbeds)
        return [torch.empty_like(a) for a in cleans], [torch.empty_like(a) for a in cleans]

    @torch.library.register_fake("lsa_ext::relative_error")
    def _relative_error_fake(clean, perturbed, eps):
        _check_pair(clean, perturbed)
        _check_eps(eps)
        acc = acc_dtype(clean.dtype)
        shape = (clean.shape[0],)
        return tuple(clean.new_empty(shape, dtype=acc) for _ in range(3))

    @torch.library.register_fake("lsa_ext::relative_error_multi")
    def _relative_error_multi_fake(cleans, perturbeds, eps):
        cleans, perturbeds = _check_lists(cleans, perturbeds)
        _check_eps(eps)
        acc = acc_dtype(cleans[0].dtype)
        shape = (len(cleans), cleans[0].shape[0])
        return tuple(cleans[0].new_empty(shape, dtype=acc) for _ in range(3))

    # Reference kernels under CompositeExplicitAutograd: they serve every device that has no
    # compiled kernel (and calls without tensor arguments, e.g. empty lists, which then fail
    # validation with a ValueError like everywhere else). Compiled CPU/CUDA kernels, registered
    # for their own dispatch keys, take precedence.
    _LIB = torch.library.Library("lsa_ext", "IMPL")

    def _sq_sums_ref(clean, perturbed):
        _check_pair(clean, perturbed)
        return reference.sq_sums(clean, perturbed)

    def _sq_sums_multi_ref(cleans, perturbeds):
        cleans, perturbeds = _check_lists(cleans, perturbeds)
        return reference.sq_sums_multi(cleans, perturbeds)

    def _grads_ref(grad_diff, grad_norm, clean, perturbed):
        acc = acc_dtype(clean.dtype)
        view = (-1,) + (1,) * (clean.dim() - 1)
        a, b = clean.to(acc), perturbed.to(acc)
        gd, gn = grad_diff.to(acc).reshape(view), grad_norm.to(acc).reshape(view)
        t = (a - b) * (2 * gd)
        return (
            torch.empty_like(clean).copy_(t + a * (2 * gn)),
            torch.empty_like(clean).copy_(-t),
        )

    def _sq_sums_backward_ref(grad_diff, grad_norm, clean, perturbed):
        _check_pair(clean, perturbed)
        return _grads_ref(grad_diff, grad_norm, clean, perturbed)

    def _multi_grads_ref(grad_diff, grad_norm, cleans, perturbeds):
        pairs = [
            _grads_ref(grad_diff[i], grad_norm[i], a, b)
            for i, (a, b) in enumerate(zip(cleans, perturbeds, strict=True))
        ]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def _sq_sums_multi_backward_ref(grad_diff, grad_norm, cleans, perturbeds):
        cleans, perturbeds = _check_lists(cleans, perturbeds)
        return _multi_grads_ref(grad_diff, grad_norm, cleans, perturbeds)

    def _relative_error_ref(clean, perturbed, eps):
        _check_pair(clean, perturbed)
        _check_eps(eps)
        d, n = reference.sq_sums(clean, perturbed)
        return reference.ratio(d, n, reference.eps_floor(eps, clean.dtype)), d, n

    def _relative_error_multi_ref(cleans, perturbeds, eps):
        cleans, perturbeds = _check_lists(cleans, perturbeds)
        _check_eps(eps)
        d, n = reference.sq_sums_multi(cleans, perturbeds)
        return reference.ratio(d, n, reference.eps_floor(eps, cleans[0].dtype)), d, n

    _LIB.impl("relative_error", _relative_error_ref, "CompositeExplicitAutograd")
    _LIB.impl("relative_error_multi", _relative_error_multi_ref, "CompositeExplicitAutograd")
    _LIB.impl("sq_sums", _sq_sums_ref, "CompositeExplicitAutograd")
    _LIB.impl("sq_sums_multi", _sq_sums_multi_ref, "CompositeExplicitAutograd")
    _LIB.impl("sq_sums_backward", _sq_sums_backward_ref, "CompositeExplicitAutograd")
    _LIB.impl("sq_sums_multi_backward", _sq_sums_multi_backward_ref, "CompositeExplicitAutograd")

    # Higher-order gradients: a backward run with create_graph=True (grad mode on) whose inputs
    # require grad takes the sums' gradient from _grads_ref (differentiable PyTorch ops, which
    # autograd records); every other backward calls the fused kernel (the sq_sums_backward ops
    # have no autograd of their own).
    def _records_graph(*tensors) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    def _sums_backward(grad_diff, grad_norm, clean, perturbed):
        if _records_graph(grad_diff, grad_norm, clean, perturbed):
            return _grads_ref(grad_diff, grad_norm, clean, perturbed)
        return torch.ops.lsa_ext.sq_sums_backward(grad_diff, grad_norm, clean, perturbed)

    def _sums_multi_backward(grad_diff, grad_norm, cleans, perturbeds):
        if _records_graph(grad_diff, grad_norm, *cleans, *perturbeds):
            return _multi_grads_ref(grad_diff, grad_norm, cleans, perturbeds)
        grads_a, grads_b = torch.ops.lsa_ext.sq_sums_multi_backward(
            grad_diff, grad_norm, cleans, perturbeds
        )
        return list(grads_a), list(grads_b)

    def _sq_sums_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _sq_sums_backward(ctx, grad_diff, grad_norm):
        clean, perturbed = ctx.saved_tensors
        return _sums_backward(grad_diff, grad_norm, clean, perturbed)

    def _sq_sums_multi_setup(ctx, inputs, output):
        cleans, perturbeds = inputs
        ctx.num_layers = len(cleans)
        ctx.save_for_backward(*cleans, *perturbeds)

    def _sq_sums_multi_backward(ctx, grad_diff, grad_norm):
        saved = ctx.saved_tensors
        n = ctx.num_layers
        return _sums_multi_backward(grad_diff, grad_norm, list(saved[:n]), list(saved[n:]))

    def _ratio_grads(ctx, grad_ratio, grad_diff, grad_norm):
        """Upstream gradients of (ratio, diff, norm) as gradients of (diff, norm)."""
        diff, norm = ctx.saved_tensors[-2:]
        gd, gn = reference.ratio_backward(grad_ratio, diff, norm, ctx.floor)
        if grad_diff is not None:
            gd = gd + grad_diff
        if grad_norm is not None:
            gn = gn + grad_norm
        return gd, gn

    def _relative_error_setup(ctx, inputs, output):
        clean, perturbed, eps = inputs
        ctx.floor = reference.eps_floor(eps, clean.dtype)
        ctx.save_for_backward(clean, perturbed, output[1], output[2])

    def _relative_error_backward(ctx, grad_ratio, grad_diff, grad_norm):
        clean, perturbed = ctx.saved_tensors[:2]
        gd, gn = _ratio_grads(ctx, grad_ratio, grad_diff, grad_norm)
        grad_a, grad_b = _sums_backward(gd, gn, clean, perturbed)
        return grad_a, grad_b, None

    def _relative_error_multi_setup(ctx, inputs, output):
        cleans, perturbeds, eps = inputs
        ctx.num_layers = len(cleans)
        ctx.floor = reference.eps_floor(eps, cleans[0].dtype)
        ctx.save_for_backward(*cleans, *perturbeds, output[1], output[2])

    def _relative_error_multi_backward(ctx, grad_ratio, grad_diff, grad_norm):
        saved = ctx.saved_tensors
        n = ctx.num_layers
        gd, gn = _ratio_grads(ctx, grad_ratio, grad_diff, grad_norm)
        grads_a, grads_b = _sums_multi_backward(gd, gn, list(saved[:n]), list(saved[n : 2 * n]))
        return grads_a, grads_b, None

    torch.library.register_autograd(
        "lsa_ext::relative_error", _relative_error_backward, setup_context=_relative_error_setup
    )
    torch.library.register_autograd(
        "lsa_ext::relative_error_multi",
        _relative_error_multi_backward,
        setup_context=_relative_error_multi_setup,
    )
    torch.library.register_autograd(
        "lsa_ext::sq_sums", _sq_sums_backward, setup_context=_sq_sums_setup
    )
    torch.library.register_autograd(
        "lsa_ext::sq_sums_multi", _sq_sums_multi_backward, setup_context=_sq_sums_multi_setup
    )


# --------------------------------------------------------------------------- public API
def sq_sums(clean: torch.Tensor, perturbed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample squared sums of a clean/perturbed pair, fused.

    Args:
        clean, perturbed: ``[B, ...]`` tensors of one shape, dtype (float16, bfloat16, float32,
            float64) and device; contiguous or channels_last are read without a copy.

    Returns:
        ``(diff, norm)``, each ``[B]``: ``diff[i] = sum (clean[i] - perturbed[i])^2`` and
        ``norm[i] = sum clean[i]^2``; float64 for float64 input, float32 otherwise.
        Differentiable in both inputs.
    """
    _check_pair(clean, perturbed)
    if _extension.has_kernel(clean.device.type):
        return torch.ops.lsa_ext.sq_sums(clean, perturbed)
    return reference.sq_sums(clean, perturbed)


def sq_sums_multi(
    cleans: Sequence[torch.Tensor], perturbeds: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sq_sums` for L layers (any shapes, one batch size B) in one fused call.

    Returns:
        ``(diff, norm)``, each ``[L, B]``.
    """
    cleans, perturbeds = _check_lists(cleans, perturbeds)
    if _extension.has_kernel(cleans[0].device.type):
        return torch.ops.lsa_ext.sq_sums_multi(cleans, perturbeds)
    return reference.sq_sums_multi(cleans, perturbeds)


def relative_error(
    clean: torch.Tensor,
    perturbed: torch.Tensor,
    reduction: str = "none",
    eps: float = 1e-12,
) -> torch.Tensor:
    """Relative error ``||clean_i - perturbed_i||_F / ||clean_i||_F`` of a layer's representation.

    Args:
        clean: ``[B, ...]`` clean representation (float16, bfloat16, float32 or float64).
        perturbed: its perturbed twin, same shape, dtype and device.
        reduction: ``"none"`` → ``[B]`` per sample (default); ``"mean"`` / ``"sum"`` over samples
            → scalar; ``"batch"`` → ``||A - B||_F / ||A||_F`` over the whole batch (the published
            LSA code's form) → scalar.
        eps: lower bound on the denominator ``||clean_i||_F`` (default 1e-12; raised to the
            input dtype's smallest normal number where that is larger, i.e. 2**-14 for
            float16), so a zero-norm sample gives a finite value and gradients finite in the
            input's dtype.

    Returns:
        float64 for float64 input, float32 otherwise. Differentiable in both arguments.
    """
    _check_options(reduction, eps)
    if reduction == "batch":
        d, n = sq_sums(clean, perturbed)
        return reference.reduce(d, n, reduction, reference.eps_floor(eps, clean.dtype))
    _check_pair(clean, perturbed)
    if _extension.has_kernel(clean.device.type):
        r = torch.ops.lsa_ext.relative_error(clean, perturbed, float(eps))[0]
    else:
        r = reference.relative_error(clean, perturbed, "none", eps)
    return _over_samples(r, reduction)


def relative_error_multi(
    cleans: Sequence[torch.Tensor],
    perturbeds: Sequence[torch.Tensor],
    reduction: str = "none",
    eps: float = 1e-12,
) -> torch.Tensor:
    """:func:`relative_error` for L layers in one fused call.

    Args:
        cleans, perturbeds: sequences of L tensors; pair ``l`` has one shape, all share the batch
            size B, dtype and device.
        reduction, eps: as in :func:`relative_error`.

    Returns:
        ``[L, B]`` for ``"none"``, ``[L]`` for ``"mean"``, ``"sum"`` and ``"batch"``.
    """
    _check_options(reduction, eps)
    if reduction == "batch":
        d, n = sq_sums_multi(cleans, perturbeds)
        return reference.reduce(d, n, reduction, reference.eps_floor(eps, cleans[0].dtype))
    cleans, perturbeds = _check_lists(cleans, perturbeds)
    if _extension.has_kernel(cleans[0].device.type):
        r = torch.ops.lsa_ext.relative_error_multi(cleans, perturbeds, float(eps))[0]
    else:
        r = reference.relative_error_multi(cleans, perturbeds, "none", eps)
    return _over_samples(r, reduction)


def _over_samples(r: torch.Tensor, reduction: str) -> torch.Tensor:
    """``reduction`` ("none", "mean" or "sum") of per-sample values along the last dimension."""
    if reduction == "mean":
        return r.mean(dim=-1)
    if reduction == "sum":
        return r.sum(dim=-1)
    return r


def backend() -> dict[str, str]:
    """Which implementation serves each device type.

    Returns:
        ``{"cpu": ..., "cuda": ...}`` with values ``"compiled-cpu"``, ``"compiled-cuda"``,
        ``"reference"`` (pure PyTorch fallback) or ``"unavailable"`` (no such device).
        When the extension failed to load, ``"load_error"`` holds the reason.
    """
    out = {"cpu": "compiled-cpu" if _extension.has_kernel("cpu") else "reference"}
    if _extension.has_kernel("cuda"):
        out["cuda"] = "compiled-cuda"
    else:
        out["cuda"] = "reference" if torch.cuda.is_available() else "unavailable"
    if _extension.LOAD_ERROR:
        out["load_error"] = _extension.LOAD_ERROR
    return out
