"""Edge-case checks of the compiled kernels on one device (meant for CUDA; runs on CPU too).

Every check compares the compiled op (``torch.ops.lsa_ext.*``) with an independent float64
reference (a straightforward ``flatten(1)`` sum, and autograd of it) and, on CUDA, also with the
CPU kernel. It covers what the CUDA kernels special-case: empty batches and samples, scalar
tails, the vectorised and the scalar (misaligned data pointer or sample stride) paths, samples
split into many chunks (two-stage reduction), channels_last and non-dense inputs, more layers
than fit in the by-value layer table, bitwise reproducibility and batch independence,
non-default streams, CUDA graph capture, no host synchronisation (CUDA sync debug mode),
gradcheck, and optionally (``--huge``) a tensor of more than 2**31 elements.

Check groups (``--only``): shapes (dtypes x shapes x layouts, forward and backward), multi
(1-40 layers), repro (bitwise reproducibility, batch independence), autograd (gradcheck), streams
(non-default stream, no host synchronisation, a second GPU; CUDA only), graph (CUDA graph
capture and replay; CUDA only), huge (> 2**31 elements, ~17 GB; only with --huge or --only).

Usage:
    python benchmarks/cuda_edge_cases.py                 # on cuda, every group but huge
    python benchmarks/cuda_edge_cases.py --huge          # + a 2**31 + 4099 element bf16 pair
    python benchmarks/cuda_edge_cases.py --only multi,repro   # some groups (sanitizer subsets)
    python benchmarks/cuda_edge_cases.py --device cpu    # the CPU kernel (checks this script)
Exits 1 on the first failure, printing what failed.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import lsa_ext
from lsa_ext import reference

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2e-5, atol=1e-6),  # sums are float32 of exactly representable inputs
    torch.float16: dict(rtol=2e-5, atol=1e-6),
}
GRAD_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),  # one rounding of the result to bfloat16
    torch.float16: dict(rtol=2e-3, atol=1e-4),
}
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CHECKS = 0


def check(cond: bool, what: str) -> None:
    global CHECKS
    CHECKS += 1
    if not cond:
        print(f"FAIL: {what}")
        sys.exit(1)


def close(got: torch.Tensor, want: torch.Tensor, tol: dict, what: str) -> None:
    global CHECKS
    CHECKS += 1
    try:
        torch.testing.assert_close(got.double().cpu(), want.double().cpu(), **tol)
    except AssertionError as exc:
        print(f"FAIL: {what}\n{exc}")
        sys.exit(1)


def ref_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Straightforward float64 per-sample sums (flatten(1) also handles B = 0)."""
    x = a.double().flatten(1)
    return (x - b.double().flatten(1)).square().sum(1), x.square().sum(1)


