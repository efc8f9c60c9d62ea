"""GPU benchmark of the fused relative-error ops: a markdown table naming the device.

Contenders, all on the same tensors in one run:
  fused    lsa_ext.sq_sums / relative_error (the compiled CUDA kernels)
  naive    lsa_ext.reference (plain PyTorch: upcast, subtract, square, sum; several passes)
  compile  torch.compile of the naive function (Inductor fuses it into one reduction)

Rows: forward (``sq_sums``) and forward+backward (``relative_error(..., "mean").backward()``) on
large activations (float32, bfloat16, float16; contiguous and channels_last), one huge sample
(B = 1), many small samples, and a 20-layer multi-layer call against a loop of single calls.

Bandwidth: bytes the op must move at least (forward: read clean and perturbed; backward: read
both again and write both gradients) per second, against the card's device-to-device copy
bandwidth measured here (``dst.copy_(src)``, read + write bytes per second).

Targets (issue 5): large tensors >= 85 % of the copy bandwidth, fused >= 1.0x torch.compile,
the 20-layer multi-layer call >= 2x the loop of single calls.

Usage (on a GPU machine, after building with CUDA):
    python benchmarks/bench_cuda.py                  # full table
    python benchmarks/bench_cuda.py --json out.json  # also the raw numbers
    python benchmarks/bench_cuda.py --reps 10 --trials 3 --markdown table.md  # fewer repeats
    python benchmarks/bench_cuda.py --device cpu --quick   # smoke run of the script itself
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

import lsa_ext
from lsa_ext import reference
from lsa_ext.io import atomic_write_json, atomic_write_text

# 20 layer outputs of a ResNet-18-like network on 32x32 inputs (per-sample shapes).
RESNET20_SHAPES = (
    [(64, 32, 32)] * 5
    + [(128, 16, 16)] * 4
    + [(256, 8, 8)] * 4
    + [(512, 4, 4)] * 4
    + [(512, 1, 1), (512,), (10,)]
)


@dataclass
class Row:
    case: str
    shape: str
    dtype: str
    layout: str
    pass_: str  # "fwd" or "fwd+bwd"
    bytes_moved: int
    fused_us: float
    naive_us: float
    compile_us: float | None
    loop_us: float | None = None  # multi-layer rows: loop of single fused calls

    @property
    def gbps(self) -> float:
        return self.bytes_moved / (self.fused_us * 1e-6) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_us(fn: Callable[[], object], device: torch.device, reps: int, trials: int) -> float:
    """Median over ``trials`` of the mean time of ``reps`` back-to-back calls, microseconds."""
    for _ in range(3):
        fn()
    _sync(device)
    samples = []
    for _ in range(trials):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            samples.append((time.perf_counter() - t0) * 1e6 / reps)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device, nbytes: int, reps: int, trials: int) -> float:
    """Device-to-device copy bandwidth, (read + write) bytes per second, in GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), device, reps, trials)
    return 2 * nbytes / (us * 1e-6) / 1e9


