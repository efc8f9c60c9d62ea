"""Tests for lsa_ext.distributed: batch slicing, exact reductions, DDP equivalence, failures.

The multi-process tests start 2 CPU processes with ``python -m torch.distributed.run`` on the
loopback interface (gloo) and run this very file as the worker script (see ``__main__`` below).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lsa_ext import distributed
from lsa_ext.errors import LsaUserError
from lsa_ext.modules import unwrap
from lsa_ext.seeding import batch_seed

HERE = Path(__file__).resolve()
N_VALUES, BATCH = 103, 10  # 11 batches, uneven over 2 ranks (6 + 5), last batch partial
P, L = 2, 3


# --------------------------------------------------------------------------------------------
# helpers shared by the test process and the workers
# --------------------------------------------------------------------------------------------


def _batch_values(k: int, size: int) -> torch.Tensor:
    """Stand-in for the CM values of global batch k: float32 [P, L, size], seeded per batch."""
    g = torch.Generator().manual_seed(batch_seed(7, k))
    return torch.rand(P, L, size, generator=g) * 3 + torch.arange(L).view(1, L, 1)


def _tiny_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 16), nn.ELU(), nn.Linear(16, 16), nn.ELU(), nn.Linear(16, 3))


def _tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(69, 4, generator=g), torch.randint(0, 3, (69,), generator=g)


def _train_tiny(epochs: int = 2, batch: int = 16) -> nn.Module:
    """AT-LR style loop (FGSM on the inner module, CE + γ·CM on ELU outputs through the wrapper).

    Runs unchanged in 1 process and under torchrun: every rank draws the same global batches
    and keeps its slice (distributed.shard_batch); DDP averages the gradients.
    """
    from lsa_ext import losses, ops
    from lsa_ext.probes import Capture

    x_all, y_all = _tiny_data()
    inner = _tiny_model()
    model = distributed.wrap_model(inner)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    layers = ["1", "3"]
    for epoch in range(epochs):
        order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(100 + epoch))
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            part = distributed.shard_batch(x_all[idx], y_all[idx])
            if part is None:
                continue
            (x, y), weight = part
            xa = x.clone().requires_grad_(True)  # FGSM on the inner module (no DDP hooks)
            (g,) = torch.autograd.grad(losses.cross_entropy(unwrap(model)(xa), y), xa)
            x_adv = (x + 0.3 * g.sign()).detach()
            with Capture(unwrap(model), layers) as cap:
                model(x)
                clean = [cap.outputs[n] for n in layers]
                cap.reset()
                logits_adv = model(x_adv)
                adv = [cap.outputs[n] for n in layers]
            lr_term = ops.relative_error_multi(clean, adv).mean(dim=1).sum()
            loss = losses.cross_entropy(logits_adv, y) + 0.5 * lr_term
            opt.zero_grad()
            (loss * weight).backward()
            opt.step()
    return unwrap(model)


@dataclass
class _Summed:
    """A statistic with ``merge`` (like analysis.CMStats)."""

    total: torch.Tensor

    def merge(self, other: _Summed) -> _Summed:
        return _Summed(self.total + other.total)


def _tiny_analysis() -> dict:
    """lsa_ext.analyze of 40 samples in one batch of 64 (a rank with no batch under torchrun)."""
    import lsa_ext
    from lsa_ext.noise import Gaussian

    x, y = _tiny_data()
    res = lsa_ext.analyze(_tiny_model(), (x[:40], y[:40]),
                          {"gauss": Gaussian(std=0.3, clip=None, seed=2)}, layers="activations",
                          batch_size=64, device="cpu", progress=False)
    return {"layers": res.layers, "mean": res.mean.tolist(), "std": res.std.tolist(),
            "count": res.count.tolist()}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra_env: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "LSA_PROGRESS": "0"})
    env.update(extra_env or {})
    return env


def _torchrun(
    scenario: str | list[str], out: Path | None = None, nproc: int = 2,
    extra_env: dict | None = None, timeout: float = 90,
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=nproc`` on loopback; ``scenario``: a worker of this file, or
    a list (``["-m", "lsa_ext.cli", "train", ...]``)."""
    target = [str(HERE), scenario, str(out)] if isinstance(scenario, str) else scenario
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "--monitor-interval=0.2",
        *target,
    ]
    return subprocess.run(cmd, env=_env(extra_env), capture_output=True, text=True,
                          timeout=timeout)


def _torchrun_nodes(target: list[str], nodes: int = 2, timeout: float = 90) -> list:
    """``nodes`` torchrun agents (simulated machines, 1 process each) meeting through a c10d
    rendezvous on loopback: the multi-node command of the README."""
    port = _free_port()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=lsa-test",
        "--monitor-interval=0.2", *target,
    ]
    procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(nodes)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


