"""Gradient-masking checks: signs that an FGSM-only robustness number is not to be trusted.

A model can look robust under FGSM because its gradient is useless (zero, noisy, pointing away
from the nearest error) rather than because no nearby input is misclassified — *gradient
masking* (Papernot et al. 2017; Athalye, Carlini & Wagner, ICML 2018, "Obfuscated gradients",
whose §3.1 lists these symptoms). The paper's R&G score (Khalooei et al., arXiv 2202.02626) is
FGSM only and cannot tell. From the accuracies (%) of one model at the same ε grid under FGSM,
under PGD (several steps from a random start) and under random sign noise of the same size
(``x + ε·s``, ``s`` uniform on ``{−1, +1}^d``: FGSM's step with a random direction), these
flags are raised:

* ``fgsm_nonmonotone``: FGSM accuracy *rises* from one ε of the grid to the next larger one.
  A larger step along the same direction helping the model means the gradient does not point
  towards the errors.
* ``pgd_above_fgsm``: the iterative attack, which starts at a random point and takes many
  steps, does worse than a single gradient step.
* ``fgsm_above_noise`` / ``pgd_above_noise``: the attack does worse than random noise of the
  same L∞ size — the gradient is less informative than no gradient at all.

A flag fires when the difference exceeds ``tol`` percentage points (default
:data:`DEFAULT_TOL` = 0.5: on 1000 test points, more than 5 samples), so a plain model's
sampling noise does not raise it. The noise is one random draw; a flag is a reason to look
closer (stronger attacks, more restarts, gradient-free attacks), not a proof.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lsa_ext.checks import check_number

__all__ = ["DEFAULT_TOL", "FLAGS", "MaskingFlag", "format_flags", "masking_flags"]

#: Tolerance in percentage points before a check fires.
DEFAULT_TOL = 0.5

#: The flags, in the order they are reported.
FLAGS: tuple[str, ...] = ("fgsm_nonmonotone", "pgd_above_fgsm", "fgsm_above_noise",
                          "pgd_above_noise")


@dataclass(frozen=True)
class MaskingFlag:
    """One raised flag: its name (one of :data:`FLAGS`) and the ε values where it fired."""

    name: str
    eps: tuple[float, ...]

    def __str__(self) -> str:
        return f"{self.name}@{','.join(f'{e:g}' for e in self.eps)}"

    def to_dict(self) -> dict[str, object]:
        return {"flag": self.name, "eps": list(self.eps)}


def _above(a: Mapping[float, float], b: Mapping[float, float], tol: float) -> tuple[float, ...]:
    """The ε > 0 present in both where ``a[ε] > b[ε] + tol``, ascending."""
    return tuple(e for e in sorted(set(a) & set(b)) if e > 0 and a[e] > b[e] + tol)


def masking_flags(
    fgsm: Mapping[float, float],
    pgd: Mapping[float, float] | None = None,
    noise: Mapping[float, float] | None = None,
    tol: float = DEFAULT_TOL,
) -> list[MaskingFlag]:
    """The masking flags raised by one model's accuracies (see the module docstring).

    Args:
        fgsm: ``{ε: FGSM accuracy %}`` over the grid (ε = 0 is clean accuracy).
        pgd: ``{ε: PGD accuracy %}`` at (some of) the same ε, or None (checks skipped).
        noise: ``{ε: accuracy % under random sign noise ±ε}``, or None (checks skipped).
        tol: percentage points a difference must exceed (≥ 0).

    Returns:
        The raised flags in :data:`FLAGS` order (empty: none), each with the ε where it fired
        (for ``fgsm_nonmonotone``: the larger ε of each rising step).

    Raises:
        LsaUserError: ``tol`` is negative or not a finite number.
    """
    tol = check_number("tol", tol)
    out: list[MaskingFlag] = []
    grid = sorted(fgsm)
    rising = tuple(hi for lo, hi in zip(grid, grid[1:], strict=False)
                   if fgsm[hi] > fgsm[lo] + tol)
    found = {"fgsm_nonmonotone": rising}
    if pgd:
        found["pgd_above_fgsm"] = _above(pgd, fgsm, tol)
    if noise:
        found["fgsm_above_noise"] = _above(fgsm, noise, tol)
        if pgd:
            found["pgd_above_noise"] = _above(pgd, noise, tol)
    for name in FLAGS:
        if found.get(name):
            out.append(MaskingFlag(name, found[name]))
    return out


def format_flags(flags: Iterable[MaskingFlag | str]) -> str:
    """``"fgsm_nonmonotone;pgd_above_fgsm"`` (names only, ``;``-separated; ``""`` for none)."""
    return ";".join(f.name if isinstance(f, MaskingFlag) else str(f) for f in flags)
