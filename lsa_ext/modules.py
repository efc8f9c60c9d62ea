"""Helpers on ``nn.Module`` objects shared by every pipeline: unwrapping, name prefixes, modes.

- :func:`unwrap`: the user's module inside ``DistributedDataParallel`` / ``DataParallel``
  wrappers (hooks and layer names refer to it).
- :func:`strip_prefix`: a qualified name or state-dict key without the ``module.`` (DDP) /
  ``_orig_mod.`` (``torch.compile``) prefix those wrappers add.
- :func:`model_mode`: eval/train mode with frozen parameters for the length of a block.
- :func:`model_device`: where a model's parameters (else buffers) live.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP/DataParallel, torch.compile
MODES = ("eval", "train", "keep")


def unwrap(model: nn.Module) -> nn.Module:
    """The innermost module of (nested) DDP / DataParallel wrappers, else ``model`` itself.

    A ``torch.compile`` wrapper is kept: hooks must go on the module that is called.
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def strip_prefix(name: str) -> str:
    """``name`` without leading wrapper prefixes (``module.``, ``_orig_mod.``), repeatedly."""
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if name.startswith(p):
                name = name[len(p):]
                changed = True
    return name


@contextlib.contextmanager
def model_mode(model: Any, mode: str = "eval") -> Iterator[None]:
    """Puts ``model`` in ``mode`` and freezes its parameters; restores both on exit.

    ``mode``: ``"eval"``, ``"train"`` or ``"keep"``. Every submodule's ``training`` flag and every
    parameter's ``requires_grad`` are restored on exit, also when the body raises. A model that is
    not an ``nn.Module`` (a plain callable) is left alone.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if mode == "eval":
            model.eval()
        elif mode == "train":
            model.train()
        for p, _ in params:
            p.requires_grad_(False)
        yield
    finally:
        for m, training in flags:
            m.training = training
        for p, req in params:
            p.requires_grad_(req)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter, else first buffer, else CPU."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
