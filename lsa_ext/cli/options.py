"""Options shared by the subcommands: comma-separated lists, ``--device``, ``--threads``,
the two-moons data options (``--moons-scale``, ``--moons-noise``, ``--moons-samples``),
Ctrl-C hints, plurals, the training attack's ``--steps`` / ``--alpha`` / ``--restarts``.

``--gamma 0.1,0.2``, ``--eps-grid 0,0.1,0.3``, ``--seeds 0,1,2``, ``--methods fgsm,pgd``: one
parser, so every list option accepts the same spelling (blanks ignored; an empty item between
values is an error) and fails with the same one-line message naming the option. ``--device``
is declared once, with the spellings :func:`lsa_ext.devices.resolve_device` accepts.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, TypeVar

from lsa_ext.errors import LsaUserError

T = TypeVar("T")

_KINDS = {float: ("a number", "numbers"), int: ("an integer", "integers")}


def parse_list(text: str | None, convert: Callable[[str], T], option: str) -> list[T] | None:
    """``"0.1, 0.2"`` → ``[0.1, 0.2]`` with ``convert`` (``float``, ``int``, ``str``).

    Returns ``None`` for ``None`` (option not given) and ``[]`` for an empty string (or only
    commas and spaces).

    Raises:
        LsaUserError: an empty item between values (``"0.1,,0.2"``), or an item ``convert``
            rejects, e.g. ``--seeds must be an integer or comma-separated integers, got 'a'``.
    """
    if text is None:
        return None
    items = [t.strip() for t in text.split(",")]
    if not any(items):
        return []
    if not all(items):  # "0.1,,0.2" or a trailing comma: a value was probably lost
        raise LsaUserError(f"{option} has an empty item: {text!r}")
    try:
        return [convert(t) for t in items]
    except ValueError:
        one, many = _KINDS.get(convert, ("a value", "values"))  # type: ignore[call-overload]
        raise LsaUserError(f"{option} must be {one} or comma-separated {many}, got {text!r}") \
            from None


def add_device_option(parser: argparse._ActionsContainer, default: str = "cpu") -> None:
    """Adds ``--device`` (``cpu``, ``cuda``, ``cuda:N`` or ``auto``; default ``default``) to a
    parser or argument group; the value is checked by :func:`lsa_ext.devices.resolve_device`."""
    parser.add_argument("--device", default=default,
                        help=f"cpu, cuda, cuda:N or auto (default: {default})")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C with a hint on how to continue (``lsa`` prints ``interrupted; <hint>``)."""

    def __init__(self, hint: str) -> None:
        super().__init__(hint)
        self.hint = hint


def plural(n: int, word: str) -> str:
    """``"1 epoch"``, ``"3 epochs"``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """Adds ``--threads N|auto`` (intra-op CPU threads; default ``auto``, see
    :mod:`lsa_ext.threads`)."""
    parser.add_argument(
        "--threads", default="auto", metavar="N|auto",
        help="intra-op CPU threads (default auto: OMP_NUM_THREADS if set, 1 for the embedded "
             "datasets' tiny models, else torch's default capped at the idle cores)")


def apply_threads_option(args: argparse.Namespace) -> int:
    """Sets torch's intra-op threads from ``args.threads``; a run on an embedded dataset's
    default model (``presets.PRESETS[...].small_model``) counts as a tiny model."""
    from lsa_ext.presets import PRESETS
    from lsa_ext.threads import set_threads

    preset = PRESETS.get(str(getattr(args, "dataset", None) or "").lower())
    small = preset is not None and preset.small_model and getattr(args, "model", None) is None
    return set_threads(getattr(args, "threads", "auto"), small_model=small)


def add_moons_options(parser: argparse._ActionsContainer) -> None:
    """Adds ``--moons-scale``, ``--moons-noise`` and ``--moons-samples`` (two-moons only; read
    back with :func:`dataset_options`)."""
    from lsa_ext.data import MOONS_DEFAULTS, MOONS_SCALES

    parser.add_argument("--moons-scale", default=None, choices=MOONS_SCALES,
                        help="two-moons coordinates: standard (mean 0, std 1 per feature, "
                             "fitted on the training split; default) or raw (make_moons')")
    parser.add_argument("--moons-noise", type=float, default=None,
                        help=f"two-moons noise std (default {MOONS_DEFAULTS['noise']:g})")
    parser.add_argument("--moons-samples", type=int, default=None,
                        help=f"two-moons training points (default {MOONS_DEFAULTS['n_train']}; "
                             f"the test set keeps {MOONS_DEFAULTS['n_test']})")


def dataset_options(args: argparse.Namespace, dataset: str, *,
                    name_scale: bool = True) -> dict[str, object]:
    """The ``lsa_ext.data.load_dataset`` options given by the moons options of ``args``.

    For moons the scale is named even when not given (``{"scale": "standard"}``; not with
    ``name_scale=False``), so a cache key says which coordinates it used; ``noise`` /
    ``n_train`` only when given.

    Raises:
        LsaUserError: a moons option given for another dataset, or an unknown dataset.
    """
    from lsa_ext.data import dataset_info

    given = {key: getattr(args, attr, None) for key, attr in
             (("scale", "moons_scale"), ("noise", "moons_noise"), ("n_train", "moons_samples"))}
    given = {k: v for k, v in given.items() if v is not None}
    if dataset_info(dataset).name != "moons":
        if given:
            flags = ", ".join(f"--moons-{'samples' if k == 'n_train' else k}" for k in given)
            raise LsaUserError(f"{flags} only apply to the moons dataset, not {dataset!r}")
        return {}
    return {"scale": "standard", **given} if name_scale else given


_ATTACK_OPTIONS = {"steps": "steps", "alpha": "alpha", "restarts": "n_restarts"}  # dest → kw


def attack_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Attack parameters given on the command line (only those set).

    Raises:
        LsaUserError: an option the ``--at`` attack does not take (``--restarts`` with PGD,
            ``--steps`` with FGSM, any of them with ``--at none``), named as the option.
    """
    import inspect

    from lsa_ext.attacks import ATTACKS

    kw = {key: getattr(args, dest) for dest, key in _ATTACK_OPTIONS.items()
          if getattr(args, dest, None) is not None}
    if kw.get("n_restarts", 1) < 1:
        raise LsaUserError(f"--restarts must be >= 1, got {kw['n_restarts']}")
    at = getattr(args, "at", None)
    if kw and at is not None:
        cls = ATTACKS.get(str(at).lower())
        takes = set() if cls is None else set(inspect.signature(cls).parameters)
        wrong = [d for d, k in _ATTACK_OPTIONS.items() if k in kw and k not in takes]
        if wrong:
            fits = [f"--{d}" for d, k in _ATTACK_OPTIONS.items() if k in takes]
            raise LsaUserError(
                f"{', '.join('--' + d for d in wrong)} do{'es' if len(wrong) == 1 else ''} not "
                f"apply to --at {at}" + (f" (it takes {', '.join(fits)})" if fits else ""))
    return kw
