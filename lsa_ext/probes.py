"""Probes: choose layers of any ``nn.Module`` and capture their outputs with forward hooks.

Layers are named by qualified module name (``model.named_modules()``), listed in registration
order. A module called more than once per forward (a shared activation) yields one *site* per
call: the first call is reported under the module's name, the k-th (k ≥ 2) under ``name#k``.

Site naming (one rule for analysis, probes and AT-LR): a site string ``name#k`` (k ≥ 1) is the
k-th call of module ``name`` in a forward and ``name`` alone is its first call, so every site a
report lists can be passed back as written (:func:`parse_site`, :func:`site_name`). A *probe*
given a bare module name (``Capture``, ``lsa analyze --layers``) watches every call of the
module and reports each as its own site; given ``name#k`` it watches that call only. A
*regularised* layer (``lr_layers``) is always one site: ``name`` = first call.

Indexed selectors: ``L<k>`` is the k-th learnable *module* (Conv*/Linear, registration order,
the paper's "LR-L<k>"); ``A<k>`` is the k-th *activation site*: the k-th activation output of
one forward (ReLU, ELU, … modules of :data:`ACTIVATIONS`, every call counted, in the order they
run), i.e. row k of ``lsa analyze --layers activations`` — the authors' LSA tool and the paper's
per-layer plots have one point per activation output, so a ReLU module called twice per forward
(torchvision's ``BasicBlock.relu``) is two sites, ``relu`` and ``relu#2``, and two ``A<k>``.
Counting sites needs one forward: :func:`activation_sites` runs one sample in eval mode without
gradients, from an ``example`` (an input batch or the input shape) that the entry points
supply (``lsa`` commands: the dataset's shape; training and analysis: the first sample of the
data). Functional activations (``F.relu``) are not modules and are not counted, as analysis
does not probe them. :func:`site_labels` names sites back as ``L<k>`` / ``A<k>`` (run names,
MVL messages, the ``site`` column of analysis reports; :func:`labelled_site` writes both).

Outputs kept past their hook (:class:`Capture` storing them, the AT-LR term) go through an
:class:`InplaceGuard`, so a later in-place op in the model (``ReLU(inplace=True)``,
``out += identity``) cannot change them. Hooks are always removed when the :class:`Capture`
context exits, also when the forward raises.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lsa_ext.errors import LsaUserError
from lsa_ext.modules import model_device, model_mode
from lsa_ext.outputs import logits_or_none

log = logging.getLogger("lsa_ext.probes")

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
# What A<k> is counted on: an input batch [B, ...] (its first sample runs), the input shape
# without the batch dimension (zeros run), or a callable returning either (called only when a
# forward is needed, so data is read lazily).
Example = torch.Tensor | Sequence[int] | Callable[[], "torch.Tensor | Sequence[int]"] | None
COPY_MODES = ("auto", "always", "never")


def parse_site(site: str) -> tuple[str, int | None]:
    """``"block.act#2"`` → ``("block.act", 2)``; ``"block.act"`` → ``("block.act", None)``
    (no call number given).

    Raises:
        LsaUserError: a ``#`` suffix that is not an integer ≥ 1, or nothing before it.
    """
    name, sep, k = site.rpartition("#")
    if not sep:
        return site, None
    if not name or not k.isdigit() or int(k) < 1:
        raise LsaUserError(f"bad layer site {site!r}: expected NAME or NAME#k with k >= 1 "
                           "(the k-th call of module NAME in a forward)")
    return name, int(k)


def site_name(name: str, k: int) -> str:
    """The site of the ``k``-th call (k ≥ 1) of module ``name``: ``name`` or ``name#k``."""
    return name if k == 1 else f"{name}#{k}"


def canonical_site(site: str) -> str:
    """A site as reports write it: ``"act#1"`` → ``"act"``, ``"act#2"`` unchanged."""
    name, k = parse_site(site)
    return site_name(name, k or 1)


