"""Compiled relative-error ops against the float64 pure-PyTorch reference.

Covers randomized shapes, dtypes and memory layouts (hypothesis), every reduction, large and tiny
samples, both CPU instruction-set paths, NaN and zero-norm samples, backend() and the reference
fallback. Threads: tests/test_ops_threads.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lsa_ext
from lsa_ext import _extension, ops, reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
REDUCTIONS = ["none", "mean", "sum", "batch"]
# rtol of the squared sums against float64 on the same (exactly representable) input values:
# accumulation error only, float32 accumulation for all but float64.
SUM_RTOL = {torch.float16: 2e-6, torch.bfloat16: 2e-6, torch.float32: 2e-6, torch.float64: 1e-13}
# Gradients are rounded once to the input dtype: about half an ulp, plus float32 arithmetic.
# The kernels' ratio of their own sums against reference.ratio's PyTorch ops on the same sums.
RATIO_ULPS = {torch.float32: 4 * 2.0**-24, torch.float64: 4 * 2.0**-53}
GRAD_RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6, torch.float64: 1e-13}

HYPO = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@contextlib.contextmanager
def cpu_isa(isa: str):
    """Selects the CPU kernels' instruction-set path ("default" = best available, "generic")."""
    old = os.environ.get("LSA_EXT_CPU_ISA")
    if isa == "generic":
        os.environ["LSA_EXT_CPU_ISA"] = "generic"
    else:
        os.environ.pop("LSA_EXT_CPU_ISA", None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LSA_EXT_CPU_ISA", None)
        else:
            os.environ["LSA_EXT_CPU_ISA"] = old


def random_pair(shape, dtype, device, seed=0, mean=0.0, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64) + mean
    b = a + noise * torch.randn(shape, generator=g, dtype=torch.float64)
    return a.to(dtype).to(device), b.to(dtype).to(device)


def relayout(t: torch.Tensor, kind: str, perm: list[int]) -> torch.Tensor:
    """``t``'s values in another memory layout."""
    if kind == "contiguous":
        return t.contiguous()
    if kind == "permuted":  # dense, strides permuted (channels_last-like or batch not outermost)
        inv = [perm.index(i) for i in range(t.dim())]
        return t.permute(perm).contiguous().permute(inv)
    if kind == "sliced":  # not dense: every other element of a wider tensor
        return torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0]
    if kind == "offset":  # dense, but starting one sample into its storage
        pad = torch.full_like(t[:1] if t.shape[0] else t.new_empty((1, *t.shape[1:])), 7.0)
        return torch.cat([pad, t])[1:]
    raise AssertionError(kind)


def ref_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return reference.sq_sums(a.double().cpu(), b.double().cpu())


@st.composite
def layouts(draw, ndim: int):
    kind = draw(st.sampled_from(["contiguous", "permuted", "sliced", "offset"]))
    perm = draw(st.permutations(list(range(ndim))))
    return kind, perm


@st.composite
def cases(draw):
    ndim = draw(st.integers(1, 5))
    batch = draw(st.sampled_from([0, 1, 1, 2, 3, 5, 8]))
    rest = [draw(st.sampled_from([0, 1, 2, 3, 5, 7] if i == 0 else [1, 2, 3, 4, 6])) for i in
            range(ndim - 1)]
    return dict(
        shape=[batch, *rest],
        dtype=draw(st.sampled_from(DTYPES)),
        layout_a=draw(layouts(ndim)),
        layout_b=draw(layouts(ndim)),
        isa=draw(st.sampled_from(["default", "generic"])),
        mean=draw(st.sampled_from([0.0, 2.0])),
        seed=draw(st.integers(0, 2**16)),
    )


