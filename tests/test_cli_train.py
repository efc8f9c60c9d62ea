"""`lsa train` / `lsa evaluate` end to end on tiny settings (in-process, exit codes, files)."""

from __future__ import annotations

import json

import pytest
import torch

from lsa_ext import checkpoint as ckpt
from lsa_ext.cli import main

TINY = ["--dataset", "moons", "--limit-train", "200", "--limit-test", "100", "--batch-size",
        "50", "--seed", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_writes_checkpoint_config_history_and_weights(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", *TINY, "--at", "fgsm", "--eps", "0.2", "--lr-layers", "L1,fc3",
               "--gamma", "0.5,2", "--lr-pass", "two_pass", "--epochs", "2", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "AT-FGSM-LR-L1+L2" in text and "clean test acc" in text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["lr_layers"] == ["fc2", "fc3"]
    assert cfg["config"]["gamma"] == [0.5, 2.0] and cfg["config"]["lr_pass"] == "two_pass"
    assert cfg["meta"]["dataset"] == "moons" and cfg["meta"]["model"] == "model_a"
    hist = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2] and all(h["lr_loss"] > 0 for h in hist)
    state = ckpt.load_checkpoint(out / "last.pt")
    weights = torch.load(out / "model.pt", weights_only=True)
    assert state["epoch"] == 2
    for k, v in weights.items():
        assert torch.equal(state["model"][k], v)
    assert ckpt.load_checkpoint(out / "prev.pt")["epoch"] == 1


def test_train_user_errors_exit_2_without_traceback(tmp_path, capsys):
    cases = [
        (["--at", "pgd", "--lr-layers", "L9"], "4 learnable layers"),
        (["--at", "pgd", "--lr-layers", "nope"], "no layer named 'nope'"),
        (["--lr-layers", "L0"], "needs adversarial examples"),
        (["--at", "pgd", "--lr-layers", "L0", "--gamma", "1,2"], "gamma has 2 values"),
        (["--at", "pgd", "--gamma", "x", "--lr-layers", "L0"], "--gamma must be a number"),
        (["--optimizer", "sgd", "--lr", "1e12", "--epochs", "3"], "training diverged"),
    ]
    for extra, msg in cases:
        rc = main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "e"), *extra])
        err = capsys.readouterr().err
        assert rc == 2, (extra, err)
        assert msg in err and "Traceback" not in err, (extra, err)


def _fgsm_accuracy(model, x, y, eps):
    """Independent FGSM (float64 model copy, plain autograd) accuracy in %."""
    import copy

    from lsa_ext.losses import cross_entropy, predict

    m = copy.deepcopy(model).double().eval()
    xd = x.double().requires_grad_()
    (g,) = torch.autograd.grad(cross_entropy(m(xd), y, reduction="sum"), xd)
    with torch.no_grad():
        return 100.0 * float((predict(m(x.double() + eps * g.sign())) == y).double().mean())


def test_evaluate_checkpoint_prints_table_and_writes_json_csv(tmp_path, capsys):
    from lsa_ext.data import load_dataset
    from lsa_ext.models import build_model

    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "last.pt"), "--limit-test", "100",
                 "--out", str(tmp_path / "ev")]) == 0
    text = capsys.readouterr().out
    assert "R&G" in text and "FGSM" in text
    rep = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    accs = [r["accuracy"] for r in rep["fgsm"]]
    assert [r["eps"] for r in rep["fgsm"]] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert abs(rep["rg_score"] - sum(accs)) < 1e-9
    assert rep["config"]["checkpoint"] == str(out / "last.pt")  # which weights were scored
    data = load_dataset("moons", limit_test=100)
    model = build_model("model_a", data.info)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    x, y = data.test.tensors
    for eps, acc in zip([0.0, 0.3], [accs[0], accs[3]], strict=True):
        assert abs(_fgsm_accuracy(model, x, y, eps) - acc) <= 1.0  # ≤ 1 sample in 100
    assert (tmp_path / "ev" / "evaluation.csv").read_text().startswith("metric,eps")


