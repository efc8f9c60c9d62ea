"""One site naming for analysis and training: ``name`` = a module's first call, ``name#k`` its
k-th; every site an analysis reports can be probed and regularised, each exactly once."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import lsa_ext
from lsa_ext import checkpoint
from lsa_ext.errors import LsaUserError
from lsa_ext.probes import Capture, canonical_site, parse_site, select_layers
from lsa_ext.regularizer import LRTerm, lr_term, resolve_layers

pytestmark = pytest.mark.usefixtures("one_thread")


class Shared(nn.Module):
    """``block.act`` runs twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(2, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.block = nn.Module()
        self.block.act = nn.Tanh()

    def forward(self, x):
        return self.out(self.block.act(self.fc2(self.block.act(self.fc1(x)))))


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    return x, (x[:, 0] > 0).long()


def test_parse_and_canonical_sites():
    assert parse_site("block.act#2") == ("block.act", 2)
    assert parse_site("block.act") == ("block.act", None)
    assert canonical_site("block.act#1") == "block.act"
    assert canonical_site("block.act#3") == "block.act#3"
    for bad in ("act#0", "act#x", "#2", "act#"):
        with pytest.raises(LsaUserError, match="bad layer site"):
            parse_site(bad)


def test_select_layers_and_capture_take_sites():
    torch.manual_seed(0)
    m = Shared()
    assert select_layers(m, "block.act#2") == ["block.act#2"]
    assert select_layers(m, "block.act,block.act#2") == ["block.act", "block.act#2"]
    x = torch.randn(3, 2)
    h1 = torch.tanh(m.fc1(x))
    h2 = torch.tanh(m.fc2(h1))
    with Capture(m, ["block.act"]) as cap:  # a module: every call
        m(x)
    assert list(cap.outputs) == ["block.act", "block.act#2"]
    with Capture(m, ["block.act#2"]) as cap:  # a site: that call only
        m(x)
    assert list(cap.outputs) == ["block.act#2"]
    torch.testing.assert_close(cap.outputs["block.act#2"], h2)
    with Capture(m, ["block.act#1"]) as cap:
        m(x)
    assert list(cap.outputs) == ["block.act"]
    torch.testing.assert_close(cap.outputs["block.act"], h1)


def test_resolve_layers_names_sites_once():
    m = Shared()
    assert resolve_layers(m, "block.act#2") == ["block.act#2"]
    assert resolve_layers(m, ["block.act", "block.act#1", "module.block.act"]) == ["block.act"]
    assert resolve_layers(m, "L1,fc2,block.act#2") == ["fc2", "block.act#2"]
    with pytest.raises(LsaUserError, match="bad layer site"):
        resolve_layers(m, "block.act#0")
    with pytest.raises(LsaUserError, match=r"lsa_ext.train\(\.\.\., lr_layers='mvl'\)"):
        resolve_layers(m, "mvl")


def test_lr_term_regularises_exactly_the_named_call():
    torch.manual_seed(0)
    m = Shared().double()
    x = torch.randn(16, 2, dtype=torch.float64)
    xa = x + 0.2
    h = [torch.tanh(m.fc1(x)), torch.tanh(m.fc1(xa))]
    h2 = [torch.tanh(m.fc2(h[0])), torch.tanh(m.fc2(h[1]))]

    def cm(a, b):
        return ((a - b).norm(dim=1) / a.norm(dim=1)).mean()

    for lr_pass in ("concat", "two_pass"):
        first, _, _ = lr_term(m, x, xa, ["block.act"], lr_pass=lr_pass)
        second, _, _ = lr_term(m, x, xa, ["block.act#2"], lr_pass=lr_pass)
        both, _, _ = lr_term(m, x, xa, ["block.act", "block.act#2"], [1.0, 3.0],
                             lr_pass=lr_pass)
        assert first.item() == pytest.approx(cm(*h).item(), rel=1e-6)
        assert second.item() == pytest.approx(cm(*h2).item(), rel=1e-6)
        assert both.item() == pytest.approx(cm(*h).item() + 3 * cm(*h2).item(), rel=1e-6)


def test_lr_term_rejects_a_site_twice_and_a_call_that_never_runs(caplog):
    m = Shared()
    x = torch.randn(4, 2)
    for twice in (["block.act", "block.act#1"], ["fc1", "module.fc1"]):
        with pytest.raises(LsaUserError, match="more than once"):
            lr_term(m, x, x + 0.1, twice)
    with pytest.raises(LsaUserError, match=r"block.act ×2"):
        lr_term(m, x, x + 0.1, ["block.act#3"])
    with caplog.at_level(logging.WARNING, logger="lsa_ext.regularizer"):
        lr_term(m, x, x + 0.1, ["block.act"])
    assert "block.act runs 2 times per forward" in caplog.text
    assert "not block.act#2" in caplog.text


def test_warning_for_a_bare_first_call_only_not_for_named_calls(caplog, tmp_path):
    """A module named bare (its first call) warns that its other calls are left out; named
    calls (name#k, A<k>, also name#1) are exact and do not warn."""
    m = Shared()
    x = torch.randn(4, 2)
    with caplog.at_level(logging.WARNING, logger="lsa_ext.regularizer"):
        for named in (["block.act#2"], ["A1"], ["block.act#1"], ["fc1", "A0", "A1"]):
            lr_term(m, x, x + 0.1, named)
    assert "times per forward" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="lsa_ext.regularizer"):
        lr_term(m, x, x + 0.1, ["activations"])  # a kind selects modules: their first calls
    assert ("module block.act runs 2 times per forward; AT-LR regularises block.act, its first "
            "call, not block.act#2") in caplog.text
    caplog.clear()
    # lsa train --lr-layers A1 (= block.act#2; the CLI passes the resolved site on): no warning
    from lsa_ext.cli import main

    args = ["train", "--dataset", "moons", "--model", "test_sites:Shared", "--limit-train",
            "64", "--limit-test", "32", "--batch-size", "32", "--at", "fgsm", "--epochs", "1"]
    with caplog.at_level(logging.WARNING, logger="lsa_ext.regularizer"):
        assert main([*args, "--lr-layers", "A1", "--out", str(tmp_path / "a1")]) == 0
    assert "times per forward" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="lsa_ext.regularizer"):
        assert main([*args, "--lr-layers", "block.act", "--out", str(tmp_path / "bare")]) == 0
    assert "AT-LR regularises block.act, its first call, not block.act#2" in caplog.text