def pair(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    b = a + 0.25 * torch.randn(shape, generator=g, dtype=torch.float64)
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def forward_ok(a, b, what):
    """sq_sums against float64 of the same (rounded) values, and against the CPU kernel."""
    d, n = torch.ops.lsa_ext.sq_sums(a, b)
    acc = reference.acc_dtype(a.dtype)
    check(d.dtype == acc and n.dtype == acc, f"{what}: output dtype {d.dtype}")
    check(d.shape == (a.shape[0],) and d.device == a.device, f"{what}: output shape/device")
    wd, wn = ref_sums(a, b)
    close(d, wd, TOL[a.dtype], f"{what}: diff")
    close(n, wn, TOL[a.dtype], f"{what}: norm")
    if a.device.type != "cpu":
        cd, cn = torch.ops.lsa_ext.sq_sums(a.cpu(), b.cpu())
        close(d, cd, TOL[a.dtype], f"{what}: diff vs CPU kernel")
        close(n, cn, TOL[a.dtype], f"{what}: norm vs CPU kernel")
    return d, n


def backward_ok(a, b, what, seed=1):
    """sq_sums_backward against float64 autograd of the reference; strides of the inputs."""
    g = torch.Generator().manual_seed(seed)
    batch = a.shape[0]
    acc = reference.acc_dtype(a.dtype)
    gd = torch.randn(batch, generator=g, dtype=torch.float64)
    gn = torch.randn(batch, generator=g, dtype=torch.float64)
    ga, gb = torch.ops.lsa_ext.sq_sums_backward(gd.to(a.device, acc), gn.to(a.device, acc), a, b)
    a64 = a.detach().double().cpu().requires_grad_(True)
    b64 = b.detach().double().cpu().requires_grad_(True)
    d, n = ref_sums(a64, b64)
    wa, wb = torch.autograd.grad((d * gd).sum() + (n * gn).sum(), (a64, b64))
    close(ga, wa, GRAD_TOL[a.dtype], f"{what}: grad clean")
    close(gb, wb, GRAD_TOL[a.dtype], f"{what}: grad perturbed")
    check(ga.dtype == a.dtype and gb.dtype == a.dtype, f"{what}: grad dtype")
    if lsa_ext_dense(a):
        check(ga.stride() == a.stride(), f"{what}: grad strides {ga.stride()} != {a.stride()}")


def lsa_ext_dense(t: torch.Tensor) -> bool:
    """Mirror of the C++ sample_major_dense (the kernels keep these layouts)."""
    if not t.is_contiguous() and not t.is_contiguous(memory_format=torch.channels_last):
        return False
    return t.dim() == 0 or t.shape[0] <= 1 or t.stride(0) * t.shape[0] == t.numel()


def shapes_and_layouts(device):
    for dtype in DTYPES:
        for shape in [
            (0, 3),
            (3, 0),
            (1, 1),
            (5, 7),
            (2, 3, 5, 7),
            (4096, 3),
            (3, 100_003),
            (1, 1_000_001),
            (2, 70_000),
        ]:
            a, b = pair(shape, dtype, device)
            what = f"{dtype} {shape}"
            forward_ok(a, b, what)
            backward_ok(a, b, what)
        # channels_last (and B = 1 channels_last), b in another layout than a
        for shape in [(4, 6, 5, 3), (1, 8, 7, 9), (3, 16, 33, 33)]:
            a, b = pair(shape, dtype, device, seed=3)
            a = a.contiguous(memory_format=torch.channels_last)
            what = f"{dtype} {shape} channels_last"
            forward_ok(a, b.contiguous(memory_format=torch.channels_last), what)
            backward_ok(a, b.contiguous(memory_format=torch.channels_last), what)
            forward_ok(a, b, what + " (perturbed contiguous)")
            backward_ok(a, b, what + " (perturbed contiguous)")
        # misaligned data pointers (storage offset 1): the scalar path
        for batch, per in [(3, 1000), (2, 40_000), (1, 9)]:
            base_a, base_b = pair((batch * per + 1,), dtype, device, seed=4)
            a = base_a[1:].view(batch, per)
            b = base_b[1:].view(batch, per)
            what = f"{dtype} misaligned [{batch}, {per}]"
            forward_ok(a, b, what)
            backward_ok(a, b, what)
        # non-dense (transposed) and a broadcast (stride 0) input: copied to a dense layout
        a, b = pair((6, 5), dtype, device, seed=5)
        forward_ok(a.t(), b.t(), f"{dtype} transposed")
        backward_ok(a.t(), b.t(), f"{dtype} transposed")
        forward_ok(a[:, :1].expand(6, 9), b[:, :1].expand(6, 9), f"{dtype} expanded")


def multi_ok(device):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for num in (1, 3, 32, 33, 40):  # 33, 40: more layers than the by-value table holds
            batch = 3
            shapes = [(batch, 1 + 37 * l % 200, 1 + l % 3) for l in range(num)]
            if num > 1:
                shapes[1] = (batch, 0)  # an empty layer
            if num > 2:
                shapes[2] = (batch, 4, 70_001)  # a multi-chunk layer
            pairs = [pair(s, dtype, device, seed=l) for l, s in enumerate(shapes)]
            cleans = [a for a, _ in pairs]
            perts = [b for _, b in pairs]
            d, n = torch.ops.lsa_ext.sq_sums_multi(cleans, perts)
            wd = torch.stack([ref_sums(a, b)[0] for a, b in pairs])
            wn = torch.stack([ref_sums(a, b)[1] for a, b in pairs])
            what = f"multi {dtype} L={num}"
            check(d.shape == (num, batch), f"{what}: shape {tuple(d.shape)}")
            close(d, wd, TOL[dtype], f"{what}: diff")
            close(n, wn, TOL[dtype], f"{what}: norm")
            g = torch.Generator().manual_seed(9)
            acc = reference.acc_dtype(dtype)
            gd = torch.randn(num, batch, generator=g, dtype=torch.float64)
            gn = torch.randn(num, batch, generator=g, dtype=torch.float64)
            gas, gbs = torch.ops.lsa_ext.sq_sums_multi_backward(
                gd.to(device, acc), gn.to(device, acc), cleans, perts
            )
            for l, (a, b) in enumerate(pairs):
                a64 = a.double().cpu().requires_grad_(True)
                b64 = b.double().cpu().requires_grad_(True)
                dd, nn = ref_sums(a64, b64)
                wa, wb = torch.autograd.grad(
                    (dd * gd[l]).sum() + (nn * gn[l]).sum(), (a64, b64), allow_unused=True
                )
                close(gas[l], wa, GRAD_TOL[dtype], f"{what}: layer {l} grad clean")
                close(gbs[l], wb, GRAD_TOL[dtype], f"{what}: layer {l} grad perturbed")
    # zero batch size
    a, b = pair((0, 5), torch.float32, device)
    d, n = torch.ops.lsa_ext.sq_sums_multi([a, a], [b, b])
    check(d.shape == (2, 0), "multi B=0 shape")


def reproducible(device):
    a, b = pair((4, 3_000_000), torch.float32, device, seed=7)  # multi-chunk, vector path
    d1, n1 = torch.ops.lsa_ext.sq_sums(a, b)
    d2, n2 = torch.ops.lsa_ext.sq_sums(a, b)
    check(torch.equal(d1, d2) and torch.equal(n1, n2), "bitwise reproducible")
    for i in range(4):  # a sample's result does not depend on the rest of the batch
        di, ni = torch.ops.lsa_ext.sq_sums(a[i : i + 1], b[i : i + 1])
        check(torch.equal(di[0], d1[i]) and torch.equal(ni[0], n1[i]), f"batch independence {i}")
    md, mn = torch.ops.lsa_ext.sq_sums_multi([a[:, :5], a], [b[:, :5], b])
    check(torch.equal(md[1], d1) and torch.equal(mn[1], n1), "multi equals single bitwise")


def autograd_ok(device):
    a, b = pair((3, 2, 5, 4), torch.float64, device, seed=11)
    a.requires_grad_(True)
    b.requires_grad_(True)
    check(
        torch.autograd.gradcheck(lambda x, y: lsa_ext.relative_error(x, y), (a, b)),
        "gradcheck relative_error",
    )
    c, e = pair((3, 7), torch.float64, device, seed=12)
    c.requires_grad_(True)
    e.requires_grad_(True)
    check(
        torch.autograd.gradcheck(
            lambda x, y, z, w: lsa_ext.relative_error_multi([x, z], [y, w]), (a, b, c, e)
        ),
        "gradcheck relative_error_multi",
    )


def streams(device):
    """Non-default stream, no host synchronisation, inputs on a second GPU."""
    a, b = pair((8, 3, 33, 31), torch.float16, device, seed=13)
    want = torch.ops.lsa_ext.sq_sums(a, b)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        got = torch.ops.lsa_ext.sq_sums(a, b)
    torch.cuda.current_stream(device).wait_stream(side)
    check(torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), "non-default stream")
    # No host synchronisation inside the ops (the big multi call uses the device-side table).
    many = [pair((4, 10 + l), torch.float32, device, seed=l) for l in range(40)]
    cl = [x for x, _ in many]
    pe = [y for _, y in many]
    gd = torch.ones(40, 4, device=device)
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.lsa_ext.sq_sums(a, b)
        torch.ops.lsa_ext.sq_sums_multi(cl, pe)
        torch.ops.lsa_ext.sq_sums_multi_backward(gd, gd, cl, pe)
        torch.ops.lsa_ext.sq_sums_backward(gd[0], gd[0], cl[0], pe[0])
    except RuntimeError as exc:
        check(False, f"host synchronisation inside an op: {exc}")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    if torch.cuda.device_count() > 1:  # inputs on a device other than the current one
        other = torch.device("cuda", 1)
        x, y = pair((3, 1000), torch.float32, other)
        with torch.cuda.device(0):
            forward_ok(x, y, "second device")
            backward_ok(x, y, "second device")


