"""Perturbation specs and parameters: bool parameters, descriptions, clip syntax, and the range
spec-built perturbations clip to under ``analyze`` (``clip="auto"``)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from torch import nn

import lsa_ext
from lsa_ext.attacks import APGD, ATTACKS, FGSM, PGD
from lsa_ext.errors import LsaUserError
from lsa_ext.noise import NOISES, Gaussian
from lsa_ext.perturbations import (
    build_perturbation,
    build_perturbations,
    parameter_names,
    parse_perturbation_specs,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


def _data(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 12, generator=g), torch.randint(0, 3, (n,), generator=g)


def _bool_parameters() -> list[tuple[str, str]]:
    """(perturbation name, parameter) for every parameter whose default is a bool, read from
    the classes' signatures (base classes included)."""
    found = []
    for name, cls in {**NOISES, **ATTACKS}.items():
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            for p in inspect.signature(init).parameters.values():
                if isinstance(p.default, bool) and (name, p.name) not in found:
                    found.append((name, p.name))
    return found


BOOLS = _bool_parameters()


def test_the_bool_parameters_are_these():
    # a new bool parameter joins the checks below by itself; this names the ones there are
    assert BOOLS == [("pgd", "random_start"), ("pgd", "return_best"), ("apgd", "random_start")]


@pytest.mark.parametrize(("name", "param"), BOOLS)
@pytest.mark.parametrize("bad", ["False", "no", "off", "maybe", 1, 0, None, 0.0])
def test_bool_parameter_rejects_non_bools_in_python(name, param, bad):
    cls = ATTACKS[name]
    with pytest.raises(LsaUserError, match=rf"^{param} must be True or False .* got "
                                           rf"{repr(bad)}$"):
        cls(_linear(), 0.1, **{param: bad})


@pytest.mark.parametrize(("name", "param"), BOOLS)
@pytest.mark.parametrize("text", ["no", "yes", "off", "on", "maybe", "1", "0", "none", "F"])
def test_bool_parameter_rejects_other_words_in_specs(name, param, text):
    shown = {"1": "1", "0": "0", "none": "None"}.get(text, repr(text))
    with pytest.raises(LsaUserError, match=rf"{param} must be True or False \(in a "
                                           rf"perturbation spec: true or false\), got {shown}$"):
        build_perturbations(f"{name}:{param}={text},steps=2", model=_linear())


@pytest.mark.parametrize(("name", "param"), BOOLS)
@pytest.mark.parametrize(("text", "value"), [("true", True), ("false", False),
                                             ("FALSE", False), ("True", True)])
def test_bool_parameter_from_spec_reaches_the_attack_and_its_description(name, param, text,
                                                                         value):
    (atk,) = build_perturbations(f"{name}:{param}={text},steps=2", model=_linear()).values()
    assert getattr(atk, param) is value
    assert f"{param}={value}" in repr(atk)


def test_random_start_false_from_a_spec_is_a_plain_gradient_step():
    # one L∞ step of size alpha >= eps from x (no random start, last iterate) is FGSM:
    # clip(x + eps·sign(∇ₓ CE)), here against a float64 gradient of the same model
    m = _linear()
    x, y = _data()
    (atk,) = build_perturbations("pgd:random_start=false,return_best=false,steps=1",
                                 model=m, eps=0.1, clip=(0.0, 1.0)).values()
    m64 = _linear().double()
    x64 = x.double().requires_grad_(True)
    loss = nn.functional.cross_entropy(m64(x64), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x64)
    want = (x.double() + 0.1 * g.sign()).clamp(0, 1)
    got = atk(x, y).double()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # with a random start, the same call lands elsewhere
    (rnd,) = build_perturbations("pgd:random_start=true,return_best=false,steps=1",
                                 model=m, eps=0.1, clip=(0.0, 1.0)).values()
    assert not torch.equal(rnd(x, y), atk(x, y))


def test_analyze_records_the_bool_in_the_report_description():
    m = _linear()
    res = lsa_ext.analyze(m, _data(), "pgd:random_start=false,steps=2,return_best=false",
                          progress=False)
    d = res.config["perturbations"]["pgd"]
    assert "random_start=False" in d and "return_best=False" in d and "steps=2" in d