def select_layers(model: nn.Module, spec: LayerSpec = "activations", *,
                  example: Example = None) -> list[str]:
    """Qualified names of the layers of ``model`` chosen by ``spec``, in registration order.

    Args:
        spec: ``"activations"`` (ReLU, ELU, LeakyReLU, GELU, SiLU, Sigmoid, Tanh, …),
            ``"learnable"`` (Conv*, ConvTranspose*, Linear — the paper's "learnable layers"),
            ``"L<k>"`` (the k-th learnable layer in registration order, the paper's "LR-L<k>"),
            ``"A<k>"`` (the k-th activation site of a forward, as ``lsa analyze`` numbers its
            rows; the module docstring; needs ``example``) — a module literally named ``L<k>``
            or ``A<k>`` takes precedence —,
            ``"leaves"`` (every module without children), a qualified name or glob
            (``"features.*"``), a comma-separated mix of those, a list of names/globs/kinds,
            or a predicate ``(name, module) -> bool``. Any item but ``A<k>`` may end in ``#k``
            to select the k-th call of each module it matches (see the module docstring).
        example: what ``A<k>`` items are counted on (:data:`Example`; default None: ``A<k>``
            raises); run once, only when an ``A<k>`` item is given.

    Returns:
        Module names, and ``name#k`` sites for items with a call number and for ``A<k>``
        items (``A0`` of a once-called ``relu1`` is ``relu1#1``); without duplicates.

    Raises:
        LsaUserError: a name or glob matches no module, a bad ``#k``, an index out of range
            (naming how many learnable layers / activation sites the model has), ``A<k>``
            without ``example``, or nothing is selected.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    if callable(spec) and not isinstance(spec, str):
        chosen = [n for n, m in named if spec(n, m)]
    else:
        items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
        keep: set[str] = set()
        calls: dict[str, set[int]] = {}
        acts: list[str] | None = None  # activation sites, counted at the first A<k>
        for item in items:
            if not isinstance(item, str) or not item:
                raise LsaUserError(f"layer selector must be a non-empty string, got {item!r}")
            text = item
            item, call = parse_site(item)
            index = _layer_index(item) if not any(n == item for n, _ in named) else None
            if item in KINDS:
                hits = [n for n, m in named if isinstance(m, KINDS[item])]
            elif item == "leaves":
                hits = [n for n, m in named if not any(True for _ in m.children())]
            elif index is not None and index[0] == "L":
                learnable = [n for n, m in named if isinstance(m, LEARNABLE)]
                k = index[1]
                if k >= len(learnable):
                    raise LsaUserError(
                        f"{item}: {type(model).__name__} has {len(learnable)} learnable layers "
                        f"(L0..L{len(learnable) - 1}: {', '.join(learnable)})"
                    )
                hits = [learnable[k]]
            elif index is not None:
                if call is not None:
                    raise LsaUserError(f"{text}: A<k> names one activation site (one call) "
                                       f"already; drop the #{call}")
                if acts is None:
                    acts = _activation_sites_for(model, item, example)
                if index[1] >= len(acts):
                    raise LsaUserError(f"{item}: {type(model).__name__} has "
                                       f"{_count_sites(acts)}")
                name, call = parse_site(acts[index[1]])
                call = call or 1
                hits = [name]
            else:
                hits = [n for n, _ in named if fnmatch.fnmatchcase(n, item)]
                if not hits:
                    raise LsaUserError(
                        f"no layer named {item!r} in {type(model).__name__} (kinds: "
                        f"{', '.join([*KINDS, 'leaves'])}; indexed: L<k>, A<k>); layers: "
                        f"{', '.join(n for n, _ in named[:40])}"
                        + (" …" if len(named) > 40 else "")
                    )
            if call is None:
                keep.update(hits)
            else:
                for n in hits:
                    calls.setdefault(n, set()).add(call)
        chosen = []
        for n, _ in named:
            if n in keep:
                chosen.append(n)
            chosen.extend(f"{n}#{c}" for c in sorted(calls.get(n, ())))
    if not chosen:
        raise LsaUserError(f"no layer of {type(model).__name__} matches {spec!r}")
    return chosen


def _layer_index(item: str) -> tuple[str, int] | None:
    """``"L<k>"`` / ``"l<k>"`` → ``("L", k)`` (k-th learnable layer, the paper's "LR-L<k>");
    ``"A<k>"`` / ``"a<k>"`` → ``("A", k)`` (k-th activation site); else None."""
    if len(item) > 1 and item[0] in "LlAa" and item[1:].isdigit():
        return item[0].upper(), int(item[1:])
    return None


def _count_sites(acts: list[str]) -> str:
    """``"3 activation sites in a forward (A0..A2: relu1, relu1#2, relu2)"``."""
    if not acts:
        return ("no activation sites in a forward (no module of the activation kinds ran; "
                "functional activations such as F.relu are not modules)")
    shown = ", ".join(acts[:40]) + (" …" if len(acts) > 40 else "")
    return (f"{len(acts)} activation site{'s' if len(acts) != 1 else ''} in a forward "
            f"(A0..A{len(acts) - 1}: {shown})")


def _activation_sites_for(model: nn.Module, item: str, example: Example) -> list[str]:
    if example is None:
        raise LsaUserError(
            f"{item}: A<k> counts the activation sites of one forward of "
            f"{type(model).__name__} (as lsa analyze numbers its rows), which needs an input: "
            "pass example= (an input batch or the input shape)"
        )
    return activation_sites(model, example)


def example_input(model: nn.Module, example: Example) -> torch.Tensor:
    """One sample ``[1, ...]`` to run ``model`` on, from ``example`` (:data:`Example`), on the
    model's device and, for floating inputs, in its floating parameters' dtype.

    Raises:
        LsaUserError: ``example`` is None, an empty batch, or not a tensor or a shape.
    """
    if callable(example) and not isinstance(example, torch.Tensor):
        example = example()
    if isinstance(example, torch.Tensor):
        if example.dim() == 0 or example.shape[0] == 0:
            raise LsaUserError(f"example must be a non-empty input batch [B, ...], got shape "
                               f"{tuple(example.shape)}")
        x = example[:1]
    elif isinstance(example, (tuple, list, torch.Size)) and all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in example):
        x = torch.zeros(1, *example)
    else:
        raise LsaUserError("example must be an input batch (a tensor [B, ...]) or the input "
                           f"shape without the batch dimension, got {example!r}")
    device = next((t.device for t in model.parameters()), None)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return x.to(device=device, dtype=dtype if x.is_floating_point() and dtype else None)


def forward_sites(model: nn.Module, names: Sequence[str], example: Example,
                  output: Any = None) -> tuple[list[str], list[str]]:
    """The sites of the modules ``names`` in the order they run in one forward of one sample
    of ``example`` (eval mode, no gradients; mode and ``requires_grad`` restored), and those
    of them whose output is the model's logits itself (the same memory: a final activation,
    or an in-place one on the logits; ``output``: the logits selector of
    :func:`lsa_ext.outputs.logits_of`; none when the output holds no logits).

    Raises:
        LsaUserError: a bad ``example`` (:func:`example_input`) or an unknown module name.
    """
    x = example_input(model, example)
    seen: list[tuple[str, torch.Tensor]] = []
    with Capture(model, names, on_output=lambda s, t: seen.append((s, t)), detach=True,
                 copy="never"), model_mode(model, "eval"), torch.no_grad():
        out = model(x)
    logits = logits_or_none(out, output)
    same = [s for s, t in seen if logits is not None and t.numel() == logits.numel() > 0
            and t.data_ptr() == logits.data_ptr()]
    return [s for s, _ in seen], same


def activation_sites(model: nn.Module, example: Example) -> list[str]:
    """The activation sites of ``model`` in forward order — ``A<k>`` is the k-th, and they are
    the rows ``lsa analyze --layers activations`` reports — from one eval-mode, no-grad
    forward of one sample of ``example`` (:func:`forward_sites`). ``[]`` when the model has no
    activation module.

    Raises:
        LsaUserError: a bad ``example``.
    """
    names = [n for n, m in model.named_modules() if n and isinstance(m, ACTIVATIONS)]
    return forward_sites(model, names, example)[0] if names else []


def site_labels(model: nn.Module, sites: Sequence[str], example: Example = None) -> list[str]:
    """Short labels of ``sites``: a learnable module's first call ``L<k>`` (its j-th call
    ``L<k>#j``), an activation site ``A<k>`` (counted as :func:`activation_sites` does, so
    only with ``example``; without one, or for a site that does not run, the site itself), any
    other site unchanged; a site whose label is also a module's name (a module called
    ``A1``, which the selector ``A1`` picks) keeps its own name. Used for run names
    (``AT-PGD-LR-A2``), MVL messages and the labels of analysis reports
    (:attr:`lsa_ext.result.AnalysisResult.labels`).

    Raises:
        LsaUserError: a bad ``example`` (only read when an activation site is among ``sites``).
    """
    modules = dict(model.named_modules())
    learnable = [n for n, m in modules.items() if n and isinstance(m, LEARNABLE)]
    parsed = [parse_site(s) for s in sites]
    acts: list[str] = []
    if example is not None and any(isinstance(modules.get(n), ACTIVATIONS) for n, _ in parsed):
        acts = activation_sites(model, example)
    labels = []
    for site, (name, k) in zip(sites, parsed, strict=True):
        canon = site_name(name, k or 1)
        if name in learnable:
            label = f"L{learnable.index(name)}" + (f"#{k}" if k and k > 1 else "")
        elif canon in acts:
            label = f"A{acts.index(canon)}"
        else:
            label = site
        # a module literally named like the label ("A1", "L0") is what that selector picks:
        # such a label would name another site, so the site keeps its own name
        labels.append(site if parse_site(label)[0] in modules and label != site else label)
    return labels


def labelled_site(site: str, label: str | None) -> str:
    """A site as messages and reports name it with its :func:`site_labels` label:
    ``"A2 (relu#2)"``; the site alone when ``label`` is None or the site itself."""
    return site if label is None or label == site else f"{label} ({site})"


class InplaceGuard:
    """Keeps layer outputs held past their forward hook equal to what the layer returned.

    A hook's output tensor can be changed afterwards by an in-place op later in the forward
    (``ReLU(inplace=True)``, ``F.relu(x, inplace=True)``, ``out += identity``); a reference
    kept from the hook then holds the changed values and, for autograd, the changed graph.
    :meth:`keep` returns what to hold instead and :meth:`check` (after the forward) reports
    outputs that were changed although held by reference. Every in-place op on a tensor or on
    a view of it bumps the tensor's version counter (``Tensor._version``), which is what is
    compared.

    Args:
        mode: ``"auto"`` (default): the first time a site is seen its output is cloned and the
            original watched; a site whose original was changed is cloned from then on, the
            others are held by reference and still watched (:meth:`check` names them if a
            later forward changes them after all). So a model without such in-place ops pays
            one version read per site, one with them a clone of the sites that need it.
            ``"always"``: clone every output. ``"never"``: hold references (for consumers
            that reduce the output inside the hook, as :mod:`lsa_ext.paired_capture` does).

    Clones keep gradients flowing into the layer (``clone`` is differentiable). Outputs of
    ``torch.inference_mode`` (no version counter) are always cloned in ``"auto"``.
    """

    def __init__(self, mode: str = "auto") -> None:
        if mode not in COPY_MODES:
            raise LsaUserError(f"unknown copy mode {mode!r}; choices: {', '.join(COPY_MODES)}")
        self.mode = mode
        self.copied: dict[str, bool] = {}  # site -> needs a copy (decided sites only)
        self._watch: list[tuple[str, torch.Tensor, int, bool]] = []

    def keep(self, site: str, t: torch.Tensor) -> torch.Tensor:
        """What to hold for ``site``'s output ``t``: ``t`` itself or a clone."""
        if self.mode == "never":
            return t
        if self.mode == "always" or t.is_inference():
            return t.clone()
        need = self.copied.get(site)
        if need is True:
            return t.clone()
        self._watch.append((site, t, t._version, need is None))
        return t if need is False else t.clone()

    def check(self) -> list[str]:
        """Call once the forward(s) whose outputs are held are done. Decides first-seen sites
        and returns the sites held by reference whose output was changed in place (their held
        value is wrong; they are cloned from now on). Stops watching."""
        changed: dict[str, bool] = {}
        bad: list[str] = []
        for site, t, version, cloned in self._watch:
            modified = t._version != version
            changed[site] = changed.get(site, False) or modified
            if modified and not cloned and site not in bad:
                bad.append(site)
        self._watch = []
        for site, modified in changed.items():
            if modified and not self.copied.get(site):
                log.debug("layer output %s is changed in place later in the forward: copied", site)
            self.copied[site] = self.copied.get(site, False) or modified
        return bad

    def forget(self) -> None:
        """Drops watched references without deciding (after a forward that raised)."""
        self._watch = []


