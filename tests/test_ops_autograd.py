"""Autograd, torch.library.opcheck and torch.compile for the lsa_ext ops."""

from __future__ import annotations

import pytest
import torch

import lsa_ext
from lsa_ext import reference

REDUCTIONS = ["none", "mean", "sum", "batch"]


def pair(shape, device, seed, dtype=torch.float64, noise=0.3, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64) + 0.5
    b = a + noise * torch.randn(shape, generator=g, dtype=torch.float64)
    a, b = a.to(dtype).to(device), b.to(dtype).to(device)
    if channels_last:
        a = a.contiguous(memory_format=torch.channels_last)
        b = b.contiguous(memory_format=torch.channels_last)
    return a.requires_grad_(True), b.requires_grad_(True)


# ----------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_relative_error(device, reduction):
    a, b = pair([3, 2, 3, 4], device, seed=0, channels_last=True)
    assert torch.autograd.gradcheck(
        lambda x, y: lsa_ext.relative_error(x, y, reduction=reduction), (a, b)
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_relative_error_multi(device, reduction):
    a1, b1 = pair([2, 3, 4], device, seed=1)
    a2, b2 = pair([2, 5], device, seed=2)
    a3, b3 = pair([2, 2, 2, 3], device, seed=3, channels_last=True)

    def f(x1, x2, x3, y1, y2, y3):
        return lsa_ext.relative_error_multi([x1, x2, x3], [y1, y2, y3], reduction=reduction)

    assert torch.autograd.gradcheck(f, (a1, a2, a3, b1, b2, b3))


def test_gradcheck_sq_sums_and_multi_with_one_output_used(device):
    a, b = pair([3, 7], device, seed=4)
    assert torch.autograd.gradcheck(lambda x, y: lsa_ext.sq_sums(x, y)[0], (a, b))
    assert torch.autograd.gradcheck(lambda x, y: lsa_ext.sq_sums(x, y)[1], (a, b))
    assert torch.autograd.gradcheck(
        lambda x, y: lsa_ext.sq_sums_multi([x, y[:, :2]], [y, x[:, :2]]), (a, b)
    )


@pytest.mark.parametrize("eps", [1e-12, 0.0, 0.5])
def test_gradcheck_relative_error_ops_all_outputs(device, eps):
    """The ops' backward (ratio chain rule, then sq_sums_backward) with every output used: the
    ratio and the diff/norm sums it returns; eps = 0 takes the branch where floor**2 underflows
    (max(sqrt(n), floor)), 0.5 clamps some samples."""
    a, b = pair([4, 3, 2], device, seed=10)
    with torch.no_grad():
        a[1] *= 0.1  # norm below 0.5**2

    def single(x, y):
        r, d, n = torch.ops.lsa_ext.relative_error(x, y, eps)
        return r, 0.3 * d, -0.2 * n

    def multi(x, y):
        r, d, n = torch.ops.lsa_ext.relative_error_multi([x, y[:, :1]], [y, x[:, :1]], eps)
        return r, 0.3 * d, -0.2 * n

    assert torch.autograd.gradcheck(single, (a, b))
    assert torch.autograd.gradcheck(multi, (a, b))


@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_zero_norm_grads_match_reference_autograd_in_both_eps_branches(device, eps):
    """Zero-norm, zero-diff and ordinary samples: the op's gradients equal autograd through
    reference.ratio, for floor**2 representable (1e-3) and underflowing (0.0 in float64)."""
    a, b = pair([4, 5], device, seed=11)
    with torch.no_grad():
        a[0] = 0
        b[1] = a[1]
        a[2] = 0
        b[2] = 0
    ra, rb = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    out = lsa_ext.relative_error(a, b, eps=eps)
    want = reference.relative_error(ra, rb, eps=eps)
    torch.testing.assert_close(out, want, rtol=1e-15, atol=0)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64, device=device)
    (out * w).sum().backward()
    (want * w).sum().backward()
    for g, r in ((a.grad, ra.grad), (b.grad, rb.grad)):
        assert g.isfinite().all()
        torch.testing.assert_close(g, r, rtol=1e-14, atol=0)


