import numpy as np
import pytest
import torch

from lsa_ext.errors import LsaUserError
from lsa_ext.measures import MEASURES, Measure, get_measure


def _pair(seed=0, shape=(6, 3, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    b = a + 0.3 * torch.randn(shape, generator=g)
    return a, b


def _numpy_reference(name, a, b):
    A = a.double().numpy().reshape(a.shape[0], -1)
    B = b.double().numpy().reshape(b.shape[0], -1)
    if name == "relative_error":
        return np.linalg.norm(A - B, axis=1) / np.linalg.norm(A, axis=1)
    if name == "mse":
        return ((A - B) ** 2).mean(axis=1)
    if name == "cosine":
        return 1 - (A * B).sum(1) / (np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1))
    if name == "relative_linf":
        return np.abs(A - B).max(1) / np.abs(A).max(1)
    raise AssertionError(name)


@pytest.mark.parametrize("name", list(MEASURES))
def test_measures_match_numpy(name):
    a, b = _pair()
    got = get_measure(name)(a, b)
    assert got.shape == (6,) and got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), _numpy_reference(name, a, b), rtol=2e-5)
    got64 = get_measure(name)(a.double(), b.double())
    assert got64.dtype == torch.float64
    np.testing.assert_allclose(got64.numpy(), _numpy_reference(name, a, b), rtol=1e-12)


def test_channels_last_and_zero_guard():
    a, b = _pair(1)
    cl = get_measure("relative_error")(
        a.to(memory_format=torch.channels_last), b.to(memory_format=torch.channels_last)
    )
    np.testing.assert_allclose(cl.numpy(), _numpy_reference("relative_error", a, b), rtol=2e-5)
    z = torch.zeros(2, 3)
    for name in MEASURES:
        v = get_measure(name)(z, z)
        assert torch.isfinite(v).all(), name
    assert get_measure("relative_linf")(z, torch.ones(2, 3)).min() > 1e11


def test_registry_and_custom():
    assert get_measure("relative_error") is MEASURES["relative_error"]

    def l1(a, b):
        return (a - b).abs().flatten(1).sum(1)

    m = get_measure(l1)
    assert isinstance(m, Measure) and m.name == "l1"
    a, b = _pair()
    torch.testing.assert_close(m(a, b), (a - b).abs().flatten(1).sum(1))
    assert get_measure(m) is m
    with pytest.raises(LsaUserError, match="relative_error, mse, cosine, relative_linf"):
        get_measure("l2")
    with pytest.raises(TypeError):
        get_measure(3)
