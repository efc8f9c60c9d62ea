"""The model-output contract: what lsa_ext reads as a model's logits.

Every place where lsa_ext calls a user's model for its prediction (attacks, accuracy and
evaluation, analysis, the LR term, training) passes the output through :func:`logits_of`, the
one home of this rule:

- a ``torch.Tensor`` is the logits, as is: ``[B, K]`` (K ≥ 2), or ``[B, 1]`` / ``[B]`` for a
  binary model (:mod:`lsa_ext.losses`);
- a mapping with a ``"logits"`` key (``{"logits": z, ...}``; also Hugging Face ``ModelOutput``)
  gives that entry;
- any other object with a tensor attribute ``logits`` (Hugging Face outputs, torchvision's
  ``GoogLeNetOutputs`` / ``InceptionOutputs`` named tuples) gives that attribute;
- anything else — a plain tuple or list such as ``(logits, features)``, a dict without
  ``"logits"``, ``None``, a number — raises one :class:`~lsa_ext.errors.LsaUserError` that
  names the output's type and how to select the logits. Tuples are not guessed: models return
  ``(logits, features)`` as often as ``(features, logits)``.

The ``output=`` argument of the public entry points (:class:`lsa_ext.attacks.Attack` and
:func:`~lsa_ext.attacks.build_attack`, :func:`lsa_ext.evaluation.accuracy` /
:func:`~lsa_ext.evaluation.evaluate`, :func:`lsa_ext.analyze`, :func:`lsa_ext.lr_term`,
:func:`lsa_ext.train` / :class:`lsa_ext.training.Trainer`) overrides the rule: an ``int``
indexes a tuple/list (``output=0`` for ``(logits, features)``), a ``str`` is a mapping key or
an attribute name, a callable ``output(model_output) -> Tensor`` does anything else. The
command line has no such option: a user factory (``--model package.module:factory``) returns
``select_output(model, selector)`` (:func:`select_output`), which makes the model itself return
its logits and keeps its layer names and state dict unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lsa_ext.errors import LsaUserError

__all__ = [
    "OutputSelector",
    "check_model_output",
    "check_selector",
    "describe",
    "logits_of",
    "logits_or_none",
    "select_output",
]

#: ``None`` (the default rule), an index, a key/attribute name, or a callable.
OutputSelector = int | str | Callable[[Any], torch.Tensor] | None

_HOW = ("pass output=<index>, output='<key>' or output=<callable> (command line: the model "
        "factory returns lsa_ext.outputs.select_output(model, <selector>))")


def check_selector(select: Any) -> OutputSelector:
    """``select`` if it is a valid selector (None, int, str or callable), else LsaUserError."""
    if select is None or callable(select):
        return select
    if isinstance(select, bool) or not isinstance(select, (int, str)):
        raise LsaUserError(
            f"output must be None, an index, a key or a callable, got {type(select).__name__} "
            f"{select!r}"
        )
    return select


def describe(output: Any) -> str:
    """A short description of a model output for error messages: ``tuple (Tensor[32, 3],
    Tensor[32, 16])``, ``dict with keys ['feat', 'z']``, ``mypkg.Out``."""
    if isinstance(output, torch.Tensor):
        return f"Tensor{list(output.shape)} {str(output.dtype).replace('torch.', '')}"
    if isinstance(output, (tuple, list)):
        items = ", ".join(describe(o) if isinstance(o, torch.Tensor) else type(o).__name__
                          for o in list(output)[:4])
        more = ", …" if len(output) > 4 else ""
        return f"{type(output).__name__} ({items}{more})"
    if isinstance(output, Mapping):
        return f"{type(output).__name__} with keys {list(output)[:8]!r}"
    kind = type(output)
    if kind.__module__ == "builtins":
        return kind.__name__
    return f"{kind.__module__}.{kind.__qualname__}"


def _default(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
    else:
        attr = getattr(output, "logits", None)
        if isinstance(attr, torch.Tensor):
            return attr
    raise LsaUserError(
        f"the model returned a {describe(output)}; lsa_ext reads logits from a tensor [B, K], a "
        f"dict's 'logits' or an object's .logits: {_HOW}"
    )


def _select(output: Any, select: int | str | Callable[[Any], Any]) -> Any:
    if callable(select):
        return select(output)
    try:
        if isinstance(select, int):
            if isinstance(output, torch.Tensor):  # t[0] would be a sample, not an element
                raise TypeError
            return output[select]
        if isinstance(output, Mapping):
            return output[select]
        return getattr(output, select)
    except (TypeError, IndexError, KeyError, AttributeError):
        raise LsaUserError(
            f"output={select!r} does not select anything from the model's {describe(output)}"
        ) from None


def logits_of(output: Any, select: OutputSelector = None, *,
              batch: int | None = None) -> torch.Tensor:
    """The logits in a model's ``output`` (see the module docstring for the rule).

    Args:
        output: what the model's forward returned.
        select: ``None`` (default rule), an index, a key / attribute name, or a callable
            ``select(output) -> Tensor``.
        batch: when given, the logits must be ``[batch, K]`` or ``[batch]`` (the shapes
            :mod:`lsa_ext.losses` reads); when None only the type is checked.

    Returns:
        The logits tensor, unchanged (no copy, gradients kept).

    Raises:
        LsaUserError: the output (or what ``select`` gives) is not a floating-point tensor, or
            has the wrong shape; the message names the output's type.
    """
    t = _default(output) if select is None else _select(output, check_selector(select))
    if not isinstance(t, torch.Tensor):
        via = "" if select is None else f" (selected with output={select!r})"
        raise LsaUserError(
            f"the model's logits{via} are a {describe(t)}, not a tensor; the model returned a "
            f"{describe(output)}"
        )
    if not t.is_floating_point():
        raise LsaUserError(f"the model's logits must be floating point, got {t.dtype}")
    if batch is not None and (t.dim() not in (1, 2) or t.shape[0] != batch):
        raise LsaUserError(
            f"the model's logits must be [B, K] (or [B] for a binary model) with B={batch}, "
            f"got {describe(t)}"
        )
    return t


def logits_or_none(output: Any, select: OutputSelector = None) -> torch.Tensor | None:
    """:func:`logits_of`, or None where the default rule (``select=None``) finds no logits.

    For callers to which logits are optional (analysis reads them only for its accuracy: a
    feature extractor returning a tuple is analysed without one). With a selector given, a
    failed selection still raises.
    """
    if select is not None:
        return logits_of(output, select)
    try:
        return logits_of(output)
    except LsaUserError:
        return None


class _SelectOutputHook:
    """Forward hook replacing a module's output by :func:`logits_of` of it."""

    def __init__(self, select: OutputSelector) -> None:
        self.select = select

    def __call__(self, _module: nn.Module, _inputs: Any, output: Any) -> torch.Tensor:
        return logits_of(output, self.select)

    def __repr__(self) -> str:
        return f"select_output({self.select!r})"


