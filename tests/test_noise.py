import numpy as np
import pytest
import torch

from lsa_ext.errors import LsaUserError
from lsa_ext.noise import NOISES, Gaussian, Pepper, Salt, SaltPepper, Speckle


def _x(shape=(64, 3, 16, 16), seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_gaussian_statistics_and_clip():
    x = torch.full((200, 1, 20, 20), 0.5)
    out = Gaussian(std=0.1, seed=1)(x, None)
    d = (out - x).double()
    assert abs(d.mean().item()) < 3e-3
    assert d.std().item() == pytest.approx(0.1, rel=0.02)
    assert out.shape == x.shape and out.dtype == x.dtype and not out.requires_grad
    out = Gaussian(std=1.0, clip=(0.0, 1.0), seed=1)(x, None)
    assert out.min() >= 0 and out.max() <= 1 and (out == 0).any() and (out == 1).any()
    # no clip: values leave the range
    out = Gaussian(std=1.0, clip=None, seed=1)(x, None)
    assert out.min() < 0 and out.max() > 1


def test_speckle_is_multiplicative():
    x = _x()
    x[0] = 0  # zero inputs stay zero under speckle
    out = Speckle(std=0.2, clip=None, seed=3)(x, None)
    assert torch.equal(out[0], x[0])
    ratio = ((out[1:] - x[1:]) / x[1:]).double()
    assert ratio.std().item() == pytest.approx(0.2, rel=0.03)


@pytest.mark.parametrize("amount", [0.05, 0.3])
def test_salt_pepper_fractions_and_values(amount):
    x = _x() * 0.5 + 0.25  # in (0.25, 0.75): never equal to 0 or 1 by chance
    out = SaltPepper(amount=amount, salt_vs_pepper=0.25, seed=0)(x, None)
    n = x.numel()
    salt = (out == 1.0).sum().item() / n
    pepper = (out == 0.0).sum().item() / n
    assert salt == pytest.approx(amount * 0.25, abs=4 * np.sqrt(amount * 0.25 / n))
    assert pepper == pytest.approx(amount * 0.75, abs=4 * np.sqrt(amount * 0.75 / n))
    untouched = (out != 0) & (out != 1)
    assert torch.equal(out[untouched], x[untouched])
    s = Salt(amount=amount, seed=0)(x, None)
    assert (s == 0).sum() == 0 and (s == 1).sum().item() / n == pytest.approx(amount, abs=0.01)
    p = Pepper(amount=amount, seed=0)(x, None)
    assert (p == 1).sum() == 0 and (p == 0).sum().item() / n == pytest.approx(amount, abs=0.01)


def test_salt_pepper_without_clip_uses_batch_feature_extremes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 2, generator=g) * torch.tensor([1.0, 5.0])
    out = Salt(amount=0.5, clip=None, seed=0)(x, None)
    changed = out != x
    hi = x.max(dim=0).values
    for j in range(2):
        assert torch.all(out[changed[:, j], j] == hi[j])
    out = Pepper(amount=0.5, clip=None, seed=0)(x, None)
    changed = out != x
    lo = x.min(dim=0).values
    for j in range(2):
        assert torch.all(out[changed[:, j], j] == lo[j])


@pytest.mark.parametrize("name", list(NOISES))
def test_seed_reproducible_and_stream_advances(name):
    x = _x((8, 3, 5, 5))
    a, b = NOISES[name](seed=7), NOISES[name](seed=7)
    first = a(x, None)
    assert torch.equal(first, b(x, None))
    assert not torch.equal(first, a(x, None))  # next draw differs
    assert not torch.equal(first, NOISES[name](seed=8)(x, None))
    torch.manual_seed(5)
    g1 = NOISES[name]()(x, None)
    torch.manual_seed(5)
    assert torch.equal(g1, NOISES[name]()(x, None))  # seed=None follows the global RNG


def test_bad_parameters():
    with pytest.raises(LsaUserError, match="std"):
        Gaussian(std=-1)
    with pytest.raises(LsaUserError, match="amount"):
        Salt(amount=1.5)
    with pytest.raises(LsaUserError, match="salt_vs_pepper"):
        SaltPepper(salt_vs_pepper=-0.1)
    with pytest.raises(LsaUserError, match="clip"):
        Gaussian(clip=(1.0, 0.0))
    with pytest.raises(LsaUserError, match="floating"):
        Gaussian()(torch.zeros(2, 2, dtype=torch.long), None)