def test_non_bool_kinds_are_checked():
    m = _linear()
    with pytest.raises(LsaUserError, match=r"^steps must be an integer, got 'abc'$"):
        build_perturbations("pgd:steps=abc", model=m)
    with pytest.raises(LsaUserError, match=r"^steps must be an integer, got 2.5$"):
        build_perturbations("apgd:steps=2.5", model=m)
    with pytest.raises(LsaUserError, match=r"^alpha must be a finite number, got 'fast'$"):
        build_perturbations("fast:alpha=fast", model=m)
    with pytest.raises(LsaUserError, match=r"^norm must be 'Linf' or 'L2', got 'l3'$"):
        build_perturbations("pgd:norm=l3", model=m)
    with pytest.raises(LsaUserError, match=r"^std must be a finite number, got True$"):
        build_perturbations("gaussian:std=true")


# every parameter a spec can give, set away from its default
EVERY_PARAMETER = {
    "gaussian": {"std": 0.3, "clip": (-1.0, 2.0), "seed": 5},
    "speckle": {"std": 0.3, "clip": (-1.0, 2.0), "seed": 5},
    "salt": {"amount": 0.2, "clip": (-1.0, 2.0), "seed": 5},
    "pepper": {"amount": 0.2, "clip": (-1.0, 2.0), "seed": 5},
    "salt_pepper": {"amount": 0.2, "salt_vs_pepper": 0.3, "clip": (-1.0, 2.0), "seed": 5},
    "fgsm": {"eps": 0.2, "clip": (-1.0, 2.0), "mode": "train", "seed": 5, "output": 0},
    "pgd": {"eps": 0.2, "alpha": 0.05, "steps": 3, "random_start": False, "norm": "L2",
            "return_best": False, "clip": (-1.0, 2.0), "mode": "train", "seed": 5,
            "output": 0},
    "fast": {"eps": 0.2, "alpha": 0.05, "clip": (-1.0, 2.0), "mode": "train", "seed": 5,
             "output": 0},
    "trades": {"eps": 0.2, "alpha": 0.05, "steps": 3, "beta": 2.0, "clip": (-1.0, 2.0),
               "mode": "train", "seed": 5, "output": 0},
    "apgd": {"eps": 0.2, "steps": 3, "n_restarts": 2, "rho": 0.5, "norm": "L2", "loss": "dlr",
             "seed": 5, "random_start": False, "momentum": 0.5, "clip": (-1.0, 2.0),
             "mode": "train", "output": 0},
}


@pytest.mark.parametrize("name", list(EVERY_PARAMETER))
def test_every_parameter_given_appears_in_the_description(name):
    params = EVERY_PARAMETER[name]
    cls = {**NOISES, **ATTACKS}[name]
    # the table covers every parameter but the attacks' callable-only `loss`
    assert set(parameter_names(cls)) - set(params) <= {"loss"}
    p = build_perturbation(name, params, model=_linear())
    text = repr(p)
    for key, value in params.items():
        assert f"{key}={value!r}" in text, (key, text)


def test_a_callable_loss_or_output_is_described_by_name():
    def my_loss(logits, y):
        return nn.functional.cross_entropy(logits, y, reduction="none")

    def pick(out):
        return out

    text = repr(PGD(_linear(), 0.1, loss=my_loss, output=pick))
    assert "loss='my_loss'" in text and "output='pick'" in text and " at 0x" not in text


# --------------------------------------------------------------------------- clip in specs
def test_clip_spec_syntax():
    assert parse_perturbation_specs("gaussian:clip=0:1,std=0.2,pgd:clip=none,steps=2,"
                                    "fgsm:clip=-1.5:2") == [
        ("gaussian", {"clip": (0.0, 1.0), "std": 0.2}), ("pgd", {"clip": None, "steps": 2}),
        ("fgsm", {"clip": (-1.5, 2.0)})]
    for bad in ("gaussian:clip=(0,1)", "gaussian:clip=1:0", "gaussian:clip=0", "pgd:clip=a:b",
                "pgd:clip=0:1:2"):
        with pytest.raises(LsaUserError, match="clip in a perturbation spec is lo:hi with "
                                               r"lo < hi \(e.g. clip=0:1\) or none, got"):
            parse_perturbation_specs(bad)


def test_a_string_clip_in_python_says_how_to_give_one():
    with pytest.raises(LsaUserError, match=r"clip must be None or a pair \(lo, hi\), got "
                                           r"'0:1' \(in a perturbation spec: clip=lo:hi"):
        Gaussian(clip="0:1")