def graph(device):
    """CUDA graph capture of a 40-layer call (then one by-value launch per 32 layers), replayed
    on new data: equal to eager calls (which use the device-side layer table). Needs PyTorch's
    caching allocator (not under PYTORCH_NO_CUDA_MEMORY_CACHING=1)."""
    side = torch.cuda.Stream(device)
    shapes = [(4, 3 + 5 * l) for l in range(38)] + [(4, 2, 70_001), (4, 0)]
    static = [pair(s, torch.float32, device, seed=50 + l) for l, s in enumerate(shapes)]
    sa = [x for x, _ in static]
    sb = [y for _, y in static]
    gd = torch.randn(len(shapes), 4, device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up outside the capture
        torch.ops.lsa_ext.sq_sums_multi(sa, sb)
        torch.ops.lsa_ext.sq_sums_multi_backward(gd, gd, sa, sb)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_d, out_n = torch.ops.lsa_ext.sq_sums_multi(sa, sb)
        out_ga, out_gb = torch.ops.lsa_ext.sq_sums_multi_backward(gd, gd, sa, sb)
    for trial in range(2):
        for l, s in enumerate(shapes):
            x, y = pair(s, torch.float32, device, seed=100 * (trial + 1) + l)
            sa[l].copy_(x)
            sb[l].copy_(y)
        graph.replay()
        wd, wn = torch.ops.lsa_ext.sq_sums_multi(sa, sb)
        wga, wgb = torch.ops.lsa_ext.sq_sums_multi_backward(gd, gd, sa, sb)
        check(torch.equal(out_d, wd) and torch.equal(out_n, wn), f"graph replay {trial}: fwd")
        for l in range(len(shapes)):
            check(
                torch.equal(out_ga[l], wga[l]) and torch.equal(out_gb[l], wgb[l]),
                f"graph replay {trial}: layer {l} grads",
            )


def huge(device):
    """A bfloat16 pair of 2**31 + 4099 elements (B = 1, then B = 3): int64 indexing."""
    n = 2**31 + 4099
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    g = torch.Generator(device=device).manual_seed(0)
    a.uniform_(-1, 1, generator=g)
    b.uniform_(-1, 1, generator=g)
    step = 1 << 28
    for batch in (1, 3):
        per = n // batch
        aa = a[: batch * per].view(batch, per)
        bb = b[: batch * per].view(batch, per)
        d, nn = torch.ops.lsa_ext.sq_sums(aa, bb)
        wd = torch.zeros(batch, dtype=torch.float64)
        wn = torch.zeros(batch, dtype=torch.float64)
        for i in range(batch):
            for s in range(0, per, step):
                x = aa[i, s : s + step].double()
                wd[i] += (x - bb[i, s : s + step].double()).square().sum().item()
                wn[i] += x.square().sum().item()
        close(d, wd, dict(rtol=1e-4, atol=0), f"huge B={batch}: diff")
        close(nn, wn, dict(rtol=1e-4, atol=0), f"huge B={batch}: norm")
        ones = torch.ones(batch, device=device)
        ga, gb = torch.ops.lsa_ext.sq_sums_backward(ones, ones, aa, bb)
        for i in range(batch):  # the far end of each sample (offsets beyond 2**31)
            x, y = aa[i, -4099:].float(), bb[i, -4099:].float()
            close(ga[i, -4099:], 2 * (x - y) + 2 * x, GRAD_TOL[torch.bfloat16], "huge grad end")
            close(gb[i, -4099:], -2 * (x - y), GRAD_TOL[torch.bfloat16], "huge grad end")
        del ga, gb


# name -> (check function, runs on CPU too)
GROUPS = {
    "shapes": (shapes_and_layouts, True),
    "multi": (multi_ok, True),
    "repro": (reproducible, True),
    "autograd": (autograd_ok, True),
    "streams": (streams, False),
    "graph": (graph, False),
    "huge": (huge, True),
}
DEFAULT_GROUPS = [g for g in GROUPS if g != "huge"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--huge", action="store_true", help="also a > 2**31-element pair (~17 GB)")
    p.add_argument(
        "--only",
        default=None,
        help=f"comma-separated check groups ({', '.join(GROUPS)}); default: all but huge",
    )
    args = p.parse_args(argv)
    if args.only is None:
        groups = DEFAULT_GROUPS + (["huge"] if args.huge else [])
    else:
        groups = [g.strip() for g in args.only.split(",") if g.strip()]
        unknown = [g for g in groups if g not in GROUPS]
        if unknown or not groups:
            p.error(f"unknown check group(s) {unknown}; choose from {', '.join(GROUPS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible")
    backend = lsa_ext.backend()
    print(f"backend: {backend}")
    want = "compiled-cuda" if device.type == "cuda" else "compiled-cpu"
    check(backend[device.type] == want, f"{device.type} is served by {backend[device.type]}")
    ran = []
    for name in groups:
        fn, on_cpu = GROUPS[name]
        if device.type != "cuda" and not on_cpu:
            print(f"group {name}: skipped (CUDA only)")
            continue
        ran.append(name)
        before, t0 = CHECKS, time.perf_counter()
        fn(device)
        print(f"group {name}: {CHECKS - before} checks passed ({time.perf_counter() - t0:.1f} s)",
              flush=True)
    print(f"all {CHECKS} checks passed on {device} (groups: {', '.join(ran)})")


if __name__ == "__main__":
    main()
