"""Classification losses that treat one-logit (binary) and K-logit models alike.

A model with output ``[B, 1]`` or ``[B]`` (e.g. Model A on two-moons, Table 1 of
Khalooei et al., arXiv 2202.02626) is read
as a binary classifier with logit ``z``: class 1 has probability ``sigmoid(z)``. Every function
here maps such outputs to two-class log-probabilities ``[log sigmoid(-z), log sigmoid(z)]``, so
attacks, training and evaluation need no special case.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` log-probabilities from ``[B, K]`` logits (K ≥ 2) or ``[B, 1]`` / ``[B]``."""
    if logits.dim() == 1:
        logits = logits.unsqueeze(1)
    if logits.shape[-1] == 1:
        return torch.cat([F.logsigmoid(-logits), F.logsigmoid(logits)], dim=-1)
    return F.log_softmax(logits, dim=-1)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of integer labels ``y`` ``[B]`` (int64) under :func:`log_probs`."""
    return F.nll_loss(log_probs(logits), y.long(), reduction=reduction)


def predict(logits: torch.Tensor) -> torch.Tensor:
    """Predicted class ``[B]`` (int64)."""
    return log_probs(logits).argmax(dim=-1)


def kl_div(logits_adv: torch.Tensor, logits_clean: torch.Tensor, reduction: str = "batchmean"):
    """TRADES' ``KL(p_clean || p_adv)`` over classes; ``"batchmean"``, ``"sum"`` or ``"none"``."""
    lp_adv, lp_clean = log_probs(logits_adv), log_probs(logits_clean)
    per = (lp_clean.exp() * (lp_clean - lp_adv)).sum(dim=-1)
    if reduction == "none":
        return per
    if reduction == "batchmean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    raise ValueError(f"unknown reduction {reduction!r}")
