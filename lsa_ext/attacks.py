"""Adversarial attacks: callables ``(x, y) -> x_adv`` in the torchattacks style.

Every attack is built as ``Attack(model, eps, ...)`` and called on a batch: ``x`` float
``[B, *input_shape]``, ``y`` int64 ``[B]``. It returns a detached tensor of ``x``'s shape, dtype
and device. Shared behaviour (class :class:`Attack`):

- dtypes: float16, bfloat16, float32 and float64 inputs (with a model of that dtype). Steps and
  projections are computed in float32 (float64 for float64 inputs); the attack returns points
  of ``x``'s dtype projected exactly (:class:`lsa_ext.budget.Budget`): ``|x̂ − x| ≤ ε`` per
  coordinate (L∞) or ``‖x̂ − x‖₂ ≤ ε`` per sample (L2) and ``lo ≤ x̂ ≤ hi``, evaluated in
  float64, with no rounding slack. The model sees L∞ iterates projected the same way and L2
  iterates cast to ``x``'s dtype and clipped.
- ``output``: how the logits are read from the model's output (:mod:`lsa_ext.outputs`):
  ``None`` (a tensor; a dict's ``"logits"``; an object's ``.logits``), an index, a key or a
  callable. Any other output is one :class:`~lsa_ext.errors.LsaUserError` naming its type.
- Inference mode: an attack called inside ``torch.inference_mode()`` or given inference tensors
  runs on normal copies with inference mode switched off for its duration (gradients need
  autograd) and returns a normal tensor; a model whose *parameters* are inference tensors is
  one :class:`~lsa_ext.errors.LsaUserError`.

- ``clip=(lo, hi)`` keeps the result inside the data range (default ``(0, 1)``, images);
  ``clip=None`` means no data range (two-moons). Inputs outside ``clip`` are a user error.
- ``mode``, the model mode during the attack (:data:`lsa_ext.modules.MODES`): ``"eval"``
  (default: ``model.eval()`` during the attack), ``"train"`` (train mode:
  dropout active, BatchNorm uses and updates batch statistics) or ``"keep"`` (mode untouched).
  Afterwards every submodule's ``training`` flag and every parameter's ``requires_grad`` are
  restored, also when the model raises. Gradients are taken with ``torch.autograd.grad`` on the
  input only, so parameters' ``.grad`` are never touched.
- ``loss``: ``None`` uses :func:`lsa_ext.losses.cross_entropy` (works for 1-logit binary models);
  a user callable ``loss(logits, y) -> Tensor [B]`` (per-sample losses) is accepted too.
- ``seed``: the attack's randomness (random starts) comes from its own ``torch.Generator``
  (CPU, so CPU and GPU runs draw the same noise), created from ``seed`` and advanced on each
  call; the same seed and the same calls give the same results. ``state_dict()`` /
  ``load_state_dict()`` save and restore the generator (resumable training).
- ``eps == 0`` returns a clone of ``x`` without calling the model.

Attacks (defaults and papers in docs/attacks.md): :class:`FGSM` (Goodfellow et al. 2015),
:class:`PGD` (Madry et al. 2018, L∞ and L2), :class:`FAST` (Wong, Rice, Kolter 2020),
:class:`TRADES` (Zhang et al. 2019, inner maximisation), :class:`APGD` (Croce & Hein 2020,
APGD-CE / APGD-DLR). :func:`build_attack` builds one by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lsa_ext.budget import Budget, work_dtype
from lsa_ext.checks import check_bool, check_clip, check_in_clip_range, check_int, check_number
from lsa_ext.errors import LsaTypeError, LsaUserError
from lsa_ext.losses import cross_entropy, kl_div
from lsa_ext.modules import MODES, model_mode
from lsa_ext.outputs import OutputSelector, check_selector, logits_of

__all__ = ["APGD", "ATTACKS", "FAST", "FGSM", "PGD", "TRADES", "Attack", "apgd_checkpoints",
           "build_attack", "dlr_loss", "model_mode"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NORMS = {"linf": "Linf", "inf": "Linf", "l2": "L2"}


def _steps_and_alpha(eps: float, steps: Any, alpha: Any) -> tuple[int, float]:
    """Checked ``steps`` (>= 1) and step size: ``alpha``, or ``2.5 · eps / steps`` when None
    (Madry et al.'s rule of thumb, used by PGD and TRADES)."""
    steps = check_int("steps", steps, minimum=1)
    if alpha is None:
        return steps, 2.5 * eps / steps
    return steps, check_number("alpha", alpha, positive=True)


def _check_norm(norm: Any) -> str:
    key = norm.lower() if isinstance(norm, str) else None
    if key not in NORMS:
        raise LsaUserError(f"norm must be 'Linf' or 'L2', got {norm!r}")
    return NORMS[key]


def _default_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return cross_entropy(logits, y, reduction="none")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference-of-logits-ratio loss (Croce & Hein 2020), per sample ``[B]``; needs K ≥ 3.

    ``DLR = −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e−12)`` with ``z_π`` the sorted logits.
    """
    if logits.dim() != 2 or logits.shape[1] < 3:
        raise LsaUserError(
            f"the DLR loss needs at least 3 classes (logits [B, K>=3]), got {tuple(logits.shape)}"
        )
    srt, _ = logits.sort(dim=1)
    z_y = logits.gather(1, y.view(-1, 1)).squeeze(1)
    top_is_y = logits.argmax(dim=1) == y
    other = torch.where(top_is_y, srt[:, -2], srt[:, -1])
    return -(z_y - other) / (srt[:, -1] - srt[:, -3] + 1e-12)


def _bview(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample ``[B]`` values reshaped to broadcast against ``x`` ``[B, ...]``."""
    return v.view(-1, *([1] * (x.dim() - 1)))


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(p=2, dim=1)


