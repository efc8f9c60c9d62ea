"""Perturbations by name: spec parsing, the registry of noises and attacks, labels.

Khalooei et al. (arXiv 2202.02626), Algorithm 2, compares each layer's representation of clean
inputs with that of perturbed ones — adversarial (FGSM, PGD, ...) or statistical noise (Gaussian,
salt, pepper, speckle). This module turns user-facing specs such as
``"gaussian:std=0.1,fgsm:eps=0.1,pgd:eps=0.1,steps=20"`` into named callables
``(x, y) -> x̂`` (:class:`lsa_ext.types.Perturbation`) from :data:`lsa_ext.noise.NOISES` and
:data:`lsa_ext.attacks.ATTACKS`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lsa_ext.attacks import ATTACKS, build_attack
from lsa_ext.checks import check_clip
from lsa_ext.errors import LsaUserError
from lsa_ext.noise import NOISES
from lsa_ext.outputs import OutputSelector
from lsa_ext.types import Perturbation

DEFAULT_EPS = 0.1  # ε of spec-built attacks that set none (L∞, in input units)


def _parse_value(text: str) -> Any:
    """A spec value: ``true`` / ``false`` (any case) a bool, ``none`` / ``null`` None, else an
    int, a float, or the text itself (each class checks its own parameters' kinds)."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text.strip()


def _parse_clip(text: str) -> tuple[float, float] | None:
    """A spec's ``clip`` value: ``lo:hi`` (e.g. ``0:1``, ``-1:1``) or ``none`` (no clipping)."""
    value = text.strip()
    if value.lower() in ("none", "null"):
        return None
    lo, sep, hi = value.partition(":")
    try:
        if not sep:
            raise ValueError(value)
        return check_clip((float(lo), float(hi)))
    except (ValueError, LsaUserError):
        raise LsaUserError(
            f"clip in a perturbation spec is lo:hi with lo < hi (e.g. clip=0:1) or none, got "
            f"{value!r}"
        ) from None


def parse_perturbation_specs(text: str) -> list[tuple[str, dict[str, Any]]]:
    """Parses ``"gaussian:std=0.1,fgsm:eps=0.1,pgd:eps=0.1,steps=20,salt"``.

    Tokens are separated by commas. A token ``name`` or ``name:key=value`` starts a
    perturbation; a following ``key=value`` token (no ``:`` before its ``=``) adds a parameter
    to the previous one. Values: ``true`` / ``false`` (bools), ``none``, numbers, else text;
    ``clip`` takes ``lo:hi`` or ``none`` (``pgd:clip=-1:1``, ``gaussian:clip=none``).

    Returns:
        ``[(name, params), ...]`` in order.

    Raises:
        LsaUserError: a parameter before any name, a malformed ``key=value``, a key given
            twice for one perturbation (``fgsm:eps=0.1,eps=0.2``), or a malformed ``clip``.
    """
    out: list[tuple[str, dict[str, Any]]] = []
    for raw in text.split(","):
        tok = raw.strip()
        if not tok:
            continue
        if ":" in tok.partition("=")[0] or "=" not in tok:
            name, _, rest = tok.partition(":")
            out.append((name.strip().lower(), {}))
            tok = rest.strip()
            if not tok:
                continue
        if not out:
            raise LsaUserError(f"perturbation parameter {tok!r} given before any perturbation name")
        key, sep, value = tok.partition("=")
        if not sep or not key.strip():
            raise LsaUserError(f"malformed perturbation parameter {tok!r}; expected key=value")
        key = key.strip()
        if key in out[-1][1]:
            raise LsaUserError(f"perturbation parameter {key!r} given twice for "
                               f"{out[-1][0]!r} ({key}={out[-1][1][key]!r} and {tok!r})")
        out[-1][1][key] = _parse_clip(value) if key == "clip" else _parse_value(value)
    if not out:
        raise LsaUserError("no perturbation given")
    return out


def perturbation_names() -> list[str]:
    """Names accepted in perturbation specs: the noises, then the attacks."""
    return list(NOISES) + list(ATTACKS)


def build_perturbation(
    name: str,
    params: Mapping[str, Any] | None = None,
    *,
    model: nn.Module | None = None,
    clip: tuple[float, float] | None = None,
    eps: float = DEFAULT_EPS,
    seed: int = 0,
    output: OutputSelector = None,
    num_classes: int | None = None,
) -> Perturbation:
    """One perturbation from its name and parameters.

    Noises (:data:`lsa_ext.noise.NOISES`) get ``clip`` and ``seed``; attacks
    (:data:`lsa_ext.attacks.ATTACKS`) get ``model``, ``eps`` (unless given in ``params``),
    ``clip``, ``seed`` and ``output`` (the logits selector, :mod:`lsa_ext.outputs`); a
    ``clip`` or ``seed`` in ``params`` wins. ``clip`` is used as given: ``None`` (the default
    here) means no clipping, unlike the classes' own default ``(0, 1)``;
    :func:`lsa_ext.analyze` passes the data's range (its ``clip="auto"``).
    ``num_classes``: when known (e.g. from the dataset), an attack that cannot run with that
    many classes (APGD with the DLR loss and K < 3) is rejected here, before any work.

    Raises:
        LsaUserError: unknown name (listing the choices), bad or unknown parameters, or an
            attack unfit for ``num_classes``.
    """
    params = dict(params or {})
    key = name.strip().lower()
    if key in NOISES or key in ATTACKS:
        _check_keys("noise" if key in NOISES else "attack", key,
                    NOISES[key] if key in NOISES else ATTACKS[key], params)
    if key in NOISES:
        params.setdefault("clip", clip)
        params.setdefault("seed", seed)
        try:
            return NOISES[key](**params)
        except TypeError as exc:
            raise LsaUserError(f"bad parameters for noise {key!r}: {exc}") from None
    if key in ATTACKS:
        if model is None:
            raise LsaUserError(f"attack {key!r} needs the model")
        eps_value = params.pop("eps", eps)
        if isinstance(eps_value, (int, float)) and eps_value < 0:
            raise LsaUserError(f"eps must be >= 0, got {eps_value} for {key!r}")
        params.setdefault("clip", clip)
        params.setdefault("seed", seed)
        if output is not None:
            params.setdefault("output", output)
        attack = build_attack(key, model, eps_value, **params)
        if num_classes is not None:
            attack.check_num_classes(num_classes)
        return attack
    raise LsaUserError(
        f"unknown perturbation {name!r}; choices: {', '.join(perturbation_names())}"
    )


def parameter_names(cls: Any) -> list[str] | None:
    """The keyword parameters a perturbation class takes (``model`` excluded), following
    ``**kwargs`` passed on to base classes; None when they cannot be known."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.name not in ("self", "model") and p.name not in names
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


def _check_keys(kind: str, key: str, cls: Any, params: Mapping[str, Any]) -> None:
    """Raises, listing the valid keys, when ``params`` holds a key ``cls`` does not take."""
    valid = parameter_names(cls)
    unknown = [k for k in params if valid is not None and k not in valid]
    if unknown:
        raise LsaUserError(f"unknown parameter{'s' if len(unknown) > 1 else ''} "
                           f"{', '.join(map(repr, unknown))} for {kind} {key!r}; valid: "
                           f"{', '.join(valid or [])}")


def _label(name: str, params: Mapping[str, Any]) -> str:
    if not params:
        return name
    return name + ":" + ";".join(f"{k}={v}" for k, v in params.items())


def build_perturbations(
    specs: str | Sequence[Any] | Mapping[str, Perturbation],
    *,
    model: nn.Module | None = None,
    clip: tuple[float, float] | None = None,
    eps: float = DEFAULT_EPS,
    seed: int = 0,
    output: OutputSelector = None,
    num_classes: int | None = None,
) -> dict[str, Perturbation]:
    """Named perturbations from any accepted form.

    Accepted: a dict ``{name: callable}``; a spec string (:func:`parse_perturbation_specs`);
    or a list mixing spec strings, callables ``(x, y) -> x̂`` (named by their ``name``
    attribute or lower-cased class/function name) and ``(name, callable)`` pairs. The i-th
    built-in perturbation gets ``seed + i``. Names are the bare perturbation names, or
    ``name:key=value;...`` when two share a name. ``output`` and ``num_classes``: see
    :func:`build_perturbation` (they apply to spec-built attacks).
    """
    if isinstance(specs, Mapping):
        items = list(specs.items())
        for n, fn in items:
            if not callable(fn):
                raise LsaUserError(f"perturbation {n!r} is not callable")
        return {str(n): fn for n, fn in items}
    if isinstance(specs, str):
        entries: list[Any] = list(parse_perturbation_specs(specs))
    else:
        entries = []
        for s in specs:
            if isinstance(s, str):
                entries.extend(parse_perturbation_specs(s))
            else:
                entries.append(s)
    if not entries:
        raise LsaUserError("no perturbation given")
    built: list[tuple[str, str, Perturbation]] = []
    for i, e in enumerate(entries):
        if isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str) and callable(e[1]):
            built.append((e[0], e[0], e[1]))
        elif isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str):
            name, params = e
            fn = build_perturbation(name, params, model=model, clip=clip, eps=eps, seed=seed + i,
                                    output=output, num_classes=num_classes)
            built.append((name, _label(name, params), fn))
        elif callable(e):
            n = getattr(e, "name", None)
            if not isinstance(n, str):
                n = getattr(e, "__name__", type(e).__name__).lower()
            built.append((n, n, e))
        else:
            raise LsaUserError(f"cannot use {e!r} as a perturbation")
    short = [b[0] for b in built]
    out: dict[str, Perturbation] = {}
    for (s, long, fn) in built:
        label = s if short.count(s) == 1 else long
        if label in out:
            raise LsaUserError(f"perturbation {label!r} given twice")
        out[label] = fn
    return out