@pytest.mark.parametrize("multi", [False, True])
def test_zero_norm_and_zero_diff_give_finite_grads(device, multi):
    a, b = pair([4, 6], device, seed=5)
    with torch.no_grad():
        a[0] = 0  # zero-norm clean sample
        b[1] = a[1]  # D = 0
        a[2] = 0
        b[2] = 0  # both
    ra, rb = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    if multi:
        out = lsa_ext.relative_error_multi([a, a], [b, b])
        want = reference.relative_error_multi([ra, ra], [rb, rb])
    else:
        out = lsa_ext.relative_error(a, b)
        want = reference.relative_error(ra, rb)
    assert out.isfinite().all()
    torch.testing.assert_close(out, want)
    out.sum().backward()
    want.sum().backward()
    for g, w in ((a.grad, ra.grad), (b.grad, rb.grad)):
        assert g.isfinite().all()
        torch.testing.assert_close(g, w)
    assert torch.equal(a.grad[1], torch.zeros_like(a[1])) and torch.equal(a.grad[2], a.grad[1])


def _relative_error_f64(a, b, eps):
    """Straightforward float64 formula: ||a_i - b_i|| / max(||a_i||, eps) per sample."""
    d = (a - b).flatten(1).square().sum(dim=1)
    n = a.flatten(1).square().sum(dim=1)
    num = torch.where(d == 0, 0.0, torch.where(d == 0, 1.0, d).sqrt())  # sqrt'(0) := 0
    return num / n.clamp_min(eps * eps).sqrt()  # = max(sqrt(n), eps), gradient 0 below


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("impl", ["ops", "ops_multi", "reference"])
def test_zero_norm_samples_give_finite_correct_grads_in_every_dtype(device, dtype, impl):
    """A zero-norm clean sample: value ||b|| / max(eps, tiny) and gradients finite in the
    input's dtype (float16 included: eps = 1e-12 would give 1e12 > 65504) and equal to a
    float64 autograd of the plain formula with that floor; identical samples: 0 and zero
    gradients (case 09 of issue 10)."""
    g = torch.Generator().manual_seed(9)
    a = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    a[0] = b[0]          # identical
    a[2] = 0             # zero-norm clean, b non-zero
    b[2] = 0
    b[2, 0, 0] = 1.0
    a[3] = 0             # both zero
    b[3] = 0
    a, b = a.to(dtype), b.to(dtype)
    floor = max(1e-12, torch.finfo(dtype).tiny)
    assert reference.eps_floor(1e-12, dtype) == floor
    x = a.to(device).requires_grad_(True)
    z = b.to(device).requires_grad_(True)
    if impl == "ops":
        out = lsa_ext.relative_error(x, z)
    elif impl == "ops_multi":
        out = lsa_ext.relative_error_multi([x], [z])[0]
    else:
        out = reference.relative_error(x, z)
    out.sum().backward()
    ra = a.detach().double().requires_grad_(True)
    rb = b.detach().double().requires_grad_(True)
    want = _relative_error_f64(ra, rb, floor)
    want.sum().backward()
    assert x.grad.dtype == dtype and x.grad.isfinite().all() and z.grad.isfinite().all()
    assert out[0].item() == 0 and (x.grad[0] == 0).all() and (z.grad[0] == 0).all()
    assert out[3].item() == 0 and (x.grad[3] == 0).all() and (z.grad[3] == 0).all()
    assert out[2].item() == pytest.approx(1.0 / floor, rel=1e-6)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5,
           torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(out.double().cpu(), want.detach(), rtol=tol, atol=0)
    # expected gradients rounded to the dtype, as the kernels store them
    for got, ref in ((x.grad, ra.grad), (z.grad, rb.grad)):
        torch.testing.assert_close(got.double().cpu(), ref.to(dtype).double(), rtol=tol,
                                   atol=tol * 1e-3)
    if dtype == torch.float16:  # the value the old floor gave cannot be stored in float16
        assert 1e12 > torch.finfo(torch.float16).max and z.grad[2].abs().max() == 1 / floor


