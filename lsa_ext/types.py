"""Type names shared by every module (one name per concept).

- ``Perturbation``: a callable ``(x, y) -> x̂`` — noise, an attack, or another library's attack
  object. ``x`` float ``[B, *input_shape]``, ``y`` int64 ``[B]``; returns a detached tensor of
  ``x``'s shape and dtype.
- ``Batch``: a labelled minibatch ``(x, y)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Perturbation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