# ----------------------------------------------------------------------------- forward
@HYPO
@given(case=cases())
def test_sq_sums_matches_float64_reference(device, case):
    a, b = random_pair(case["shape"], case["dtype"], device, case["seed"], case["mean"])
    a = relayout(a, *case["layout_a"])
    b = relayout(b, *case["layout_b"])
    with cpu_isa(case["isa"]):
        d, n = lsa_ext.sq_sums(a, b)
    want_d, want_n = ref_sums(a, b)
    acc = reference.acc_dtype(case["dtype"])
    assert d.dtype == n.dtype == acc and d.shape == n.shape == (case["shape"][0],)
    rtol = SUM_RTOL[case["dtype"]]
    torch.testing.assert_close(d.double().cpu(), want_d, rtol=rtol, atol=1e-30)
    torch.testing.assert_close(n.double().cpu(), want_n, rtol=rtol, atol=1e-30)


@HYPO
@given(case=cases(), reduction=st.sampled_from(REDUCTIONS))
def test_relative_error_all_reductions_match_reference(device, case, reduction):
    a, b = random_pair(case["shape"], case["dtype"], device, case["seed"], case["mean"])
    a = relayout(a, *case["layout_a"])
    with cpu_isa(case["isa"]):
        got = lsa_ext.relative_error(a, b, reduction=reduction)
    want = reference.relative_error(a.double().cpu(), b.double().cpu(), reduction=reduction)
    assert got.shape == want.shape
    assert got.dtype == reference.acc_dtype(case["dtype"])
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-6 if got.dtype != torch.float64
                               else 1e-12, atol=0, equal_nan=True)


