import json
import logging

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lsa_ext
from lsa_ext.analysis import (
    AnalysisResult,
    CMStats,
    accumulate,
    build_perturbations,
    paired_measures,
    parse_perturbation_specs,
)
from lsa_ext.errors import LsaUserError
from lsa_ext.measures import Measure
from lsa_ext.mvl import most_vulnerable_layers, rank_layers
from lsa_ext.noise import Gaussian, Salt
from lsa_ext.probes import Capture
from lsa_ext.seeding import batch_seed


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only add overhead on a busy machine
    yield
    torch.set_num_threads(threads)


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True),  # in-place after a probed conv
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ELU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.Tanh(), nn.Linear(8, 3),
    ).eval()


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _shift(x, y):
    return (x * 0.8 + 0.1).clamp(0, 1)


def _capture_all(model, names, x):
    """Independent oracle: plain forward, cloned outputs (clone before in-place ops act)."""
    outs = {}

    def keep(site, t):
        outs[site] = t.detach().clone().double()

    with torch.no_grad(), Capture(model, names, on_output=keep):
        model(x)
    return outs


def test_batch_form_relative_error_matches_numpy_on_captured_activations():
    m = _net()
    x, y = _data()
    xh = Gaussian(std=0.1, clip=(0, 1), seed=0)(x, y)
    names = ["0", "2", "4", "6"]
    with torch.no_grad(), Capture(m, names, detach=True) as cap:
        m(x)
        clean = {k: v.clone() for k, v in cap.outputs.items()}
        cap.reset()
        m(xh)
        pert = {k: v.clone() for k, v in cap.outputs.items()}
    got = lsa_ext.relative_error_multi([clean[n] for n in names], [pert[n] for n in names],
                                       reduction="batch")
    for i, n in enumerate(names):
        A, B = clean[n].double().numpy(), pert[n].double().numpy()
        want = np.linalg.norm(A - B) / np.linalg.norm(A)
        assert float(got[i]) == pytest.approx(want, rel=1e-5)
        assert float(lsa_ext.relative_error(clean[n], pert[n], "batch")) == pytest.approx(
            want, rel=1e-5)


