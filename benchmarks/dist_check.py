"""An analysis under torchrun with a real process group: nccl on CUDA, gloo on CPU.

Usage (repository root; any number of processes, one GPU each on CUDA)::

    torchrun --standalone --nproc_per_node=1 benchmarks/dist_check.py --device cuda
    torchrun --standalone --nproc_per_node=2 benchmarks/dist_check.py --device cpu

``lsa_ext`` joins a torchrun job by itself only when ``WORLD_SIZE > 1``; this script creates the
process group itself (``nccl`` on CUDA, ``gloo`` on CPU; ``--backend`` overrides), so that a
1-process run goes through the backend too, and ``lsa_ext.distributed`` adopts it. Checks:

1. the group: ``lsa_ext.distributed`` reports the backend, rank and world size; an
   ``all_reduce`` of a device tensor and an ``all_gather_object`` (the collective
   ``all_reduce_stats`` uses) return the expected values;
2. ``lsa_ext.analyze`` of Model B (paper Table 1) on ``--samples`` random MNIST-shaped inputs
   under Gaussian noise, FGSM and PGD-5 on the device, every ReLU probed, with the fused
   relative-error kernel, against the same analysis with a float64 pure-PyTorch measure (same
   seed, deterministic algorithms, so the same perturbations): counts equal, mean and std of
   every (perturbation, layer) within 1e-5 relative.

Rank 0 prints one line per check and ``dist check passed``; any failure exits non-zero.
"""

from __future__ import annotations

import argparse
import os
import sys

# Deterministic cuBLAS (set before CUDA initialises): both analyses see the same perturbations.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import lsa_ext  # noqa: E402
from lsa_ext import distributed, reference  # noqa: E402
from lsa_ext.data import DatasetInfo  # noqa: E402
from lsa_ext.measures import Measure  # noqa: E402
from lsa_ext.models import build_model  # noqa: E402


def fail(msg: str) -> None:
    print(f"[rank {os.environ.get('RANK', '?')}] FAIL: {msg}", flush=True)
    sys.exit(1)


def ref_relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float64 ``||a - b|| / max(||a||, 1e-12)`` per sample, plain PyTorch."""
    return reference.relative_error(a.double(), b.double(), reduction="none", eps=1e-12)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--backend", default=None, help="default: nccl on cuda, gloo on cpu")
    p.add_argument("--samples", type=int, default=512, help="analysed samples (default 512)")
    p.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    args = p.parse_args(argv)
    if "RANK" not in os.environ:
        fail("start this script with torchrun (see the module docstring)")
    backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            fail("no CUDA device visible")
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, init_method="env://")
    ctx = distributed.init_from_env(device=args.device)  # adopts the group created above
    dev = ctx.device
    main_rank = ctx.rank == 0

    def say(msg: str) -> None:
        if main_rank:
            print(msg, flush=True)

    # 1. the group and its collectives
    if ctx.backend != backend or ctx.world_size != dist.get_world_size():
        fail(f"lsa_ext.distributed sees backend {ctx.backend}, world {ctx.world_size}")
    n = ctx.world_size
    t = torch.arange(4, dtype=torch.float32, device=dev) + ctx.rank
    dist.all_reduce(t)
    want = torch.arange(4, dtype=torch.float32) * n + n * (n - 1) / 2
    if not torch.equal(t.cpu(), want):
        fail(f"all_reduce gave {t.tolist()}, expected {want.tolist()}")
    out: list = [None] * n
    dist.all_gather_object(out, {"rank": ctx.rank, "x": [ctx.rank] * 3})
    if out != [{"rank": r, "x": [r] * 3} for r in range(n)]:
        fail(f"all_gather_object gave {out}")
    say(f"group: backend {ctx.backend}, world size {n}, device {dev}, backend() "
        f"{lsa_ext.backend()}: all_reduce and all_gather_object ok")

    # 2. the analysis, fused kernel against a float64 reference measure
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    info = DatasetInfo("mnist", (1, 28, 28), 10, (0.0, 1.0))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.samples, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.samples,), generator=g)
    model = build_model("model_b", info, seed=0).to(dev)
    spec = "gaussian:std=0.1,fgsm,pgd:steps=5"
    results = {}
    for name, measure in (
        ("fused", "relative_error"),
        ("reference", Measure("relative_error_f64", ref_relative_error)),
    ):
        results[name] = lsa_ext.analyze(
            model, (x, y), spec, layers="activations", measure=measure, batch_size=args.batch,
            device=dev, seed=3, clip=(0.0, 1.0), eps=0.1, progress=False,
        )
    fused, ref = results["fused"], results["reference"]
    counts = fused.stats.count.numpy()
    if not np.array_equal(counts, ref.stats.count.numpy()) or counts.min() != args.samples:
        fail(f"counts {counts.tolist()} vs {ref.stats.count.numpy().tolist()}")
    for what in ("mean", "std"):
        got, exp = getattr(fused, what), getattr(ref, what)
        if not np.isfinite(got).all() or not np.allclose(got, exp, rtol=1e-5, atol=1e-8):
            worst = float(np.max(np.abs(got - exp) / np.maximum(np.abs(exp), 1e-30)))
            fail(f"{what} CM: fused vs float64 reference differ (worst relative {worst:.2e})")
    worst = float(np.max(np.abs(fused.mean - ref.mean) / np.abs(ref.mean)))
    say(f"analysis: {args.samples} samples x {len(fused.perturbations)} perturbations x "
        f"{len(fused.layers)} layers on {dev}; fused vs float64 reference mean CM: worst "
        f"relative difference {worst:.1e}")
    dist.barrier()
    dist.destroy_process_group()
    say("dist check passed")


if __name__ == "__main__":
    main()
