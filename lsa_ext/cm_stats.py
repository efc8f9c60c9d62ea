"""Sufficient statistics of per-sample CM values per (perturbation, layer): count, Σ, Σ².

The comparison measure (CM) of Khalooei et al., arXiv 2202.02626, §3 (Eq. 2), is computed per
sample at every probed layer; Algorithm 1 (§3, :mod:`lsa_ext.mvl`) only needs each layer's count,
sum and sum of squares, so analysis streams any number of samples in constant memory and ranks
merge by adding tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lsa_ext.errors import LsaUserError


@dataclass
class CMStats:
    """Sufficient statistics of per-sample CM values, per (perturbation, layer).

    Attributes:
        count, sum, sumsq: float64 tensors ``[P, L]`` (number of samples, Σ CM, Σ CM²), on the
            device where they were accumulated.
        correct: float64 ``[P+1]`` or None: correctly classified samples, clean (index 0) and
            under each perturbation (index p+1); NaN when the model's output is not logits.

    Merging shards is elementwise addition: ``torch.distributed.all_reduce(t, op=SUM)`` on each
    tensor of :meth:`tensors` merges ranks.
    """

    count: torch.Tensor
    sum: torch.Tensor
    sumsq: torch.Tensor
    correct: torch.Tensor | None = None

    @classmethod
    def zeros(cls, num_perturbations: int, num_layers: int, device=None) -> CMStats:
        """All-zero statistics ``[P, L]`` (float64), ``correct`` ``[P+1]`` zeros."""
        z = torch.zeros(num_perturbations, num_layers, dtype=torch.float64, device=device)
        c = torch.zeros(num_perturbations + 1, dtype=torch.float64, device=device)
        return cls(z.clone(), z.clone(), z.clone(), c)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors to sum across shards/ranks (in place), e.g. with ``all_reduce``."""
        out = [self.count, self.sum, self.sumsq]
        return out if self.correct is None else out + [self.correct]

    def update_correct(self, preds: torch.Tensor | None, y: torch.Tensor) -> None:
        """Adds correct predictions ``preds`` ``[P+1, B]`` vs labels ``y`` ``[B]`` (None: NaN)."""
        if self.correct is None:
            return
        if preds is None:
            self.correct.fill_(float("nan"))
            return
        hits = (preds == y.to(preds.device).unsqueeze(0)).sum(dim=1)
        self.correct += hits.to(device=self.correct.device, dtype=torch.float64)

    def update(self, p: int, values: torch.Tensor) -> None:
        """Adds per-sample values ``[L, B]`` of perturbation ``p``."""
        v = values.detach().to(device=self.sum.device, dtype=torch.float64)
        self.count[p] += v.shape[1]
        self.sum[p] += v.sum(dim=1)
        self.sumsq[p] += v.square().sum(dim=1)

    def merge(self, other: CMStats) -> CMStats:
        """Statistics of the union of both sample sets (elementwise sum)."""
        if self.count.shape != other.count.shape:
            raise LsaUserError(
                f"cannot merge CM statistics of shapes {tuple(self.count.shape)} and "
                f"{tuple(other.count.shape)}"
            )
        dev = self.count.device
        correct = None
        if self.correct is not None and other.correct is not None:
            correct = self.correct + other.correct.to(dev)
        return CMStats(
            self.count + other.count.to(dev),
            self.sum + other.sum.to(dev),
            self.sumsq + other.sumsq.to(dev),
            correct,
        )

    def to(self, device) -> CMStats:
        correct = None if self.correct is None else self.correct.to(device)
        return CMStats(self.count.to(device), self.sum.to(device), self.sumsq.to(device), correct)

    def row(self, p: int) -> CMStats:
        """Statistics ``[L]`` of perturbation ``p`` (input form accepted by :mod:`lsa_ext.mvl`)."""
        return CMStats(self.count[p], self.sum[p], self.sumsq[p])

    def accuracy(self) -> torch.Tensor | None:
        """Accuracy ``[P+1]`` (clean first), or None when not recorded / not logits."""
        if self.correct is None or self.count.numel() == 0:
            return None
        n = self.count[:, 0]
        acc = self.correct / torch.cat([n[:1], n])
        return None if bool(torch.isnan(acc).any()) else acc

    @property
    def mean(self) -> torch.Tensor:
        """Mean CM per (perturbation, layer); NaN where count is 0."""
        return self.sum / self.count

    @property
    def std(self) -> torch.Tensor:
        """Population standard deviation of CM over samples (divides by count)."""
        m = self.mean
        return (self.sumsq / self.count - m * m).clamp_min(0).sqrt()

