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
)
from lsa_ext.losses import cross_entropy


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
    res = evaluate(model, (x, y), dataset="moons", pgd_eps=0.3, apgd_eps=[0.3], apgd_steps=20)
    assert set(res.pgd) == {0.3} and set(res.apgd) == {0.3}
    assert res.pgd[0.3] < res.fgsm[0.3]  # PGD stronger than FGSM
    assert res.apgd[0.3] < res.clean
    again = evaluate(model, (x, y), dataset="moons", pgd_eps=0.3, apgd_eps=[0.3], apgd_steps=20)
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
    res = evaluate(model, (x, y), dataset="moons", pgd_eps=0.1, pgd_steps=2)
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
