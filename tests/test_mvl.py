import numpy as np
import pytest
import torch

from lsa_ext.errors import LsaUserError
from lsa_ext.mvl import most_vulnerable_layers, mvl_detail, rank_layers


def _numpy_mvl(cm, eta):
    """Algorithm 1 written out: mu, sigma over all M*L values; layer mean compared."""
    M, L = cm.shape
    mu = cm.sum() / (M * L)
    sigma = np.sqrt(((cm - mu) ** 2).sum() / (M * L))
    return [l for l in range(L) if cm[:, l].mean() - mu > eta * sigma], mu, sigma


def test_hand_built_table():
    # 4 samples x 5 layers; layers 1 and 3 clearly above the rest
    cm = np.array([
        [0.10, 0.90, 0.20, 0.70, 0.10],
        [0.12, 0.80, 0.22, 0.75, 0.11],
        [0.08, 0.85, 0.18, 0.72, 0.09],
        [0.10, 0.95, 0.20, 0.69, 0.10],
    ])
    # mu = 0.398, sigma = 0.33134; layer means 0.1, 0.875, 0.2, 0.715, 0.1
    d = mvl_detail(cm, eta=0.5)
    assert d.mu == pytest.approx(0.398)
    assert d.sigma == pytest.approx(np.std(cm))
    assert d.layers == [1, 3]
    assert most_vulnerable_layers(cm, eta=1.0) == [1]  # 0.715 - 0.398 < sigma
    assert most_vulnerable_layers(cm, eta=-0.5) == [1, 3]  # 0.2 - 0.398 < -sigma/2
    assert most_vulnerable_layers(cm, eta=-1.0) == [0, 1, 2, 3, 4]
    assert rank_layers(cm) == [1, 3, 2, 0, 4]  # tie 0/4 broken by index


@pytest.mark.parametrize("eta", [-1.0, 0.0, 0.3, 1.0, 2.0])
def test_random_tables_match_numpy_and_stats_form(eta):
    rng = np.random.default_rng(int(eta * 10) + 30)
    cm = rng.gamma(2.0, size=(37, 9)) * rng.uniform(0.2, 3.0, size=9)
    want, mu, sigma = _numpy_mvl(cm, eta)
    assert most_vulnerable_layers(cm, eta) == want
    stats = {"count": np.full(9, 37.0), "sum": cm.sum(0), "sumsq": (cm**2).sum(0)}
    d = mvl_detail(stats, eta)
    assert d.layers == want
    assert d.mu == pytest.approx(mu, rel=1e-12) and d.sigma == pytest.approx(sigma, rel=1e-10)
    assert d.threshold == pytest.approx(mu + eta * sigma)
    assert most_vulnerable_layers(torch.from_numpy(cm), eta) == want
    assert rank_layers(stats) == list(np.argsort(-cm.mean(0), kind="stable"))


def test_bad_tables():
    with pytest.raises(LsaUserError, match=r"\[M samples, L layers\]"):
        most_vulnerable_layers(np.ones(4))
    with pytest.raises(LsaUserError, match="no CM values"):
        mvl_detail({"count": np.array([1.0, 0.0]), "sum": np.ones(2), "sumsq": np.ones(2)})
    with pytest.raises(LsaUserError, match="eta"):
        mvl_detail(np.ones((2, 2)), eta=float("nan"))


def test_mvl_from_a_real_analysis_report_matches_the_analysis(tmp_path):
    from lsa_ext import analysis
    from lsa_ext.attacks import FGSM
    from lsa_ext.data import load_dataset
    from lsa_ext.models import build_model
    from lsa_ext.mvl_select import mvl_from_report

    data = load_dataset("moons", limit_train=128)
    model = build_model("model_a", data.info, seed=0)
    res = analysis.analyze(model, data.train, {"fgsm": FGSM(model, 0.3, clip=None)},
                           layers="learnable", progress=False)
    res.to_json(tmp_path / "report.json", eta=0.0)
    checked = 0
    for eta in (-0.5, 0.0, 0.5):
        want = res.mvl(eta)["fgsm"]
        if want:
            assert mvl_from_report(tmp_path / "report.json", eta).sites == want
            checked += 1
    assert checked >= 2


def test_mvl_from_report_checks_the_schema_and_names(tmp_path, caplog):
    import json

    from lsa_ext.mvl_select import mvl_from_report

    table = {"mean": [0.1, 0.9], "std": [0.0, 0.0], "count": [4, 4]}
    rep = {"layers": ["a", "b#2"], "perturbations": {"gaussian": table, "fgsm:eps=0.1": table}}
    (tmp_path / "plain.json").write_text(json.dumps(rep))
    with pytest.raises(LsaUserError, match="not an LSA analysis report"):
        mvl_from_report(tmp_path / "plain.json", 0.0)
    rep["schema"] = "lsa_ext.analysis/1"
    (tmp_path / "r.json").write_text(json.dumps(rep))
    # mu = 0.5, sigma = 0.4: only b#2 (mean 0.9) exceeds mu + 0.5 sigma; the site is kept as
    # reported (b's second call), so training regularises exactly that call
    assert mvl_from_report(tmp_path / "r.json", 0.5).sites == ["b#2"]  # the one adversarial entry
    assert mvl_from_report(tmp_path / "r.json", 0.5, "gaussian").sites == ["b#2"]
    with pytest.raises(LsaUserError, match="no perturbation 'pgd'"):
        mvl_from_report(tmp_path / "r.json", 0.5, "pgd")
    # no layer passes η = 5: the top-ranked layer, and a warning that says so
    with caplog.at_level("WARNING", logger="lsa_ext.mvl_select"):
        choice = mvl_from_report(tmp_path / "r.json", 5.0)
    assert choice.sites == ["b#2"] and choice.top_ranked  # the site as reported
    assert [r.getMessage() for r in caplog.records] == [
        f"no layer passes the MVL cut-off eta=5 in {tmp_path / 'r.json'}: taking the top-ranked "
        "layer b#2 (a lower eta selects by the cut-off)"]
    # at η = 0 nothing passes only when every layer's mean CM is the same
    same = {"mean": [0.4, 0.4], "std": [0.1, 0.1], "count": [4, 4]}
    rep["perturbations"] = {"fgsm:eps=0.1": same}
    (tmp_path / "same.json").write_text(json.dumps(rep))
    caplog.clear()
    with caplog.at_level("WARNING", logger="lsa_ext.mvl_select"):
        assert mvl_from_report(tmp_path / "same.json", 0.0).top_ranked
    assert caplog.records[-1].getMessage().endswith(
        "(at eta=0 this means every layer has the same mean CM)")


def test_subset_draws_the_same_samples_from_tensors_and_datasets():
    from torch.utils.data import TensorDataset

    from lsa_ext.mvl_select import _subset

    x, y = torch.arange(20.0).reshape(10, 2), torch.arange(10)
    xs, ys = _subset((x, y), 4, seed=3)
    want = torch.randperm(10, generator=torch.Generator().manual_seed(3))[:4]
    assert torch.equal(ys, want) and torch.equal(xs, x[want])
    sub = _subset(list(zip(x, y, strict=True)), 4, seed=3)  # a map-style dataset (a list)
    assert [int(sub[i][1]) for i in range(4)] == want.tolist()
    assert _subset(TensorDataset(x, y), 20, seed=3).tensors[0] is x  # fewer than n: as given