@pytest.mark.parametrize("mode,forward_batch", [("concat", None), ("concat", 5), ("two_pass", 7)])
def test_analyze_matches_reference_statistics(mode, forward_batch):
    m = _net()
    x, y = _data(50)
    layers = ["0", "1", "2", "4", "6", "7"]
    res = lsa_ext.analyze(
        m, (x, y), {"shift": _shift, "gauss": Gaussian(std=0.2, clip=(0, 1), seed=3)},
        layers=layers, batch_size=16, mode=mode, forward_batch=forward_batch, progress=False,
    )
    assert res.layers == layers and res.perturbations == ["shift", "gauss"]
    g = Gaussian(std=0.2, clip=(0, 1), seed=3)
    for p, pert in enumerate([_shift, lambda xb, yb: g(xb, yb)]):
        per_sample = []
        for i in range(0, 50, 16):  # same batches, same noise draws
            g.reseed(batch_seed(3, i // 16))  # analyze reseeds noise per batch (distributed)
            xb, yb = x[i:i + 16], y[i:i + 16]
            a = _capture_all(m, layers, xb)
            b = _capture_all(m, layers, pert(xb, yb))
            per_sample.append(np.stack([
                np.linalg.norm((a[n] - b[n]).flatten(1).numpy(), axis=1)
                / np.linalg.norm(a[n].flatten(1).numpy(), axis=1) for n in layers
            ], axis=1))
        cm = np.concatenate(per_sample)  # [M, L]
        np.testing.assert_allclose(res.mean[p], cm.mean(0), rtol=1e-5)
        np.testing.assert_allclose(res.std[p], cm.std(0), rtol=1e-3, atol=1e-7)
        assert (res.count[p] == 50).all()
        for eta in (0.0, 0.5):
            want = [layers[i] for i in most_vulnerable_layers(cm, eta)]
            assert res.mvl(eta)[res.perturbations[p]] == want
        assert res.ranking()[res.perturbations[p]] == [layers[i] for i in rank_layers(cm)]


class _BatchCoupled(nn.Module):
    """Centres each batch on its own mean: samples are not independent."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.lin(x - x.mean(0, keepdim=True)))


def test_two_pass_for_batch_coupled_models():
    torch.manual_seed(0)
    m = _BatchCoupled()
    x = torch.randn(30, 4)
    xh = x + 0.5
    sites, v2 = paired_measures(m, ["act"], x, [xh], mode="two_pass")
    a, b = m(x).detach().double(), m(xh).detach().double()
    want = (a - b).norm(dim=1) / a.norm(dim=1).clamp_min(1e-12)
    torch.testing.assert_close(v2[0, 0].double(), want, rtol=1e-5, atol=1e-6)
    _, vc = paired_measures(m, ["act"], x, [xh], mode="concat")
    assert not torch.allclose(vc[0, 0].double(), want, atol=1e-3)  # why two_pass exists


def test_shared_activation_sites_and_result_outputs(tmp_path):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 5)
            self.b = nn.Linear(5, 2)
            self.act = nn.ELU()

        def forward(self, x):
            return self.act(self.b(self.act(self.a(x))))

    torch.manual_seed(1)
    x = torch.randn(64, 2)
    y = (x[:, 0] > 0).long()
    res = lsa_ext.analyze(Shared(), (x, y), "gaussian:std=0.3,salt:amount=0.2", progress=False)
    assert res.layers == ["act", "act#2"]
    assert res.perturbations == ["gaussian", "salt"]
    res.to_json(tmp_path / "r.json", eta=0.0)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["layers"] == ["act", "act#2"]
    assert set(rep["perturbations"]) == {"gaussian", "salt"}
    assert rep["perturbations"]["salt"]["count"] == [64, 64]
    assert rep["mvl"]["eta"] == 0.0 and set(rep["mvl"]["layers"]) == {"gaussian", "salt"}
    assert set(rep["versions"]) == {"lsa_ext", "torch", "numpy", "python"}
    assert rep["config"]["perturbations"]["gaussian"].startswith("Gaussian(std=0.3")
    np.testing.assert_allclose(rep["perturbations"]["gaussian"]["mean"], res.mean[0])
    res.to_csv(tmp_path / "r.csv")
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert rows[0].startswith("perturbation,layer_index,layer,mean,std,count")
    assert len(rows) == 1 + 2 * 2
    res.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "act#2" in res.format_table()


def test_same_seed_same_report_and_rng_restored(tmp_path):
    m = _net()
    x, y = _data(20)
    state = torch.get_rng_state()
    kw = dict(layers="activations", clip=(0.0, 1.0), seed=5, progress=False)
    lsa_ext.analyze(m, (x, y), ["gaussian", "speckle", "salt_pepper"], **kw).to_json(
        tmp_path / "a.json")
    assert torch.equal(torch.get_rng_state(), state)
    lsa_ext.analyze(m, (x, y), ["gaussian", "speckle", "salt_pepper"], **kw).to_json(
        tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    kw["seed"] = 6
    lsa_ext.analyze(m, (x, y), ["gaussian", "speckle", "salt_pepper"], **kw).to_json(
        tmp_path / "c.json")
    assert (tmp_path / "a.json").read_bytes() != (tmp_path / "c.json").read_bytes()


def test_stats_merge_equals_whole_and_from_stats():
    m = _net()
    x, y = _data(40)
    perts = {"shift": _shift}
    names = ["1", "4", "7"]
    sites, whole = accumulate(m, [(x, y)], perts, names)
    _, s1 = accumulate(m, [(x[:15], y[:15])], perts, names)
    _, s2 = accumulate(m, [(x[15:], y[15:])], perts, names)
    merged = s1.merge(s2)
    torch.testing.assert_close(merged.count, whole.count)
    torch.testing.assert_close(merged.sum, whole.sum, rtol=1e-6, atol=0)
    torch.testing.assert_close(merged.sumsq, whole.sumsq, rtol=1e-6, atol=0)
    torch.testing.assert_close(merged.correct, whole.correct)
    assert len(merged.tensors()) == 4
    r = AnalysisResult.from_stats(sites, ["shift"], merged)
    assert r.stats.count.dtype == torch.float64 and r.count.tolist() == [[40, 40, 40]]
    with pytest.raises(LsaUserError, match="do not match"):
        AnalysisResult.from_stats(sites, ["a", "b"], merged)
    with pytest.raises(LsaUserError, match="merge"):
        merged.merge(CMStats.zeros(2, 3))


def test_data_forms_agree():
    m = _net()
    x, y = _data(24)
    ref = lsa_ext.analyze(m, (x, y), {"s": _shift}, batch_size=8, progress=False).mean
    for data in (TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=5),
                 [(x[:10], y[:10]), (x[10:], y[10:])]):
        got = lsa_ext.analyze(m, data, {"s": _shift}, batch_size=8, progress=False).mean
        np.testing.assert_allclose(got, ref, rtol=1e-5)
    got = lsa_ext.analyze(m, x, {"s": _shift}, progress=False)  # labels = predictions
    np.testing.assert_allclose(got.mean, ref, rtol=1e-5)
    shards = [lsa_ext.analyze(m, (x, y), {"s": _shift}, batch_size=5, progress=False,
                              sampler=DistributedSampler(TensorDataset(x, y), num_replicas=2,
                                                         rank=r, shuffle=False)).stats
              for r in range(2)]
    merged = shards[0].merge(shards[1])
    assert merged.count.max() == 24
    np.testing.assert_allclose((merged.sum / merged.count).numpy(), ref, rtol=1e-5)
    part = lsa_ext.analyze(m, (x, y), {"s": _shift}, batch_size=7, max_samples=10,
                           progress=False)
    assert part.count.max() == 10


def test_user_attack_callable_and_train_mode_restored():
    m = _net().train()
    x, y = _data(16)

    class TinyFGSM:  # stand-in for any library's attack object: (x, y) -> x_adv
        name = "tinyfgsm"

        def __call__(self, xb, yb):
            xb = xb.clone().requires_grad_(True)
            loss = nn.functional.cross_entropy(m(xb), yb)
            (g,) = torch.autograd.grad(loss, xb)
            return (xb + 0.1 * g.sign()).clamp(0, 1).detach()

    res = lsa_ext.analyze(m, (x, y), [TinyFGSM(), ("noise", Salt(seed=0))], progress=False)
    assert res.perturbations == ["tinyfgsm", "noise"]
    assert m.training  # restored
    assert np.all(res.mean > 0)


def test_spec_parsing_and_errors():
    assert parse_perturbation_specs("gaussian:std=0.2,pgd:eps=0.1,steps=3,salt") == [
        ("gaussian", {"std": 0.2}), ("pgd", {"eps": 0.1, "steps": 3}), ("salt", {})]
    perts = build_perturbations("gaussian:std=0.1,gaussian:std=0.2")
    assert list(perts) == ["gaussian:std=0.1", "gaussian:std=0.2"]
    with pytest.raises(LsaUserError, match="unknown perturbation 'blur'.*gaussian"):
        build_perturbations("blur")
    with pytest.raises(LsaUserError, match="before any perturbation"):
        parse_perturbation_specs("std=0.1")
    with pytest.raises(LsaUserError, match="unknown parameter 'std' for noise 'salt'; valid: "
                                           "amount, clip, seed"):
        build_perturbations("salt:std=3")
    m = _net()
    x, y = _data(8)
    with pytest.raises(LsaUserError, match="perturbation 'bad' returned"):
        lsa_ext.analyze(m, (x, y), {"bad": lambda a, b: a[:2]}, progress=False)
    with pytest.raises(LsaUserError, match="measure 'scalar' returned"):
        lsa_ext.analyze(m, (x, y), {"s": _shift}, progress=False,
                        measure=Measure("scalar", lambda a, b: a.sum()))
    with pytest.raises(LsaUserError, match="unknown measure"):
        lsa_ext.analyze(m, (x, y), {"s": _shift}, measure="l7", progress=False)
    with pytest.raises(LsaUserError, match="no layer named 'fc9'"):
        lsa_ext.analyze(m, (x, y), {"s": _shift}, layers="fc9", progress=False)
    with pytest.raises(LsaUserError, match="empty"):
        lsa_ext.analyze(m, [], {"s": _shift}, progress=False)
    with pytest.raises(LsaUserError, match="eps"):
        lsa_ext.analyze(m, (x, y), {"s": _shift}, eps=-0.1, progress=False)


def test_nan_from_model_names_layer_and_perturbation():
    class Blows(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.ReLU()
            self.log = nn.Tanh()

        def forward(self, x):
            h = self.act(self.fc(x))
            return self.log(torch.log(h - 10.0))  # log of negatives: NaN

    x = torch.randn(6, 4)
    with pytest.raises(LsaUserError, match=r"layer 'log' under perturbation 'shift'"):
        lsa_ext.analyze(Blows(), (x, torch.zeros(6, dtype=torch.long)), {"shift": _shift},
                        progress=False)


def test_spec_built_attacks_equal_explicit_objects():
    from lsa_ext.attacks import FGSM, PGD

    m = _net()
    x, y = _data(24)
    by_spec = lsa_ext.analyze(m, (x, y), "fgsm,pgd:steps=3", eps=0.05, clip=(0.0, 1.0),
                              seed=2, progress=False)
    explicit = lsa_ext.analyze(
        m, (x, y), {"fgsm": FGSM(m, eps=0.05), "pgd": PGD(m, eps=0.05, steps=3, seed=3)},
        seed=2, progress=False)
    np.testing.assert_allclose(by_spec.mean, explicit.mean, rtol=1e-6)
    assert by_spec.config["perturbations"]["pgd"].startswith("PGD(eps=0.05")
    with pytest.raises(LsaUserError, match="eps"):
        lsa_ext.analyze(m, (x, y), "fgsm:eps=-0.1", progress=False)


def test_load_result_round_trip(tmp_path):
    m = _net()
    x, y = _data(30)
    res = lsa_ext.analyze(m, (x, y), {"shift": _shift, "g": Gaussian(seed=0)}, progress=False)
    res.to_json(tmp_path / "r.json")
    back = lsa_ext.analysis.load_result(tmp_path / "r.json")
    assert back.layers == res.layers and back.perturbations == res.perturbations
    np.testing.assert_allclose(back.mean, res.mean, rtol=1e-12)
    np.testing.assert_allclose(back.std, res.std, rtol=1e-6, atol=1e-12)
    for eta in (-0.5, 0.0, 0.5, 1.0):
        assert back.mvl(eta) == res.mvl(eta)
    assert back.ranking() == res.ranking() and back.ranking("g") == res.ranking()["g"]
    assert back.accuracy == pytest.approx(res.accuracy)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(LsaUserError, match="not an LSA analysis report"):
        lsa_ext.analysis.load_result(tmp_path / "x.json")
    with pytest.raises(LsaUserError, match="does not exist"):
        lsa_ext.analysis.load_result(tmp_path / "none.json")


@pytest.mark.parametrize("mode", ["concat", "two_pass"])
def test_accuracy_per_perturbation(mode):
    from lsa_ext.losses import predict

    m = _net()
    x, y = _data(33)
    y = predict(m(x)).detach()
    y[::3] = (y[::3] + 1) % 3  # two thirds right on clean inputs
    res = lsa_ext.analyze(m, (x, y), {"shift": _shift}, batch_size=10, mode=mode,
                          forward_batch=7, progress=False)
    want_clean = float((predict(m(x)) == y).double().mean())
    want_shift = float((predict(m(_shift(x, y))) == y).double().mean())
    assert res.accuracy == pytest.approx({"clean": want_clean, "shift": want_shift})
    assert want_clean == pytest.approx(22 / 33)


def test_accuracy_none_when_output_is_not_logits():
    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.act = nn.ReLU()

        def forward(self, x):
            h = self.act(self.fc(x))
            return h, h.sum()

    res = lsa_ext.analyze(TupleOut(), (torch.randn(8, 3), torch.zeros(8, dtype=torch.long)),
                          {"s": lambda a, b: a + 1}, progress=False)
    assert res.accuracy is None and res.to_dict()["accuracy"] is None
    assert res.layers == ["act"]


def test_log_scale_choice():
    from lsa_ext.report import wants_log_scale

    assert not wants_log_scale(np.array([[0.1, 0.5], [0.2, 9.0]]))
    assert wants_log_scale(np.array([[1e-4, 0.5], [0.2, 0.3]]))
    assert not wants_log_scale(np.array([[0.0, np.nan], [0.2, 0.3]]))  # zeros/NaN ignored


def test_mode_restored_after_a_perturbation_that_changes_it():
    m = _net()
    x, y = _data(12)

    def rude(xb, yb):
        m.train()  # e.g. an attack that forgets to restore eval mode
        return _shift(xb, yb)

    ref = lsa_ext.analyze(m, (x, y), {"s": _shift}, batch_size=4, progress=False)
    got = lsa_ext.analyze(m, (x, y), {"s": rude}, batch_size=4, progress=False)
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-6)  # BN stayed in eval mode
    assert not m.training


def test_unlabelled_data_reports_no_accuracy(caplog):
    """A bare tensor x: the attacks take the model's predictions as labels, so the clean
    'accuracy' would be 1.0 by construction — none is reported; the CM values are those of
    the same data labelled with those predictions."""
    from lsa_ext.losses import predict

    m = _net()
    x, _ = _data(20)
    y = predict(m(x)).detach()
    with caplog.at_level(logging.INFO, logger="lsa_ext.analysis"):
        bare = lsa_ext.analyze(m, x, {"shift": _shift}, batch_size=8, progress=False)
    labelled = lsa_ext.analyze(m, (x, y), {"shift": _shift}, batch_size=8, progress=False)
    assert bare.accuracy is None and bare.to_dict()["accuracy"] is None
    assert labelled.accuracy is not None and labelled.accuracy["clean"] == 1.0
    assert torch.equal(torch.as_tensor(bare.mean), torch.as_tensor(labelled.mean))
    assert sum("no accuracy is reported" in r.getMessage() for r in caplog.records) == 1


def test_explicit_call_site_that_never_runs_is_an_error_before_any_batch():
    """``name#k`` with fewer calls: refused before the analysis (it used to be left out of the
    report silently); a second call that does run is analysed."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 3)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.fc2(self.act(self.act(self.fc1(x)) - 0.1))

    torch.manual_seed(0)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    calls = []
    model = Twice().eval()
    model.fc1.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(LsaUserError, match=r"fc1#2 never runs"):
        lsa_ext.analyze(model, (x, y), {"s": lambda a, b: a + 0.1}, layers="fc1,fc1#2",
                        progress=False)
    assert len(calls) == 1  # only the check's forward ran
    res = lsa_ext.analyze(model, (x, y), {"s": lambda a, b: a + 0.1}, layers="act#2",
                          progress=False)
    assert res.layers == ["act#2"]


def test_dead_units_warn_once_per_layer(caplog):
    """A 2-unit ReLU layer that is all zero for some clean samples: the relative error of
    those samples is ||â|| / eps (the floor), which dominates the mean — one warning names
    the layer, the count in the first batch and the perturbation; a healthy layer is not
    named."""
    torch.manual_seed(0)
    fc = nn.Linear(2, 2)
    with torch.no_grad():
        fc.weight.copy_(torch.eye(2))
        fc.bias.zero_()
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), fc, nn.ReLU(), nn.Linear(2, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
    x = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-2.0, -0.5], [0.5, 2.0]])
    y = torch.zeros(4, dtype=torch.long)
    with caplog.at_level(logging.WARNING, logger="lsa_ext.analysis"):
        res = lsa_ext.analyze(model, (x, y), {"up": lambda a, b: a + 2.0}, layers=["1", "3"],
                              batch_size=4, progress=False)
    # reference: samples 0 and 2 are dead at the ReLU (both inputs negative)
    h = torch.relu(torch.tanh(x))
    h_hat = torch.relu(torch.tanh(x + 2.0))
    ratio = (h_hat - h).norm(dim=1) / h.norm(dim=1).clamp_min(1e-12)
    assert res.mean[0, 1] == pytest.approx(float(ratio.double().mean()), rel=1e-4)
    msgs = [r.getMessage() for r in caplog.records if "relative error above" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].startswith("layer 3: 2 of 4 samples") and "up" in msgs[0]