# ----------------------------------------------------------------------------- base class
class Attack:
    """Base class: ``Attack(model, eps, *, clip=(0, 1), mode="eval", loss=None, seed=0,
    output=None)``.

    Subclasses implement :meth:`_perturb` (called with the model already in the attack mode,
    gradients enabled, ``x`` detached in the working dtype and ``eps > 0``) and call the model
    only through :meth:`_loss_grad`, :meth:`_loss_only` or :meth:`_logits_at`.
    """

    name = "attack"
    norm = "Linf"

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        eps: float,
        *,
        clip: tuple[float, float] | None = (0.0, 1.0),
        mode: str = "eval",
        loss: LossFn | None = None,
        seed: int = 0,
        output: OutputSelector = None,
    ) -> None:
        if not callable(model):
            raise LsaUserError(f"model must be callable (an nn.Module), got {type(model).__name__}")
        if mode not in MODES:
            raise LsaUserError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if loss is not None and not callable(loss):
            raise LsaUserError(f"loss must be None or a callable (logits, y) -> [B], got {loss!r}")
        self.model = model
        self.eps = check_number("eps", eps)
        self.clip = check_clip(clip)
        self.mode = mode
        self.loss = loss
        self._loss_fn: LossFn = loss if loss is not None else _default_loss
        self.seed = check_int("seed", seed, minimum=0)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.output = check_selector(output)
        self._budget: Budget | None = None  # set for the length of a call

    # -- public API ---------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial version of ``x`` ``[B, ...]`` (labels ``y`` ``[B]``), detached."""
        x, y = self._check_inputs(x, y)
        if self.eps == 0:
            return x.detach().clone()
        if torch.is_inference_mode_enabled() or x.is_inference() or y.is_inference():
            # gradients need autograd, which inference mode switches off and inference tensors
            # cannot enter: run on normal copies with inference mode off
            with torch.inference_mode(False):
                return self._attack(x.clone(), y.clone())
        return self._attack(x, y)

    def check_num_classes(self, num_classes: int) -> None:
        """Raises :class:`LsaUserError` when the attack cannot run on a model with
        ``num_classes`` classes (e.g. the DLR loss needs 3). Lets callers that know the class
        count (the CLI, from the dataset) reject a spec before any training."""

    def _attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._budget = Budget(x, self.eps, self.norm, self.clip)
        try:
            with model_mode(self.model, self.mode), torch.enable_grad():
                out = self._perturb(x.detach().to(work_dtype(x.dtype)), y)
            return self._budget.project(out)
        except RuntimeError as exc:
            if "inference tensor" in str(exc).lower():
                raise LsaUserError(
                    f"the {self.name} attack needs gradients through the model, but the "
                    "model's parameters are inference tensors (created or loaded under "
                    "torch.inference_mode()); build or load the model outside inference mode"
                ) from None
            raise
        finally:
            self._budget = None

    def state_dict(self) -> dict[str, Any]:
        """The random generator's state (to resume a run with the same random starts)."""
        return {"seed": self.seed, "rng_state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a state from :meth:`state_dict`."""
        self.generator.set_state(state["rng_state"])

    def reseed(self, seed: int) -> None:
        """Restarts the random generator from ``seed``."""
        self.seed = check_int("seed", seed, minimum=0)
        self.generator.manual_seed(self.seed)

    def __repr__(self) -> str:
        """Every setting (report.json's description); loss/output when set, callables by name."""
        params = self._params()
        for key, value in (("loss", self.loss), ("output", self.output)):
            if value is not None and key not in params:
                name = getattr(value, "__name__", type(value).__name__)
                params[key] = name if callable(value) else value
        params["seed"] = self.seed
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in params.items())})"

    # -- helpers for subclasses -------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        return {"eps": self.eps, "clip": self.clip, "mode": self.mode}

    def _perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_inputs(self, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise LsaTypeError("attack inputs x and y must be torch tensors")
        if not x.is_floating_point():
            raise LsaTypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.dim() < 1 or y.shape != (x.shape[0],):
            raise LsaUserError(
                f"y must have shape [B] matching x [B, ...]; got x {tuple(x.shape)}, "
                f"y {tuple(y.shape)}"
            )
        if y.is_floating_point() or y.is_complex():
            raise LsaTypeError(f"y must hold integer class labels, got {y.dtype}")
        check_in_clip_range(x, self.clip)
        return x, y.to(device=x.device, dtype=torch.long)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self._loss_fn(logits, y)
        if loss.shape != (y.shape[0],):
            raise LsaUserError(
                f"the loss must return per-sample values [B]={y.shape[0]}, "
                f"got shape {tuple(loss.shape)}"
            )
        return loss

    def _model_input(self, x_adv: torch.Tensor) -> torch.Tensor:
        """The point the model sees for the iterate ``x_adv`` (working dtype), in the input's
        dtype, detached. L∞: projected exactly (two clamps), so it is the point returned if it
        is the result. L2: cast and clipped only (the exact L2 projection costs a float64 pass
        and a host sync; the iterate is already in the ball up to rounding, and the result
        gets the exact projection)."""
        assert self._budget is not None, "attack helpers run inside Attack.__call__"
        if self._budget.norm == "L2":
            return self._budget.cast(x_adv)
        return self._budget.project(x_adv)

    def _logits_at(self, x_in: torch.Tensor) -> torch.Tensor:
        """The model's logits at a model input (:mod:`lsa_ext.outputs` contract)."""
        return logits_of(self.model(x_in), self.output, batch=x_in.shape[0])

    def _loss_grad(self, x_adv: torch.Tensor, y: torch.Tensor, first: bool = False):
        """Per-sample loss ``[B]`` (detached) and its gradient w.r.t. the model input, both in
        ``x_adv``'s (working) dtype."""
        x_in = self._model_input(x_adv).requires_grad_(True)
        loss = self._loss(self._logits_at(x_in), y)
        if first and not bool(torch.isfinite(loss).all()):
            raise LsaUserError(f"the model produced NaN/Inf loss during the {self.name} attack")
        (grad,) = torch.autograd.grad(loss.sum(), x_in)
        return loss.detach().to(x_adv.dtype), grad.to(x_adv.dtype)

    @torch.no_grad()
    def _loss_only(self, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_in = self._model_input(x_adv)
        return self._loss(self._logits_at(x_in), y).detach().to(x_adv.dtype)

    def _clip(self, x_adv: torch.Tensor) -> torch.Tensor:
        if self.clip is None:
            return x_adv
        return x_adv.clamp(self.clip[0], self.clip[1])

    def _project(self, x_adv: torch.Tensor, x: torch.Tensor, norm: str = "Linf") -> torch.Tensor:
        """Projection onto the ε-ball around ``x`` (per sample), then onto the data range.

        Clamping to the box after the ball keeps the point in the ball (x is in the box), and for
        L∞ the result is the exact projection onto the intersection.
        """
        if norm == "Linf":
            x_adv = torch.minimum(torch.maximum(x_adv, x - self.eps), x + self.eps)
        else:
            delta = x_adv - x
            n = _flat_norm(delta)
            factor = torch.clamp(self.eps / n.clamp_min(1e-12), max=1.0)
            x_adv = x + delta * _bview(factor, x)
        return self._clip(x_adv)

    def _rand(self, x: torch.Tensor, kind: str = "uniform") -> torch.Tensor:
        """Noise of ``x``'s shape from the attack's generator: U[-1, 1] or N(0, 1)."""
        if kind == "uniform":
            t = torch.rand(x.shape, generator=self.generator, dtype=x.dtype) * 2 - 1
        else:
            t = torch.randn(x.shape, generator=self.generator, dtype=x.dtype)
        return t.to(x.device)

    def _step(self, grad: torch.Tensor, norm: str) -> torch.Tensor:
        """Steepest-ascent direction: sign (L∞) or unit-L2 gradient (L2), per sample."""
        if norm == "Linf":
            return grad.sign()
        return grad / _bview(_flat_norm(grad).clamp_min(1e-12), grad)


# ----------------------------------------------------------------------------- FGSM
class FGSM(Attack):
    """Fast Gradient Sign Method (Goodfellow, Shlens, Szegedy 2015).

    ``x_adv = clip(x + eps · sign(∇ₓ loss(x, y)))``. One gradient, no randomness.
    """

    name = "fgsm"

    def __init__(self, model, eps: float, **kw: Any) -> None:
        super().__init__(model, eps, **kw)

    def _perturb(self, x, y):
        _, grad = self._loss_grad(x, y, first=True)
        return self._clip(x + self.eps * grad.sign())


# ----------------------------------------------------------------------------- PGD
class PGD(Attack):
    """Projected Gradient Descent (Madry et al. 2018), L∞ or L2.

    Args:
        eps: radius of the ball (L∞ or L2).
        alpha: step size; default ``2.5 * eps / steps`` (Madry et al.'s rule of thumb).
        steps: number of gradient steps (default 10).
        random_start: start uniformly in the ball (L∞: U[−ε, ε] per coordinate; L2: uniform in
            the L2 ball), clipped to the data range. Default True.
        norm: ``"Linf"`` (sign steps, clamp projection) or ``"L2"`` (steps along the per-sample
            L2-normalised gradient, per-sample projection onto the L2 ball).
        return_best: return per sample the highest-loss point seen (clean input, start and every
            iterate), so the returned loss is never below the clean loss (default True; one extra
            forward). False returns the last iterate, as in Madry et al.'s code.
    """

    name = "pgd"

    def __init__(
        self,
        model,
        eps: float,
        alpha: float | None = None,
        steps: int = 10,
        random_start: bool = True,
        norm: str = "Linf",
        *,
        return_best: bool = True,
        **kw: Any,
    ) -> None:
        super().__init__(model, eps, **kw)
        self.steps, self.alpha = _steps_and_alpha(self.eps, steps, alpha)
        self.norm = _check_norm(norm)
        self.random_start = check_bool("random_start", random_start)
        self.return_best = check_bool("return_best", return_best)

    def _params(self):
        return {**super()._params(), "alpha": self.alpha, "steps": self.steps,
                "random_start": self.random_start, "norm": self.norm,
                "return_best": self.return_best}

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        if not self.random_start:
            return x.clone()
        if self.norm == "Linf":
            return self._clip(x + self.eps * self._rand(x))
        # uniform in the L2 ball: Gaussian direction, radius eps * U^(1/d)
        d = x[0].numel()
        direction = self._rand(x, "normal")
        direction = direction / _bview(_flat_norm(direction).clamp_min(1e-12), x)
        u = torch.rand(x.shape[0], generator=self.generator, dtype=x.dtype).to(x.device)
        return self._clip(x + direction * _bview(self.eps * u.pow(1.0 / d), x))

    def _perturb(self, x, y):
        x_adv = self._start(x)
        best_x = best_loss = None
        if self.return_best and self.random_start:
            best_x, best_loss = x.clone(), self._loss_only(x, y)
        for t in range(self.steps):
            loss, grad = self._loss_grad(x_adv, y, first=t == 0)
            if self.return_best:
                best_x, best_loss = _keep_best(best_x, best_loss, x_adv, loss)
            x_adv = self._project(x_adv + self.alpha * self._step(grad, self.norm), x, self.norm)
        if not self.return_best:
            return x_adv
        best_x, _ = _keep_best(best_x, best_loss, x_adv, self._loss_only(x_adv, y))
        return best_x


def _keep_best(best_x, best_loss, x_new, loss_new):
    """Per-sample running argmax of the loss (ties keep the earlier point)."""
    if best_x is None:
        return x_new.clone(), loss_new.clone()
    better = loss_new > best_loss
    best_x = torch.where(_bview(better, x_new), x_new, best_x)
    return best_x, torch.where(better, loss_new, best_loss)


# ----------------------------------------------------------------------------- FAST
class FAST(Attack):
    """"Fast is better than free" FGSM with random start (Wong, Rice, Kolter 2020).

    ``δ ~ U[−ε, ε]`` (kept inside the data range), one step ``δ ← δ + α·sign(∇)``, projection of
    δ back to ``[−ε, ε]`` and of ``x + δ`` to the data range. ``alpha`` default ``1.25 · eps``
    (the paper's choice).
    """

    name = "fast"

    def __init__(self, model, eps: float, alpha: float | None = None, **kw: Any) -> None:
        super().__init__(model, eps, **kw)
        self.alpha = (
            1.25 * self.eps if alpha is None else check_number("alpha", alpha, positive=True)
        )

    def _params(self):
        return {**super()._params(), "alpha": self.alpha}

    def _perturb(self, x, y):
        x0 = self._clip(x + self.eps * self._rand(x))
        _, grad = self._loss_grad(x0, y, first=True)
        return self._project(x0 + self.alpha * grad.sign(), x)


# ----------------------------------------------------------------------------- TRADES
class TRADES(Attack):
    """TRADES inner maximisation (Zhang et al. 2019): ``max KL(f(x) ‖ f(x'))`` over the L∞ ball.

    Start at ``x + 0.001·N(0, I)`` (projected into the ball and data range), then ``steps`` sign
    steps of size ``alpha`` on the KL divergence between the clean and perturbed predictions
    (:func:`lsa_ext.losses.kl_div`), each followed by projection. Returns the last iterate, as
    the TRADES code does. ``alpha`` default ``2.5 · eps / steps`` (≈ TRADES' CIFAR-10 setting,
    0.007 for ε = 0.031 and 10 steps). ``beta`` (default 6.0, TRADES' CIFAR-10 value) is not used
    by the attack; it is the weight of the KL term in the outer TRADES objective
    ``CE(f(x), y) + β·KL(f(x) ‖ f(x'))`` and is read by training. The labels ``y`` are not used.
    """

    name = "trades"

    def __init__(
        self,
        model,
        eps: float,
        alpha: float | None = None,
        steps: int = 10,
        *,
        beta: float = 6.0,
        **kw: Any,
    ) -> None:
        if kw.get("loss") is not None:
            raise LsaUserError("TRADES maximises the KL divergence; its loss cannot be changed")
        super().__init__(model, eps, **kw)
        self.steps, self.alpha = _steps_and_alpha(self.eps, steps, alpha)
        self.beta = check_number("beta", beta)

    def _params(self):
        return {**super()._params(), "alpha": self.alpha, "steps": self.steps, "beta": self.beta}

    def _perturb(self, x, y):
        with torch.no_grad():
            logits_clean = self._logits_at(self._model_input(x)).detach()
        x_adv = self._project(x + 0.001 * self._rand(x, "normal"), x)
        for t in range(self.steps):
            x_in = self._model_input(x_adv).requires_grad_(True)
            kl = kl_div(self._logits_at(x_in), logits_clean, reduction="none")
            if t == 0 and not bool(torch.isfinite(kl).all()):
                raise LsaUserError("the model produced NaN/Inf during the trades attack")
            (grad,) = torch.autograd.grad(kl.sum(), x_in)
            x_adv = self._project(x_adv + self.alpha * grad.to(x_adv.dtype).sign(), x)
        return x_adv


# ----------------------------------------------------------------------------- APGD
def apgd_checkpoints(steps: int) -> list[int]:
    """APGD checkpoints ``w_j = ceil(p_j · steps)`` (Croce & Hein 2020), ``w_0 = 0``.

    ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)`` while
    ``p_j ≤ 1``; computed exactly in hundredths. Duplicates (small ``steps``) are dropped.
    """
    p_prev, p = 0, 22
    ws = [0]
    while p <= 100:
        w = -(-p * steps // 100)  # ceil
        if w > ws[-1]:
            ws.append(w)
        p_prev, p = p, p + max(p - p_prev - 3, 6)
    return ws


class APGD(Attack):
    """Auto-PGD (Croce & Hein 2020), APGD-CE by default; L∞ or L2.

    Per restart: start (random, as AutoAttack's code: L∞ ``x + ε·t/‖t‖∞`` with ``t ~ U[−1,1]``;
    L2 ``x + ε·t/‖t‖₂`` with ``t ~ N(0, I)``; or ``x`` itself when ``random_start=False``), step
    size ``η = 2ε`` per sample, first step plain, then momentum
    ``x⁽ᵏ⁺¹⁾ = P(x⁽ᵏ⁾ + α(z⁽ᵏ⁺¹⁾ − x⁽ᵏ⁾) + (1 − α)(x⁽ᵏ⁾ − x⁽ᵏ⁻¹⁾))`` with α = 0.75 and
    ``z⁽ᵏ⁺¹⁾ = P(x⁽ᵏ⁾ + η·sign(∇))``. At each checkpoint ``w_j`` (:func:`apgd_checkpoints`) a
    sample's step size is halved and its iterate restarts from its best point when
    (1) the loss increased in fewer than ``rho·(w_j − w_{j−1})`` of the steps since
    ``w_{j−1}``, or (2) its step size was not reduced at ``w_{j−1}`` and its best loss has not
    improved since then. The best (highest-loss) point per sample is tracked over all iterates
    including the start and returned; with several restarts the best over restarts.

    Args:
        eps: ball radius. steps: iterations ``N_iter`` (default 100, the paper's). n_restarts:
        default 1. rho: default 0.75. norm: ``"Linf"`` or ``"L2"``. loss: ``"ce"`` (default),
        ``"dlr"`` (K ≥ 3 classes) or a callable ``(logits, y) -> [B]``. seed: default 0.
    """

    name = "apgd"

    def __init__(
        self,
        model,
        eps: float,
        steps: int = 100,
        n_restarts: int = 1,
        rho: float = 0.75,
        norm: str = "Linf",
        loss: str | LossFn = "ce",
        seed: int = 0,
        *,
        random_start: bool = True,
        momentum: float = 0.75,
        **kw: Any,
    ) -> None:
        if loss == "ce" or loss is None:
            loss_fn = None
        elif loss == "dlr":
            loss_fn = dlr_loss
        elif callable(loss):
            loss_fn = loss
        else:
            raise LsaUserError(f"APGD loss must be 'ce', 'dlr' or a callable, got {loss!r}")
        super().__init__(model, eps, loss=loss_fn, seed=seed, **kw)
        self.loss_name = loss if isinstance(loss, str) else "callable"
        self.steps = check_int("steps", steps, minimum=1)
        self.n_restarts = check_int("n_restarts", n_restarts, minimum=1)
        self.rho = check_number("rho", rho, positive=True)
        if self.rho > 1:
            raise LsaUserError(f"rho must be in (0, 1], got {rho}")
        self.momentum = check_number("momentum", momentum, positive=True)
        if self.momentum > 1:
            raise LsaUserError(f"momentum must be in (0, 1], got {momentum}")
        self.norm = _check_norm(norm)
        self.random_start = check_bool("random_start", random_start)
        self.checkpoints = apgd_checkpoints(self.steps)

    def _params(self):
        return {**super()._params(), "steps": self.steps, "n_restarts": self.n_restarts,
                "rho": self.rho, "norm": self.norm, "loss": self.loss_name,
                "random_start": self.random_start, "momentum": self.momentum}

    def check_num_classes(self, num_classes: int) -> None:
        """The DLR loss needs at least 3 classes (:func:`dlr_loss`)."""
        if self.loss_name == "dlr" and num_classes < 3:
            raise LsaUserError(
                f"the DLR loss of APGD needs at least 3 classes; the data has {num_classes} "
                "(use loss=ce)"
            )

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        if not self.random_start:
            return x.clone()
        if self.norm == "Linf":
            t = self._rand(x)
            t = t / _bview(t.flatten(1).abs().amax(dim=1).clamp_min(1e-12), x)
        else:
            t = self._rand(x, "normal")
            t = t / _bview(_flat_norm(t).clamp_min(1e-12), x)
        return self._clip(x + self.eps * t)

    def _perturb(self, x, y):
        best_x = best_loss = None
        for _ in range(self.n_restarts):
            bx, bl = self._run(x, y, self._start(x))
            if best_x is None:
                best_x, best_loss = bx, bl
            else:
                best_x, best_loss = _keep_best(best_x, best_loss, bx, bl)
        return best_x

    def _run(self, x: torch.Tensor, y: torch.Tensor, x_k: torch.Tensor):
        """One APGD run from ``x_k``; returns the best point ``[B, ...]`` and its loss ``[B]``."""
        n = x.shape[0]
        checks = set(self.checkpoints[1:])
        loss_k, grad = self._loss_grad(x_k, y, first=True)
        hist = [loss_k]  # hist[i] = f(x^(i)) per sample
        best_x, best_loss, best_grad = x_k.clone(), loss_k.clone(), grad.clone()
        eta = torch.full((n,), 2.0 * self.eps, dtype=x.dtype, device=x.device)
        x_prev = x_k
        w_prev = 0
        best_at_last_check = best_loss.clone()
        reduced_last = torch.zeros(n, dtype=torch.bool, device=x.device)
        for k in range(self.steps):
            z = self._project(x_k + _bview(eta, x) * self._step(grad, self.norm), x, self.norm)
            a = 1.0 if k == 0 else self.momentum
            x_new = self._project(x_k + a * (z - x_k) + (1 - a) * (x_k - x_prev), x, self.norm)
            x_prev, x_k = x_k, x_new
            loss_k, grad = self._loss_grad(x_k, y)
            hist.append(loss_k)
            better = loss_k > best_loss
            bb = _bview(better, x)
            best_x = torch.where(bb, x_k, best_x)
            best_grad = torch.where(bb, grad, best_grad)
            best_loss = torch.where(better, loss_k, best_loss)
            w = k + 1
            if w in checks:
                increases = torch.zeros(n, dtype=x.dtype, device=x.device)
                for i in range(w_prev, w):
                    increases += (hist[i + 1] > hist[i]).to(x.dtype)
                cond1 = increases < self.rho * (w - w_prev)
                cond2 = (~reduced_last) & (best_loss <= best_at_last_check)
                reduce = cond1 | cond2
                eta = torch.where(reduce, eta / 2, eta)
                rb = _bview(reduce, x)
                x_k = torch.where(rb, best_x, x_k)
                grad = torch.where(rb, best_grad, grad)
                reduced_last = reduce
                best_at_last_check = best_loss.clone()
                w_prev = w
        return best_x, best_loss


# ----------------------------------------------------------------------------- registry
ATTACKS: dict[str, type[Attack]] = {
    "fgsm": FGSM,
    "pgd": PGD,
    "fast": FAST,
    "trades": TRADES,
    "apgd": APGD,
}


def build_attack(name: str, model, eps: float, **kw: Any) -> Attack:
    """Builds the attack called ``name`` (one of :data:`ATTACKS`, case-insensitive).

    Raises:
        LsaUserError: unknown name, ``eps < 0`` or a bad / unknown parameter.
    """
    key = name.lower().strip() if isinstance(name, str) else None
    if key not in ATTACKS:
        raise LsaUserError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    try:
        return ATTACKS[key](model, eps, **kw)
    except LsaUserError:
        raise
    except TypeError as exc:
        raise LsaUserError(f"bad parameters for attack {key!r}: {exc}") from None
