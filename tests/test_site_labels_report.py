"""Analysis reports name every probed site with its short label — ``A<k>`` (k-th activation
site of a forward), ``L<k>`` (k-th learnable layer), else the site itself — in the result, the
text table, ``layers.csv`` (column ``label``) and ``report.json`` (``"labels"``, schema 1.2), so
the numbers ``--layers`` / ``--lr-layers`` take can be read off any report. The reference for
a label is :func:`lsa_ext.probes.select_layers`: the label, typed back as a selector, selects
that very site."""

from __future__ import annotations

import csv
import json
import sys
import textwrap

import numpy as np
import pytest
import torch

import lsa_ext
from lsa_ext.cli import main
from lsa_ext.data import load_dataset
from lsa_ext.errors import LsaUserError
from lsa_ext.models import build_model
from lsa_ext.probes import LEARNABLE, canonical_site, select_layers
from lsa_ext.report import SCHEMA
from lsa_ext.result import AnalysisResult, load_result

pytestmark = pytest.mark.usefixtures("one_thread")

CSV_HEAD = ["perturbation", "layer_index", "layer", "mean", "std", "count", "rank", "in_mvl"]


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("LSA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LSA_PROGRESS", "0")


@pytest.fixture(scope="module")
def user_models(tmp_path_factory):
    """A factory module with :class:`Reused`-like nets for two-moons: one ``ReLU(inplace=True)``
    runs twice per forward; ``act`` (ELU) is registered first but runs last."""
    folder = tmp_path_factory.mktemp("models")
    (folder / "lsa_label_models.py").write_text(textwrap.dedent("""
        from torch import nn

        class Reused(nn.Module):
            def __init__(self, info=None):
                super().__init__()
                self.act = nn.ELU()
                self.fc1, self.fc2, self.out = nn.Linear(2, 8), nn.Linear(8, 8), nn.Linear(8, 2)
                self.relu = nn.ReLU(inplace=True)

            def forward(self, x):
                a = self.relu(self.fc1(x))
                b = self.fc2(a)
                b += a
                return self.out(self.act(self.relu(b)))
    """))
    sys.path.insert(0, str(folder))
    sys.modules.pop("lsa_label_models", None)
    yield "lsa_label_models"
    sys.path.remove(str(folder))
    sys.modules.pop("lsa_label_models", None)


def _checkpoint(tmp_path, model_name: str, dataset: str):
    info = load_dataset(dataset).info
    model = build_model(model_name, info, seed=0)
    path = tmp_path / f"{model_name.replace(':', '_')}.pt"
    torch.save(model.state_dict(), path)
    return model, info, path