def test_a_pinned_spec_seed_makes_a_perturbation_independent_of_its_position():
    """README, Perturbation specs → Randomness: ``seed=`` in a spec pins that perturbation's
    draws, whatever comes before it in the list; unpinned, the i-th gets seed + i."""
    m = _net()
    x, y = _data(24)
    kw = {"batch_size": 8, "progress": False, "seed": 3}
    first = lsa_ext.analyze(m, (x, y), "gaussian:std=0.1,seed=9,salt:amount=0.1", **kw)
    second = lsa_ext.analyze(m, (x, y), "salt:amount=0.1,gaussian:std=0.1,seed=9", **kw)
    np.testing.assert_array_equal(first.mean[0], second.mean[1])
    # unpinned: salt is seed + 1 in the first list and seed + 0 in the second
    alone = lsa_ext.analyze(m, (x, y), "salt:amount=0.1,seed=4", **kw)
    np.testing.assert_array_equal(first.mean[1], alone.mean[0])


@pytest.mark.parametrize("bad", ["one_hot", "column", "float"])
def test_labels_not_shaped_b_are_a_user_error_with_noise_only(bad):
    """Noise never reads y, so the accuracy bookkeeping was the first to meet it (a raw
    RuntimeError); now one clear message, as the attacks give."""
    m = _net()
    x, y = _data(12)
    wrong = {"one_hot": nn.functional.one_hot(y, 3).float(), "column": y.unsqueeze(1),
             "float": y.float()}[bad]
    with pytest.raises(LsaUserError, match=r"labels y must be integer class indices of shape"):
        lsa_ext.analyze(m, (x, wrong), {"s": _shift}, progress=False)


def test_a_loaded_report_uses_its_own_eta_by_default(tmp_path):
    """report.json written with η = 0: reading it back, .mvl() / .format_table() / .to_json()
    use η = 0 (they used the library default 1), and an explicit η still wins."""
    m = _net()
    x, y = _data(24)
    res = lsa_ext.analyze(m, (x, y), {"s": _shift}, batch_size=8, progress=False)
    assert res.eta == 1.0
    res.to_json(tmp_path / "r.json", eta=0.0)
    back = lsa_ext.analysis.load_result(tmp_path / "r.json")
    assert back.eta == 0.0
    assert back.mvl() == res.mvl(eta=0.0) and back.mvl(eta=1.0) == res.mvl(eta=1.0)
    assert back.mvl() != back.mvl(eta=1.0)  # the two cut-offs differ on this model
    assert back.format_table() == res.format_table(eta=0.0)
    back.to_json(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["mvl"]["eta"] == 0.0
