"""Statistical perturbations: callables ``(x, y) -> x̂`` like the attacks in :mod:`lsa_ext.attacks`.

Every noise takes ``clip`` (the data range, e.g. ``(0.0, 1.0)`` for images; ``None`` for
unbounded data such as two-moons) and ``seed``:

* ``seed=None`` draws from PyTorch's global RNG (seed it with ``torch.manual_seed``);
* ``seed=int`` draws from a private ``torch.Generator`` created on first use on the input's device,
  so a fresh object with the same seed yields the same sequence of perturbations on that device.

Defaults follow ``skimage.util.random_noise``: Gaussian and speckle std 0.1 (variance 0.01),
salt/pepper ``amount`` 0.05 (fraction of elements replaced), ``salt_vs_pepper`` 0.5.

Salt sets the chosen elements to the top of the range, pepper to the bottom: ``clip[1]`` and
``clip[0]``, or, when ``clip is None``, the per-feature maximum and minimum over the batch
(``x.amax(0)`` / ``x.amin(0)``), the extremes actually observed in the data. Elements are chosen
independently (every channel of a pixel on its own, as ``random_noise`` does).

All outputs are detached, float tensors of ``x``'s shape, dtype and device; ``y`` is ignored.
"""

from __future__ import annotations

import torch

from lsa_ext.checks import Clip, check_clip, check_number
from lsa_ext.errors import LsaUserError


def _check_fraction(value: object, what: str) -> float:
    v = check_number(what, value)
    if v > 1:
        raise LsaUserError(f"{what} must be in [0, 1], got {value}")
    return v


class _Noise:
    """Base: seeded generator per device, clipping, input checks."""

    def __init__(self, clip: Clip = (0.0, 1.0), seed: int | None = None) -> None:
        self.clip = check_clip(clip)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise LsaUserError(f"seed must be an int or None, got {seed!r}")
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def reseed(self, seed: int) -> None:
        """Restarts the noise stream from ``seed`` (like the attacks' ``reseed``)."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise LsaUserError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self._generators = {}

    def _gen(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        g = self._generators.get(device)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[device] = g
        return g

    def _randn(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=self._gen(x.device))

    def _rand(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=self._gen(x.device))

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip is not None:
            x = x.clamp(self.clip[0], self.clip[1])
        return x.detach()

    def _extremes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high) values for pepper/salt, broadcastable to ``x``."""
        if self.clip is not None:
            return (torch.tensor(self.clip[0], dtype=x.dtype, device=x.device),
                    torch.tensor(self.clip[1], dtype=x.dtype, device=x.device))
        return x.amin(dim=0, keepdim=True), x.amax(dim=0, keepdim=True)

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise LsaUserError("noise input x must be a floating point torch.Tensor")
        with torch.no_grad():
            return self._finish(self._apply(x.detach()))

    def _apply(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _params(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._params()}, clip={self.clip}, seed={self.seed})"


class _StdNoise(_Noise):
    """A noise with one parameter ``std`` (default 0.1), >= 0."""

    def __init__(self, std: float = 0.1, clip: Clip = (0.0, 1.0), seed: int | None = None):
        super().__init__(clip, seed)
        self.std = check_number("std", std)

    def _params(self) -> str:
        return f"std={self.std}"


class Gaussian(_StdNoise):
    """Additive Gaussian noise: ``x̂ = clip(x + std·n)``, ``n ~ N(0, 1)`` elementwise.

    Args:
        std: standard deviation (default 0.1, i.e. variance 0.01), >= 0.
    """

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.std * self._randn(x)


class Speckle(_StdNoise):
    """Multiplicative noise: ``x̂ = clip(x + x·std·n)``, ``n ~ N(0, 1)`` elementwise.

    Args:
        std: standard deviation of the multiplier (default 0.1), >= 0.
    """

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return x + x * (self.std * self._randn(x))


class SaltPepper(_Noise):
    """Replaces a fraction ``amount`` of elements: a share ``salt_vs_pepper`` of them by the high
    value (salt), the rest by the low value (pepper). See the module docstring for the values.

    Args:
        amount: fraction of elements replaced, in [0, 1] (default 0.05).
        salt_vs_pepper: share of salt among the replaced elements, in [0, 1] (default 0.5).
    """

    def __init__(
        self,
        amount: float = 0.05,
        salt_vs_pepper: float = 0.5,
        clip: Clip = (0.0, 1.0),
        seed: int | None = None,
    ):
        super().__init__(clip, seed)
        self.amount = _check_fraction(amount, "amount")
        self.salt_vs_pepper = _check_fraction(salt_vs_pepper, "salt_vs_pepper")

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        u = self._rand(x)
        lo, hi = self._extremes(x)
        salt_cut = self.amount * self.salt_vs_pepper
        out = torch.where(u < salt_cut, hi, x)
        return torch.where((u >= salt_cut) & (u < self.amount), lo, out)

    def _params(self) -> str:
        return f"amount={self.amount}, salt_vs_pepper={self.salt_vs_pepper}"


class _OneSided(SaltPepper):
    """Salt-and-pepper noise with a fixed ``salt_vs_pepper`` (1: salt only, 0: pepper only)."""

    _salt_vs_pepper: float

    def __init__(self, amount: float = 0.05, clip: Clip = (0.0, 1.0), seed: int | None = None):
        super().__init__(amount, self._salt_vs_pepper, clip, seed)

    def _params(self) -> str:
        return f"amount={self.amount}"


class Salt(_OneSided):
    """Salt noise: a fraction ``amount`` (default 0.05) of elements set to the high value."""

    _salt_vs_pepper = 1.0


class Pepper(_OneSided):
    """Pepper noise: a fraction ``amount`` (default 0.05) of elements set to the low value."""

    _salt_vs_pepper = 0.0


NOISES: dict[str, type[_Noise]] = {
    "gaussian": Gaussian,
    "salt": Salt,
    "pepper": Pepper,
    "salt_pepper": SaltPepper,
    "speckle": Speckle,
}