# --------------------------------------------------------------------------------------------
# single-process tests of the primitives
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [5, 6, 16, 17])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_shard_batch_slices_and_weights_reproduce_the_global_mean(n, world):
    x = torch.arange(n, dtype=torch.float64)
    parts = [distributed.shard_batch(x, x * 2, rank_=r, world=world) for r in range(world)]
    assert all(p is not None for p in parts)
    assert torch.equal(torch.cat([p[0][0] for p in parts]), x)
    assert all(torch.equal(p[0][1], p[0][0] * 2) for p in parts)
    # DDP's average of weight_r * mean_r equals the mean over the whole batch
    ddp_avg = sum(w * xs.mean() for (xs, _), w in parts) / world
    assert ddp_avg.item() == pytest.approx(x.mean().item(), rel=1e-12)


def test_shard_batch_edge_cases():
    x = torch.arange(3.0)
    assert distributed.shard_batch(x, rank_=0, world=4) is None  # fewer samples than ranks
    (same,), w = distributed.shard_batch(x)  # plain process: identity
    assert same is x and w == 1.0
    with pytest.raises(LsaUserError, match="different batch sizes"):
        distributed.shard_batch(x, torch.arange(4.0), rank_=0, world=2)


def test_plain_process_helpers_are_identities(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LSA_DIST_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    distributed.cleanup()
    ctx = distributed.init_from_env(device="cpu")
    try:
        assert (ctx.rank, ctx.world_size, ctx.backend, ctx.distributed) == (0, 1, None, False)
        assert distributed.is_main() and distributed.rank_prefix() == ""
        stats = {"a": torch.ones(2), "n": 3}
        assert distributed.all_reduce_stats(stats) is stats
        model = nn.Linear(2, 2)
        assert distributed.wrap_model(model) is model and unwrap(model) is model
        assert distributed.init_from_env() is ctx  # idempotent
    finally:
        distributed.cleanup()


def test_backend_choice_and_bad_settings(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("LSA_DIST_BACKEND", raising=False)
    assert distributed.choose_backend(cpu) == "gloo"
    monkeypatch.setenv("LSA_DIST_BACKEND", "GLOO")
    assert distributed.choose_backend(cpu) == "gloo"
    with pytest.raises(LsaUserError, match="nccl"):
        distributed.choose_backend(cpu, "nccl")
    with pytest.raises(LsaUserError, match="unknown distributed backend"):
        distributed.choose_backend(cpu, "carrier-pigeon")
    monkeypatch.setenv("LSA_DIST_TIMEOUT", "soon")
    with pytest.raises(LsaUserError, match="LSA_DIST_TIMEOUT"):
        distributed._timeout_from_env(None)
    with pytest.raises(LsaUserError, match="positive"):
        distributed._timeout_from_env(-1.0)


# --------------------------------------------------------------------------------------------
# 2 processes on loopback (gloo)
# --------------------------------------------------------------------------------------------


def test_two_ranks_reduce_exactly_and_train_like_one_process(tmp_path):
    proc = _torchrun("primitives", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads((tmp_path / "primitives.json").read_text())

    # single-process float64 reference over every batch of the dataset
    sizes = [min(BATCH, N_VALUES - s) for s in range(0, N_VALUES, BATCH)]
    allv = torch.cat([_batch_values(k, b) for k, b in enumerate(sizes)], dim=-1).double().numpy()
    assert got["world_size"] == 2 and got["count"] == N_VALUES
    assert got["batches_per_rank"] == [6, 5]
    np.testing.assert_allclose(got["sum"], allv.sum(-1), rtol=1e-12)
    np.testing.assert_allclose(got["sumsq"], (allv**2).sum(-1), rtol=1e-12)
    assert got["same_on_ranks"] is True and got["mismatch_raised"] is True
    assert got["only_rank0"] == [1.0, 1.0]  # None = no contribution from rank 1
    assert got["merged"] == [3.0]  # objects with merge(): 1 (rank 0) merged with 2 (rank 1)

    tiny = _tiny_analysis()
    assert got["tiny"]["layers"] == tiny["layers"] and got["tiny"]["count"] == tiny["count"]
    np.testing.assert_allclose(got["tiny"]["mean"], tiny["mean"], rtol=1e-12)
    np.testing.assert_allclose(got["tiny"]["std"], tiny["std"], rtol=1e-9)

    # DDP: 2 ranks x B/2 (uneven last batch) == 1 process x B
    ref = _train_tiny()
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for name, p in ref.state_dict().items():
        torch.testing.assert_close(ddp[name], p, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(ddp["0.weight"], _tiny_model().state_dict()["0.weight"])  # it trained


def test_a_failing_rank_fails_the_job_fast_and_is_named(tmp_path):
    proc = _torchrun("fail", tmp_path, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank 1 failed: ValueError: boom on rank 1" in out
    assert not (tmp_path / "reached").exists()  # rank 0 never got past the collective


def test_a_rank_stuck_outside_a_collective_times_out_instead_of_hanging(tmp_path):
    proc = _torchrun("stuck", tmp_path, extra_env={"LSA_DIST_TIMEOUT": "3"}, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank 0 failed:" in out
    assert not (tmp_path / "reached").exists()


# --------------------------------------------------------------------------------------------
# `lsa analyze` / `lsa train` under torchrun vs one process
# --------------------------------------------------------------------------------------------


def _assert_json_close(a, b, path="", rel=1e-6):
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            _assert_json_close(a[k], b[k], f"{path}/{k}", rel)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _assert_json_close(u, v, f"{path}[{i}]", rel)
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=rel, abs=1e-12), path
    else:
        assert a == b, path


def test_lsa_analyze_under_torchrun_writes_the_one_process_report(tmp_path):
    from lsa_ext import cli
    from lsa_ext.data import load_dataset
    from lsa_ext.models import build_model

    info = load_dataset("digits", seed=0).info
    model = build_model("model_b", info, seed=1)  # untrained weights are fine for equality
    torch.save(model.state_dict(), tmp_path / "model.pt")
    # 200 samples in batches of 32: 7 batches, dealt 4 + 3, the last one partial; random
    # perturbations (noise, PGD random start) must not depend on the split
    args = ["analyze", "--dataset", "digits", "--checkpoint", str(tmp_path / "model.pt"),
            "--perturbations", "gaussian,salt_pepper,fgsm,pgd:steps=3", "--max-samples", "200",
            "--batch-size", "32", "--device", "cpu", "--no-plot"]
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    proc = _torchrun(["-m", "lsa_ext.cli", *args, "--out", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("Most vulnerable layers") == 1  # rank 0 prints, rank 1 does not
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert "2 processes" in proc.stderr
    for table in two["perturbations"].values():
        assert table["count"] == [200] * len(two["layers"])  # every sample once, no padding
    _assert_json_close(one, two)  # tables (mean/std/count), MVL, ranking, accuracy, config


def test_lsa_train_on_two_nodes_then_resumed_under_torchrun_matches_one_process(tmp_path):
    from lsa_ext import cli

    # Model A (no BatchNorm), AT-FGSM-LR; 301 samples in global batches of 64: the last batch
    # (45) splits 23 + 22, weighted so DDP's average is the mean over all 45
    args = ["train", "--dataset", "moons", "--limit-train", "301", "--at", "fgsm",
            "--lr-layers", "L1", "--batch-size", "64", "--optimizer", "sgd", "--lr", "0.05",
            "--device", "cpu"]
    assert cli.main([*args, "--epochs", "2", "--out", str(tmp_path / "one")]) == 0
    two = tmp_path / "two"
    # epoch 1: 2 "machines" (torchrun agents) meeting at a c10d rendezvous endpoint
    procs = _torchrun_nodes(["-m", "lsa_ext.cli", *args, "--epochs", "1", "--out", str(two)])
    for p in procs:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert json.loads((two / "history.json").read_text())[-1]["epoch"] == 1
    # epoch 2: --resume under single-node torchrun
    proc = _torchrun(["-m", "lsa_ext.cli", "train", "--out", str(two), "--resume", "--epochs",
                      "2", "--device", "cpu"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    got = torch.load(two / "model.pt", weights_only=True)
    for name, p in ref.items():
        torch.testing.assert_close(got[name], p, rtol=1e-4, atol=1e-5, msg=name)
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    h2 = json.loads((two / "history.json").read_text())
    for r1, r2 in zip(h1, h2, strict=True):  # epoch records are totals over the ranks
        for key in ("loss", "base", "lr_loss", "accuracy"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-5), key


def test_lsa_train_monitor_under_torchrun_matches_one_process(tmp_path):
    """Layer monitoring under torchrun: every rank measures its share of the probe (2 chunks of
    64 → one per rank), rank 0 writes monitor.csv, equal to a 1-process run's."""
    import csv

    from lsa_ext import cli

    # no bare --monitor: torchrun's parser takes it for an abbreviation of --monitor-interval;
    # --monitor-samples turns monitoring on
    args = ["train", "--dataset", "moons", "--limit-train", "200", "--at", "pgd", "--lr-layers",
            "L1", "--batch-size", "64", "--monitor-samples", "128", "--epochs", "1", "--device",
            "cpu"]
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    proc = _torchrun(["-m", "lsa_ext.cli", *args, "--out", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.count("monitoring 4 layers") == 1  # rank 0 prints
    rows = [list(csv.DictReader(open(tmp_path / d / "monitor.csv", encoding="utf-8")))
            for d in ("one", "two")]
    assert [(r["epoch"], r["layer"], r["kind"]) for r in rows[1]] == [
        (e, s, "lr" if s == "fc2" else "probe") for e in "01" for s in
        ("act1", "fc2", "act2", "act3")]
    # epoch 0: the same weights, and the probe's PGD random starts do not depend on the ranks;
    # epoch 1: AT-PGD itself matches a 1-process run in distribution only (README)
    for r1, r2 in zip(*rows, strict=True):
        rel = 1e-5 if r1["epoch"] == "0" else 0.05
        assert float(r2["mean"]) == pytest.approx(float(r1["mean"]), rel=rel), r1
        assert float(r2["std"]) == pytest.approx(float(r1["std"]), rel=10 * rel, abs=1e-7), r1


def test_a_user_error_under_torchrun_prints_once_and_fails(tmp_path):
    """Every rank meets the same mistake; rank 0 alone prints it, without a "rank R failed"
    log line (torchrun's own failure summary still follows: it fails on any non-zero exit)."""
    proc = _torchrun(["-m", "lsa_ext.cli", "train", "--dataset", "mnist", "--data-dir",
                      str(tmp_path / "missing"), "--out", str(tmp_path / "out")], timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("lsa train: error: MNIST folder") == 1, out
    assert "[rank" not in out and "failed: LsaUserError" not in out


# --------------------------------------------------------------------------------------------
# worker side (run by torchrun)
# --------------------------------------------------------------------------------------------


def _worker_primitives(out: Path) -> None:
    from lsa_ext.io import atomic_write_json, atomic_write_with

    ctx = distributed.init_from_env(device="cpu")
    assert ctx.world_size == 2 and ctx.backend == "gloo"
    total = torch.zeros(P, L, dtype=torch.float64)
    sq = torch.zeros(P, L, dtype=torch.float64)
    count, mine = 0, 0
    # global batch k (sequential batches of BATCH values) goes to rank k % world, as in analysis
    for k in range(ctx.rank, -(-N_VALUES // BATCH), ctx.world_size):
        v = _batch_values(k, min(BATCH, N_VALUES - k * BATCH))
        total += v.double().sum(-1)
        sq += (v.double() ** 2).sum(-1)
        count += v.shape[-1]
        mine += 1
    stats = {"noise": {"sum": total, "sumsq": sq}, "count": count,
             "name": "same-everywhere", "only_rank0": torch.ones(2) if ctx.rank == 0 else None,
             "merged": _Summed(torch.tensor([ctx.rank + 1.0]))}
    red = distributed.all_reduce_stats(stats)
    mism = False
    try:  # strings must agree on every rank
        distributed.all_reduce_stats({"name": f"rank {ctx.rank}"})
    except RuntimeError:
        mism = True
    n_batches = distributed.all_gather_objects(mine)
    model = _train_tiny()
    tiny = _tiny_analysis()  # one batch: rank 1 has nothing to analyse
    if distributed.is_main():
        atomic_write_json(out / "primitives.json", {
            "world_size": ctx.world_size, "count": red["count"], "batches_per_rank": n_batches,
            "sum": red["noise"]["sum"].tolist(), "sumsq": red["noise"]["sumsq"].tolist(),
            "same_on_ranks": red["name"] == "same-everywhere", "mismatch_raised": mism,
            "only_rank0": red["only_rank0"].tolist(), "merged": red["merged"].total.tolist(),
            "tiny": tiny,
        })
        atomic_write_with(out / "ddp.pt", lambda f: torch.save(model.state_dict(), f))
    distributed.barrier()


def _worker_fail(out: Path) -> None:
    ctx = distributed.init_from_env(device="cpu")
    with distributed.failure_guard():
        if ctx.rank == 1:
            time.sleep(0.5)
            raise ValueError("boom on rank 1")
        distributed.barrier()  # rank 0 waits here for a peer that died
        (out / "reached").write_text("rank 0 passed the barrier")


def _worker_stuck(out: Path) -> None:
    ctx = distributed.init_from_env(device="cpu")
    with distributed.failure_guard():
        if ctx.rank == 1:
            time.sleep(120)  # alive but never joins; torchrun kills it once rank 0 fails
        distributed.barrier()
        (out / "reached").write_text("passed the barrier")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    try:
        {"primitives": _worker_primitives, "fail": _worker_fail, "stuck": _worker_stuck}[
            scenario](out_dir)
    finally:
        distributed.cleanup()
