"""Attacks in float16 / bfloat16 / float32 / float64 and under inference mode (issue 10, cases 07
and 12): the result keeps the dtype and lies inside the budget and the clip range exactly
(checked in float64, no tolerance); inside ``torch.inference_mode()`` or on inference tensors
the attack gives the normal-mode result."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lsa_ext.attacks import build_attack
from lsa_ext.budget import Budget
from lsa_ext.errors import LsaUserError

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
ATTACKS = ["fgsm", "pgd", "fast", "trades", "apgd", "pgd-L2", "apgd-L2"]
FAST_KW = {"pgd": {"steps": 5}, "trades": {"steps": 5}, "apgd": {"steps": 8}}


def _attack(name: str, model, eps: float, **kw):
    base, _, norm = name.partition("-")
    if norm:
        kw["norm"] = norm
    return build_attack(base, model, eps, **FAST_KW.get(base, {}), **kw)


def _model(dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5)).to(dtype)


def _excess(x_adv: torch.Tensor, x: torch.Tensor, eps: float, l2: bool) -> float:
    """How far x_adv lies outside the eps-ball around x, in float64 (<= 0: inside)."""
    d = x_adv.double() - x.double()
    dist = d.flatten(1).norm(dim=1).max() if l2 else d.abs().max()
    return float(dist) - eps


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ATTACKS)
@pytest.mark.parametrize("clip", [(0.0, 1.0), (0.05, 0.95), None])
def test_result_keeps_dtype_and_lies_in_budget_and_range_exactly(dtype, name, clip):
    """Case 07: bfloat16 used to leave the ball by 5.8 % of eps and float16 by 0.4 %; clip
    (0.05, 0.95) is not representable in float16/bfloat16 (the bounds round outwards)."""
    l2 = name.endswith("L2")
    eps = 0.5 if l2 else 8 / 255
    g = torch.Generator().manual_seed(3)
    x = (0.1 + 0.8 * torch.rand(64, 20, generator=g)).to(dtype)  # inside every clip range
    y = torch.randint(0, 5, (64,), generator=g)
    x_adv = _attack(name, _model(dtype), eps, clip=clip)(x, y)
    assert x_adv.dtype == dtype and x_adv.shape == x.shape and not x_adv.requires_grad
    assert _excess(x_adv, x, eps, l2) <= 0.0
    if clip is not None:
        assert x_adv.double().min() >= clip[0] and x_adv.double().max() <= clip[1]
    moved = _excess(x_adv, x, 0.0, l2)
    assert moved > 0.5 * eps  # it did attack


def test_the_final_projection_is_needed_in_bfloat16():
    """The rounding fault itself: x + eps rounded to bfloat16 leaves the ball (here by 12 % of
    eps: x + eps crosses 1, where the spacing doubles); Budget steps the bound one value
    towards x."""
    x = torch.full((1, 4), 0.97265625, dtype=torch.bfloat16)
    eps = 8 / 255
    naive = (x.double() + eps).to(torch.bfloat16)
    assert float(naive.double().sub(x.double()).max()) > eps  # what the cast alone gives
    projected = Budget(x, eps, "Linf", None).project(x.float() + 1.0)
    assert float(projected.double().sub(x.double()).max()) <= eps
    assert torch.equal(projected, torch.nextafter(naive, x))  # the largest value inside


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    norm=st.sampled_from(["Linf", "L2"]),
    eps=st.floats(1e-4, 3.0),
    clip=st.sampled_from([None, (0.0, 1.0), (-0.3, 1.7), (0.1, 0.9)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_budget_projection_is_exact_for_any_target(dtype, norm, eps, clip, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 9, generator=g, dtype=torch.float64)
    if clip is not None:
        x = clip[0] + (clip[1] - clip[0]) * (0.05 + 0.9 * x)
    x = x.to(dtype)
    target = x.double() + 3 * eps * torch.randn(6, 9, generator=g, dtype=torch.float64)
    out = Budget(x, eps, norm, clip).project(target)
    assert out.dtype == dtype
    assert _excess(out, x, eps, norm == "L2") <= 0.0
    if clip is not None:
        assert out.double().min() >= clip[0] and out.double().max() <= clip[1]
    # a point already inside (x itself) is left unchanged
    assert torch.equal(Budget(x, eps, norm, clip).project(x), x)


# ----------------------------------------------------------------------------- inference mode
@pytest.mark.parametrize(("name", "kw"), [(n, {}) for n in ATTACKS] + [
    ("pgd", {"random_start": False}), ("apgd", {"random_start": False})])
def test_attack_inside_inference_mode_equals_normal_mode(name, kw):
    """Case 12: inside torch.inference_mode() and on inference tensors the attack runs (with
    inference mode off, on normal copies) and returns the normal-mode result, a normal tensor."""
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    want = _attack(name, model, 0.1, **kw)(x, y)
    with torch.inference_mode():
        inside = _attack(name, model, 0.1, **kw)(x, y)
        x_inf, y_inf = x.clone(), y.clone()
    assert x_inf.is_inference() and not inside.is_inference()
    on_inference_tensors = _attack(name, model, 0.1, **kw)(x_inf, y_inf)
    assert torch.equal(inside, want) and torch.equal(on_inference_tensors, want)
    assert not on_inference_tensors.is_inference()
    assert not torch.equal(want, x)


def test_model_with_inference_tensor_parameters_is_one_clear_error():
    with torch.inference_mode():
        model = nn.Linear(4, 3)
    x, y = torch.rand(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(LsaUserError, match="parameters are inference tensors"):
        build_attack("pgd", model, 0.1, steps=2)(x, y)