def make_pair(shape, dtype, device, channels_last=False, requires_grad=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    b = (a.float() + 0.1 * torch.randn(shape, generator=g).to(device)).to(dtype)
    if channels_last:
        a = a.contiguous(memory_format=torch.channels_last)
        b = b.contiguous(memory_format=torch.channels_last)
    return a.requires_grad_(requires_grad), b.requires_grad_(requires_grad)


def _fwd_bwd(fn, a, b):
    def step():
        a.grad = None
        b.grad = None
        fn(a, b, "mean").backward()

    return step


def bench_single(case, shape, dtype, device, args, channels_last=False) -> list[Row]:
    a, b = make_pair(shape, dtype, device, channels_last)
    nbytes = a.numel() * a.element_size()
    compiled = torch.compile(reference.sq_sums, dynamic=False) if args.compile else None
    # Same answers before timing anything.
    want = reference.sq_sums(a.double(), b.double())
    got = lsa_ext.sq_sums(a, b)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-3, atol=1e-3)
    layout = "channels_last" if channels_last else "contiguous"
    rows = [
        Row(
            case,
            str(tuple(shape)),
            str(dtype).replace("torch.", ""),
            layout,
            "fwd",
            2 * nbytes,
            time_us(lambda: lsa_ext.sq_sums(a, b), device, args.reps, args.trials),
            time_us(lambda: reference.sq_sums(a, b), device, args.reps, args.trials),
            time_us(lambda: compiled(a, b), device, args.reps, args.trials) if compiled else None,
        )
    ]
    a.requires_grad_(True)
    b.requires_grad_(True)
    compiled_re = torch.compile(reference.relative_error, dynamic=False) if args.compile else None
    rows.append(
        Row(
            case,
            str(tuple(shape)),
            str(dtype).replace("torch.", ""),
            layout,
            "fwd+bwd",
            6 * nbytes,
            time_us(_fwd_bwd(lsa_ext.relative_error, a, b), device, args.reps, args.trials),
            time_us(_fwd_bwd(reference.relative_error, a, b), device, args.reps, args.trials),
            time_us(_fwd_bwd(compiled_re, a, b), device, args.reps, args.trials)
            if compiled_re
            else None,
        )
    )
    return rows


def bench_multi(batch, dtype, device, args) -> list[Row]:
    pairs = [make_pair((batch, *s), dtype, device, seed=i) for i, s in enumerate(RESNET20_SHAPES)]
    cleans = [a for a, _ in pairs]
    perts = [b for _, b in pairs]
    nbytes = sum(a.numel() * a.element_size() for a in cleans)
    shape = f"{len(cleans)} layers, B={batch}"
    dt = str(dtype).replace("torch.", "")

    def loop_fwd():
        outs = [lsa_ext.sq_sums(a, b) for a, b in zip(cleans, perts, strict=True)]
        return torch.stack([d for d, _ in outs]), torch.stack([n for _, n in outs])

    compiled = torch.compile(reference.sq_sums_multi, dynamic=False) if args.compile else None
    want = reference.sq_sums_multi([a.double() for a in cleans], [b.double() for b in perts])
    got = lsa_ext.sq_sums_multi(cleans, perts)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-3, atol=1e-3)
    rows = [
        Row(
            "multi",
            shape,
            dt,
            "contiguous",
            "fwd",
            2 * nbytes,
            time_us(lambda: lsa_ext.sq_sums_multi(cleans, perts), device, args.reps, args.trials),
            time_us(lambda: reference.sq_sums_multi(cleans, perts), device, args.reps, args.trials),
            time_us(lambda: compiled(cleans, perts), device, args.reps, args.trials)
            if compiled
            else None,
            loop_us=time_us(loop_fwd, device, args.reps, args.trials),
        )
    ]
    for t in cleans + perts:
        t.requires_grad_(True)

    def step(fn):
        def run():
            for t in cleans + perts:
                t.grad = None
            fn(cleans, perts, "mean").sum().backward()

        return run

    def loop_re(cs, ps, reduction):
        return torch.stack(
            [lsa_ext.relative_error(a, b, reduction) for a, b in zip(cs, ps, strict=True)]
        )

    compiled_re = (
        torch.compile(reference.relative_error_multi, dynamic=False) if args.compile else None
    )
    rows.append(
        Row(
            "multi",
            shape,
            dt,
            "contiguous",
            "fwd+bwd",
            6 * nbytes,
            time_us(step(lsa_ext.relative_error_multi), device, args.reps, args.trials),
            time_us(step(reference.relative_error_multi), device, args.reps, args.trials),
            time_us(step(compiled_re), device, args.reps, args.trials) if compiled_re else None,
            loop_us=time_us(step(loop_re), device, args.reps, args.trials),
        )
    )
    return rows


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def table(rows: list[Row], copy_gbps: float, device_name: str) -> str:
    lines = [
        f"Device: **{device_name}**, torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"measured device-to-device copy bandwidth {copy_gbps:.0f} GB/s (read + write).",
        "",
        "| case | shape | dtype | layout | pass | fused µs | GB/s | % copy BW | naive µs | "
        "× naive | compile µs | × compile | loop µs | × loop |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.shape} | {r.dtype} | {r.layout} | {r.pass_} | {r.fused_us:.1f} | "
            f"{r.gbps:.0f} | {100 * r.gbps / copy_gbps:.0f} | {r.naive_us:.1f} | "
            f"{r.naive_us / r.fused_us:.2f} | {_fmt(r.compile_us)} | "
            f"{_fmt(r.compile_us and r.compile_us / r.fused_us, '.2f')} | {_fmt(r.loop_us)} | "
            f"{_fmt(r.loop_us and r.loop_us / r.fused_us, '.2f')} |"
        )
    return "\n".join(lines)