class Capture:
    """Context manager recording (or streaming) the outputs of chosen layers.

    Example::

        with Capture(model, ["conv1", "relu1"]) as cap:
            logits = model(x)
        cap.outputs  # {"conv1": Tensor, "relu1": Tensor}, in call order

    Args:
        model: any module.
        names: qualified module names — every call of the module is captured, the k-th as
            site ``name#k`` (k ≥ 2) — or sites ``name#k`` (k ≥ 1) for that call only (see
            the module docstring and :func:`select_layers`).
        on_output: if given, called as ``on_output(site, tensor)`` for each output instead of
            storing it (used to reduce each layer as soon as it is produced).
        detach: store/stream detached tensors (default False: gradients flow, as AT-LR needs).
        copy: how outputs are protected from later in-place ops in the model: a mode of
            :class:`InplaceGuard` (default ``"auto"``: stored outputs are always the layer's
            own output) or a shared :class:`InplaceGuard` whose :meth:`~InplaceGuard.check`
            the caller runs. Pass ``"never"`` when ``on_output`` reduces the tensor at once.

    Outputs that are not a tensor (tuples, dicts) are read as their first tensor element.
    ``outputs`` is cleared by :meth:`reset` and at each ``__enter__``.

    Raises:
        LsaUserError: an unknown module or bad site; and, from :meth:`reset` / on exit, a
            stored output that was changed in place after all (``copy="auto"`` with an
            instance reused over forwards whose in-place ops differ; use ``copy="always"``).
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        on_output: Callable[[str, torch.Tensor], None] | None = None,
        detach: bool = False,
        copy: str | InplaceGuard = "auto",
    ) -> None:
        self.model = model
        self.names = list(names)
        modules = dict(model.named_modules())
        wanted: dict[str, set[int] | None] = {}  # module -> call numbers (None: every call)
        for item in self.names:
            name, k = parse_site(item)
            if k is None:
                wanted[name] = None
            elif wanted.get(name, set()) is not None:
                wanted.setdefault(name, set()).add(k)
        missing = [n for n in wanted if n not in modules]
        if missing:
            raise LsaUserError(f"no layer named {', '.join(map(repr, missing))} in the model")
        self._modules = [(n, modules[n], calls) for n, calls in wanted.items()]
        self.on_output = on_output
        self.detach = detach
        self._owns_guard = not isinstance(copy, InplaceGuard)
        self.guard = InplaceGuard(copy) if self._owns_guard else copy
        self.outputs: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._handles: list = []

    @property
    def calls(self) -> dict[str, int]:
        """How often each hooked module ran since the last :meth:`reset`."""
        return dict(self._calls)

    def reset(self) -> None:
        """Forgets recorded outputs and call counts (call between forwards)."""
        self._check()
        self.outputs = {}
        self._calls = {}

    def _check(self) -> None:
        if self._owns_guard:
            bad = self.guard.check()
            if bad:
                raise LsaUserError(
                    f"the stored outputs of {', '.join(bad)} were changed in place later in "
                    "the forward (this forward's in-place ops differ from the first one's); "
                    "use Capture(..., copy='always')"
                )

    def _hook(self, name: str, calls: set[int] | None):
        def hook(_module, _inputs, output):
            t = _first_tensor(output)
            if t is None:
                return
            k = self._calls.get(name, 0) + 1
            self._calls[name] = k
            if calls is not None and k not in calls:
                return
            site = site_name(name, k)
            if self.detach:
                t = t.detach()
            t = self.guard.keep(site, t)
            if self.on_output is not None:
                self.on_output(site, t)
            else:
                self.outputs[site] = t

        return hook

    def __enter__(self) -> Capture:
        self.outputs, self._calls = {}, {}
        if self._owns_guard:
            self.guard.forget()
        try:
            for name, module, calls in self._modules:
                self._handles.append(module.register_forward_hook(self._hook(name, calls)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Removes every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __exit__(self, exc_type, *exc) -> None:
        self.remove()
        if exc_type is None:
            self._check()
        elif self._owns_guard:
            self.guard.forget()


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


def sites_not_run(model: nn.Module, names: Sequence[str],
                  input_shape: Sequence[int]) -> list[str]:
    """The sites of ``names`` (module names, ``name#k``) that one eval-mode, no-grad forward of
    two zero inputs of shape ``input_shape`` does not reach (``name#k`` needs k calls); the
    model's mode is restored."""
    param = next(model.parameters(), None)
    x = torch.zeros(2, *input_shape, dtype=param.dtype if param is not None else None,
                    device=model_device(model))
    was_training = model.training
    try:
        with torch.no_grad(), Capture(model, names, on_output=lambda s, t: None, detach=True,
                                      copy="never") as cap:
            model.eval()
            model(x)
            calls = cap.calls
    finally:
        model.train(was_training)
    out = []
    for s in names:
        name, k = parse_site(s)
        if calls.get(name, 0) < (k or 1):
            out.append(s)
    return out
