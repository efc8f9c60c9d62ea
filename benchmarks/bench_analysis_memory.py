"""Peak memory of the paired capture (LSA analysis) vs one plain forward, VGG-19, CPU.

Method: each contender runs in a fresh subprocess. After building the model (eval mode) and the
inputs (clean batch x and perturbed batch x̂ = x + N(0, 0.1²), both [B, 3, 32, 32]) and one warm-up
forward of 2 samples (so one-time allocator/oneDNN set-up is not counted), the child resets the
kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), records VmRSS, runs the contender
once and reads VmHWM. The figure reported is VmHWM − VmRSS(before): the extra resident memory the
step needed at its peak (weights and inputs excluded, since they exist before). torch uses one
thread (``torch.set_num_threads(1)``) and glibc a fixed mmap threshold
(``MALLOC_MMAP_THRESHOLD_=131072``: large tensors are mmap'ed and unmapped when freed, so RSS
follows live memory rather than the heap's history); the median of ``--repeat`` runs is kept.

Contenders:
  plain        model(x) under no_grad (the reference, ratio 1.0)
  lsa_concat   lsa_ext paired capture, concat mode, forward_batch=B (default of analyze)
  lsa_concat2B same with forward_batch=2B (clean and perturbed in one forward)
  lsa_6pert    concat mode, six perturbed twins (the CLI default), forward_batch=B
  lsa_two_pass two_pass mode (clean outputs kept, then reduced against the perturbed pass)
  prototype    the published code's approach: hooks on ReLU append every activation of both
               passes to lists, then a numpy batch-level ||A-B||/||A|| per layer

Run: ``.venv/bin/python benchmarks/bench_analysis_memory.py [--batch 64] [--repeat 3]``;
``--fuse-timing`` instead times per-layer ``sq_sums`` vs one ``sq_sums_multi`` over VGG-19's ReLU
outputs (clean/perturbed halves of one forward of ``--batch`` samples).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONTENDERS = ("plain", "lsa_concat", "lsa_concat2B", "lsa_6pert", "lsa_two_pass", "prototype")


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _vgg19():
    from torch import nn

    try:
        from lsa_ext.models import VGG

        return VGG()
    except ImportError:  # models.py not merged yet: the same architecture, built here
        cfg = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
               512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def _prototype(model, x, x_hat):
    """The authors' published LSA code (github.com/khalooei/LSA): keep all activations, numpy
    batch form."""
    import numpy as np
    import torch
    from torch import nn

    clean, pert = [], []
    store = {"target": clean}
    handles = [m.register_forward_hook(lambda _m, _i, o: store["target"].append(o.detach()))
               for m in model.modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        model(x)
        store["target"] = pert
        model(x_hat)
    for h in handles:
        h.remove()
    out = []
    for a, b in zip(clean, pert, strict=True):
        a, b = a.numpy(), b.numpy()
        out.append(np.linalg.norm(a - b) / np.linalg.norm(a))
    return out


def child(name: str, batch: int) -> dict:
    import torch

    import lsa_ext
    from lsa_ext.analysis import paired_measures
    from lsa_ext.probes import select_layers

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _vgg19().eval()
    x = torch.rand(batch, 3, 32, 32)
    x_hats = [(x + 0.1 * torch.randn_like(x)).clamp(0, 1) for _ in range(6)]
    layers = select_layers(model, "activations")
    with torch.no_grad():
        model(x[:2])
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status("VmRSS")
    t0 = time.perf_counter()
    if name == "plain":
        with torch.no_grad():
            model(x)
    elif name == "lsa_concat":
        paired_measures(model, layers, x, x_hats[:1], forward_batch=batch)
    elif name == "lsa_concat2B":
        paired_measures(model, layers, x, x_hats[:1], forward_batch=2 * batch)
    elif name == "lsa_6pert":
        paired_measures(model, layers, x, x_hats, forward_batch=batch)
    elif name == "lsa_two_pass":
        paired_measures(model, layers, x, x_hats[:1], mode="two_pass", forward_batch=batch)
    elif name == "prototype":
        _prototype(model, x, x_hats[0])
    else:
        raise SystemExit(f"unknown contender {name}")
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"name": name, "peak_extra": peak - before, "seconds": seconds,
            "backend": lsa_ext.backend()["cpu"]}


def fuse_timing(batch: int) -> None:
    """Per-layer ``sq_sums`` in hooks vs one ``sq_sums_multi`` over all ReLU outputs."""
    import time

    import torch

    import lsa_ext
    from lsa_ext.probes import Capture, select_layers

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _vgg19().eval()
    x = torch.rand(2 * batch, 3, 32, 32)
    with torch.no_grad(), Capture(model, select_layers(model, "activations"), detach=True,
                                  copy="never") as c:
        t0 = time.perf_counter()
        model(x)
        t_fwd = time.perf_counter() - t0
    cleans = [t[:batch] for t in c.outputs.values()]
    perts = [t[batch:] for t in c.outputs.values()]

    def best(fn, n=5):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_single = best(lambda: [lsa_ext.sq_sums(a, b) for a, b in zip(cleans, perts, strict=True)])
    t_multi = best(lambda: lsa_ext.sq_sums_multi(cleans, perts))
    mib = sum(t.numel() * t.element_size() for t in c.outputs.values()) / 2**20
    print(f"forward of 2x{batch}: {t_fwd * 1e3:.1f} ms; {len(cleans)} x sq_sums: "
          f"{t_single * 1e3:.2f} ms; one sq_sums_multi: {t_multi * 1e3:.2f} ms; "
          f"buffer needed for multi: {mib:.1f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="runs per contender (median kept)")
    ap.add_argument("--fuse-timing", action="store_true",
                    help="time per-layer sq_sums vs one sq_sums_multi instead")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fuse_timing:
        fuse_timing(args.batch // 2)
        return
    if args.child:
        print(json.dumps(child(args.child, args.batch)))
        return
    # A fixed mmap threshold turns off glibc's dynamic threshold, so every large tensor is
    # mmap'ed and returned to the OS when freed: RSS then tracks live memory, not heap history.
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    rows, times = {}, {}
    for name in CONTENDERS:
        vals, secs = [], []
        for _ in range(args.repeat):
            out = subprocess.run(
                [sys.executable, __file__, "--child", name, "--batch", str(args.batch)],
                capture_output=True, text=True, check=True, env=env,
            )
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            vals.append(rec["peak_extra"])
            secs.append(rec["seconds"])
        rows[name] = sorted(vals)[len(vals) // 2]
        times[name] = sorted(secs)[len(secs) // 2]
    base = rows["plain"]
    print(f"VGG-19, batch {args.batch}x3x32x32 float32, CPU, 1 thread; peak extra RSS and wall "
          f"time (medians of {args.repeat} fresh processes)")
    print(f"{'contender':<14} {'peak extra MiB':>15} {'x plain forward':>16} {'seconds':>8}")
    for name, v in rows.items():
        print(f"{name:<14} {v / 2**20:>15.1f} {v / base:>16.2f} {times[name]:>8.2f}")


if __name__ == "__main__":
    main()