def targets(rows: list[Row], copy_gbps: float) -> list[str]:
    """The issue's targets, one PASS/FAIL line each."""
    out = []
    for r in rows:
        if r.case == "large":
            frac = r.gbps / copy_gbps
            out.append(
                f"{'PASS' if frac >= 0.85 else 'FAIL'} bandwidth >= 85 %: {r.dtype} {r.layout} "
                f"{r.pass_}: {100 * frac:.0f} %"
            )
        if r.compile_us is not None and r.case != "multi":
            ratio = r.compile_us / r.fused_us
            out.append(
                f"{'PASS' if ratio >= 1.0 else 'FAIL'} >= 1.0x torch.compile: {r.case} {r.dtype} "
                f"{r.layout} {r.pass_}: {ratio:.2f}x"
            )
        if r.loop_us is not None:
            ratio = r.loop_us / r.fused_us
            out.append(
                f"{'PASS' if ratio >= 2.0 else 'FAIL'} multi >= 2x loop: {r.pass_}: {ratio:.2f}x"
            )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke run)")
    p.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    p.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="skip the torch.compile contender",
    )
    p.add_argument("--reps", type=int, default=None, help="calls per timing (default 20/2)")
    p.add_argument("--trials", type=int, default=None, help="timings per number (default 5/2)")
    p.add_argument("--json", default=None, help="also write the raw numbers to this file")
    p.add_argument("--markdown", default=None, help="also write the table and targets here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible; use --device cpu --quick for a smoke run")
    args.reps = args.reps or (2 if args.quick else 20)
    args.trials = args.trials or (2 if args.quick else 5)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "CPU"
    print(f"backend: {lsa_ext.backend()}")

    if args.quick:
        big, batch = (8, 16, 16, 16), 8
    else:
        big, batch = (64, 256, 56, 56), 128  # 51.4 M elements per tensor
    numel = 1
    for s in big:
        numel *= s
    copy_gbps = copy_bandwidth(device, 4 * numel, args.reps, args.trials)

    rows: list[Row] = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        rows += bench_single("large", big, dtype, device, args)
    rows += bench_single("large", big, torch.float32, device, args, channels_last=True)
    rows += bench_single("B=1", (1, numel), torch.float32, device, args)
    rows += bench_single("many small", (numel // 512, 512), torch.float32, device, args)
    rows += bench_multi(batch, torch.float32, device, args)

    checks = targets(rows, copy_gbps)
    text = table(rows, copy_gbps, name) + "\n\n" + "\n".join(f"- {line}" for line in checks)
    print(text)
    met = sum(line.startswith("PASS") for line in checks)
    print(f"\ntargets met: {met} of {len(checks)} (copy bandwidth {copy_gbps:.0f} GB/s)")
    if args.markdown:
        atomic_write_text(args.markdown, text + "\n")
    if args.json:
        payload = {
            "device": name,
            "torch": torch.__version__,
            "copy_gbps": copy_gbps,
            "rows": [asdict(r) | {"gbps": r.gbps} for r in rows],
        }
        atomic_write_json(args.json, payload)


if __name__ == "__main__":
    main()