def test_analysis_sites_round_trip_into_training(tmp_path):
    """Every site lsa_ext.analyze reports can be regularised, as written."""
    from lsa_ext.attacks import FGSM

    torch.manual_seed(0)
    m = Shared()
    x, y = _data()
    res = lsa_ext.analyze(m, (x, y), {"fgsm": FGSM(m, 0.1, clip=None)}, layers="activations",
                          progress=False)
    assert res.layers == ["block.act", "block.act#2"]
    for site in res.layers:
        assert resolve_layers(m, site) == [site]
        lr_term(m, x, x + 0.1, [site])
    lsa_ext.train(m, (x, y), at="fgsm", eps=0.1, lr_layers="block.act#2", epochs=1,
                  batch_size=32, out=tmp_path, progress=False)
    cfg = checkpoint.load_checkpoint(tmp_path / "last.pt")["config"]
    assert cfg["lr_layers"] == ["block.act#2"]


def test_train_lr_layers_mvl_from_a_report_and_on_the_fly(tmp_path):
    from lsa_ext.attacks import FGSM
    from lsa_ext.mvl_select import mvl_from_report, mvl_on_the_fly

    torch.manual_seed(0)
    m = Shared()
    x, y = _data()
    res = lsa_ext.analyze(m, (x, y), {"fgsm": FGSM(m, 0.1, clip=None)}, layers="learnable",
                          progress=False)
    res.to_json(tmp_path / "report.json", eta=0.0)
    # with the model, the output layer `out` is left out, as on the fly
    want = mvl_from_report(tmp_path / "report.json", 0.0, model=Shared())
    assert want.left_out == ["out"] and want.kind == "learnable"
    assert want.sites and set(want.sites) <= {"fc1", "fc2"}
    lsa_ext.train(Shared(), (x, y), at="fgsm", eps=0.1, lr_layers="mvl", eta=0.0,
                  mvl_report=tmp_path / "report.json", epochs=1, batch_size=32,
                  out=tmp_path / "a", progress=False)
    assert checkpoint.load_checkpoint(tmp_path / "a" / "last.pt")["config"]["lr_layers"] \
        == want.sites
    kw = dict(at="fgsm", eps=0.1, clip=None, eta=0.0, epochs=1, batch_size=32, seed=0)
    torch.manual_seed(1)
    fresh = Shared()
    want = mvl_on_the_fly(fresh, (x, y), **kw)  # activation sites, as lsa analyze
    assert want.kind == "activations" and want.sites
    assert set(want.sites) <= {"block.act", "block.act#2"}
    lsa_ext.train(fresh, (x, y), lr_layers="MVL", out=tmp_path / "b", progress=False,
                  **{k: v for k, v in kw.items() if k != "clip"})
    assert checkpoint.load_checkpoint(tmp_path / "b" / "last.pt")["config"]["lr_layers"] \
        == want.sites
    with pytest.raises(LsaUserError, match="needs an attack"):
        lsa_ext.train(Shared(), (x, y), at="none", lr_layers="mvl", epochs=1)
    with pytest.raises(LsaUserError, match="unknown optimizer"):  # checked before the search
        lsa_ext.train(Shared(), (x, y), at="fgsm", lr_layers="mvl", optimizer="lbfgs")
    with pytest.raises(LsaUserError, match="unknown MVL kind 'relu'; choices: activations, "
                                           "learnable"):
        lsa_ext.train(Shared(), (x, y), at="fgsm", lr_layers="mvl", mvl_kind="relu")


def test_auto_pass_plan_follows_the_depth_of_the_last_site():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 16), nn.ELU(), nn.Linear(16, 16), nn.ELU(), nn.Linear(16, 3))
    x = torch.randn(4, 2)
    # multiply-accumulates per sample: 2·16, 16·16, 16·3 (336 in all)
    for sites, fraction, mode in ((["0"], 32 / 336, "two_pass"), (["2"], 288 / 336, "two_pass"),
                                  (["0", "3"], 288 / 336, "two_pass"), (["4"], 1.0, "concat")):
        term = LRTerm(sites)
        assert term.plan(m, x, clean_logits=False) == mode
        assert term.fraction == pytest.approx(fraction)
        assert term.plan(m, x, clean_logits=True) == "concat"
    assert LRTerm(["0"], lr_pass="two_pass").plan(m, x, clean_logits=True) == "two_pass"
    with pytest.raises(LsaUserError, match="unknown lr_pass"):
        LRTerm(["0"], lr_pass="fused")
