"""Tests for lsa_ext.seeding: per-batch seeds independent of sharding, scoped global RNG.

(Moved from tests/test_distributed.py with the seeding helpers' move to lsa_ext.seeding.)
"""

from __future__ import annotations

import torch

from lsa_ext.seeding import batch_seed, batch_seeding, reseed, rng_scope


class _Noise:
    """Draws from a private generator (like lsa_ext noises/attacks) and can be reseeded."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.g = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self.g.manual_seed(seed)

    def __call__(self, x, y):
        return x + torch.randn(x.shape, generator=self.g)


def test_reseed_for_batch_makes_noise_independent_of_sharding():
    x = torch.zeros(12, 3)
    batches = list(torch.split(x, 4))

    def run(order, own_seed=0):  # perturb the batches with the given indices, in that order
        perts = {"a": _Noise(own_seed), "b": _Noise(1),
                 "global": lambda x, y: x + torch.rand(x.shape)}
        out = {}
        with batch_seeding(perts, seed=5) as reseed_batch:
            for k in order:
                reseed_batch(k)
                out[k] = [p(batches[k], None) for p in perts.values()]
        assert perts["a"].seed == own_seed  # own seeds restored on exit
        return out

    one = run([0, 1, 2])
    shard0, shard1 = run([0, 2]), run([1])  # 2 ranks, batches dealt round-robin
    for k, got in {**shard0, **shard1}.items():
        for a, b in zip(got, one[k], strict=True):
            assert torch.equal(a, b)
    assert not torch.equal(one[0][0], one[1][0])  # different batches, different noise
    assert not torch.equal(run([0], own_seed=9)[0][0], one[0][0])  # the object's seed counts
    assert reseed(object(), 1) is False


def test_batch_seed_and_rng_scope_are_deterministic_and_restore_state():
    assert batch_seed(1, 2) == batch_seed(1, 2)
    assert len({batch_seed(1, k) for k in range(100)}) == 100
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with rng_scope(42):
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    with rng_scope(42):
        assert torch.equal(torch.rand(3), a)