@HYPO
@given(case=cases(), eps=st.sampled_from([1e-12, 0.0, 1e-3, 2.0]))
def test_relative_error_op_matches_float64_reference(device, case, eps):
    """The measure computed in the kernel (lsa_ext::relative_error): its ratio against the
    float64 reference, and the reference's ratio of the op's own sums (same eps floor) to an ulp
    or two (IEEE sqrt here; PyTorch's vectorised float32 sqrt is within 0.5001 ulp)."""
    a, b = random_pair(case["shape"], case["dtype"], device, case["seed"], case["mean"])
    a = relayout(a, *case["layout_a"])
    b = relayout(b, *case["layout_b"])
    if case["shape"][0] > 1 and a.numel():
        a.view(-1)[: a.numel() // a.shape[0]].zero_() if a.is_contiguous() else a[0].zero_()
    with cpu_isa(case["isa"]):
        r, d, n = torch.ops.lsa_ext.relative_error(a, b, eps)
    acc = reference.acc_dtype(case["dtype"])
    assert r.dtype == d.dtype == n.dtype == acc and r.shape == (case["shape"][0],)
    floor = reference.eps_floor(eps, case["dtype"])
    torch.testing.assert_close(r, reference.ratio(d, n, floor), rtol=RATIO_ULPS[acc], atol=0)
    want_d, want_n = ref_sums(a, b)
    want = reference.ratio(want_d, want_n, floor)
    rtol = SUM_RTOL[case["dtype"]]
    torch.testing.assert_close(d.double().cpu(), want_d, rtol=rtol, atol=1e-30)
    torch.testing.assert_close(n.double().cpu(), want_n, rtol=rtol, atol=1e-30)
    torch.testing.assert_close(r.double().cpu(), want, rtol=2 * rtol, atol=0)


def test_relative_error_op_eps_floor_zero_norm_and_empty(device):
    """Zero-norm clean samples: ||b|| / max(eps, tiny) with tiny the input dtype's smallest normal
    (float16: 2**-14, so the default eps gives 16384 ||b||, not 1e12 ||b||); zero diff: 0; an
    empty batch and empty samples."""
    for dtype in DTYPES:
        a = torch.zeros(3, 4, dtype=dtype, device=device)
        b = torch.zeros(3, 4, dtype=dtype, device=device)
        b[0, 1] = 0.5
        a[2] = 1.0
        b[2] = 1.0
        for eps, floor in ((1e-12, reference.eps_floor(1e-12, dtype)), (0.25, 0.25)):
            r, d, n = torch.ops.lsa_ext.relative_error(a, b, eps)
            assert r.cpu().tolist() == [pytest.approx(0.5 / floor, rel=1e-7), 0.0, 0.0], dtype
            assert d.cpu().tolist() == [0.25, 0.0, 0.0] and n.cpu().tolist() == [0.0, 0.0, 4.0]
            if dtype == torch.float16 and eps == 1e-12:
                assert r[0].item() == 0.5 * 2**14
        if dtype == torch.float64:  # eps = 0: floor 2**-1022, whose square underflows
            r, _, _ = torch.ops.lsa_ext.relative_error(a, b, 0.0)
            assert r[0].item() == 0.5 / 2.0**-1022
    for shape in ([0, 3], [3, 0], [0]):
        r, d, n = torch.ops.lsa_ext.relative_error(torch.ones(shape, device=device),
                                                   torch.ones(shape, device=device), 1e-12)
        assert r.shape == d.shape == n.shape == (shape[0],) and not r.any()
        r, _, _ = torch.ops.lsa_ext.relative_error_multi(
            [torch.ones(shape, device=device)] * 2, [torch.ones(shape, device=device)] * 2, 0.0)
        assert r.shape == (2, shape[0]) and not r.any()


@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf")])
def test_relative_error_ops_reject_bad_eps(device, eps):
    a = torch.ones(2, 3, device=device)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        torch.ops.lsa_ext.relative_error(a, a, eps)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        torch.ops.lsa_ext.relative_error_multi([a], [a], eps)


@st.composite
def multi_cases(draw):
    batch = draw(st.sampled_from([1, 2, 3, 6]))
    layers = []
    for _ in range(draw(st.integers(1, 6))):
        rest = draw(st.lists(st.integers(1, 6), min_size=0, max_size=3))
        layers.append(([batch, *rest], draw(layouts(1 + len(rest)))))
    return dict(layers=layers, dtype=draw(st.sampled_from(DTYPES)),
                isa=draw(st.sampled_from(["default", "generic"])),
                reduction=draw(st.sampled_from(REDUCTIONS)), seed=draw(st.integers(0, 2**16)))


@HYPO
@given(case=multi_cases())
def test_multi_matches_per_layer_reference(device, case):
    cleans, perturbeds = [], []
    for i, (shape, layout) in enumerate(case["layers"]):
        a, b = random_pair(shape, case["dtype"], device, case["seed"] + i, mean=1.0)
        cleans.append(relayout(a, *layout))
        perturbeds.append(b)
    with cpu_isa(case["isa"]):
        d, n = lsa_ext.sq_sums_multi(cleans, perturbeds)
        got = lsa_ext.relative_error_multi(cleans, perturbeds, reduction=case["reduction"])
        r_op, d_op, n_op = torch.ops.lsa_ext.relative_error_multi(cleans, perturbeds, 1e-12)
    assert torch.equal(d_op, d) and torch.equal(n_op, n)
    floor = reference.eps_floor(1e-12, case["dtype"])
    torch.testing.assert_close(r_op, reference.ratio(d, n, floor), rtol=RATIO_ULPS[r_op.dtype],
                               atol=0)
    pairs = [ref_sums(a, b) for a, b in zip(cleans, perturbeds, strict=True)]
    rtol = SUM_RTOL[case["dtype"]]
    torch.testing.assert_close(d.double().cpu(), torch.stack([p[0] for p in pairs]), rtol=rtol,
                               atol=1e-30)
    torch.testing.assert_close(n.double().cpu(), torch.stack([p[1] for p in pairs]), rtol=rtol,
                               atol=1e-30)
    want = torch.stack([
        reference.relative_error(a.double().cpu(), b.double().cpu(), case["reduction"])
        for a, b in zip(cleans, perturbeds, strict=True)
    ])
    torch.testing.assert_close(got.double().cpu(), want, rtol=max(rtol, 1e-12), atol=0)


# ----------------------------------------------------------------------------- backward
@HYPO
@given(case=cases())
def test_sq_sums_backward_matches_float64_formula(device, case):
    a, b = random_pair(case["shape"], case["dtype"], device, case["seed"], case["mean"])
    a = relayout(a, *case["layout_a"])
    b = relayout(b, *case["layout_b"])
    g = torch.Generator().manual_seed(case["seed"] + 1)
    acc = reference.acc_dtype(case["dtype"])
    gd = torch.randn(case["shape"][0], generator=g, dtype=torch.float64).to(acc).to(device)
    gn = torch.randn(case["shape"][0], generator=g, dtype=torch.float64).to(acc).to(device)
    with cpu_isa(case["isa"]):
        ga, gb = torch.ops.lsa_ext.sq_sums_backward(gd, gn, a, b)
    # layout contract: gradients are laid out like torch.empty_like(clean)
    assert ga.stride() == torch.empty_like(a).stride() == gb.stride()
    assert ga.dtype == gb.dtype == case["dtype"]
    view = (-1,) + (1,) * (a.dim() - 1)
    a64, b64 = a.double().cpu(), b.double().cpu()
    gd64, gn64 = gd.double().cpu().view(view), gn.double().cpu().view(view)
    want_a = 2 * (a64 - b64) * gd64 + 2 * a64 * gn64
    want_b = -2 * (a64 - b64) * gd64
    rtol = GRAD_RTOL[case["dtype"]]
    scale = max(want_a.abs().max().item(), want_b.abs().max().item()) if a.numel() else 0.0
    torch.testing.assert_close(ga.double().cpu(), want_a, rtol=rtol, atol=rtol * scale + 1e-30)
    torch.testing.assert_close(gb.double().cpu(), want_b, rtol=rtol, atol=rtol * scale + 1e-30)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients_round_like_torch(device, dtype):
    """The kernels' float -> float16/bfloat16 rounding equals PyTorch's (nearest even)."""
    a, b = random_pair([4, 3, 33], dtype, device, seed=5)
    gd = torch.tensor([1.0, -0.5, 3.0, 1e-3], device=device)
    gn = torch.tensor([0.25, 2.0, -1.0, 7.0], device=device)
    ga, gb = torch.ops.lsa_ext.sq_sums_backward(gd, gn, a, b)
    af, bf = a.float(), b.float()
    t = (af - bf) * (2 * gd).view(-1, 1, 1)
    torch.testing.assert_close(ga, (t + af * (2 * gn).view(-1, 1, 1)).to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(gb, (-t).to(dtype), rtol=0, atol=0)


LARGE_GRAD_CASES = [
    # >= 8 MiB per gradient: streaming stores on CPU; >= 32 MiB: huge-page buffers too. Odd
    # sample sizes put sample starts off the vector alignment (scalar head before the streaming
    # loop).
    ([3, 1_000_003], torch.float32, "contiguous"),
    ([3, 2_900_003], torch.float32, "contiguous"),
    ([2, 2_100_001], torch.float64, "contiguous"),
    ([2, 2_100_001], torch.float16, "contiguous"),
    ([2, 2_100_001], torch.bfloat16, "contiguous"),
    ([2, 600_001], torch.float64, "contiguous"),
    ([16, 64, 48, 48], torch.float32, "channels_last"),
    ([3, 1_000_003], torch.float32, "batch_transposed"),  # not sample-major: computed, copied
]


@pytest.mark.parametrize(("shape", "dtype", "layout"), LARGE_GRAD_CASES)
@pytest.mark.parametrize("isa", ["default", "generic"])
def test_large_gradients_match_float64_formula(device, shape, dtype, layout, isa):
    a, b = random_pair(shape, dtype, device, seed=7, mean=1.0)
    if layout == "channels_last":
        a = a.contiguous(memory_format=torch.channels_last)
    elif layout == "batch_transposed":
        a = a.t().contiguous().t()
    g = torch.Generator().manual_seed(8)
    acc = reference.acc_dtype(dtype)
    gd = torch.randn(shape[0], generator=g, dtype=torch.float64).to(acc).to(device)
    gn = torch.randn(shape[0], generator=g, dtype=torch.float64).to(acc).to(device)
    with cpu_isa(isa):
        ga, gb = torch.ops.lsa_ext.sq_sums_backward(gd, gn, a, b)
    assert ga.stride() == torch.empty_like(a).stride() == gb.stride()
    view = (-1,) + (1,) * (a.dim() - 1)
    a64, b64 = a.double().cpu(), b.double().cpu()
    gd64, gn64 = gd.double().cpu().view(view), gn.double().cpu().view(view)
    want_a = 2 * (a64 - b64) * gd64 + 2 * a64 * gn64
    want_b = -2 * (a64 - b64) * gd64
    rtol = GRAD_RTOL[dtype]
    scale = max(want_a.abs().max().item(), want_b.abs().max().item())
    torch.testing.assert_close(ga.double().cpu(), want_a, rtol=rtol, atol=rtol * scale)
    torch.testing.assert_close(gb.double().cpu(), want_b, rtol=rtol, atol=rtol * scale)


@pytest.mark.skipif(sys.platform != "linux", reason="huge-page buffers are Linux-only")
def test_large_cpu_gradients_are_ordinary_tensors_on_huge_page_boundaries():
    """Gradients of >= 32 MiB come from 2 MiB-aligned mappings, and behave like any CPU tensor."""
    n = 2_900_003  # 3 * n * 4 bytes = 34.8 MB
    a, b = random_pair([3, n], torch.float32, "cpu", seed=9)
    ga, gb = torch.ops.lsa_ext.sq_sums_backward(torch.ones(3), torch.ones(3), a, b)
    assert ga.data_ptr() % (1 << 21) == 0 and gb.data_ptr() % (1 << 21) == 0
    want = ga.clone()
    ga.resize_(4, n)  # resizable storage: grows through the same allocator
    assert torch.equal(ga[:3], want)
    gb.add_(1.0).mul_(0.5)
    assert ga.untyped_storage().nbytes() >= 4 * n * 4
    small, _ = torch.ops.lsa_ext.sq_sums_backward(torch.ones(3), torch.ones(3), a[:, :1000],
                                                  b[:, :1000])
    assert small.data_ptr() % 64 == 0  # small outputs: the default allocator


# ----------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_multi_million_element_samples_are_accurate(device, dtype):
    """4M-element samples of nonzero mean: float32 accumulation stays near float64."""
    a, b = random_pair([2, 4_000_000], dtype, device, seed=1, mean=3.0, noise=1e-2)
    d, n = lsa_ext.sq_sums(a, b)
    want_d, want_n = ref_sums(a, b)
    torch.testing.assert_close(d.double().cpu(), want_d, rtol=1e-6, atol=0)
    torch.testing.assert_close(n.double().cpu(), want_n, rtol=1e-6, atol=0)


def test_one_huge_sample_and_many_tiny_samples(device):
    for shape in ([1, 3_000_001], [4096, 3, 2], [4096, 1]):
        a, b = random_pair(shape, torch.float32, device, seed=2, mean=1.0)
        got = lsa_ext.relative_error(a, b)
        want = reference.relative_error(a.double().cpu(), b.double().cpu())
        torch.testing.assert_close(got.double().cpu(), want, rtol=2e-6, atol=0)


def test_empty_batch_and_empty_samples(device):
    for shape in ([0, 3, 4], [3, 0], [2, 5, 0, 2]):
        a = torch.randn(shape, device=device, requires_grad=True)
        b = torch.randn(shape, device=device, requires_grad=True)
        out = lsa_ext.relative_error(a, b)
        assert out.shape == (shape[0],)
        assert torch.equal(out.cpu(), torch.zeros(shape[0]))
        out.sum().backward()
        assert a.grad.shape == a.shape and b.grad.shape == b.shape
    assert lsa_ext.relative_error(torch.ones(0, 3), torch.ones(0, 3), "mean").isnan()
    assert lsa_ext.relative_error(torch.ones(0, 3), torch.ones(0, 3), "sum").item() == 0


# ----------------------------------------------------------------------------- special values
@pytest.mark.parametrize("shape", [[4096, 5], [3, 100_000], [2, 3, 7, 7]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nan_only_in_its_sample(device, shape, dtype):
    a, b = random_pair(shape, dtype, device, seed=4, mean=1.0)
    bad = shape[0] // 2
    a.view(shape[0], -1)[bad, -1] = float("nan")
    b.view(shape[0], -1)[bad - 1, 0] = float("inf")
    got = lsa_ext.relative_error(a, b).cpu()
    assert got[bad].isnan()
    assert got[bad - 1].isinf()
    keep = torch.ones(shape[0], dtype=torch.bool)
    keep[[bad - 1, bad]] = False
    assert got[keep].isfinite().all()
    want = reference.relative_error(a.double().cpu(), b.double().cpu())
    torch.testing.assert_close(got[keep].double(), want[keep], rtol=2e-6, atol=0)


def test_zero_norm_clean_sample_gives_finite_value_and_grads(device):
    a, b = random_pair([3, 4, 5], torch.float64, device, seed=6)
    a[1] = 0
    b[2] = a[2]  # D = 0 as well
    a.requires_grad_(True)
    b.requires_grad_(True)
    eps = 1e-6
    out = lsa_ext.relative_error(a, b, eps=eps)
    assert out.isfinite().all()
    torch.testing.assert_close(out[1], b[1].detach().norm() / eps)  # sqrt(D) / eps
    assert out[2].item() == 0
    out.sum().backward()
    assert a.grad.isfinite().all() and b.grad.isfinite().all()
    assert torch.equal(a.grad[2], torch.zeros_like(a[2]))  # sqrt'(0) taken as 0
    ra, rb = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    reference.relative_error(ra, rb, eps=eps).sum().backward()
    torch.testing.assert_close(a.grad, ra.grad)
    torch.testing.assert_close(b.grad, rb.grad)


def test_broadcast_perturbed_and_batch_transposed_clean(device):
    """Overlapping (expanded) and batch-not-outermost inputs are handled (copied) correctly."""
    base, _ = random_pair([1, 3, 4], torch.float32, device, seed=11)
    a, _ = random_pair([3, 5, 4], torch.float32, device, seed=12)
    a_t = a.transpose(0, 1).contiguous().transpose(0, 1)  # dense, batch stride 4, not outermost
    b = base.expand(5, 3, 4).transpose(0, 1)  # stride 0 along dim 1
    a_t.requires_grad_(True)
    got = lsa_ext.relative_error(a_t, b)
    want = reference.relative_error(a.double().cpu(), b.double().cpu())
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-6, atol=0)
    got.sum().backward()
    assert a_t.grad.stride() == torch.empty_like(a_t).stride()
    ref_a = a.double().cpu().requires_grad_(True)
    reference.relative_error(ref_a, b.double().cpu()).sum().backward()
    torch.testing.assert_close(a_t.grad.double().cpu(), ref_a.grad, rtol=1e-5, atol=1e-7)


def test_channels_last_grads_keep_layout(device):
    a, b = random_pair([2, 3, 4, 5], torch.float32, device, seed=7)
    a = a.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    b = b.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    lsa_ext.relative_error(a, b, reduction="batch").backward()
    assert a.grad.is_contiguous(memory_format=torch.channels_last)
    assert b.grad.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- backends
def test_backend_reports_compiled_kernels():
    info = lsa_ext.backend()
    assert _extension.LOADED, info
    assert info["cpu"] == "compiled-cpu"
    if torch.cuda.is_available():
        assert info["cuda"] == ("compiled-cuda" if _extension.has_kernel("cuda") else "reference")
    else:
        assert info["cuda"] == "unavailable"
    assert "load_error" not in info


def test_reference_is_used_when_no_kernel_for_device(device, monkeypatch):
    calls = []
    real = reference.sq_sums

    def spy(a, b):
        calls.append(a.device.type)
        return real(a, b)

    a, b = random_pair([3, 2, 5], torch.float32, device, seed=8)
    compiled = lsa_ext.relative_error_multi([a, a[:, :1]], [b, b[:, :1]], reduction="mean")
    monkeypatch.setattr(_extension, "has_kernel", lambda device_type: False)
    monkeypatch.setattr(reference, "sq_sums", spy)
    assert lsa_ext.backend()["cpu"] == "reference"
    ar, br = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    fallback = lsa_ext.relative_error_multi([ar, ar[:, :1]], [br, br[:, :1]], reduction="mean")
    single = ops.relative_error(ar, br)
    assert calls == [device] * 3
    torch.testing.assert_close(fallback, compiled, rtol=1e-6, atol=0)
    torch.testing.assert_close(single, reference.relative_error(a, b))
    fallback.sum().backward()
    assert ar.grad is not None and ar.grad.isfinite().all()


def test_fallback_when_extension_cannot_load():
    """Without lsa_ext._C: one RuntimeWarning saying how to build, reference backend, same API."""
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["lsa_ext._C"] = None  # makes `from lsa_ext import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, lsa_ext
        msgs = [str(w.message) for w in caught if w.category is RuntimeWarning]
        assert len(msgs) == 1 and "make build" in msgs[0], msgs
        info = lsa_ext.backend()
        assert info["cpu"] == "reference" and "load_error" in info, info
        a = torch.randn(4, 3, 8, 8, dtype=torch.float64, requires_grad=True)
        b = a.detach() + 0.1
        out = lsa_ext.relative_error(a, b)
        torch.testing.assert_close(out, (a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1))
        out.sum().backward()
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr


def test_composite_reference_kernels_match_compiled():
    """The CompositeExplicitAutograd kernels (devices without a compiled kernel) agree."""
    a, b = random_pair([3, 4, 5, 2], torch.float32, "cpu", seed=9)
    a = a.contiguous(memory_format=torch.channels_last)
    gd, gn = torch.randn(3), torch.randn(3)
    for got, want in (
        (ops._sq_sums_ref(a, b), torch.ops.lsa_ext.sq_sums(a, b)),
        (ops._sq_sums_multi_ref([a, b], [b, a]), torch.ops.lsa_ext.sq_sums_multi([a, b], [b, a])),
        (ops._sq_sums_backward_ref(gd, gn, a, b),
         torch.ops.lsa_ext.sq_sums_backward(gd, gn, a, b)),
    ):
        for x, y in zip(got, want, strict=True):
            assert x.stride() == y.stride()
            torch.testing.assert_close(x, y, rtol=2e-6, atol=1e-6)
    for got, want in (
        (ops._relative_error_ref(a, b, 1e-3), torch.ops.lsa_ext.relative_error(a, b, 1e-3)),
        (ops._relative_error_multi_ref([a, b], [b, a], 0.0),
         torch.ops.lsa_ext.relative_error_multi([a, b], [b, a], 0.0)),
    ):
        for x, y in zip(got, want, strict=True):
            torch.testing.assert_close(x, y, rtol=2e-6, atol=1e-6)
    ga, gb = ops._sq_sums_multi_backward_ref(gd[None], gn[None], [a], [b])
    torch.testing.assert_close(ga[0], torch.ops.lsa_ext.sq_sums_backward(gd, gn, a, b)[0])
    with pytest.raises(ValueError, match="empty list"):
        torch.ops.lsa_ext.sq_sums_multi([], [])


def test_a_build_lacking_an_op_is_reported_as_out_of_date():
    """An extension built from older C++ sources (an op missing) is not used half-way."""
    assert _extension.missing_ops(torch.ops.lsa_ext) == []  # this checkout's build

    class OldBuild:
        sq_sums = sq_sums_backward = sq_sums_multi = sq_sums_multi_backward = object()

    assert _extension.missing_ops(OldBuild()) == ["relative_error", "relative_error_multi"]
