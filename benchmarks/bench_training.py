"""AT-LR overhead: PGD-10 adversarial training with and without the LR term, side by side.

Contenders, timed interleaved (base, LR, base, LR, ...) on the same data in one run:

* Model B on 8×8 digits (1437 training images, batch 128): one full training epoch of
  AT-PGD-10 vs AT-PGD-10-LR-L0 (Table 3's layer) vs LR on L0…L3 (every hidden learnable layer),
  the latter three ways: main's path before this change (two passes, clean pass stopped after
  the last site, outputs held by reference — wrong with in-place ops), two passes with the
  in-place guard (``copy="auto"``), the default (``lr_pass="auto"``: here one forward of the
  concatenated clean + adversarial batch, with the guard), and with the clean pass detached
  (``TrainConfig.lr_detach_clean=True``: clean forward under ``torch.no_grad``, no gradient
  through it).
* VGG-19 on a CIFAR-shaped batch (random ``[B, 3, 32, 32]``, default B = 32): one training
  step of AT-PGD-10 vs LR-L1 (Table 4's layer) vs LR on all 16 convs: main's path, two passes
  with the guard, two passes cloning every site (``copy="always"``), the default (concat,
  BatchNorm run per half), and the detached clean pass.
* The LR term's own cost: the fused ``relative_error_multi`` forward + backward on the captured
  layer outputs of that step, and the same with the pure-PyTorch reference; the in-place
  guard's own cost: cloning every site output of both passes vs watching them by reference.
* The two kinds of pass a step is made of ('part' rows): one attack iteration and one
  training pass, whose ratio to the step is the LR term's floor.
* The floor itself, timed as a contender ('floor' rows, and the '× floor' column): the base
  method plus one training pass on the clean batch (its cross-entropy added to the loss) —
  the work the exact term cannot avoid (a forward of the clean batch and a backward through
  it with weight gradients), without hooks, the CM op or the in-place guard.

Script (prints the tables of benchmarks/README.md, with the command and load averages)::

    .venv/bin/python benchmarks/bench_training.py [--repeats 11] [--vgg-batch 32] [--threads N]

pytest-benchmark::

    .venv/bin/python -m pytest benchmarks/bench_training.py --benchmark-only
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch

from lsa_ext import reference
from lsa_ext.ops import relative_error_multi
from lsa_ext.probes import Capture
from lsa_ext.regularizer import LRTerm
from lsa_ext.training import TrainConfig, Trainer, resolve_layers


def _digits():
    from lsa_ext.data import load_dataset

    return load_dataset("digits", seed=0)


# LR variants: (lr_pass, copy, detach_clean). "main": the path before the in-place guard and
# the concat pass. "detached clean": TrainConfig.lr_detach_clean=True (no gradient through the
# clean pass; its forward runs under torch.no_grad, two passes) with the default lr_pass/copy.
VARIANTS = {"main": ("two_pass", "never", False), "two-pass": ("two_pass", "auto", False),
            "two-pass, clone all": ("two_pass", "always", False),
            "auto": ("auto", "auto", False), "detached clean": ("auto", "auto", True)}


def make_trainer(model_name: str, data_train, info, layers: list[str], eps: float,
                 batch_size: int, device: str, variant: str = "auto",
                 at: str = "pgd") -> Trainer:
    """A PGD-10 (or ``at``) trainer (Adam) with LR on ``layers`` (``[]``: the base method),
    the LR term run as :data:`VARIANTS` ``[variant]`` says."""
    from lsa_ext.models import build_model

    model = build_model(model_name, info, seed=0)
    lr_pass, copy, detach = VARIANTS[variant]
    cfg = TrainConfig(at=at, eps=eps, clip=[0.0, 1.0], lr_layers=layers, epochs=1,
                      batch_size=batch_size, device=device, seed=0, lr_pass=lr_pass,
                      lr_detach_clean=detach)
    trainer = Trainer(model, data_train, cfg, progress=False)
    if layers:
        trainer.regularizer = LRTerm(trainer.layers, lr_pass=lr_pass, copy=copy,
                                     detach_clean=detach)
    return trainer


class FloorTrainer(Trainer):
    """The exact LR term's floor: the base method plus one training pass on the clean batch
    (cross-entropy on the clean logits added to the loss, so the clean forward is
    differentiated with weight gradients, as the exact term needs) and nothing else — no
    hooks, no CM op, no in-place guard."""

    def loss(self, x: torch.Tensor, y: torch.Tensor, attack):
        from lsa_ext.losses import cross_entropy
        from lsa_ext.outputs import logits_of

        loss, parts = super().loss(x, y, attack)
        return loss + cross_entropy(logits_of(self.module(x), self.output), y), parts


def make_floor_trainer(model_name: str, data_train, info, eps: float, batch_size: int,
                       device: str) -> Trainer:
    """A :class:`FloorTrainer` set up as :func:`make_trainer`'s base (PGD-10, Adam, seed 0)."""
    from lsa_ext.models import build_model

    cfg = TrainConfig(at="pgd", eps=eps, clip=[0.0, 1.0], lr_layers=[], epochs=1,
                      batch_size=batch_size, device=device, seed=0)
    return FloorTrainer(build_model(model_name, info, seed=0), data_train, cfg, progress=False)