def _analyze(tmp_path, capsys, ckpt, model_name, dataset, layers, out="a", eta="0"):
    rc = main(["analyze", "--dataset", dataset, "--model", model_name, "--checkpoint", str(ckpt),
               "--layers", layers, "--perturbations", "gaussian:std=0.3,fgsm", "--max-samples",
               "40", "--batch-size", "16", "--eta", eta, "--no-plot", "--device", "cpu",
               "--threads", "1", "--out", str(tmp_path / out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rep = json.loads((tmp_path / out / "report.json").read_text())
    with open(tmp_path / out / "layers.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    return rep, rows, captured.out


def _table(text: str) -> list[tuple[str, str]]:
    """``(site, layer)`` of the table's rows (between the two rules)."""
    lines = text.splitlines()
    h = next(i for i, ln in enumerate(lines) if ln.startswith("label "))
    assert lines[h].split()[:2] == ["label", "layer"]
    out = []
    for ln in lines[h + 2:]:
        if not ln.strip() or ln.startswith("---"):
            break
        site, layer = ln.split()[:2]
        out.append((site, layer))
    return out


def _selects(model, label: str, site: str, info) -> bool:
    """The independent reference: ``label`` typed back as a selector selects ``site``."""
    got = select_layers(model, label, example=info.input_shape)
    return [canonical_site(s) for s in got] == [site]


def _check_report(rep, rows, text, model, info, sites, labels):
    """Every view of the report names ``sites`` with ``labels``; labels select their sites."""
    assert rep["schema"] == SCHEMA == "lsa_ext.analysis/1.2"
    assert rep["layers"] == sites and rep["labels"] == labels
    for site, label in zip(sites, labels, strict=True):
        if label != site:
            assert _selects(model, label, site, info), (label, site)
    # layers.csv: the old columns first, unchanged, then `label`
    assert rows[0] == [*CSV_HEAD, "label"]
    perts = list(rep["perturbations"])
    body = rows[1:]
    assert len(body) == len(perts) * len(sites)
    for r, row in enumerate(body):
        p, i = divmod(r, len(sites))
        assert row[0] == perts[p] and row[1] == str(i) and row[2] == sites[i]
        assert row[8] == labels[i]
        assert float(row[3]) == rep["perturbations"][perts[p]]["mean"][i]
    # the text table: `label` column (`-` where the label is the site itself), then the layer
    assert _table(text) == [("-" if lbl == s else lbl, s)
                            for s, lbl in zip(sites, labels, strict=True)]
    # the MVL lines name each layer with its label
    for p in perts:
        mvl = rep["mvl"]["layers"][p]
        if mvl:
            named = ", ".join(s if labels[sites.index(s)] == s else
                              f"{labels[sites.index(s)]} ({s})" for s in mvl)
            line = next(ln for ln in text.splitlines() if ln.startswith(f"  {p} "))
            assert named in line, (named, line)


def test_model_a_moons_activation_and_learnable_labels(tmp_path, capsys):
    model, info, ckpt = _checkpoint(tmp_path, "model_a", "moons")
    rep, rows, text = _analyze(tmp_path, capsys, ckpt, "model_a", "moons", "A0,A2")
    _check_report(rep, rows, text, model, info, ["act1", "act3"], ["A0", "A2"])
    assert [r[1] for r in rows[1:3]] == ["0", "1"]  # layer_index: the row, kept as it was
    assert any(rep["mvl"]["layers"].values())  # eta=0: the MVL lines were checked
    rep, rows, text = _analyze(tmp_path, capsys, ckpt, "model_a", "moons", "L1,L3", out="b")
    _check_report(rep, rows, text, model, info, ["fc2", "fc4"], ["L1", "L3"])
    rep, rows, text = _analyze(tmp_path, capsys, ckpt, "model_a", "moons", "activations",
                               out="c")
    _check_report(rep, rows, text, model, info, ["act1", "act2", "act3"], ["A0", "A1", "A2"])
    # the labels are read back; the reloaded table is the printed one
    back = load_result(tmp_path / "c" / "report.json")
    assert back.labels == ["A0", "A1", "A2"]
    assert _table(back.format_table(0.0)) == _table(text)


def test_model_b_leaves_mix_learnable_activation_and_unlabelled_sites(tmp_path, capsys):
    model, info, ckpt = _checkpoint(tmp_path, "model_b", "digits")
    rep, rows, text = _analyze(tmp_path, capsys, ckpt, "model_b", "digits", "leaves")
    learnable = [n for n, m in model.named_modules() if isinstance(m, LEARNABLE)]
    acts = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ReLU)]
    # model_b runs its leaves in registration order, each once: the reference is that order
    expected = [f"L{learnable.index(s)}" if s in learnable else
                f"A{acts.index(s)}" if s in acts else s for s in rep["layers"]]
    assert {"L0", "L4", "A0", "A3"} <= set(expected) and "pool1" in expected
    _check_report(rep, rows, text, model, info, rep["layers"], expected)


def test_reused_inplace_relu_two_sites_two_labels(tmp_path, capsys, user_models):
    name = f"{user_models}:Reused"
    model, info, ckpt = _checkpoint(tmp_path, name, "moons")
    rep, rows, text = _analyze(tmp_path, capsys, ckpt, name, "moons", "activations")
    # forward order (not registration order: act is registered first but runs last)
    _check_report(rep, rows, text, model, info, ["relu", "relu#2", "act"], ["A0", "A1", "A2"])
    rep, rows, text = _analyze(tmp_path, capsys, ckpt, name, "moons", "A1,L0,L2", out="b")
    _check_report(rep, rows, text, model, info, ["fc1", "relu#2", "out"], ["L0", "A1", "L2"])


def test_python_api_labels_and_a_one_shot_iterator_guesses_nothing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4),
                                torch.nn.ReLU(), torch.nn.Linear(4, 2))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, generator=g)
    y = (x[:, 0] > 0).long()

    def shift(xb, yb):
        return xb + 0.1

    def noisy(xb, yb):  # draws from torch's global RNG, which analyze seeds per batch
        return xb + 0.1 * torch.randn_like(xb)

    state = torch.get_rng_state()
    res = lsa_ext.analyze(model, (x, y), {"shift": shift, "noisy": noisy}, layers="leaves",
                          seed=3, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG: untouched
    again = lsa_ext.analyze(model, (x, y), {"shift": shift, "noisy": noisy}, layers="leaves",
                            seed=3, progress=False)
    np.testing.assert_array_equal(again.mean, res.mean)
    assert res.layers == ["0", "1", "2", "3", "4"]
    assert res.labels == ["L0", "A0", "L1", "A1", "L2"]
    once = lsa_ext.analyze(model, ((x[i:i + 5], y[i:i + 5]) for i in range(0, 20, 5)),
                           {"shift": shift}, layers="leaves", progress=False)
    np.testing.assert_allclose(once.mean, res.mean[:1], rtol=1e-5)  # batches of 5, not 20
    # no sample to count activation sites on: they keep their names (never a wrong A<k>)
    assert once.labels == ["L0", "1", "L1", "3", "L2"]
    with pytest.raises(LsaUserError, match="2 site labels for 5 layers"):
        AnalysisResult.from_stats(res.layers, res.perturbations, res.stats, labels=["A0", "A1"])


def _old(rep: dict, schema: str) -> dict:
    old = {k: v for k, v in rep.items() if k != "labels"}
    old["schema"] = schema
    if schema == "lsa_ext.analysis/1":
        old.pop("accuracy_percent")
    return old


@pytest.mark.parametrize("schema", ["lsa_ext.analysis/1", "lsa_ext.analysis/1.1"])
def test_reports_of_schema_1_and_1_1_load_without_labels(tmp_path, capsys, schema):
    model, info, ckpt = _checkpoint(tmp_path, "model_a", "moons")
    rep, _, _ = _analyze(tmp_path, capsys, ckpt, "model_a", "moons", "A0,A2", eta="1")
    new = load_result(tmp_path / "a" / "report.json")
    (tmp_path / "old.json").write_text(json.dumps(_old(rep, schema)))
    old = load_result(tmp_path / "old.json")
    assert old.labels is None and old.layers == new.layers == ["act1", "act3"]
    np.testing.assert_allclose(old.mean, new.mean, rtol=1e-12)
    assert old.mvl(1.0) == new.mvl(1.0) and old.accuracy == pytest.approx(new.accuracy)
    # written again: labels stay unknown (null / empty), the table has no label column
    old.to_json(tmp_path / "again.json")
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["schema"] == SCHEMA and again["labels"] is None
    assert load_result(tmp_path / "again.json").labels is None
    old.to_csv(tmp_path / "again.csv")
    with open(tmp_path / "again.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["label"] for r in rows] == ["", ""] * len(old.perturbations)
    table = old.format_table(1.0).splitlines()
    assert table[1].split()[0] == "layer" and table[3].split()[0] == "act1"
    assert "A0" not in old.format_table(1.0)


def test_malformed_sites_are_refused(tmp_path, capsys):
    model, info, ckpt = _checkpoint(tmp_path, "model_a", "moons")
    rep, _, _ = _analyze(tmp_path, capsys, ckpt, "model_a", "moons", "A0,A2")
    for bad in (["A0"], "A0,A2", ["A0", 2]):
        (tmp_path / "bad.json").write_text(json.dumps({**rep, "labels": bad}))
        with pytest.raises(LsaUserError, match="malformed.*labels"):
            load_result(tmp_path / "bad.json")


def test_a_module_named_like_a_label_keeps_the_labels_true():
    """Modules literally named ``A1`` and ``L0``: the selector ``A1`` picks the module A1, so
    no other site may be labelled A1 (or L0); every label, typed back, selects its site."""
    from collections import OrderedDict

    from torch import nn

    from lsa_ext.probes import canonical_site, select_layers, site_labels

    m = nn.Sequential(OrderedDict(A1=nn.Linear(4, 8), r1=nn.ReLU(), L0=nn.Linear(8, 8),
                                  r2=nn.ReLU(), out=nn.Linear(8, 3)))
    sites = select_layers(m, "leaves")
    labels = site_labels(m, sites, example=(4,))
    assert dict(zip(sites, labels, strict=True)) == {
        "A1": "A1", "r1": "A0", "L0": "L1", "r2": "r2", "out": "L2"}
    for site, label in zip(sites, labels, strict=True):
        assert [canonical_site(n) for n in select_layers(m, label, example=(4,))] == [site]
