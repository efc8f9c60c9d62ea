import torch

import lsa_ext
from lsa_ext import reference


def test_relative_error_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 3, 5, 5, generator=g)
    b = a + 0.3 * torch.randn(a.shape, generator=g)
    got = lsa_ext.relative_error(a, b)
    want = reference.relative_error(a.double(), b.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