def epoch_fn(trainer: Trainer) -> Callable[[], None]:
    """One epoch from the same starting weights/optimizer state every time (so contenders
    never time differently trained models)."""
    import copy

    model0 = copy.deepcopy(trainer.module.state_dict())
    opt0 = copy.deepcopy(trainer.optimizer.state_dict())
    gen0 = trainer.loader_generator.get_state()

    def run() -> None:
        trainer.module.load_state_dict(model0)
        trainer.optimizer.load_state_dict(opt0)
        trainer.loader_generator.set_state(gen0)
        trainer.epoch = 0
        trainer.config.epochs = 1
        trainer.train_epoch()

    return run


def step_fn(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    attack = trainer._attack_for_epoch(0)

    def run() -> None:
        loss, _ = trainer.loss(x, y, attack)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        if x.is_cuda:
            torch.cuda.synchronize()

    return run


def part_fns(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], None]]:
    """The two kinds of pass a step is made of: one attack iteration (eval mode, frozen
    weights, gradient w.r.t. the input only) and one training pass (train mode, forward and
    backward with weight gradients). The LR term adds one training pass on the clean batch, so
    its floor is ``1 + pass / step``."""
    from lsa_ext.losses import cross_entropy
    from lsa_ext.modules import model_mode

    model = trainer.module

    def attack_iteration() -> None:
        with model_mode(model, "eval"):
            xi = x.clone().requires_grad_()
            torch.autograd.grad(cross_entropy(model(xi), y), xi)

    def training_pass() -> None:
        model.train()
        cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    return {"part attack iteration": attack_iteration, "part training pass": training_pass}


def lr_op_fn(trainer: Trainer, x: torch.Tensor, impl: str) -> Callable[[], None]:
    """Forward + backward of the CM reduction alone on the step's captured layer outputs."""
    model = trainer.module
    names = trainer.layers
    with Capture(model, names) as cap:
        model(x)
    clean = [cap.outputs[n].detach() for n in names]
    adv = [(c + 0.05 * torch.randn_like(c)) for c in clean]
    fn = relative_error_multi if impl == "fused" else reference.relative_error_multi

    def run() -> None:
        a = [c.clone().requires_grad_() for c in clean]
        b = [c.clone().requires_grad_() for c in adv]
        fn(a, b, reduction="mean").sum().backward()

    return run


def guard_fns(trainer: Trainer, x: torch.Tensor, label: str) -> dict[str, Callable[[], None]]:
    """What the in-place guard adds to one step on its own, for the sites' outputs of both
    passes: cloning them all (``copy="always"``, the first batch of ``"auto"``, and ``"auto"``
    on sites changed in place) vs the steady ``"auto"`` work on sites left by reference (a
    version-counter read when kept and one when checked)."""
    from lsa_ext.probes import InplaceGuard

    model = trainer.module
    names = trainer.layers
    with Capture(model, names, copy="never") as cap:
        model(torch.cat([x, x]))
    outs = [cap.outputs[n].detach().requires_grad_() * 1.0 for n in names]
    guard = InplaceGuard("auto")
    guard.copied = {n: False for n in names}

    def clone_all() -> None:
        for t in outs:
            t.clone()

    def watch() -> None:
        for n, t in zip(names, outs, strict=True):
            guard.keep(n, t)
        guard.check()

    return {f"op {label} clone": clone_all, f"op {label} guard watch": watch}


