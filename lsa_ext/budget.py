"""The exact final projection of an attack: onto the ε-ball around ``x`` and the data range, in
the dtype ``x`` is stored in.

Attacks compute their steps and projections in a working dtype (:func:`work_dtype`: float32,
or float64 for float64 inputs). Casting the result back to float16 or bfloat16 rounds each
coordinate to the nearest representable value, which can lie up to half a unit in the last
place outside the ball (bfloat16 at 0.9: 0.002, 6 % of ε = 8/255) or the clip range; and even in
float64 ``x + ε`` rounds. :class:`Budget` removes both: its :meth:`~Budget.project` returns a
tensor of ``x``'s dtype for which, evaluated in float64,

- L∞: ``|x̂_i − x_i| ≤ ε`` for every coordinate,
- L2: ``‖x̂_b − x_b‖₂ ≤ ε`` for every sample ``b``,
- ``lo ≤ x̂_i ≤ hi`` for ``clip=(lo, hi)``,

exactly: the bounds ``x ± ε`` and ``lo``/``hi`` are rounded to the storage dtype and stepped one
representable value towards ``x`` (``torch.nextafter``) wherever rounding put them outside (the
check is exact for float16/bfloat16/float32, whose differences are exact in float64, and is the
float64 arithmetic a user's own check does for float64); L2 coordinates are rounded towards
``x``, so no coordinate moves further than the float64 projection asked for.
"""

from __future__ import annotations

import torch

from lsa_ext.checks import Clip

__all__ = ["Budget", "work_dtype"]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype attacks compute in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Budget:
    """Exact projection onto ``{x̂ : ‖x̂ − x‖ ≤ eps} ∩ [lo, hi]`` in ``x``'s dtype.

    Args:
        x: the clean batch ``[B, ...]`` in its storage dtype (float16, bfloat16, float32 or
            float64); it must lie inside ``clip``.
        eps: radius (≥ 0, input units).
        norm: ``"Linf"`` or ``"L2"``.
        clip: ``(lo, hi)`` or None (no data range).
    """

    def __init__(self, x: torch.Tensor, eps: float, norm: str, clip: Clip) -> None:
        self.x = x.detach()
        self.eps = float(eps)
        self.norm = norm
        self.dtype = x.dtype
        self._xd = self.x.to(torch.float64)
        self._clip = None if clip is None else self._clip_bounds(clip)
        self._lo = self._hi = None
        if norm == "Linf":
            self._lo, self._hi = self._ball_bounds()

    # -- bounds ---------------------------------------------------------------------------------
    def _clip_bounds(self, clip: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """``lo``/``hi`` in the storage dtype, rounded into ``[lo, hi]``."""
        lo = torch.tensor(clip[0], dtype=torch.float64, device=self.x.device)
        hi = torch.tensor(clip[1], dtype=torch.float64, device=self.x.device)
        lo_s, hi_s = lo.to(self.dtype), hi.to(self.dtype)
        lo_s = torch.where(lo_s.double() < lo, torch.nextafter(lo_s, hi_s), lo_s)
        hi_s = torch.where(hi_s.double() > hi, torch.nextafter(hi_s, lo_s), hi_s)
        return lo_s, hi_s

    def _ball_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``x ± eps`` in the storage dtype, each within ``eps`` of ``x`` (float64 check)."""
        xd, eps, x = self._xd, self.eps, self.x
        lo = (xd - eps).to(self.dtype)
        hi = (xd + eps).to(self.dtype)
        for _ in range(4):  # one step suffices in practice; float64 may need a second
            lo_out = (xd - lo.double()) > eps
            hi_out = (hi.double() - xd) > eps
            if not bool(lo_out.any() or hi_out.any()):
                break
            lo = torch.where(lo_out, torch.nextafter(lo, x), lo)
            hi = torch.where(hi_out, torch.nextafter(hi, x), hi)
        if self._clip is not None:
            lo = torch.maximum(lo, self._clip[0])
            hi = torch.minimum(hi, self._clip[1])
        return lo, hi

    # -- projection -------------------------------------------------------------------------------
    @torch.no_grad()
    def project(self, x_adv: torch.Tensor) -> torch.Tensor:
        """``x_adv`` (any float dtype, ``x``'s shape) projected exactly, in ``x``'s dtype,
        detached."""
        if self.norm == "Linf":
            out = x_adv.detach().to(self.dtype)
            return torch.minimum(torch.maximum(out, self._lo), self._hi)
        return self._project_l2(x_adv.detach())

    @torch.no_grad()
    def cast(self, x_adv: torch.Tensor) -> torch.Tensor:
        """``x_adv`` in ``x``'s dtype, clamped into the clip range (exact), detached: the cheap
        projection for iterates already projected onto the ball in a wider dtype (the ball
        may be exceeded by rounding; :meth:`project` is exact)."""
        out = x_adv.detach().to(self.dtype)
        if self._clip is not None:
            out = torch.minimum(torch.maximum(out, self._clip[0]), self._clip[1])
        return out

    def _project_l2(self, x_adv: torch.Tensor) -> torch.Tensor:
        xd = self._xd
        delta = x_adv.to(torch.float64) - xd
        shape = (-1,) + (1,) * (xd.dim() - 1)
        n = delta.flatten(1).norm(dim=1)
        delta = delta * (self.eps / n.clamp_min(1e-300)).clamp(max=1.0).view(shape)
        out = self._round_toward_x(xd + delta)
        for _ in range(8):  # float64 rounding of the norm: shrink the few samples still over
            n_out = (out.double() - xd).flatten(1).norm(dim=1)
            over = n_out > self.eps
            if not bool(over.any()):
                break
            delta = torch.where(over.view(shape), delta * (1 - 2.0 ** -40), delta)
            out = self._round_toward_x(xd + delta)
        return out

    def _round_toward_x(self, target: torch.Tensor) -> torch.Tensor:
        """``target`` (float64) in the storage dtype, each coordinate rounded towards ``x``
        (never further from ``x`` than ``target``), then clamped into the clip range."""
        out = target.to(self.dtype)
        further = (out.double() - self._xd).abs() > (target - self._xd).abs()
        out = torch.where(further, torch.nextafter(out, self.x), out)
        if self._clip is not None:  # towards the box: never further from x (x is inside)
            out = torch.minimum(torch.maximum(out, self._clip[0]), self._clip[1])
        return out
