"""Probes: choose layers of any ``nn.Module`` and capture their outputs with forward hooks.

Layers are named by qualified module name (``model.named_modules()``), listed in registration
order. A module called more than once per forward (a shared activation) yields one *site* per
call: the first call is reported under the module's name, the k-th (k ≥ 2) under ``name#k``.
Hooks are always removed when the :class:`Capture` context exits, also when the forward raises.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from lsa_ext.errors import LsaUserError

ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.ELU, nn.SELU, nn.CELU, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)
LEARNABLE: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
KINDS = {"activations": ACTIVATIONS, "learnable": LEARNABLE}

LayerSpec = str | Sequence[str] | Callable[[str, nn.Module], bool]


def select_layers(model: nn.Module, spec: LayerSpec = "activations") -> list[str]:
    """Qualified names of the layers of ``model`` chosen by ``spec``, in registration order.

    Args:
        spec: ``"activations"`` (ReLU, ELU, LeakyReLU, GELU, SiLU, Sigmoid, Tanh, …),
            ``"learnable"`` (Conv*, ConvTranspose*, Linear — the paper's "learnable layers"),
            ``"L<k>"`` (the k-th learnable layer in registration order, the paper's "LR-L<k>";
            a module literally named ``L<k>`` takes precedence),
            ``"leaves"`` (every module without children), a qualified name or glob
            (``"features.*"``), a comma-separated mix of those, a list of names/globs/kinds,
            or a predicate ``(name, module) -> bool``.

    Raises:
        LsaUserError: a name or glob matches no module, or nothing is selected.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    if callable(spec) and not isinstance(spec, str):
        chosen = [n for n, m in named if spec(n, m)]
    else:
        items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
        keep: set[str] = set()
        for item in items:
            if not isinstance(item, str) or not item:
                raise LsaUserError(f"layer selector must be a non-empty string, got {item!r}")
            if item in KINDS:
                hits = [n for n, m in named if isinstance(m, KINDS[item])]
            elif item == "leaves":
                hits = [n for n, m in named if not any(True for _ in m.children())]
            elif _is_learnable_index(item) and not any(n == item for n, _ in named):
                learnable = [n for n, m in named if isinstance(m, LEARNABLE)]
                k = int(item[1:])
                if k >= len(learnable):
                    raise LsaUserError(
                        f"{item}: {type(model).__name__} has {len(learnable)} learnable layers "
                        f"(L0..L{len(learnable) - 1}: {', '.join(learnable)})"
                    )
                hits = [learnable[k]]
            else:
                hits = [n for n, _ in named if fnmatch.fnmatchcase(n, item)]
                if not hits:
                    raise LsaUserError(
                        f"no layer named {item!r} in {type(model).__name__} (kinds: "
                        f"{', '.join([*KINDS, 'leaves'])}); layers: "
                        f"{', '.join(n for n, _ in named[:40])}"
                        + (" …" if len(named) > 40 else "")
                    )
            keep.update(hits)
        chosen = [n for n, _ in named if n in keep]
    if not chosen:
        raise LsaUserError(f"no layer of {type(model).__name__} matches {spec!r}")
    return chosen


def _is_learnable_index(item: str) -> bool:
    """``"L<k>"`` / ``"l<k>"``: the k-th learnable layer (the paper's "LR-L<k>" naming)."""
    return len(item) > 1 and item[0] in "Ll" and item[1:].isdigit()


class Capture:
    """Context manager recording (or streaming) the outputs of chosen layers.

    Example::

        with Capture(model, ["conv1", "relu1"]) as cap:
            logits = model(x)
        cap.outputs  # {"conv1": Tensor, "relu1": Tensor}, in call order

    Args:
        model: any module.
        names: qualified names (see :func:`select_layers`).
        on_output: if given, called as ``on_output(site, tensor)`` for each output instead of
            storing it (used to reduce each layer as soon as it is produced).
        detach: store/stream detached tensors (default False: gradients flow, as AT-LR needs).

    Outputs that are not a tensor (tuples, dicts) are read as their first tensor element.
    ``outputs`` is cleared by :meth:`reset` and at each ``__enter__``.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        on_output: Callable[[str, torch.Tensor], None] | None = None,
        detach: bool = False,
    ) -> None:
        self.model = model
        self.names = list(names)
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise LsaUserError(f"no layer named {', '.join(map(repr, missing))} in the model")
        self._modules = [(n, modules[n]) for n in self.names]
        self.on_output = on_output
        self.detach = detach
        self.outputs: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._handles: list = []

    def reset(self) -> None:
        """Forgets recorded outputs and call counts (call between forwards)."""
        self.outputs = {}
        self._calls = {}

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            t = _first_tensor(output)
            if t is None:
                return
            k = self._calls.get(name, 0) + 1
            self._calls[name] = k
            site = name if k == 1 else f"{name}#{k}"
            if self.detach:
                t = t.detach()
            if self.on_output is not None:
                self.on_output(site, t)
            else:
                self.outputs[site] = t

        return hook

    def __enter__(self) -> Capture:
        self.reset()
        try:
            for name, module in self._modules:
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Removes every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __exit__(self, *exc) -> None:
        self.remove()


def _first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for o in output:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(output, dict):
        for o in output.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    return None