def interleaved(fns: dict[str, Callable[[], None]], repeats: int,
                warmup: int = 1) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and CPU seconds (``time.process_time``: this process, all threads) of each
    callable per repeat, timing them round-robin ``repeats`` times. On a shared machine the
    CPU time is the steadier measure of the work done: time spent descheduled is not in it."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            cpu[k].append(time.process_time() - c0)
            wall[k].append(time.perf_counter() - t0)
    return wall, cpu


def digits_contenders(device: str = "cpu") -> tuple[dict[str, Callable[[], None]], dict]:
    d = _digits()
    base = make_trainer("model_b", d.train, d.info, [], 0.2, 128, device)
    probe = base.module
    one = resolve_layers(probe, "L0")
    hidden = resolve_layers(probe, "L0,L1,L2,L3")
    t1 = make_trainer("model_b", d.train, d.info, one, 0.2, 128, device)
    t4 = {v: make_trainer("model_b", d.train, d.info, hidden, 0.2, 128, device, v)
          for v in ("main", "two-pass", "auto", "detached clean")}
    x = d.train.tensors[0][:128].to(device)
    y = d.train.tensors[1][:128].to(device)
    floor = make_floor_trainer("model_b", d.train, d.info, 0.2, 128, device)
    fns = {"base": epoch_fn(base), FLOOR: epoch_fn(floor),
           "LR-L0": epoch_fn(t1)}
    fns.update({f"LR-L0..L3 {v}": epoch_fn(t) for v, t in t4.items()})
    trades = make_trainer("model_b", d.train, d.info, [], 0.2, 128, device, at="trades")
    trades4 = make_trainer("model_b", d.train, d.info, hidden, 0.2, 128, device, at="trades")
    fns.update({"TRADES base": epoch_fn(trades), "TRADES LR-L0..L3 auto": epoch_fn(trades4)})
    fns.update({"step base": step_fn(base, x, y),
                f"step {FLOOR}": step_fn(floor, x, y),
                "step LR-L0": step_fn(t1, x, y)})
    fns.update({f"step LR-L0..L3 {v}": step_fn(t, x, y) for v, t in t4.items()})
    fns.update(part_fns(base, x, y))
    fns.update({"op L0 fused": lr_op_fn(t1, x, "fused"),
                "op L0..L3 fused": lr_op_fn(t4["auto"], x, "fused"),
                "op L0..L3 reference": lr_op_fn(t4["auto"], x, "reference")})
    fns.update(guard_fns(t4["auto"], x, "L0..L3"))
    plan = t4["auto"].regularizer.plan(t4["auto"].model, x, clean_logits=False)
    return fns, {"steps": len(range(0, len(d.train), 128)), "plan": plan}


def vgg_contenders(batch: int = 32, device: str = "cpu"):
    from lsa_ext.data import DatasetInfo
    from lsa_ext.probes import select_layers

    info = DatasetInfo("cifar10", (3, 32, 32), 10, (0.0, 1.0))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    data = (x, y)
    base = make_trainer("vgg19", data, info, [], 8 / 255, batch, device)
    convs = [n for n in select_layers(base.module, "learnable") if "conv" in n]
    t1 = make_trainer("vgg19", data, info, resolve_layers(base.module, "L1"), 8 / 255, batch,
                      device)
    tall = {v: make_trainer("vgg19", data, info, convs, 8 / 255, batch, device, v)
            for v in VARIANTS}
    floor = make_floor_trainer("vgg19", data, info, 8 / 255, batch, device)
    fns = {"base": step_fn(base, x, y),
           FLOOR: step_fn(floor, x, y),
           "LR-L1": step_fn(t1, x, y)}
    fns.update({f"LR-all-{len(convs)}-convs {v}": step_fn(t, x, y) for v, t in tall.items()})
    fns.update({f"step {k}": f for k, f in part_fns(base, x, y).items()})
    fns.update({"op L1 fused": lr_op_fn(t1, x, "fused"),
                f"op {len(convs)} convs fused": lr_op_fn(tall["auto"], x, "fused"),
                f"op {len(convs)} convs reference": lr_op_fn(tall["auto"], x, "reference")})
    fns.update(guard_fns(tall["auto"], x, f"{len(convs)} convs"))
    plan = tall["auto"].regularizer.plan(tall["auto"].model, x, clean_logits=False)
    return fns, {"plan": plan}


def _load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def _base_of(k: str, res: dict) -> str:
    if k.startswith("part"):
        return "step base"
    b = next((f"{p} base" for p in ("step", "TRADES") if k.startswith(p)), "base")
    return b if b in res else "base"


