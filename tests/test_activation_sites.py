"""``A<k>``: the k-th activation site of a forward, as ``lsa analyze`` numbers its rows; MVL on
the fly probes the same kind as ``lsa analyze`` (activations) or learnable layers, and says
which; AT-LR on activation sites of a reused in-place ReLU against a float64 reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import lsa_ext
from lsa_ext.batches import first_input
from lsa_ext.cli import main
from lsa_ext.errors import LsaUserError
from lsa_ext.probes import activation_sites, select_layers, site_labels
from lsa_ext.regularizer import lr_term, resolve_layers
from lsa_ext.train_config import TrainConfig, run_name

pytestmark = pytest.mark.usefixtures("one_thread")


class Reused(nn.Module):
    """ResNet-like: one ``ReLU(inplace=True)`` runs twice per forward, once on a residual sum
    made in place; ``act`` (ELU) is registered first but runs last. Forward order of the
    activation sites: relu, relu#2, act (registration order: act, relu)."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ELU()
        self.fc1, self.fc2, self.out = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        a = self.relu(self.fc1(x))
        b = self.fc2(a)
        b += a  # in place on fc2's output (site fc2 is changed after its hook ran)
        return self.out(self.act(self.relu(b)))  # relu in place on b, again


def _reference_sites(m: Reused, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The site outputs by plain out-of-place ops (float64 when ``m`` and ``x`` are)."""
    a = torch.relu(x @ m.fc1.weight.T + m.fc1.bias)
    f2 = a @ m.fc2.weight.T + m.fc2.bias
    c = torch.relu(f2 + a)
    return {"fc1": x @ m.fc1.weight.T + m.fc1.bias, "relu": a, "fc2": f2, "relu#2": c,
            "act": torch.nn.functional.elu(c)}


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


# --------------------------------------------------------------------------- A<k>
def test_a_k_counts_activation_sites_in_forward_order_as_analyze_reports():
    torch.manual_seed(0)
    m = Reused()
    x, y = _data()
    sites = ["relu", "relu#2", "act"]
    assert activation_sites(m, (3,)) == sites
    assert activation_sites(m, x) == sites  # a batch: its first sample runs
    assert activation_sites(nn.Sequential(nn.Linear(2, 2)), (2,)) == []
    res = lsa_ext.analyze(m, (x, y), "gaussian:std=0.3", layers="activations", progress=False)
    assert res.layers == sites  # A<k> is row k of the analysis
    for k, site in enumerate(sites):
        assert resolve_layers(m, f"A{k}", example=x) == [site]
        assert resolve_layers(m, f"a{k}", example=(3,)) == [site]
        one = lsa_ext.analyze(m, (x, y), "gaussian:std=0.3", layers=f"A{k}", progress=False)
        assert one.layers == [site]  # counted on the data's first sample
        np.testing.assert_allclose(one.mean[0], res.mean[0, k], rtol=1e-12)
    # A<k> probes that call only (select_layers gives the call number, in registration
    # order like every selection), L<k> is a module
    assert select_layers(m, "A0,A1,L1", example=(3,)) == ["fc2", "relu#1", "relu#2"]
    assert resolve_layers(m, "A2,L0,A1", example=(3,)) == ["act", "fc1", "relu#2"]
    assert resolve_layers(m, ["A1", "relu#2", "module.relu#2"], example=(3,)) == ["relu#2"]


def test_a_k_errors_say_how_many_activation_sites_there_are():
    m = Reused()
    with pytest.raises(LsaUserError, match=r"^A3: Reused has 3 activation sites in a forward "
                                           r"\(A0\.\.A2: relu, relu#2, act\)$"):
        select_layers(m, "A3", example=(3,))
    with pytest.raises(LsaUserError, match=r"L3: Reused has 3 learnable layers"):
        resolve_layers(m, "L3")
    with pytest.raises(LsaUserError, match=r"^A0: A<k> counts the activation sites of one "
                                           r"forward of Reused .*pass example="):
        resolve_layers(m, "A0")
    with pytest.raises(LsaUserError, match="A1#2: A<k> names one activation site .* drop the #2"):
        resolve_layers(m, "A1#2", example=(3,))
    with pytest.raises(LsaUserError, match="Sequential has no activation sites in a forward"):
        select_layers(nn.Sequential(nn.Linear(2, 2)), "A0", example=(2,))
    with pytest.raises(LsaUserError, match="example must be"):
        select_layers(m, "A0", example="3")
    # a module literally named A1 is that module, as for L<k>
    named = nn.Sequential()
    named.add_module("A1", nn.Linear(2, 2))
    named.add_module("r", nn.ReLU())
    assert select_layers(named, "A1") == ["A1"]
    assert select_layers(named, "A0", example=(2,)) == ["r#1"]


def test_site_labels_and_run_names_label_activation_sites_a_k():
    m = Reused()
    labels = site_labels(m, ["relu#2", "fc1", "act", "relu", "out"], (3,))
    assert labels == ["A1", "L0", "A2", "A0", "L2"]
    assert site_labels(m, ["relu#2", "fc2"]) == ["relu#2", "L1"]  # no example: no forward
    assert run_name("pgd", ["relu#2"], m, (3,)) == "AT-PGD-LR-A1"
    assert run_name("pgd", ["act", "fc1"], m, torch.zeros(5, 3)) == "AT-PGD-LR-A2+L0"
    assert run_name("pgd", ["relu#2"], m) == "AT-PGD-LR-relu#2"
    assert run_name("fgsm", ["A1"]) == "AT-FGSM-LR-A1"  # as typed
    x, y = _data(16)
    trainer = lsa_ext.training.Trainer(m, (x, y), TrainConfig(at="fgsm", eps=0.1,
                                                              lr_layers=["A1", "L1"]))
    assert trainer.layers == ["relu#2", "fc2"] and trainer.config.lr_layers == trainer.layers
    assert trainer.run_name == "AT-FGSM-LR-A1+L1"


def test_first_input_reads_one_sample_without_random_numbers():
    from torch.utils.data import DataLoader, TensorDataset

    x, y = _data(10)
    torch.testing.assert_close(first_input((x, y)), x[:1])
    torch.testing.assert_close(first_input(x), x[:1])
    torch.testing.assert_close(first_input(TensorDataset(x, y)), x[:1])
    state = torch.get_rng_state()
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    torch.testing.assert_close(first_input(loader), x[:1])
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(first_input([(x[3:5], y[3:5])]), x[3:4])
    with pytest.raises(LsaUserError, match="one-shot iterator"):
        first_input(iter([(x, y)]))
    with pytest.raises(LsaUserError, match="no input sample"):
        first_input((x[:0], y[:0]))


# --------------------------------------------------------------------------- AT-LR
@pytest.mark.parametrize("lr_pass", ["concat", "two_pass"])
def test_lr_term_on_activation_sites_of_a_reused_inplace_relu_matches_float64(lr_pass):
    torch.manual_seed(0)
    m = Reused().double()
    x = torch.randn(12, 3, dtype=torch.float64)
    xa = x + 0.3 * torch.randn_like(x)
    sites = resolve_layers(m, "A1,A0,L1", example=x)
    assert sites == ["relu#2", "relu", "fc2"]
    gamma = [1.0, 0.5, 2.0]
    loss, _, _ = lr_term(m, x, xa, sites, gamma, lr_pass=lr_pass)
    params = [*m.fc1.parameters(), *m.fc2.parameters()]  # the sites depend on these only
    grads = torch.autograd.grad(loss, params)
    clean, adv = _reference_sites(m, x), _reference_sites(m, xa)
    ref = sum(g * ((clean[s] - adv[s]).norm(dim=1) / clean[s].norm(dim=1)).mean()
              for g, s in zip(gamma, sites, strict=True))
    ref_grads = torch.autograd.grad(ref, params)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("lr_pass", ["concat", "two_pass"])
def test_lr_term_takes_indexed_selectors_as_the_sites_they_name(lr_pass):
    """lr_term(..., ["L0", "A1"]) resolves against the model (A1 counted on x): its value and
    gradients are those of the resolved sites, and those match the float64 reference."""
    torch.manual_seed(0)
    m = Reused().double()
    x = torch.randn(12, 3, dtype=torch.float64)
    xa = x + 0.3 * torch.randn_like(x)
    params = list(m.parameters())
    gamma = [0.5, 2.0]
    by_index, _, _ = lr_term(m, x, xa, ["L0", "A1"], gamma, lr_pass=lr_pass)
    g_index = torch.autograd.grad(by_index, params, allow_unused=True)
    by_site, _, _ = lr_term(m, x, xa, ["fc1", "relu#2"], gamma, lr_pass=lr_pass)
    g_site = torch.autograd.grad(by_site, params, allow_unused=True)
    clean, adv = _reference_sites(m, x), _reference_sites(m, xa)
    ref = sum(g * ((clean[s] - adv[s]).norm(dim=1) / clean[s].norm(dim=1)).mean()
              for g, s in zip(gamma, ["fc1", "relu#2"], strict=True))
    assert by_index.item() == by_site.item()
    assert by_index.item() == pytest.approx(ref.item(), rel=1e-6)
    assert sum(g is not None for g in g_index) == 4  # fc1, fc2 weights and biases
    for a, b in zip(g_index, g_site, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(LsaUserError, match=r"L3: Reused has 3 learnable layers"):
        lr_term(m, x, xa, ["L3"])
    with pytest.raises(LsaUserError, match=r"A3: Reused has 3 activation sites"):
        lr_term(m, x, xa, ["A3"])


def test_lr_term_object_resolves_selectors_once_and_rejects_one_site_twice():
    from lsa_ext.regularizer import LRTerm

    torch.manual_seed(0)
    m = Reused()
    x = torch.randn(8, 3)
    term = LRTerm(["A1", "module.L1"], lr_pass="two_pass")
    assert term.sites is None and term.layers == ["A1", "L1"]
    term(m, x, x + 0.1)
    assert term.sites == ["relu#2", "fc2"]
    calls = []
    m.fc1.register_forward_hook(lambda *a: calls.append(1))
    term(m, x, x + 0.1)  # resolved already: no counting forward, just the two passes
    assert len(calls) == 2
    with pytest.raises(LsaUserError, match="layers L0 and fc1 select the same site fc1"):
        lr_term(m, x, x + 0.1, ["L0", "fc1"])
    with pytest.raises(LsaUserError, match="layers A0 and relu select the same site relu"):
        lr_term(m, x, x + 0.1, ["A0", "relu"])


def test_train_with_a_k_regularises_the_activation_site(tmp_path):
    from lsa_ext import checkpoint

    torch.manual_seed(0)
    x, y = _data()
    lsa_ext.train(Reused(), (x, y), at="fgsm", eps=0.1, lr_layers="A1", epochs=1,
                  batch_size=32, out=tmp_path, progress=False)
    state = checkpoint.load_checkpoint(tmp_path / "last.pt")
    assert state["config"]["lr_layers"] == ["relu#2"]
    assert state["history"][0]["lr_loss"] > 0


# --------------------------------------------------------------------------- MVL
def _algorithm1(mean, std, count, eta):
    """Algorithm 1 from per-layer mean/std/count (float64, plain numpy): indices with
    mean − μ > η·σ, μ and σ over all samples of the layers given."""
    mean, std, count = (np.asarray(v, dtype=np.float64) for v in (mean, std, count))
    mu = (count * mean).sum() / count.sum()
    sigma = np.sqrt((count * (std ** 2 + mean ** 2)).sum() / count.sum() - mu ** 2)
    return [i for i in range(mean.size) if mean[i] - mu > eta * sigma]


def test_mvl_on_the_fly_names_its_kind_and_agrees_with_a_report(tmp_path):
    from lsa_ext.attacks import build_attack
    from lsa_ext.mvl_select import _subset, mvl_from_report, mvl_on_the_fly
    from lsa_ext.train_config import TRAIN_ATTACK_DEFAULTS
    from lsa_ext.trainer import fit

    x, y = _data(96)
    torch.manual_seed(3)
    model = Reused()
    kw = dict(at="pgd", eps=0.3, clip=None, eta=0.0, epochs=2, batch_size=32, seed=0)
    acts = ["relu", "relu#2", "act"]
    for kind, probed, left_out in (("activations", acts, []),
                                   ("learnable", ["fc1", "fc2", "out"], ["out"])):
        choice = mvl_on_the_fly(model, (x, y), kind=kind, **kw)
        # the same analysis by hand: a normally trained copy, the training attack, a report
        probe = Reused()
        probe.load_state_dict(model.state_dict())
        fit(probe, (x, y), epochs=2, batch_size=32, seed=0, progress=False)
        attack = build_attack("pgd", probe, 0.3, clip=None, seed=0, **TRAIN_ATTACK_DEFAULTS["pgd"])
        res = lsa_ext.analyze(probe, _subset((x, y), 512, 0), {"pgd": attack}, layers=kind,
                              seed=0, progress=False)
        assert res.layers == probed
        keep = [i for i, s in enumerate(probed) if s not in left_out]
        want = [probed[keep[i]] for i in _algorithm1(res.mean[0][keep], res.std[0][keep],
                                                     res.count[0][keep], 0.0)]
        assert want and choice.sites == want
        assert choice.kind == kind and choice.left_out == left_out and not choice.top_ranked
        labels = site_labels(probe, want, (3,))
        assert choice.labels == labels
        assert all(lbl[0] == ("A" if kind == "activations" else "L") for lbl in labels)
        words = ("activation outputs, as lsa analyze" if kind == "activations" else
                 "learnable-layer outputs; output layer out left out")
        named = ", ".join(f"{lbl} ({s})" for lbl, s in zip(labels, want, strict=True))
        assert choice.describe() == f"MVL on the fly ({words}; pgd, η=0): {named}"
        # a report of the same analysis gives the same choice for the same model
        res.to_json(tmp_path / f"{kind}.json", eta=0.0)
        from_report = mvl_from_report(tmp_path / f"{kind}.json", 0.0, model=model,
                                      example=(3,))
        assert (from_report.sites, from_report.labels, from_report.kind, from_report.left_out) \
            == (choice.sites, choice.labels, choice.kind, choice.left_out)
    with pytest.raises(LsaUserError, match="unknown MVL kind 'conv'"):
        mvl_on_the_fly(model, (x, y), kind="conv", **kw)
    with pytest.raises(LsaUserError, match="Sequential has none: choose the learnable kind"):
        mvl_on_the_fly(nn.Sequential(nn.Linear(3, 2)), (x, y), **kw)


def test_output_sites_are_the_last_learnable_layer_and_activations_giving_the_logits():
    from lsa_ext.mvl_select import output_sites

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3), nn.Tanh())
    assert output_sites(m, ["1", "3"], (2,)) == ["3"]  # Tanh's output is the model's output
    assert output_sites(m, ["0", "1", "2", "3"], (2,)) == ["2", "3"]
    assert output_sites(m, ["1", "3"]) == []  # without an example only the learnable rule
    assert output_sites(Reused(), ["relu", "relu#2", "act"], (3,)) == []


# --------------------------------------------------------------------------- CLI
TINY = ["--dataset", "moons", "--limit-train", "200", "--limit-test", "100", "--batch-size",
        "50", "--seed", "1"]


def test_lsa_train_takes_a_k_and_resumes_with_it(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", *TINY, "--at", "fgsm", "--lr-layers", "A1,L0", "--epochs", "1",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "AT-FGSM-LR-A1+L0:" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["config"]["lr_layers"] == \
        ["act2", "fc1"]  # Model A: fc1 act1 fc2 act2 fc3 act3 fc4
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--lr-layers",
                 "A1,L0"]) == 0
    capsys.readouterr()
    rc = main(["train", "--out", str(out), "--resume", "--epochs", "3", "--lr-layers", "A0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--lr-layers A0 (the run: A1,L0)" in err and "Traceback" not in err


def test_cli_a_k_and_mvl_kind_errors_exit_2_without_traceback(tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text("{}")
    cases = [
        (["train", *TINY, "--at", "pgd", "--lr-layers", "A3"],
         "lsa train: error: A3: ModelA has 3 activation sites in a forward (A0..A2: act1, act2, "
         "act3)"),
        (["train", *TINY, "--at", "pgd", "--lr-layers", "A1#2"], "drop the #2"),
        (["train", *TINY, "--at", "pgd", "--mvl-kind", "learnable"],
         "lsa train: error: --mvl-kind is read only with --lr-layers mvl"),
        (["train", *TINY, "--at", "pgd", "--lr-layers", "mvl", "--mvl-report", str(report),
          "--mvl-kind", "activations"], "give one of them"),
        (["analyze", "--dataset", "moons", "--layers", "A0,A5", "--no-cache"],
         "lsa analyze: error: A5: ModelA has 3 activation sites in a forward"),
        (["reproduce", "moons", "--quick", "--layers", "A4"],
         "lsa reproduce: error: A4: ModelA has 3 activation sites in a forward"),
    ]
    for argv, msg in cases:
        rc = main([*argv, "--out", str(tmp_path / "e")])
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert msg in err and "Traceback" not in err, (argv, err)
        assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())


def test_lsa_analyze_layers_a_k(tmp_path, capsys, monkeypatch):
    from lsa_ext.data import load_dataset
    from lsa_ext.models import build_model

    monkeypatch.setenv("LSA_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = tmp_path / "model_b.pt"
    torch.save(build_model("model_b", load_dataset("digits").info, seed=0).state_dict(), ckpt)
    rc = main(["analyze", "--checkpoint", str(ckpt), "--max-samples", "32", "--layers",
               "A3,A0", "--perturbations", "gaussian:std=0.2", "--no-plot", "--device", "cpu",
               "--out", str(tmp_path / "a")])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert rep["layers"] == ["relu1", "relu4"] and rep["config"]["layers_spec"] == "A3,A0"