def select_output(model: nn.Module, select: OutputSelector) -> nn.Module:
    """Makes ``model`` return its logits, selected from its output by ``select``; returns it.

    For user factories of the command line (``--model package.module:factory``), which have no
    ``output=`` option: ``return select_output(MyNet(), 0)`` for a forward returning
    ``(logits, features)``. A forward hook on ``model`` does the selection, so module names,
    the state dict and checkpoints are those of the model itself. Applying it again replaces
    the previous selection.

    Raises:
        LsaUserError: ``model`` is not an ``nn.Module`` or ``select`` is not a selector.
    """
    if not isinstance(model, nn.Module):
        raise LsaUserError(f"select_output needs an nn.Module, got {type(model).__name__}")
    select = check_selector(select)
    for key, hook in list(model._forward_hooks.items()):
        if isinstance(hook, _SelectOutputHook):
            del model._forward_hooks[key]
    model.register_forward_hook(_SelectOutputHook(select))
    return model


def check_model_output(model: nn.Module, input_shape: tuple[int, ...],
                       num_classes: int | None = None, select: OutputSelector = None, *,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """Runs ``model`` once on two all-zero inputs ``[2, *input_shape]`` and checks its output.

    For callers that know the data's shape (the CLI, from :func:`lsa_ext.data.dataset_info`):
    a model whose output holds no logits, or whose logits do not fit ``num_classes`` (``K``
    logits, or 1 / none for two classes), is rejected before any data is read or any training
    starts. The forward runs in eval mode under ``torch.no_grad`` with PyTorch's RNG state
    forked (nothing of the model or the global RNG changes).

    Returns:
        The logits ``[2, K]`` (or ``[2]``).

    Raises:
        LsaUserError: the output holds no logits (:func:`logits_of`), the forward fails on
            inputs of ``input_shape`` (the message names the error), or the logits' width does
            not fit ``num_classes``.
    """
    from lsa_ext.checks import first_line
    from lsa_ext.modules import model_device, model_mode

    dev = model_device(model) if device is None else torch.device(device)
    x = torch.zeros((2, *input_shape), device=dev)
    with torch.random.fork_rng(devices=[]), model_mode(model, "eval"), torch.no_grad():
        try:
            out = model(x)
        except LsaUserError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the user's forward
            raise LsaUserError(
                f"the model fails on inputs of shape {list(x.shape)}: {first_line(exc)}"
            ) from None
    logits = logits_of(out, select, batch=2)
    if num_classes is not None:
        width = 1 if logits.dim() == 1 else logits.shape[1]
        if width != num_classes and not (num_classes == 2 and width == 1):
            raise LsaUserError(
                f"the model gives {width} logit(s) per sample but the data has {num_classes} "
                "classes (a binary model may give 1)"
            )
    return logits