FLOOR = "floor: base + clean training pass"


def _floor_of(k: str, res: dict) -> str | None:
    """The floor row matching row ``k``'s base (``None`` for the TRADES rows, parts and ops)."""
    b = _base_of(k, res)
    f = {"base": FLOOR, "step base": f"step {FLOOR}"}.get(b)
    return f if f in res and not k.startswith(("part", "op", "step part")) else None


def _table(title: str, wall: dict[str, list[float]], cpu: dict[str, list[float]]) -> str:
    """Per contender: median and minimum wall time, median CPU time (ms), each as a ratio to
    the matching base row, and the CPU-time ratio to the matching floor row."""
    med = {k: statistics.median(v) for k, v in wall.items()}
    low = {k: min(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    lines = [f"\n{title}", "",
             "| contender | median ms | × base | min ms | × base (min) | CPU ms (median) "
             "| × base (CPU) | × floor (CPU) |",
             "|---|---|---|---|---|---|---|---|"]
    for k in wall:
        b = _base_of(k, wall)
        f = _floor_of(k, wall)
        vs_floor = f"{cmed[k] / cmed[f]:.3f}" if f else ""
        lines.append(f"| {k} | {med[k] * 1e3:.1f} | {med[k] / med[b]:.3f} | "
                     f"{low[k] * 1e3:.1f} | {low[k] / low[b]:.3f} | {cmed[k] * 1e3:.1f} | "
                     f"{cmed[k] / cmed[b]:.3f} | {vs_floor} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- pytest-benchmark
# One intra-op thread (as the script's --threads 1): on a shared 2-core machine two threads
# make every contender swing by 10-80x from one round to the next.
try:
    import pytest
except ImportError:  # pragma: no cover - the script does not need pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def digits_fns():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        fns, _ = digits_contenders()
        yield fns
        torch.set_num_threads(n)

    def test_digits_epoch_base(benchmark, digits_fns):
        benchmark.pedantic(digits_fns["base"], rounds=5, iterations=1, warmup_rounds=1)

    def test_digits_epoch_lr_l0(benchmark, digits_fns):
        benchmark.pedantic(digits_fns["LR-L0"], rounds=5, iterations=1, warmup_rounds=1)

    def test_digits_step_base(benchmark, digits_fns):
        benchmark.pedantic(digits_fns["step base"], rounds=20, iterations=1, warmup_rounds=2)

    def test_digits_step_lr_l0(benchmark, digits_fns):
        benchmark.pedantic(digits_fns["step LR-L0"], rounds=20, iterations=1, warmup_rounds=2)

    def test_digits_lr_op_fused(benchmark, digits_fns):
        benchmark(digits_fns["op L0..L3 fused"])

    def test_digits_lr_op_reference(benchmark, digits_fns):
        benchmark(digits_fns["op L0..L3 reference"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--vgg-repeats", type=int, default=11)
    p.add_argument("--vgg-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-vgg", action="store_true")
    p.add_argument("--skip-digits", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("$ " + " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]))
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"repeats {args.repeats} (digits) / {args.vgg_repeats} (VGG), interleaved; × base "
          "compares with the base row of the same kind (epoch/step)")
    if not args.skip_digits:
        fns, info = digits_contenders(args.device)
        print(f"{_load()} (before the digits rounds)")
        wall, cpu = interleaved(fns, args.repeats)
        print(f"{_load()} (after)")
        print(_table(f"Model B, 8×8 digits: one AT-PGD-10 epoch ({info['steps']} steps of 128), "
                     "AT-TRADES-10 epochs (× TRADES base), one step on a fixed batch of 128 "
                     "('step' rows, × step base), and the CM "
                     f"fwd+bwd alone on that batch's captured outputs ('op' rows); 'auto' ran "
                     f"{info['plan']}", wall, cpu))
    if not args.skip_vgg:
        fns, info = vgg_contenders(args.vgg_batch, args.device)
        print(f"\n{_load()} (before the VGG rounds)")
        wall, cpu = interleaved(fns, args.vgg_repeats)
        print(f"{_load()} (after)")
        print(_table(f"VGG-19, one AT-PGD-10 training step, batch {args.vgg_batch}×3×32×32; "
                     f"'auto' ran {info['plan']}", wall, cpu))


if __name__ == "__main__":
    main()