def test_lr_term_of_identical_batches_has_zero_finite_gradients():
    """lr_term(x, x): LR = 0 and every parameter gradient exactly 0 (case 09: an eps = 0 attack
    must not poison training), with ReLU outputs whose samples may be all zero."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with torch.no_grad():
        m[0].bias[:] = -10.0  # every ReLU output is zero: zero-norm samples at layer "1"
    x = torch.rand(16, 4)
    lr, _, _ = lsa_ext.lr_term(m, x, x.clone(), ["0", "1"], gamma=1.0)
    lr.backward()
    assert lr.item() == 0
    for p in m.parameters():
        assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p))


def test_lower_precision_grads_match_reference(device):
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        a, b = pair([3, 4, 5], device, seed=6, dtype=dtype)
        lsa_ext.relative_error(a, b, reduction="mean").backward()
        ra = a.detach().double().requires_grad_(True)
        rb = b.detach().double().requires_grad_(True)
        reference.relative_error(ra, rb, reduction="mean").backward()
        tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]
        assert a.grad.dtype == dtype
        torch.testing.assert_close(a.grad.double(), ra.grad, rtol=tol, atol=tol * 0.1)
        torch.testing.assert_close(b.grad.double(), rb.grad, rtol=tol, atol=tol * 0.1)


# ----------------------------------------------------------------------------- opcheck
def _opcheck_samples(device):
    g = torch.Generator().manual_seed(7)

    def t(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=g).to(dtype).to(device)

    cl = torch.channels_last
    return [
        (t(4, 3, 5, 5), t(4, 3, 5, 5)),
        (t(2, 3, 4, 4, dtype=torch.float64).contiguous(memory_format=cl),
         t(2, 3, 4, 4, dtype=torch.float64).contiguous(memory_format=cl)),
        (t(3, 8, dtype=torch.float16), t(3, 8, dtype=torch.float16)),
        (t(3, 6, 4)[:, ::2], t(3, 3, 4)),  # non-dense clean
    ]


def test_opcheck_sq_sums_and_backward(device):
    for a, b in _opcheck_samples(device):
        ag, bg = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        torch.library.opcheck(torch.ops.lsa_ext.sq_sums.default, (ag, bg))
        acc = reference.acc_dtype(a.dtype)
        gd = torch.randn(a.shape[0], dtype=acc, device=device)
        gn = torch.randn(a.shape[0], dtype=acc, device=device)
        torch.library.opcheck(torch.ops.lsa_ext.sq_sums_backward.default, (gd, gn, a, b))


def test_opcheck_sq_sums_multi_and_backward(device):
    samples = _opcheck_samples(device)
    for dtype in (torch.float32, torch.float64):
        pairs = [(a.to(dtype)[:2], b.to(dtype)[:2]) for a, b in samples]
        cleans = [a for a, _ in pairs]
        perturbeds = [b for _, b in pairs]
        grads = [x.clone().requires_grad_(True) for x in cleans + perturbeds]
        n = len(cleans)
        torch.library.opcheck(
            torch.ops.lsa_ext.sq_sums_multi.default, (grads[:n], grads[n:])
        )
        acc = reference.acc_dtype(dtype)
        gd = torch.randn(n, 2, dtype=acc, device=device)
        gn = torch.randn(n, 2, dtype=acc, device=device)
        torch.library.opcheck(
            torch.ops.lsa_ext.sq_sums_multi_backward.default, (gd, gn, cleans, perturbeds)
        )


def test_opcheck_relative_error_ops(device):
    for a, b in _opcheck_samples(device):
        for eps in (1e-12, 0.0, 0.5):
            ag, bg = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
            torch.library.opcheck(torch.ops.lsa_ext.relative_error.default, (ag, bg, eps))
    samples = _opcheck_samples(device)
    for dtype in (torch.float32, torch.float64):
        pairs = [(a.to(dtype)[:2], b.to(dtype)[:2]) for a, b in samples]
        grads = [x.clone().requires_grad_(True) for p in pairs for x in p]
        torch.library.opcheck(
            torch.ops.lsa_ext.relative_error_multi.default, (grads[0::2], grads[1::2], 1e-12)
        )


# ----------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph_matches_eager(device):
    def measure(x1, y1, x2, y2):
        per_sample = lsa_ext.relative_error(x1, y1)
        layers = lsa_ext.relative_error_multi([x1, x2], [y1, y2], reduction="batch")
        return per_sample.mean() + 0.5 * layers.sum() + lsa_ext.relative_error(x2, y2, "sum")

    torch._dynamo.reset()
    compiled = torch.compile(measure, fullgraph=True)
    a1, b1 = pair([4, 3, 6, 6], device, seed=8, dtype=torch.float32)
    a2, b2 = pair([4, 10], device, seed=9, dtype=torch.float32)
    eager_in = [t.detach().clone().requires_grad_(True) for t in (a1, b1, a2, b2)]
    got = compiled(a1, b1, a2, b2)
    want = measure(*eager_in)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    got.backward()
    want.backward()
    for x, y in zip((a1, b1, a2, b2), eager_in, strict=True):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)