def test_spec_clip_wins_over_analyze_clip():
    x, y = _data()
    g = build_perturbations("gaussian:clip=none,std=2.0", clip=(0.0, 1.0), seed=3)["gaussian"]
    want = Gaussian(std=2.0, clip=None, seed=3)(x, y)
    assert torch.equal(g(x, y), want) and (want.min() < 0) and (want.max() > 1)
    g01 = build_perturbations("gaussian:clip=0.25:0.75,std=2.0", clip=None)["gaussian"]
    assert g01.clip == (0.25, 0.75)


# --------------------------------------------------------------------------- analyze's clip
class _Spy:
    """Records every FGSM output (monkeypatched ``FGSM.__call__``)."""

    def __init__(self, monkeypatch):
        self.outputs: list[torch.Tensor] = []
        original = FGSM.__call__

        def call(atk, x, y):
            out = original(atk, x, y)
            self.outputs.append(out.clone())
            return out

        monkeypatch.setattr(FGSM, "__call__", call)


def _big_step_fgsm_outputs(monkeypatch, model, data, perturbations, **kw):
    spy = _Spy(monkeypatch)
    res = lsa_ext.analyze(model, data, perturbations, batch_size=8, progress=False, **kw)
    return res, torch.cat(spy.outputs)


def test_spec_built_fgsm_equals_the_class_one_under_analyze(monkeypatch):
    m = _linear()
    x, y = _data()  # in [0, 1]: "auto" clips to (0, 1), as FGSM's own default
    res_s, by_spec = _big_step_fgsm_outputs(monkeypatch, m, (x, y), "fgsm:eps=0.3")
    res_c, by_class = _big_step_fgsm_outputs(monkeypatch, m, (x, y),
                                             {"fgsm": FGSM(m, eps=0.3)})
    assert torch.equal(by_spec, by_class)
    assert res_s.config["clip"] == [0.0, 1.0]
    np.testing.assert_array_equal(res_s.mean, res_c.mean)
    assert res_s.accuracy == res_c.accuracy
    # the clip is real: unclipped, ε = 0.3 leaves [0, 1]; clip=None turns it off
    res_n, unclipped = _big_step_fgsm_outputs(monkeypatch, m, (x, y), "fgsm:eps=0.3",
                                              clip=None)
    assert unclipped.min() < 0 and unclipped.max() > 1
    assert by_spec.min() >= 0 and by_spec.max() <= 1
    torch.testing.assert_close(unclipped.clamp(0, 1), by_spec, rtol=0, atol=0)
    assert res_n.config["clip"] is None
    # an explicit pair is used as given
    res_p, pair = _big_step_fgsm_outputs(monkeypatch, m, (x, y), "fgsm:eps=0.3",
                                         clip=(-0.5, 1.5))
    assert torch.equal(pair, unclipped.clamp(-0.5, 1.5)) and res_p.config["clip"] == [-0.5, 1.5]


def test_auto_clip_is_none_for_data_outside_unit_range(monkeypatch):
    m = _linear()
    x, y = _data()
    x = x * 4 - 2  # like standardized two-moons features: no data range
    res, out = _big_step_fgsm_outputs(monkeypatch, m, (x, y), "fgsm:eps=0.3")
    assert res.config["clip"] is None
    _, want = _big_step_fgsm_outputs(monkeypatch, m, (x, y), {"f": FGSM(m, 0.3, clip=None)})
    assert torch.equal(out, want)


def test_analyze_clip_errors():
    m = _linear()
    with pytest.raises(LsaUserError, match=r"clip must be 'auto', None or a pair \(lo, hi\), "
                                           "got 'data'"):
        lsa_ext.analyze(m, _data(), "fgsm", clip="data", progress=False)
    with pytest.raises(LsaUserError, match="clip must have lo < hi"):
        lsa_ext.analyze(m, _data(), "fgsm", clip=(1, 0), progress=False)


def test_apgd_random_start_false_is_deterministic_over_seeds():
    m = _linear()
    x, y = _data()
    a = APGD(m, 0.1, steps=3, random_start=False, seed=0)(x, y)
    b = APGD(m, 0.1, steps=3, random_start=False, seed=7)(x, y)
    assert torch.equal(a, b)
    c = APGD(m, 0.1, steps=3, random_start=True, seed=7)(x, y)
    assert not torch.equal(a, c)
