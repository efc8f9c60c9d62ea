"""Tests for lsa_ext.evaluation: FGSM grid, R&G, PGD/APGD accuracy, result files."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import make_moons
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lsa_ext.attacks import FGSM
from lsa_ext.errors import LsaUserError
from lsa_ext.evaluation import (
    EPS_GRIDS,
    EvaluationResult,
    accuracy,
    evaluate,
    fgsm_accuracy_grid,
    rg_score,
    sign_noise_accuracy_grid,
)
from lsa_ext.losses import cross_entropy
from lsa_ext.masking import masking_flags


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def moons():
    xs, ys = make_moons(n_samples=700, noise=0.15, random_state=1)
    x = torch.tensor(xs, dtype=torch.float32)
    y = torch.tensor(ys, dtype=torch.long)
    xtr, ytr, xte, yte = x[:400], y[:400], x[400:], y[400:]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(2, 32), nn.ELU(), nn.Dropout(0.2), nn.Linear(32, 32), nn.ELU(), nn.Linear(32, 1)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        cross_entropy(model(xtr), ytr).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model, xte, yte


def _manual_fgsm_accuracy(model, x, y, eps, clip=None):
    """Straightforward FGSM accuracy of a 1-logit model, one batch, CE = softplus(−s·z).

    (torch's binary_cross_entropy_with_logits would not do: its gradient underflows to exactly 0
    in float32 for confidently classified points, so FGSM would leave those points in place.)
    """
    x_req = x.clone().requires_grad_(True)
    s = 2.0 * y.float() - 1.0
    loss = F.softplus(-s * model(x_req).squeeze(1)).sum()
    (g,) = torch.autograd.grad(loss, x_req)
    x_adv = x + eps * g.sign()
    if clip is not None:
        x_adv = x_adv.clamp(*clip)
    with torch.no_grad():
        pred = (model(x_adv).squeeze(1) > 0).long()
    return 100.0 * (pred == y).double().mean().item()


def test_grid_matches_a_straightforward_fgsm_computation(moons):
    model, x, y = moons
    grid = EPS_GRIDS["moons"]
    got = fgsm_accuracy_grid(model, (x, y), grid, clip=None, batch_size=64)
    assert list(got) == list(grid)
    for eps in grid:
        assert got[eps] == pytest.approx(_manual_fgsm_accuracy(model, x, y, eps), abs=1e-9)
        per_attack = accuracy(model, (x, y), perturb=FGSM(model, eps, clip=None), batch_size=64)
        assert got[eps] == per_attack
    assert got[0.0] > 90 and got[0.5] < got[0.0]


def test_eps_zero_is_clean_accuracy(moons):
    model, x, y = moons
    with torch.no_grad():
        clean = 100.0 * ((model(x).squeeze(1) > 0).long() == y).double().mean().item()
    res = evaluate(model, (x, y), dataset="moons")
    assert res.fgsm[0.0] == pytest.approx(clean, abs=1e-9)
    assert res.clean == pytest.approx(clean, abs=1e-9)
    assert accuracy(model, (x, y)) == pytest.approx(clean, abs=1e-9)
    assert res.n_samples == x.shape[0]


def test_rg_is_the_sum_of_the_grid(moons):
    model, x, y = moons
    res = evaluate(model, (x, y), dataset="moons")
    assert res.rg == pytest.approx(math.fsum(res.fgsm.values()), abs=1e-9)
    # the paper's Table 2 "Normal" row: 97.07 + 93.63 + 82.5 + 76.83 + 63.79 + 52.35 = 466.17
    assert rg_score([97.07, 93.63, 82.5, 76.83, 63.79, 52.35]) == pytest.approx(466.17, abs=1e-9)
    assert rg_score({0.0: 90.53, 0.01: 48.91, 0.03: 43.91, 0.1: 31.5, 0.2: 22.29}) == (
        pytest.approx(237.14, abs=1e-9)
    )


def test_batching_and_data_forms_agree(moons):
    model, x, y = moons
    grid = (0.0, 0.2, 0.4)
    ref = fgsm_accuracy_grid(model, (x, y), grid, clip=None)
    for data, bs in [
        ((x, y), 7),
        (TensorDataset(x, y), 50),
        (DataLoader(TensorDataset(x, y), batch_size=33), 256),
        ([(x[:100], y[:100]), (x[100:], y[100:])], 256),
        (SimpleNamespace(test=TensorDataset(x, y), info=None), 256),
    ]:
        assert fgsm_accuracy_grid(model, data, grid, clip=None, batch_size=bs) == ref


def test_pgd_and_apgd_accuracy(moons):
    model, x, y = moons
    kw = {"pgd_eps": 0.3, "apgd_eps": [0.3], "apgd_steps": 20, "masking_checks": False}
    res = evaluate(model, (x, y), dataset="moons", **kw)
    assert set(res.pgd) == {0.3} and set(res.apgd) == {0.3}
    assert res.pgd[0.3] < res.fgsm[0.3]  # PGD stronger than FGSM
    assert res.apgd[0.3] < res.clean
    again = evaluate(model, (x, y), dataset="moons", **kw)
    assert again.to_dict() == res.to_dict()  # same seed, same report


def test_model_mode_restored_and_eval_mode_used(moons):
    model, x, y = moons
    ref = evaluate(model, (x, y), dataset="moons", pgd_eps=0.2, pgd_steps=3)
    model.train()
    model[0].weight.requires_grad_(False)
    try:
        res = evaluate(model, (x, y), dataset="moons", pgd_eps=0.2, pgd_steps=3)
        assert model.training and all(m.training for m in model.modules())
        assert not model[0].weight.requires_grad and model[3].weight.requires_grad
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()
        model[0].weight.requires_grad_(True)
    assert res.fgsm == ref.fgsm and res.pgd == ref.pgd  # dropout was off


def test_data_splits_and_image_clip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    splits = SimpleNamespace(
        train=None, test=TensorDataset(x, y),
        info=SimpleNamespace(name="digits", data_range=(0.0, 1.0)),
    )
    res = evaluate(model, splits)
    assert res.dataset == "digits" and tuple(res.fgsm) == EPS_GRIDS["digits"]
    assert res.config["clip"] == [0.0, 1.0]
    # clipping matters at eps 0.5: the clipped and unclipped grids are the straightforward ones
    clipped = fgsm_accuracy_grid(model, (x, y), (0.5,), clip=(0.0, 1.0))
    assert clipped[0.5] == accuracy(model, (x, y), perturb=FGSM(model, 0.5))
    with pytest.raises(LsaUserError, match="outside the clip range"):
        evaluate(model, (x * 3, y), dataset="mnist")


def test_result_files_and_table(moons, tmp_path):
    model, x, y = moons
    res = evaluate(model, (x, y), dataset="moons", pgd_eps=0.1, pgd_steps=2,
                   masking_checks=False)
    res.to_json(tmp_path / "eval.json")
    res.to_csv(tmp_path / "eval.csv")
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert doc["dataset"] == "moons" and doc["n_samples"] == x.shape[0]
    assert [r["eps"] for r in doc["fgsm"]] == list(EPS_GRIDS["moons"])
    assert doc["rg_score"] == pytest.approx(sum(r["accuracy"] for r in doc["fgsm"]))
    assert doc["pgd"] == [{"eps": 0.1, "accuracy": res.pgd[0.1]}]
    assert doc["config"]["clip"] is None and doc["config"]["versions"]["torch"]
    assert EvaluationResult.from_dict(doc) == res
    with pytest.raises(LsaUserError, match="not an evaluation result"):
        EvaluationResult.from_dict({"fgsm": []})
    rows = list(csv.DictReader((tmp_path / "eval.csv").open()))
    fg = [r for r in rows if r["metric"] == "fgsm_accuracy"]
    assert [float(r["eps"]) for r in fg] == list(EPS_GRIDS["moons"])
    assert [float(r["value"]) for r in fg] == list(res.fgsm.values())
    (rg,) = [r for r in rows if r["metric"] == "rg_score"]
    assert float(rg["value"]) == res.rg
    (pg,) = [r for r in rows if r["metric"] == "pgd_accuracy"]
    assert float(pg["value"]) == res.pgd[0.1] and pg["steps"] == "2"
    table = res.table()
    lines = table.splitlines()
    assert lines[1].split() == ["accuracy", "%", "0", "0.1", "0.2", "0.3", "0.4", "0.5", "R&G"]
    assert lines[2].split() == ["FGSM"] + [f"{a:.2f}" for a in res.fgsm.values()] + [
        f"{res.rg:.2f}"
    ]
    assert lines[3].split() == ["PGD-2", "-", f"{res.pgd[0.1]:.2f}", "-", "-", "-", "-"]
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporaries


def test_result_from_fields_round_trip():
    res = EvaluationResult(dataset=None, n_samples=3, fgsm={0.0: 100.0, 0.1: 50.0}, rg=150.0,
                           clean=100.0)
    assert res.to_dict()["fgsm"] == [{"eps": 0.0, "accuracy": 100.0},
                                     {"eps": 0.1, "accuracy": 50.0}]
    assert "150.00" in res.table()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"dataset": "imagenet"}, "no default eps grid"),
        ({"eps_grid": (0.0, -0.1), "clip": None}, "eps must be >= 0"),
        ({"eps_grid": (), "clip": None}, "empty"),
        ({"eps_grid": (0.1, 0.1), "clip": None}, "duplicate"),
        ({"eps_grid": (0.0, 0.1)}, "cannot infer the data range"),
        ({"dataset": "moons", "pgd_eps": -1.0}, "eps must be >= 0"),
        ({"dataset": "moons", "batch_size": 0}, "batch_size"),
        ({"dataset": "moons", "clip": (1, 0)}, "lo < hi"),
    ],
)
def test_bad_input(moons, kw, match):
    model, x, y = moons
    with pytest.raises(LsaUserError, match=match):
        evaluate(model, (x, y), **kw)


def test_empty_data_and_nan_model():
    model = nn.Linear(2, 1)
    with pytest.raises(LsaUserError, match="empty"):
        accuracy(model, (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(LsaUserError, match="NaN"):
        accuracy(lambda t: t[:, :1] * float("nan"), (torch.zeros(3, 2), torch.zeros(3).long()))


# ----------------------------------------------------------------------------- masking checks
class _Quantized(nn.Module):
    """``inner(round(x / q) · q)``: the rounding has zero gradient almost everywhere, so FGSM's
    direction is 0 and FGSM leaves every input in place — a textbook masked gradient — while
    random noise of the same size still moves inputs across the quantisation cells."""

    def __init__(self, inner: nn.Module, q: float) -> None:
        super().__init__()
        self.inner, self.q = inner, q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x / self.q) * self.q)


def test_sign_noise_grid_matches_a_straightforward_computation(moons):
    model, x, y = moons
    grid = (0.0, 0.2, 0.5)
    got = sign_noise_accuracy_grid(model, (x, y), grid, clip=None, seed=3, batch_size=1024)
    g = torch.Generator().manual_seed(3)
    s = 2.0 * torch.randint(0, 2, x.shape, generator=g).double() - 1.0  # one batch: one draw
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    m64 = _double(model)

    def ref(xs, eps, lo=-math.inf, hi=math.inf):
        with torch.no_grad():
            pred = (m64((xs.double() + eps * s).clamp(lo, hi)).squeeze(1) > 0).long()
        return 100.0 * (pred == y).double().mean().item()

    for eps in grid:
        assert got[eps] == pytest.approx(ref(x, eps), abs=1e-9)
    assert got[0.5] < got[0.0]  # noise of this size does hurt the plain model
    lo, hi = float(x.min()), float(x.max()) - 1.0
    x_in = x.clamp(lo, hi)
    clipped = sign_noise_accuracy_grid(model, (x_in, y), (0.5,), clip=(lo, hi), seed=3,
                                       batch_size=1024)
    assert clipped[0.5] == pytest.approx(ref(x_in, 0.5, lo, hi), abs=1e-9)


def _double(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double().eval()


def test_plain_model_reports_pgd_rg_and_raises_no_masking_flag(moons):
    model, x, y = moons
    res = evaluate(model, (x, y), dataset="moons")
    grid = EPS_GRIDS["moons"]
    assert set(res.pgd) == {e for e in grid if e > 0} and tuple(res.noise) == grid
    assert res.rg_pgd == pytest.approx(res.clean + math.fsum(res.pgd.values()), abs=1e-9)
    for e in res.pgd:  # PGD-20 is at least as strong as FGSM, both beat random noise
        assert res.pgd[e] <= res.fgsm[e] + 0.5 and res.fgsm[e] < res.noise[e]
    assert res.masking == []
    assert "masking flags (tolerance 0.5 points): none" in res.table()
    assert res.table().splitlines()[3].split()[-1] == f"{res.rg_pgd:.2f}"  # PGD-20 row's R&G


def test_quantized_input_model_is_flagged_as_masked(moons, tmp_path):
    model, x, y = moons
    masked = _Quantized(model, q=0.25).eval()
    res = evaluate(masked, (x, y), dataset="moons")
    assert len(set(res.fgsm.values())) == 1  # zero gradient: FGSM never moves an input
    names = [f.name for f in res.masking]
    assert "fgsm_above_noise" in names
    (flag,) = [f for f in res.masking if f.name == "fgsm_above_noise"]
    assert 0.5 in flag.eps and res.fgsm[0.5] > res.noise[0.5] + 0.5
    assert res.rg_pgd < res.rg  # PGD's random start finds what FGSM cannot
    res.to_json(tmp_path / "e.json")
    res.to_csv(tmp_path / "e.csv")
    assert EvaluationResult.from_dict(json.loads((tmp_path / "e.json").read_text())) == res
    rows = {r["metric"]: r for r in csv.DictReader((tmp_path / "e.csv").open())}
    assert rows["masking_flags"]["value"] == ";".join(names)
    assert float(rows["rg_pgd"]["value"]) == res.rg_pgd and rows["rg_pgd"]["steps"] == "20"


def test_masking_flags_from_accuracies():
    # the detached-φ(x) AT-FGSM-LR run of issue 12: FGSM accuracy rises with ε, PGD is lower
    fgsm = {0.0: 90.0, 0.1: 87.9, 0.2: 89.1, 0.3: 89.5}
    pgd = {0.1: 86.0, 0.2: 80.0, 0.3: 75.0}
    noise = {0.1: 89.0, 0.2: 88.0, 0.3: 86.0}
    flags = masking_flags(fgsm, pgd, noise)
    assert [str(f) for f in flags] == ["fgsm_nonmonotone@0.2", "fgsm_above_noise@0.2,0.3"]
    assert [f.name for f in masking_flags(fgsm, pgd, noise, tol=1.5)] == ["fgsm_above_noise"]
    assert [str(f) for f in masking_flags({0.0: 90, 0.1: 60}, {0.1: 70}, {0.1: 65})] == [
        "pgd_above_fgsm@0.1", "pgd_above_noise@0.1"]
    assert masking_flags({0.0: 90, 0.1: 60, 0.2: 60.4}, {0.1: 59}, {0.1: 80}) == []
    assert masking_flags(fgsm) == [masking_flags(fgsm)[0]]  # only the FGSM check without others
    with pytest.raises(LsaUserError, match="tol"):
        masking_flags(fgsm, tol=-1)


def test_rg_pgd_follows_the_grid_as_rg_does():
    """A grid without 0: neither R&G has a clean term (rg_pgd used to add the clean accuracy,
    making it twice the FGSM R&G on a 2-point grid); with 0 both start with it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).eval()
    x = torch.rand(64, 2)
    y = (x[:, 0] > x[:, 1]).long()
    no_zero = evaluate(model, (x, y), eps_grid=[0.1, 0.2], clip=(0.0, 1.0), seed=0)
    assert no_zero.rg == pytest.approx(math.fsum(no_zero.fgsm.values()), abs=1e-9)
    assert no_zero.rg_pgd == pytest.approx(math.fsum(no_zero.pgd[e] for e in (0.1, 0.2)),
                                           abs=1e-9)
    with_zero = evaluate(model, (x, y), eps_grid=[0.0, 0.1, 0.2], clip=(0.0, 1.0), seed=0)
    assert with_zero.rg_pgd == pytest.approx(
        with_zero.clean + math.fsum(with_zero.pgd[e] for e in (0.1, 0.2)), abs=1e-9)
    assert with_zero.rg_pgd - no_zero.rg_pgd == pytest.approx(with_zero.clean, abs=1e-9)
