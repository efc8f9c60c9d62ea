"""`lsa reproduce` on the --quick protocol: table layout, CSV/JSON, figures, run cache."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from lsa_ext import reproduce as rp
from lsa_ext.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_plan_follows_the_paper_protocol():
    from lsa_ext.data import dataset_info
    from lsa_ext.models import build_model

    model = build_model("model_a", dataset_info("moons"))
    names = [r.name for r in rp.plan(rp.PROTOCOLS["moons"], model)]
    assert names[:5] == ["Normal", "AT-FGSM", "AT-PGD", "AT-TRADES", "AT-FAST"]
    assert names[5:8] == ["AT-FGSM-LR-L0", "AT-FGSM-LR-L1", "AT-FGSM-LR-L2"]
    assert len(names) == 1 + 4 + 4 * 3  # L3 is the output layer: not regularized by default
    # an LR variant adds one run per (method, layer), named with its suffix, configured with
    # its TrainConfig overrides
    variant = rp.LRVariant("[g2]", {"gamma": 2.0})
    proto = rp.dataclasses.replace(rp.PROTOCOLS["moons"], methods=("fgsm",),
                                   lr_variants=(rp.LRVariant(), variant))
    runs = rp.plan(proto, model, layers=["L2"])
    assert [r.name for r in runs] == ["Normal", "AT-FGSM", "AT-FGSM-LR-L2", "AT-FGSM-LR-L2[g2]"]
    cfg = rp._train_config(proto, "fgsm", "L2", 0, None, "cpu", runs[-1].variant)
    assert cfg.gamma == 2.0 and rp._train_config(proto, "fgsm", "L2", 0, None, "cpu").gamma == 1
    with pytest.raises(rp.LsaUserError, match="unknown TrainConfig"):
        rp._train_config(proto, "fgsm", "L2", 0, None, "cpu", rp.LRVariant("x", {"bogus": 1}))


def test_reproduce_moons_quick_cli_table_files_and_cache(tmp_path, capsys):
    out = tmp_path / "rep"
    argv = ["reproduce", "moons", "--quick", "--methods", "fgsm,pgd", "--layers", "L2",
            "--out", str(out), "--seeds", "0"]
    assert main(argv) == 0
    text = capsys.readouterr()
    table = text.out
    assert "| training | 0 | 0.1 | 0.2 | 0.3 | 0.4 | 0.5 | R&G |" in table
    for name in ("Normal", "AT-FGSM", "AT-PGD", "AT-FGSM-LR-L2", "AT-PGD-LR-L2"):
        assert f"| {name} |" in table
    assert "R&G PGD-20 | masking flags |" in table
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["name"] for r in rows] == ["Normal", "AT-FGSM", "AT-PGD", "AT-FGSM-LR-L2",
                                         "AT-PGD-LR-L2"]
    eps = (0.1, 0.2, 0.3, 0.4, 0.5)
    assert list(rows[0])[-13:] == [*[f"pgd20@{e:g}" for e in eps], "rg_pgd20",
                                   *[f"noise@{e:g}" for e in eps], "masking_flags", "seconds"]
    for r in rows:
        accs = [float(r[f"acc@{e:g}"]) for e in (0, 0.1, 0.2, 0.3, 0.4, 0.5)]
        assert abs(sum(accs) - float(r["rg"])) < 1e-3
        assert all(0 <= a <= 100 for a in accs)
        pgd = [float(r[f"pgd20@{e:g}"]) for e in eps]
        assert abs(accs[0] + sum(pgd) - float(r["rg_pgd20"])) < 1e-3
        assert all(0 <= a <= 100 for a in pgd + [float(r[f"noise@{e:g}"]) for e in eps])
        assert r["masking_flags"] == "" or r["masking_flags"].split(";")[0].split("@")[0] in (
            "fgsm_nonmonotone", "pgd_above_fgsm", "fgsm_above_noise", "pgd_above_noise")
    for f in ("rg.png", "boundaries.png", "table.md", "results.json"):
        assert (out / f).stat().st_size > 0
    assert (out / "rg.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "results.json").read_text())
    assert saved["protocol"]["epochs"] == 2 and saved["paper"]["AT-PGD"][0] == 86.5

    # the cached models reproduce their stored accuracies with an independent evaluation
    from lsa_ext.data import load_dataset
    from lsa_ext.losses import predict
    from lsa_ext.models import build_model

    data = load_dataset("moons", limit_train=256, limit_test=200)
    x, y = data.test.tensors
    model = build_model("model_a", data.info)
    model.load_state_dict(torch.load(out / "runs" / "AT-PGD-s0.pt", weights_only=True))
    with torch.no_grad():
        clean = 100.0 * float((predict(model(x)) == y).float().mean())
    assert abs(clean - float(rows[2]["acc@0"])) < 1e-6

    # PGD-20 of the cached model, straightforwardly: the column is PGD's, not FGSM's
    from lsa_ext.attacks import PGD
    from lsa_ext.evaluation import accuracy

    pgd = accuracy(model, (x, y), perturb=PGD(model, 0.3, steps=20, clip=None, seed=0))
    assert pgd == pytest.approx(float(rows[2]["pgd20@0.3"]), abs=1e-9)

    # second run: everything comes from the cache, same numbers
    assert main(argv) == 0
    assert capsys.readouterr().err.count("(cached)") == 5
    assert list(csv.DictReader((out / "results.csv").open())) == rows
    # a cached run from before the PGD/masking columns is re-evaluated, not retrained
    stem = out / "runs" / "AT-PGD-s0.json"
    doc = json.loads(stem.read_text())
    del doc["evaluation"]
    stem.write_text(json.dumps(doc))
    assert main(argv) == 0
    assert capsys.readouterr().err.count("(cached)") == 5
    assert list(csv.DictReader((out / "results.csv").open())) == rows
    assert "evaluation" in json.loads(stem.read_text())


def test_reproduce_unknown_dataset_and_method(tmp_path):
    from lsa_ext.errors import LsaUserError

    with pytest.raises(LsaUserError, match="no reproduction protocol"):
        rp.reproduce("cifar10", out=tmp_path)
    with pytest.raises(LsaUserError, match="unknown method"):
        rp.reproduce("moons", out=tmp_path, methods=["mim"])


def test_reproduce_digits_quick_apgd_table(tmp_path):
    res = rp.reproduce("digits", out=tmp_path, quick=True, layers=["L0"], progress=False)
    assert [r.name for r in res.runs] == ["Normal", "AT-APGD", "AT-APGD-LR-L0"]
    assert res.protocol.model == "model_b" and res.protocol.eps == 0.2
    assert all(abs(r.rg - sum(r.accuracies)) < 1e-9 for r in res.runs)
    assert (tmp_path / "rg.png").exists() and not (tmp_path / "boundaries.png").exists()
    assert "| AT-APGD-LR-L0 |" in res.table() and "541.73" in res.comparison()


def test_figures_leave_matplotlib_global_state_alone(tmp_path, monkeypatch):
    import matplotlib

    def no_global_switch(*args, **kwargs):
        raise AssertionError("library code must not call matplotlib.use")

    monkeypatch.setattr(matplotlib, "use", no_global_switch)
    backend = matplotlib.rcParams._get_backend_or_none()
    runs = [rp.RunResult("Normal", "none", None, 0, [90.0, 50.0], 140.0, 1.0),
            rp.RunResult("AT-FGSM", "fgsm", None, 0, [80.0, 70.0], 150.0, 1.0)]
    proto = rp.dataclasses.replace(rp.PROTOCOLS["moons"], eval_eps=(0.0, 0.1))
    rp.plot_rg(rp.ReproduceResult(proto, [0], runs, {}), tmp_path / "rg.png")
    assert (tmp_path / "rg.png").read_bytes()[:4] == b"\x89PNG"
    assert matplotlib.rcParams._get_backend_or_none() == backend
