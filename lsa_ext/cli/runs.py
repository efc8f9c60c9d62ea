"""Run folders of ``lsa train``: default names, no silent overwrite, a run's ``config.json``.

A run folder (``--out``) holds ``config.json`` (``{"config": TrainConfig.to_dict(), "meta":
{dataset, model, data_dir, data_seed, ...}}``), ``last.pt`` / ``prev.pt`` (checkpoints),
``history.json``, with ``--monitor`` ``monitor.csv`` / ``monitor.png`` and, at the end,
``model.pt``; ``lsa evaluate`` adds ``evaluation.json/.csv``.

* :func:`default_out`: ``runs/<dataset>-<run name>`` (``runs/digits-AT-PGD-LR-mvl``), so runs
  with different settings land in different folders.
* :func:`prepare_out`: a non-empty folder is refused unless ``--overwrite`` (the run files in it
  are removed first, so no checkpoint of the old run can be resumed by mistake) or ``--resume``.
* :func:`run_meta`: the ``meta`` of the run that wrote a checkpoint — from ``config.json`` next
  to it, else from the checkpoint itself (``last.pt``, or ``last.pt`` next to ``model.pt``) —
  so every command taking ``--checkpoint`` knows the run's dataset and model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lsa_ext.errors import LsaUserError

CONFIG = "config.json"


def default_out(dataset: str, run_name: str) -> Path:
    """``runs/<dataset>-<run name>``, e.g. ``runs/moons-AT-PGD-LR-L2``."""
    return Path("runs") / f"{dataset}-{run_name}"


def prepare_out(out: str | os.PathLike, *, overwrite: bool) -> Path:
    """Checks that a new run may be written into ``out`` (nothing is created or removed).

    Raises:
        LsaUserError: ``out`` is a file or not writable (:func:`lsa_ext.io.check_dir`), or a
            folder that is not empty while ``overwrite`` is False (the message says how to
            continue: ``--resume``, ``--overwrite`` or another ``--out``).
    """
    from lsa_ext.io import check_dir

    out = check_dir(out)
    if overwrite or not out.is_dir():
        return out
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return out
    shown = _shown(entries)
    if not run_files(out):
        raise LsaUserError(f"--out {str(out)!r} already holds files that are not an lsa train "
                           f"run ({shown}); choose another --out, or write the run next to "
                           "them with --overwrite")
    raise LsaUserError(f"--out {str(out)!r} already holds a run ({shown}); continue it with "
                       "--resume, replace it with --overwrite, or choose another --out")


def run_files(out: Path) -> list[str]:
    """The run files in folder ``out`` (:func:`lsa_ext.trainer.run_files`, whose
    :data:`~lsa_ext.trainer.RUN_FILES` is the one list of them)."""
    from lsa_ext.trainer import run_files as files

    return files(out)


def nothing_to_resume(out: Path, last: str) -> str:
    """Why ``--resume`` finds no checkpoint ``last`` in run folder ``out``, and what to do."""
    fresh = "start the run without --resume"
    if not out.exists():
        return f"nothing to resume: {str(out)!r} does not exist (no run there); {fresh}"
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return f"nothing to resume: {str(out)!r} is empty (no run in it); {fresh}"
    if not run_files(out):
        return (f"nothing to resume: {str(out)!r} holds no lsa train run ({_shown(entries)}); "
                f"{fresh}, with another --out or --overwrite (which keeps those files)")
    return (f"nothing to resume: {str(out)!r} has no {last} (the run stopped before it "
            "started training); start it again without --resume, with --overwrite")


def _shown(entries: list[str]) -> str:
    return ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")


def clear_run(out: Path) -> list[str]:
    """``--overwrite``: removes the old run's files from ``out``
    (:func:`lsa_ext.trainer.clear_run`); returns the names removed."""
    from lsa_ext.trainer import clear_run as clear

    return clear(out)


def read_config(folder: Path) -> dict[str, Any] | None:
    """The ``config.json`` of a run folder as ``{"config": {...}, "meta": {...}}``, or None
    when there is none.

    Raises:
        LsaUserError: the file exists but is not a run configuration.
    """
    path = folder / CONFIG
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LsaUserError(f"{str(path)!r} is not readable JSON: {exc}") from None
    if not (isinstance(doc, dict) and isinstance(doc.get("meta"), dict)
            and isinstance(doc.get("config"), dict)):
        raise LsaUserError(f"{str(path)!r} is not an 'lsa train' run configuration")
    return doc


def run_meta(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The ``meta`` (dataset, model, data_dir, data_seed, ...) of the ``lsa train`` run that
    wrote ``checkpoint``: its folder's ``config.json``, else the ``meta`` stored in the
    checkpoint (or in ``last.pt`` next to a ``model.pt``); ``{}`` for a plain state dict.

    Raises:
        LsaUserError: the checkpoint itself is unreadable, or the config.json is malformed.
    """
    from lsa_ext import checkpoint as ckpt

    path = Path(checkpoint)
    doc = read_config(path.parent)
    if doc is not None:
        return dict(doc["meta"])
    candidates = [path] + ([path.with_name(ckpt.LAST)] if path.name == "model.pt" else [])
    for c in candidates:
        try:
            obj = ckpt.torch_load(c)
        except LsaUserError:
            if c == path:  # the file asked for is unreadable: say so
                raise
            continue
        if isinstance(obj, dict) and obj.get("format") == ckpt.FORMAT:
            return dict(obj.get("meta") or {})
    return {}


def from_run(given: set[str], args: Any, meta: dict[str, Any], path: str | os.PathLike,
             names: dict[str, str]) -> dict[str, Any]:
    """Settings of a command taking ``--checkpoint`` that the run's ``meta`` fixes.

    ``names`` maps an argparse dest (``"dataset"``) to its ``meta`` key. Each setting not
    given on the command line (``given``: the dests given explicitly) is taken from ``meta``;
    one given and different from the run's is an error naming both values.

    Raises:
        LsaUserError: options that contradict the run (all of them in one message).
    """
    out: dict[str, Any] = {}
    clashes = []
    for dest, key in names.items():
        if key not in meta or meta[key] is None:
            continue
        if dest in given and _norm(getattr(args, dest)) != _norm(meta[key]):
            clashes.append(f"--{dest.replace('_', '-')} {getattr(args, dest)} (the run: "
                           f"{meta[key]})")
        out[dest] = meta[key] if dest not in given else getattr(args, dest)
    if clashes:
        raise LsaUserError(f"{'; '.join(clashes)} contradict the run that wrote {str(path)!r} "
                           f"(its {CONFIG}); drop them")
    return out


def _norm(v: Any) -> Any:
    return v.strip().lower() if isinstance(v, str) else v