def test_evaluate_errors(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pt")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "plain.pt")]) == 2
    assert "--dataset" in capsys.readouterr().err


def test_lr_layers_from_an_analyze_report(tmp_path, capsys, caplog):
    """Algorithm 1 on a hand-made report: means [.1, .1, .9, .1], std 0 → μ = .3,
    σ = √(.21 − .09) ≈ .346; only fc3 exceeds μ + 1·σ."""
    report = {"schema": "lsa_ext.analysis/1", "layers": ["fc1", "fc2", "fc3", "fc4"],
              "perturbations": {"gaussian:std=0.1": {"mean": [0.01] * 4, "std": [0.0] * 4,
                                                     "count": [10] * 4},
                                "pgd:eps=0.3": {"mean": [0.1, 0.1, 0.9, 0.1],
                                                "std": [0.0] * 4, "count": [10] * 4}}}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    out = tmp_path / "run"
    rc = main(["train", *TINY, "--at", "pgd", "--lr-layers", "mvl", "--mvl-report", str(path),
               "--eta", "1.0", "--epochs", "1", "--out", str(out)])
    assert rc == 0
    assert json.loads((out / "config.json").read_text())["config"]["lr_layers"] == ["fc3"]
    assert "AT-PGD-LR-L2" in capsys.readouterr().out
    # no layer passes η = 5 (0.9 < 0.3 + 5·0.346): the top-ranked layer, said in one warning
    with caplog.at_level("WARNING", logger="lsa_ext.mvl_select"):
        rc = main(["train", *TINY, "--at", "pgd", "--lr-layers", "mvl", "--mvl-report",
                   str(path), "--eta", "5", "--epochs", "1", "--out", str(tmp_path / "r5")])
    assert rc == 0
    assert json.loads((tmp_path / "r5" / "config.json").read_text())["config"]["lr_layers"] \
        == ["fc3"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("no layer passes the MVL cut-off eta=5 in ") and \
        warning.endswith(": taking the top-ranked layer fc3 (a lower eta selects by the cut-off)")


def test_lr_layers_mvl_on_the_fly(tmp_path, capsys):
    """Model A (fc1 act1 fc2 act2 fc3 act3 fc4): on the fly probes the activation outputs by
    default, as lsa analyze; --mvl-kind learnable probes fc1..fc3 (fc4, the output, left out)."""
    import re

    for kind, sites, label in ((None, {"act1", "act2", "act3"}, "A"),
                               ("learnable", {"fc1", "fc2", "fc3"}, "L")):
        out = tmp_path / f"run-{kind}"
        rc = main(["train", *TINY, "--at", "fgsm", "--lr-layers", "mvl", "--eta", "0",
                   "--epochs", "1", "--out", str(out),
                   *(["--mvl-kind", kind] if kind else [])])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        saved = json.loads((out / "config.json").read_text())
        layers = saved["config"]["lr_layers"]
        assert layers and set(layers) <= sites
        assert saved["meta"]["mvl_kind"] == (kind or "activations")
        what = ("activation outputs, as lsa analyze" if kind is None else
                "learnable-layer outputs; output layer fc4 left out")
        named = ", ".join(f"{label}{int(s[-1]) - 1} ({s})" for s in layers)
        line = f"LR layers (--lr-layers mvl): MVL on the fly ({what}; fgsm, η=0): {named}"
        assert line in captured.err.splitlines(), captured.err
        name = "+".join(re.findall(rf"{label}\d", named))
        assert f"AT-FGSM-LR-{name}:" in captured.out


def test_moons_options_reach_training_and_evaluation(tmp_path, capsys):
    from lsa_ext.data import load_dataset
    from lsa_ext.models import build_model

    out = tmp_path / "raw"
    assert main(["train", "--dataset", "moons", "--moons-scale", "raw", "--moons-noise", "0.1",
                 "--moons-samples", "300", "--limit-test", "100", "--epochs", "1",
                 "--out", str(out)]) == 0
    meta = json.loads((out / "config.json").read_text())["meta"]
    want = {"n_train": 300, "n_test": 1000, "noise": 0.1, "scale": "raw"}
    assert meta["data_options"] == want
    capsys.readouterr()
    # evaluate takes the run's data options: raw coordinates, noise 0.1
    assert main(["evaluate", "--checkpoint", str(out / "last.pt"), "--limit-test", "100",
                 "--out", str(tmp_path / "ev")]) == 0
    text = capsys.readouterr().out
    assert "PGD-20" in text and "noise ±eps" in text and "masking flags" in text
    rep = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    data = load_dataset("moons", limit_test=100, **want)
    model = build_model("model_a", data.info)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    x, y = data.test.tensors
    assert rep["clean_accuracy"] == pytest.approx(_fgsm_accuracy(model, x, y, 0.0), abs=1e-9)
    assert rep["rg_pgd"] == pytest.approx(
        rep["clean_accuracy"] + sum(r["accuracy"] for r in rep["pgd"]), abs=1e-9)
    assert [r["eps"] for r in rep["noise"]] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    # a moons option for another dataset is a one-line error before any work
    assert main(["train", "--dataset", "digits", "--moons-noise", "0.1",
                 "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "--moons-noise only apply to the moons dataset" in err and "Traceback" not in err
    assert main(["train", "--moons-scale", "minmax", "--out", str(tmp_path / "d")]) == 2
    assert "invalid choice: 'minmax'" in capsys.readouterr().err


def test_runs_recorded_before_data_options_were_raw_moons():
    from lsa_ext.cli.train import stored_data_options

    assert stored_data_options({"dataset": "moons"}) == {"scale": "raw"}
    assert stored_data_options({"dataset": "digits"}) == {}
    assert stored_data_options({"dataset": "moons", "data_options": {"scale": "standard"}}) == {
        "scale": "standard"}


def test_mnist5k_trains_and_evaluates_with_model_b_at_28x28(tmp_path, capsys):
    out = tmp_path / "m5k"
    assert main(["train", "--dataset", "mnist5k", "--limit-train", "64", "--limit-test", "32",
                 "--batch-size", "32", "--epochs", "1", "--out", str(out)]) == 0
    meta = json.loads((out / "config.json").read_text())["meta"]
    assert meta["model"] == "model_b" and meta["data_options"] == {"n_test": 1000}
    weights = torch.load(out / "model.pt", weights_only=True)
    assert weights["fc1.weight"].shape == (100, 64 * 3 * 3)  # valid convs on 28×28
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "last.pt"), "--limit-test", "32",
                 "--no-masking-checks"]) == 0
    text = capsys.readouterr().out
    assert "on mnist5k test (32 samples)" in text and "masking flags" not in text


def test_mvl_report_of_a_default_analysis_takes_the_training_attack(tmp_path, capsys):
    """`lsa analyze --out r` (its default perturbations: gaussian, ..., fgsm, pgd), then `lsa
    train --at pgd --lr-layers mvl --mvl-report r/report.json`: the MVL of "pgd" (the one named
    after --at), the same as --mvl-perturbation pgd names; an unknown name fails before any
    training; the perturbation is the run's and --resume checks it."""
    from lsa_ext.data import dataset_info
    from lsa_ext.models import build_model
    from lsa_ext.mvl_select import mvl_from_report

    assert main(["analyze", "--dataset", "digits", "--epochs", "1", "--max-samples", "48",
                 "--no-cache", "--no-plot", "--out", str(tmp_path / "r")]) == 0
    report = tmp_path / "r" / "report.json"
    perts = list(json.loads(report.read_text())["perturbations"])
    assert len(perts) > 2 and "pgd" in perts and "fgsm" in perts
    capsys.readouterr()
    small = ["train", "--dataset", "digits", "--limit-train", "64", "--limit-test", "32",
             "--batch-size", "32", "--at", "pgd", "--steps", "2", "--lr-layers", "mvl",
             "--mvl-report", str(report), "--epochs", "1"]
    assert main([*small, "--out", str(tmp_path / "a")]) == 0
    assert "; pgd, η=1)" in capsys.readouterr().err
    model = build_model("model_b", dataset_info("digits"), seed=0)
    want = mvl_from_report(report, 1.0, "pgd", model=model, example=(1, 8, 8))
    doc = json.loads((tmp_path / "a" / "config.json").read_text())
    assert doc["config"]["lr_layers"] == want.sites
    assert doc["meta"]["mvl_perturbation"] == "pgd"
    assert main([*small, "--mvl-perturbation", "fgsm", "--out", str(tmp_path / "f")]) == 0
    doc = json.loads((tmp_path / "f" / "config.json").read_text())
    assert doc["meta"]["mvl_perturbation"] == "fgsm"
    assert doc["config"]["lr_layers"] == mvl_from_report(report, 1.0, "fgsm", model=model,
                                                         example=(1, 8, 8)).sites
    capsys.readouterr()
    assert main([*small, "--mvl-perturbation", "cw", "--out", str(tmp_path / "cw")]) == 2
    err = capsys.readouterr().err
    assert f"has no perturbation 'cw' (have {', '.join(perts)})" in err
    assert not (tmp_path / "cw").exists()  # nothing written, nothing trained
    # --resume holds the run's perturbation
    assert main(["train", "--out", str(tmp_path / "a"), "--resume", "--epochs", "2",
                 "--mvl-perturbation", "fgsm"]) == 2
    assert "--mvl-perturbation fgsm (the run: pgd)" in capsys.readouterr().err


def test_mvl_report_perturbation_default_and_errors(tmp_path):
    """The default perturbation of a report: its only one, else the one named after the
    training attack, else (no attack given) the only adversarial one, else an error naming
    them and --mvl-perturbation."""
    from lsa_ext.errors import LsaUserError
    from lsa_ext.mvl_select import report_perturbation

    perts = ["gaussian", "fgsm", "pgd:eps=0.1"]
    assert report_perturbation(["gaussian"], None, "pgd", "r") == "gaussian"
    assert report_perturbation(perts, None, "pgd", "r") == "pgd:eps=0.1"
    assert report_perturbation(perts, None, "FGSM", "r") == "fgsm"
    assert report_perturbation(perts, "gaussian", "pgd", "r") == "gaussian"
    assert report_perturbation(["gaussian", "fgsm"], None, None, "r") == "fgsm"
    with pytest.raises(LsaUserError, match=r"r has several perturbations \(gaussian, fgsm, "
                                           r"pgd:eps=0.1\) and none is named after the training "
                                           r"attack 'apgd': name the one to take the MVL from "
                                           r"\(lsa train --mvl-perturbation NAME"):
        report_perturbation(perts, None, "apgd", "r")
    with pytest.raises(LsaUserError, match="more than one is named after the training attack"):
        report_perturbation(["pgd:eps=0.1", "pgd:eps=0.2"], None, "pgd", "r")
    with pytest.raises(LsaUserError, match="more than one is adversarial"):
        report_perturbation(perts, None, None, "r")
    with pytest.raises(LsaUserError, match="r has no perturbation 'pdg'"):
        report_perturbation(perts, "pdg", "pgd", "r")
