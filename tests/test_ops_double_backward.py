"""Higher-order gradients through the lsa_ext ops (backward with create_graph=True)."""

from __future__ import annotations

import warnings

import pytest
import torch

import lsa_ext
from lsa_ext import reference

REDUCTIONS = ["none", "mean", "sum", "batch"]
NOT_REGISTERED = "autograd kernel was not registered"


def pair(shape, device, seed, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64) + 0.5
    b = a + noise * torch.randn(shape, generator=g, dtype=torch.float64)
    return a.to(device).requires_grad_(True), b.to(device).requires_grad_(True)


def weights(out, seed):
    """Fixed random weights of ``out``'s shape, so a non-scalar output gives a scalar loss."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)


def second_order(f, inputs, seed=0):
    """``(grads, hessian-vector products)``: gradients of ``sum(w * f(inputs))`` (create_graph)
    and the gradients of ``sum(grads**2)`` with respect to ``inputs``."""
    out = f(*inputs)
    grads = torch.autograd.grad((out * weights(out, seed)).sum(), inputs, create_graph=True)
    loss = sum((g**2).sum() for g in grads)
    return grads, torch.autograd.grad(loss, inputs)


def detached(inputs):
    return [t.detach().clone().requires_grad_(True) for t in inputs]


def multi(reduction, eps=1e-12):
    def f(x1, x2, y1, y2):
        return lsa_ext.relative_error_multi([x1, x2], [y1, y2], reduction=reduction, eps=eps)

    return f


def multi_reference(reduction, eps=1e-12):
    def f(x1, x2, y1, y2):
        return reference.relative_error_multi([x1, x2], [y1, y2], reduction=reduction, eps=eps)

    return f


def multi_inputs(device):
    a1, b1 = pair([3, 2, 4], device, seed=1)
    a2, b2 = pair([3, 5], device, seed=2)
    return (a1, a2, b1, b2)


# ----------------------------------------------------------------------------- gradgradcheck
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradgradcheck_relative_error(device, reduction):
    a, b = pair([3, 2, 3], device, seed=0)
    assert torch.autograd.gradgradcheck(
        lambda x, y: lsa_ext.relative_error(x, y, reduction=reduction), (a, b)
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradgradcheck_relative_error_multi(device, reduction):
    assert torch.autograd.gradgradcheck(multi(reduction), multi_inputs(device))


def test_gradgradcheck_sq_sums_and_multi(device):
    a, b = pair([3, 7], device, seed=4)
    assert torch.autograd.gradgradcheck(lambda x, y: lsa_ext.sq_sums(x, y), (a, b))
    assert torch.autograd.gradgradcheck(
        lambda x, y: lsa_ext.sq_sums_multi([x, y[:, :2]], [y, x[:, :2]]), (a, b)
    )


@pytest.mark.parametrize("eps", [1e-12, 0.0, 0.5])
def test_gradgradcheck_relative_error_ops_all_outputs(device, eps):
    """Every output of the ops used (ratio and the diff/norm sums); eps = 0 takes the branch
    where floor**2 underflows, 0.5 clamps sample 1 (norm well inside the guard, so finite
    differences stay on one side of it)."""
    a, b = pair([4, 3, 2], device, seed=10)
    with torch.no_grad():
        a[1] *= 0.1

    def single(x, y):
        r, d, n = torch.ops.lsa_ext.relative_error(x, y, eps)
        return r, 0.3 * d, -0.2 * n

    def multi_op(x, y):
        r, d, n = torch.ops.lsa_ext.relative_error_multi([x, y[:, :1]], [y, x[:, :1]], eps)
        return r, 0.3 * d, -0.2 * n

    if eps == 0.5:
        assert (a[1].detach().square().sum() < 0.5**2 / 2).item()
    assert torch.autograd.gradgradcheck(single, (a, b))
    assert torch.autograd.gradgradcheck(multi_op, (a, b))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradgradcheck_inside_zero_norm_guard(device, reduction):
    """A clean sample of norm far below eps: the clamped denominator's zero gradient and the
    guard's value hold in the second derivative too."""
    a, b = pair([3, 4], device, seed=12)
    with torch.no_grad():
        a[0] *= 1e-3
    assert torch.autograd.gradgradcheck(
        lambda x, y: lsa_ext.relative_error(x, y, reduction=reduction, eps=0.5), (a, b)
    )
    inputs = (a, *detached((a[:, :2],)), b, *detached((b[:, :2],)))
    assert torch.autograd.gradgradcheck(multi(reduction, eps=0.5), inputs)


