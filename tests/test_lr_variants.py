"""The LR term's variants (``reduction="batch"``, ``detach_clean``) against float64 references,
and their plumbing through TrainConfig, ``lsa train`` and ``lsa reproduce``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lsa_ext import reproduce as rp
from lsa_ext import training
from lsa_ext.cli import main
from lsa_ext.errors import LsaUserError

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int, width: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, width), nn.ELU(), nn.Linear(width, width), nn.ELU(),
                         nn.Linear(width, 3))


def _outputs(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    for layer in model:
        x = layer(x)
        outs.append(x)
    return outs


def _ref(model: nn.Sequential, x, x_adv, idx, gamma, reduction: str, detach: bool):
    """float64, layer by layer: Σ γ · CM, CM = mean_i ||a_i − b_i|| / ||a_i|| ("mean") or
    ||A − B||_F / ||A||_F over the batch ("batch"); ``detach``: clean outputs as constants."""
    outs_a, outs_b = _outputs(model, x.double()), _outputs(model, x_adv.double())
    total = torch.zeros((), dtype=torch.float64)
    for g, i in zip(gamma, idx, strict=True):
        a, b = outs_a[i].flatten(1), outs_b[i].flatten(1)
        if detach:
            a = a.detach()
        if reduction == "batch":
            cm = (a - b).norm() / a.norm()
        else:
            cm = ((a - b).norm(dim=1) / a.norm(dim=1)).mean()
        total = total + g * cm
    return total


def _batch(seed: int = 0, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    return x, x + 0.2 * torch.randn(n, 2, generator=g)


@pytest.mark.parametrize("reduction", ["mean", "batch"])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("lr_pass", ["auto", "concat", "two_pass"])
@pytest.mark.parametrize("clean_logits", [True, False])
def test_variant_value_and_weight_gradients_match_float64(reduction, detach, lr_pass,
                                                          clean_logits):
    model = _mlp(1)
    x, x_adv = _batch()
    lr, lc, la = training.lr_term(model, x, x_adv, ["0", "2"], [0.5, 2.0], lr_pass=lr_pass,
                                  reduction=reduction, detach_clean=detach,
                                  clean_logits=clean_logits)
    ref_model = copy.deepcopy(model).double()
    ref = _ref(ref_model, x, x_adv, [0, 2], [0.5, 2.0], reduction, detach)
    torch.testing.assert_close(lr.double(), ref, rtol=1e-5, atol=1e-7)
    assert (lc is not None) == clean_logits
    torch.testing.assert_close(la.double(), ref_model(x_adv.double()), rtol=1e-5, atol=1e-6)
    lr.backward()
    ref.backward()
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        want = torch.zeros_like(q) if q.grad is None else q.grad
        got = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_batch_and_mean_differ_and_detach_changes_only_gradients():
    model = _mlp(2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, generator=g) * torch.tensor([[0.1], [1], [3], [0.5], [2], [1]])
    x_adv = x + 0.3 * torch.randn(6, 2, generator=g)
    mean, _, _ = training.lr_term(model, x, x_adv, ["2"])
    batch, _, _ = training.lr_term(model, x, x_adv, ["2"], reduction="batch")
    # samples of unequal norms: the two forms differ
    assert abs(float(mean.detach()) - float(batch.detach())) > 1e-3
    xs = x.clone().requires_grad_()
    both, _, _ = training.lr_term(model, xs, x_adv, ["2"], clean_logits=False)
    det, _, _ = training.lr_term(model, xs, x_adv, ["2"], detach_clean=True, clean_logits=False)
    assert torch.equal(both, det)  # same value (two passes either way, same order of sums)
    (gx_both,) = torch.autograd.grad(both, xs)
    assert float(gx_both.abs().sum()) > 0
    assert det.grad_fn is not None  # the adversarial pass still carries gradient
    gx_det = torch.autograd.grad(det, xs, allow_unused=True)[0]
    assert gx_det is None or float(gx_det.abs().sum()) == 0.0  # no gradient into the clean x


def test_detached_clean_pass_keeps_no_graph_and_auto_plans_two_passes():
    """With no clean logits wanted, "auto" runs the clean forward under no_grad."""
    model = _mlp(4)
    x, x_adv = _batch(4)
    term = training.LRTerm(["2"], detach_clean=True)
    assert term.plan(model, x, clean_logits=False) == "two_pass"
    assert term.plan(model, x, clean_logits=True) == "concat"
    seen = []
    handle = model[0].register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    term(model, x, x_adv, clean_logits=False)
    handle.remove()
    assert seen == [False, True]  # clean pass without autograd, adversarial pass with it


def test_bad_variant_settings_are_user_errors():
    with pytest.raises(LsaUserError, match="unknown LR reduction"):
        training.LRTerm(["0"], reduction="sum")
    for bad in ({"lr_reduction": "median"}, {"lr_detach_clean": "yes"}):
        cfg = training.TrainConfig(at="fgsm", lr_layers=["0"], **bad)
        with pytest.raises(LsaUserError, match="lr_reduction|lr_detach_clean"):
            cfg.validate()


def test_train_cli_stores_variants_and_trainer_uses_them(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "moons", "--limit-train", "100", "--limit-test", "50",
               "--batch-size", "50", "--at", "fgsm", "--lr-layers", "L1", "--lr-reduction",
               "batch", "--lr-detach-clean", "--epochs", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["lr_reduction"] == "batch" and cfg["lr_detach_clean"] is True
    trainer = training.Trainer(_mlp(0), (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)),
                               training.TrainConfig.from_dict({**cfg, "lr_layers": ["2"]}),
                               progress=False)
    assert trainer.regularizer.reduction == "batch" and trainer.regularizer.detach_clean
    # resuming with a contradicting variant is refused before any work
    rc = main(["train", "--dataset", "moons", "--resume", str(out / "last.pt"),
               "--lr-reduction", "mean", "--epochs", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--lr-reduction mean (the run: batch)" in err and "Traceback" not in err


def test_reproduce_variants_plan_names_and_configs():
    from lsa_ext.data import dataset_info
    from lsa_ext.models import build_model

    assert rp.lr_variants(["all"]) == tuple(rp.LR_VARIANTS.values())
    with pytest.raises(LsaUserError, match="unknown LR variant"):
        rp.lr_variants(["mean", "median"])
    proto = rp._protocol("moons", quick=False, methods=["pgd"], epochs=None, eps=None,
                         gamma=None, variants=["mean", "batch", "detach", "batch-detach"])
    model = build_model("model_a", dataset_info("moons"))
    runs = rp.plan(proto, model, layers=["L2"])
    assert [r.name for r in runs] == ["Normal", "AT-PGD", "AT-PGD-LR-L2", "AT-PGD-LR-L2-batch",
                                      "AT-PGD-LR-L2-detach", "AT-PGD-LR-L2-batch-detach"]
    cfgs = [rp._train_config(proto, r.method, r.lr_layer, 0, None, "cpu", r.variant)
            for r in runs[2:]]
    assert [(c.lr_reduction, c.lr_detach_clean) for c in cfgs] == [
        ("mean", False), ("batch", False), ("mean", True), ("batch", True)]


def test_comparison_lists_each_variant_against_its_base_and_the_paper():
    proto = rp._protocol("moons", quick=False, methods=["fgsm"], epochs=None, eps=None,
                         gamma=None, variants=["mean", "detach"])

    def run(name, method, layer, accs, variant=""):
        return rp.RunResult(name, method, layer, 0, accs, float(sum(accs)), 1.0,
                            variant=variant)

    res = rp.ReproduceResult(proto, [0], [
        run("AT-FGSM", "fgsm", None, [90.0] * 6),
        run("AT-FGSM-LR-L2", "fgsm", "L2", [89.0] * 6),
        run("AT-FGSM-LR-L2-detach", "fgsm", "L2", [92.0] * 6, "-detach"),
    ], {})
    rows = {line.split(" | ")[0].lstrip("| "): line for line in res.comparison().splitlines()}
    paper = rp.PAPER["moons"]
    d_paper = f"{sum(paper['AT-FGSM-LR-L2']) - sum(paper['AT-FGSM']):+.2f}"
    assert rows["AT-FGSM-LR-L2"].split(" | ")[3:] == ["-6.00", f"{d_paper} |"]
    assert rows["AT-FGSM-LR-L2-detach"].split(" | ")[3:] == ["+12.00", f"{d_paper} |"]
    assert "AT-PGD-LR-L2-detach" not in rows and rows["AT-PGD-LR-L2"].split(" | ")[1] == "—"


def test_variants_name_runs_and_need_lr_layers(tmp_path, capsys):
    """A variant is part of the run name (and default folder), as lsa reproduce names its
    rows; variant options without --lr-layers are an error, not silently ignored."""
    cfg = training.TrainConfig(at="pgd", lr_layers=["fc3"], lr_reduction="batch",
                               lr_detach_clean=True)
    assert cfg.run_name == "AT-PGD-LR-fc3-batch-detach"
    assert training.TrainConfig(at="pgd", lr_layers=["fc3"]).run_name == "AT-PGD-LR-fc3"
    assert rp.LR_VARIANTS["batch-detach"].suffix == "-batch-detach"
    x = torch.randn(16, 2)
    trainer = training.Trainer(_mlp(0), (x, torch.zeros(16, dtype=torch.long)),
                               training.TrainConfig(at="fgsm", lr_layers=["2"],
                                                    lr_detach_clean=True), progress=False)
    assert trainer.run_name == "AT-FGSM-LR-L1-detach"
    for extra in (["--lr-reduction", "batch"], ["--lr-detach-clean"]):
        rc = main(["train", "--dataset", "moons", "--at", "pgd", "--epochs", "1", "--out",
                   str(tmp_path / "x"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "give --lr-layers too" in err and "Traceback" not in err
        assert not (tmp_path / "x").exists()


def test_lr_variant_names_errors():
    for names, msg in ((["all", "mean"], "'all' stands alone"), ([""], "give one or more"),
                       (["median"], r"unknown LR variant\(s\) median")):
        with pytest.raises(LsaUserError, match=msg):
            rp.lr_variants(names)


def test_lr_site_that_never_runs_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "s"
    rc = main(["train", "--dataset", "moons", "--at", "pgd", "--lr-layers", "act1#2",
               "--epochs", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "act1#2 never run in a forward" in err and "Traceback" not in err
    assert not out.exists()  # nothing written: the corrected command is not blocked


def test_batch_reduction_under_several_processes_warns_once(monkeypatch, caplog):
    """Under torchrun 'batch' takes each rank's slice (README, Determinism): one warning per
    term; 'mean' (per-sample, exact over ranks) and one process say nothing."""
    from lsa_ext import distributed
    from lsa_ext.regularizer import LRTerm

    model = _mlp(2)
    x = torch.randn(4, 2)
    x_adv = x + 0.1
    with caplog.at_level("WARNING", logger="lsa_ext.regularizer"):
        LRTerm(["2"], reduction="batch")(model, x, x_adv)  # one process
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        LRTerm(["2"])(model, x, x_adv)  # mean
        term = LRTerm(["2"], reduction="batch")
        for _ in range(3):
            term(model, x, x_adv)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and msgs[0].startswith("lr_reduction='batch' under torchrun")
