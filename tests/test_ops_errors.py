"""Bad input gives a ValueError/TypeError naming the problem: public API and torch.ops alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lsa_ext

OTHER_DEVICE = "cuda" if torch.cuda.is_available() else "meta"


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.ones(shape, dtype=dtype, device=device)


# (id, clean, perturbed, exception, message regex) for the single-layer ops.
PAIR_CASES = [
    ("shape", t(2, 3), t(2, 4), ValueError, r"same shape.*[\[(]2, 3[\])].*[\[(]2, 4[\])]"),
    ("rank", t(2, 3), t(2, 3, 1), ValueError, r"same shape"),
    ("dtype", t(2, 3), t(2, 3, dtype=torch.float64), TypeError, r"same dtype"),
    ("int", t(2, 3, dtype=torch.int64), t(2, 3, dtype=torch.int64), TypeError,
     r"floating point.*(int64|Long)"),
    ("bool", t(2, 3, dtype=torch.bool), t(2, 3, dtype=torch.bool), TypeError,
     r"floating point.*bool"),
    ("complex", t(2, 3, dtype=torch.complex64), t(2, 3, dtype=torch.complex64), TypeError,
     r"floating point"),
    ("0-dim", torch.tensor(1.0), torch.tensor(2.0), ValueError, r"0-dim"),
    ("device", t(2, 3), t(2, 3, device=OTHER_DEVICE), ValueError, r"same device"),
]


def _ids(cases):
    return [c[0] for c in cases]


@pytest.mark.parametrize(("name", "a", "b", "exc", "match"), PAIR_CASES, ids=_ids(PAIR_CASES))
def test_public_api_rejects_bad_pairs(name, a, b, exc, match):
    for call in (
        lambda: lsa_ext.relative_error(a, b),
        lambda: lsa_ext.sq_sums(a, b),
        lambda: lsa_ext.relative_error_multi([t(2, 1), a], [t(2, 1), b]),
    ):
        with pytest.raises(exc, match=r"(?is)" + match):
            call()


@pytest.mark.parametrize(("name", "a", "b", "exc", "match"), PAIR_CASES, ids=_ids(PAIR_CASES))
def test_torch_ops_reject_bad_pairs(name, a, b, exc, match):
    """The compiled kernels' TORCH_CHECK_VALUE/TORCH_CHECK_TYPE surface as ValueError/TypeError."""
    gd = torch.ones(a.shape[:1] if a.dim() else (1,))
    calls = [
        lambda: torch.ops.lsa_ext.sq_sums(a, b),
        lambda: torch.ops.lsa_ext.sq_sums_multi([a], [b]),
        lambda: torch.ops.lsa_ext.sq_sums_backward(gd, gd, a, b),
        lambda: torch.ops.lsa_ext.sq_sums_multi_backward(gd[None], gd[None], [a], [b]),
        lambda: torch.ops.lsa_ext.relative_error(a, b, 1e-12),
        lambda: torch.ops.lsa_ext.relative_error_multi([a], [b], 1e-12),
    ]
    for call in calls:
        with pytest.raises(exc, match=r"(?is)" + match):
            call()


def test_torch_ops_message_names_the_layer():
    with pytest.raises(ValueError, match="layer 1: clean and perturbed must have the same shape"):
        torch.ops.lsa_ext.sq_sums_multi([t(2, 3), t(2, 3)], [t(2, 3), t(2, 5)])
    with pytest.raises(TypeError, match="layer 0: clean must be a floating point"):
        torch.ops.lsa_ext.sq_sums_multi([t(2, dtype=torch.int32)], [t(2, dtype=torch.int32)])


LIST_CASES = [
    ("empty", [], [], ValueError, r"at least one layer.*empty"),
    ("length", [t(2, 3)], [t(2, 3), t(2, 3)], ValueError, r"same length.*1 and 2"),
    ("batch", [t(2, 3), t(3, 3)], [t(2, 3), t(3, 3)], ValueError,
     r"same batch size.*layer 0 has 2.*layer 1 has 3"),
    ("layer-dtype", [t(2, 3), t(2, 3, dtype=torch.float64)],
     [t(2, 3), t(2, 3, dtype=torch.float64)], TypeError, r"same dtype.*layer 1"),
    ("layer-device", [t(2, 3), t(2, 3, device=OTHER_DEVICE)],
     [t(2, 3), t(2, 3, device=OTHER_DEVICE)], ValueError, r"same device.*layer 1"),
]


@pytest.mark.parametrize(("name", "cs", "ps", "exc", "match"), LIST_CASES, ids=_ids(LIST_CASES))
def test_bad_layer_lists(name, cs, ps, exc, match):
    with pytest.raises(exc, match=r"(?is)" + match):
        lsa_ext.relative_error_multi(cs, ps)
    with pytest.raises(exc, match=r"(?is)" + match):
        lsa_ext.sq_sums_multi(cs, ps)
    with pytest.raises(exc, match=r"(?is)" + match):
        torch.ops.lsa_ext.sq_sums_multi(cs, ps)
    with pytest.raises(exc, match=r"(?is)" + match):
        torch.ops.lsa_ext.relative_error_multi(cs, ps, 1e-12)
    g = torch.ones(max(len(cs), 1), 2)
    with pytest.raises(exc, match=r"(?is)" + match):
        torch.ops.lsa_ext.sq_sums_multi_backward(g, g, cs, ps)


def test_lists_must_be_sequences_of_tensors():
    with pytest.raises(TypeError, match="cleans must be a list or tuple of tensors, got Tensor"):
        lsa_ext.relative_error_multi(t(2, 3), [t(2, 3)])
    with pytest.raises(TypeError, match="layer 0: perturbed must be a torch.Tensor, got list"):
        lsa_ext.relative_error_multi([t(2, 3)], [[1.0, 2.0]])
    with pytest.raises(TypeError, match="clean must be a torch.Tensor, got ndarray"):
        lsa_ext.relative_error(np.ones((2, 3)), t(2, 3))


@pytest.mark.parametrize("reduction", ["avg", "", None, "MEAN", 0])
def test_unknown_reduction(reduction):
    with pytest.raises(ValueError, match="unknown reduction.*none, mean, sum, batch"):
        lsa_ext.relative_error(t(2, 3), t(2, 3), reduction=reduction)
    with pytest.raises(ValueError, match="unknown reduction"):
        lsa_ext.relative_error_multi([t(2, 3)], [t(2, 3)], reduction=reduction)


@pytest.mark.parametrize(
    ("eps", "exc"),
    [(-1e-3, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
     ("1e-6", TypeError), (True, TypeError), (None, TypeError), (torch.tensor(1e-6), TypeError)],
)
def test_bad_eps(eps, exc):
    with pytest.raises(exc, match="eps must be"):
        lsa_ext.relative_error(t(2, 3), t(2, 3), eps=eps)
    with pytest.raises(exc, match="eps must be"):
        lsa_ext.relative_error_multi([t(2, 3)], [t(2, 3)], eps=eps)


def test_eps_accepts_ints_and_zero():
    a = t(2, 3)
    assert lsa_ext.relative_error(a, a + 1, eps=0).tolist() == [1.0, 1.0]
    assert lsa_ext.relative_error(a * 0, a, eps=2).tolist() == [pytest.approx(3**0.5 / 2)] * 2


def test_backward_op_rejects_wrong_grad_size():
    with pytest.raises(ValueError, match="L \\* B = 2 elements, got 3 and 2"):
        torch.ops.lsa_ext.sq_sums_backward(torch.ones(3), torch.ones(2), t(2, 3), t(2, 3))