# ----------------------------------------------------------------------------- values
def test_issue_example_matches_plain_float64_formula(device):
    torch.manual_seed(0)
    a = torch.randn(2, 5, dtype=torch.float64, device=device, requires_grad=True)
    b = a.detach() + 0.1 * torch.randn(2, 5, dtype=torch.float64, device=device)
    g, = torch.autograd.grad(lsa_ext.relative_error(a, b, reduction="mean"), a,
                             create_graph=True)
    h, = torch.autograd.grad((g**2).sum(), a)
    ra = a.detach().clone().requires_grad_(True)
    rg, = torch.autograd.grad(((ra - b).norm(dim=1) / ra.norm(dim=1)).mean(), ra,
                              create_graph=True)
    rh, = torch.autograd.grad((rg**2).sum(), ra)
    assert rh[0].abs().min() > 0
    torch.testing.assert_close(g, rg, rtol=1e-12, atol=0)
    torch.testing.assert_close(h, rh, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("which", ["single", "multi"])
def test_second_order_equals_reference(device, reduction, which):
    """Hessian-vector products through the ops equal autograd through lsa_ext.reference."""
    if which == "single":
        a, b = pair([4, 3, 2], device, seed=3)
        inputs = (a, b)

        def f(x, y):
            return lsa_ext.relative_error(x, y, reduction=reduction)

        def f_ref(x, y):
            return reference.relative_error(x, y, reduction=reduction)
    else:
        inputs, f, f_ref = multi_inputs(device), multi(reduction), multi_reference(reduction)
    grads, hvps = second_order(f, inputs)
    want_grads, want_hvps = second_order(f_ref, detached(inputs))
    for got, want in zip(grads + hvps, want_grads + want_hvps, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_sq_sums_second_order_equals_reference(device):
    a, b = pair([3, 6], device, seed=5)
    for f, f_ref in (
        (lambda x, y: torch.stack(lsa_ext.sq_sums(x, y)),
         lambda x, y: torch.stack(reference.sq_sums(x, y))),
        (lambda x, y: torch.stack(lsa_ext.sq_sums_multi([x, y], [y, x])),
         lambda x, y: torch.stack(reference.sq_sums_multi([x, y], [y, x]))),
    ):
        grads, hvps = second_order(f, (a, b))
        want_grads, want_hvps = second_order(f_ref, detached((a, b)))
        for got, want in zip(grads + hvps, want_grads + want_hvps, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("multi_op", [False, True])
def test_zero_norm_and_zero_diff_second_order_equals_reference(device, multi_op):
    """Exactly zero norm / diff (no finite differences there): second-order gradients finite
    and equal to autograd through the reference, for both eps branches. (A zero-norm clean
    sample with a non-zero perturbed one is left out for eps = 0: its value ||b|| / 2**-1022
    overflows float64, as documented.)"""
    for eps in (1e-12, 0.0, 1e-3):
        a, b = pair([4, 5], device, seed=11)
        with torch.no_grad():
            if eps > 0:
                a[0] = 0
            b[1] = a[1]
            a[2] = 0
            b[2] = 0
        if multi_op:
            f, f_ref = multi("none", eps), multi_reference("none", eps)
            inputs = (a, *detached((a[:, :2],)), b, *detached((b[:, :2],)))
        else:
            def f(x, y, eps=eps):
                return lsa_ext.relative_error(x, y, eps=eps)

            def f_ref(x, y, eps=eps):
                return reference.relative_error(x, y, eps=eps)

            inputs = (a, b)
        grads, hvps = second_order(f, inputs, seed=1)
        want_grads, want_hvps = second_order(f_ref, detached(inputs), seed=1)
        for got, want in zip(grads + hvps, want_grads + want_hvps, strict=True):
            assert got.isfinite().all()
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_third_order_equals_reference(device):
    a, b = pair([3, 4], device, seed=6)

    def third(f, x, y):
        g, = torch.autograd.grad(f(x, y).sum(), x, create_graph=True)
        h, = torch.autograd.grad((g**3).sum(), x, create_graph=True)
        return torch.autograd.grad((h * g).sum(), (x, y))

    got = third(lambda x, y: lsa_ext.relative_error_multi([x], [y])[0], a, b)
    want = third(reference.relative_error, *detached((a, b)))
    for g, w in zip(got, want, strict=True):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-13)


def test_first_order_gradients_with_create_graph_match_kernel(device):
    """create_graph=True takes the PyTorch-op path, create_graph=False the fused kernel: the
    same gradients (float32 too, within rounding)."""
    for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 1e-6)):
        a, b = pair([4, 3, 5], device, seed=7)
        a, b = (t.detach().to(dtype).requires_grad_(True) for t in (a, b))
        for f in (
            lambda x, y: lsa_ext.relative_error(x, y, reduction="sum"),
            lambda x, y: lsa_ext.relative_error_multi([x, y], [y, x], reduction="batch").sum(),
        ):
            plain = torch.autograd.grad(f(a, b), (a, b))
            recorded = torch.autograd.grad(f(a, b), (a, b), create_graph=True)
            assert all(g.grad_fn is not None for g in recorded)
            for got, want in zip(recorded, plain, strict=True):
                assert got.dtype == dtype
                torch.testing.assert_close(got, want, rtol=tol, atol=tol * 1e-2)


# ----------------------------------------------------------------------------- warnings
def _not_registered_warnings(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if NOT_REGISTERED in str(w.message)]


def test_double_backward_raises_no_autograd_not_registered_warning(device):
    a, b = pair([3, 4], device, seed=8)
    a2, b2 = pair([3, 2], device, seed=9)

    def run():
        for out in (
            lsa_ext.relative_error(a, b, reduction="mean"),
            lsa_ext.relative_error(a, b, reduction="batch"),
            lsa_ext.relative_error_multi([a, a2], [b, b2], reduction="sum").sum(),
            lsa_ext.relative_error_multi([a, a2], [b, b2], reduction="batch").sum(),
            lsa_ext.sq_sums(a, b)[0].sum(),
            lsa_ext.sq_sums_multi([a, a2], [b, b2])[1].sum(),
        ):
            grads = torch.autograd.grad(out, (a, b), create_graph=True)
            torch.autograd.grad(sum((g**2).sum() for g in grads), (a, b))

    assert _not_registered_warnings(run) == []


def test_not_registered_warning_is_detected(device):
    """The check above can fail: differentiating the backward op itself (no autograd of its
    own) raises the warning it looks for."""
    a, b = pair([3, 4], device, seed=8)
    gd = torch.ones(3, dtype=torch.float64, device=device, requires_grad=True)

    def run():
        grad_a, _ = torch.ops.lsa_ext.sq_sums_backward(gd, gd, a, b)
        torch.autograd.grad(grad_a.sum(), a, allow_unused=True)

    assert _not_registered_warnings(run)
