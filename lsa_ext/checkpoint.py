"""Atomic, resumable training checkpoints (``.pt`` files loaded with ``weights_only=True``).

A checkpoint is a plain ``dict`` of tensors and Python primitives (so ``torch.load(...,
weights_only=True)`` accepts it)::

    {"format": "lsa_ext.checkpoint", "version": 1,
     "epoch": int,                 # completed epochs
     "model": state_dict, "optimizer": state_dict, "scheduler": state_dict | None,
     "rng": {"torch": ByteTensor, "cuda": [ByteTensor, ...], "numpy": {...},
             "python": {...}, "loader": ByteTensor},
     "config": {...}, "meta": {...}, "history": [{...}, ...]}

Writing (:func:`save_checkpoint`) goes through :func:`lsa_ext.io.atomic_write_with`: the file is
written to a temporary name, fsynced and renamed, so a crash (even SIGKILL) at any moment leaves
either the previous complete file or the new complete file, never half of one. With
``keep_previous=True`` the file being replaced is first hard-linked (or copied) to
``prev.pt`` next to it, so one older good checkpoint survives as well.

:func:`training_state` / :func:`restore_training_state` build and apply the dict of a training
run (:class:`lsa_ext.training.Trainer`); :func:`torch_load` is the one reader of ``.pt`` files.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsa_ext.checks import first_line
from lsa_ext.errors import LsaUserError
from lsa_ext.io import atomic_write_with, ensure_dir

log = logging.getLogger("lsa_ext.checkpoint")

FORMAT = "lsa_ext.checkpoint"
VERSION = 1
LAST = "last.pt"
PREVIOUS = "prev.pt"


# --------------------------------------------------------------------------- RNG states
def capture_rng_state(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """The global RNG states (torch, CUDA, numpy, Python ``random``) and a loader generator's,
    as tensors and plain types (loadable with ``weights_only=True``)."""
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "python": {"version": int(py_version), "state": [int(v) for v in py_state],
                   "gauss": None if py_gauss is None else float(py_gauss)},
        "loader": None if loader_generator is None else loader_generator.get_state(),
    }
    return state


def restore_rng_state(
    state: dict[str, Any], loader_generator: torch.Generator | None = None
) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
         n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if loader_generator is not None and state.get("loader") is not None:
        loader_generator.set_state(state["loader"])


# --------------------------------------------------------------------------- trainer state
def training_state(
    *,
    epoch: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    loader_generator: torch.Generator | None,
    config: dict[str, Any],
    meta: dict[str, Any],
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """The checkpoint dict (module docstring) of a training run after ``epoch`` epochs:
    ``model``'s and ``optimizer``'s (and ``scheduler``'s) state dicts, every RNG state
    (:func:`capture_rng_state`), the plain-typed ``config``, ``meta`` and ``history``."""
    return {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "rng": capture_rng_state(loader_generator),
        "config": config,
        "meta": meta,
        "history": history,
    }


def restore_training_state(
    state: dict[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    loader_generator: torch.Generator | None,
) -> tuple[int, list[dict[str, Any]]]:
    """Inverse of :func:`training_state`: loads weights, optimizer, scheduler and RNG states.

    Returns:
        ``(epoch, history)``: the completed epochs and the per-epoch records.

    Raises:
        LsaUserError: the state does not match this model/optimizer.
    """
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise LsaUserError(f"checkpoint does not match this model/optimizer: {exc}") from exc
    restore_rng_state(state["rng"], loader_generator)
    return int(state["epoch"]), list(state.get("history", []))


# --------------------------------------------------------------------------- save / load
def save_checkpoint(path: str | os.PathLike, state: dict[str, Any],
                    keep_previous: bool = True, check_previous: bool = True) -> Path:
    """Writes ``state`` (a checkpoint dict, see the module docstring) to ``path`` atomically.

    With ``keep_previous`` an existing ``path`` is kept as ``prev.pt`` in the same folder
    (hard link, or a copy where links are not supported) before being replaced — unless it is
    damaged (:func:`archive_damage`: truncated, or a record whose bytes changed), so a
    run resumed from ``prev.pt`` after ``last.pt`` was found unreadable keeps its good
    ``prev.pt`` instead of replacing it with the damaged file. ``check_previous=False`` skips
    that check (a read of the whole file) for a ``path`` the caller wrote itself.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    ensure_dir(path.parent, "checkpoint folder")
    state = {"format": FORMAT, "version": VERSION, **state}
    damage = (archive_damage(path) if keep_previous and check_previous and path.exists()
              else None)
    if damage is not None:
        log.warning("%s is damaged (%s): it is replaced, and not kept as %s", path, damage,
                    PREVIOUS)
    elif keep_previous and path.exists():
        prev = path.with_name(PREVIOUS)
        tmp = path.with_name(f".{PREVIOUS}.tmp")
        try:
            if tmp.exists():
                tmp.unlink()
            try:
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
            os.replace(tmp, prev)
        except OSError as exc:  # keeping the older copy is a convenience, never fatal
            log.warning("could not keep the previous checkpoint as %s: %s", prev, exc)
    atomic_write_with(path, lambda fh: torch.save(state, fh))
    return path


def archive_damage(path: str | os.PathLike) -> str | None:
    """Why ``path``, a ``torch.save`` zip archive, is damaged — ``"truncated or not a zip
    archive"``, ``"no data.pkl"``, or ``"CRC mismatch in <record>"`` (zipfile's ``testzip``
    reads every record and checks its CRC-32, which ``torch.load`` does not) — or None when
    it is intact. Reads the whole file once."""
    try:
        with zipfile.ZipFile(path) as z:
            if not any(n.endswith("data.pkl") for n in z.namelist()):
                return "no data.pkl"
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return "truncated or not a zip archive"
    return None if bad is None else f"CRC mismatch in {bad}"


def torch_load(path: str | os.PathLike, map_location: Any = "cpu", what: str = "checkpoint"
               ) -> Any:
    """``torch.load(path, map_location, weights_only=True)`` whose failures are one clear line.

    The one place lsa_ext reads ``.pt`` files (training checkpoints, ``--checkpoint`` state
    dicts, cached models), so every command reports a bad file the same way.

    Raises:
        LsaUserError: the file does not exist; it holds pickled Python objects that
            ``weights_only=True`` refuses (named); or it is truncated, corrupt (a zip archive
            whose records fail their CRC-32, :func:`archive_damage`) or not a PyTorch file.
            The message names ``what`` and the path.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise LsaUserError(f"{what} {str(path)!r} does not exist")
    if zipfile.is_zipfile(path):  # torch.save's format; torch.load checks no CRC
        damage = archive_damage(path)
        if damage is not None:
            raise LsaUserError(f"{what} {str(path)!r} is unreadable: truncated or corrupt "
                               f"({damage})")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if refused:
            raise LsaUserError(
                f"{what} {str(path)!r} cannot be loaded with weights_only=True: it holds a "
                f"pickled {refused.group(1)}, not only tensors and plain containers (save a "
                "state_dict instead)"
            ) from exc
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        reason = detail.group(1).strip() if detail else first_line(exc)
        cause: BaseException = exc
    except Exception as exc:  # noqa: BLE001 - a corrupt file can make torch raise nearly anything
        reason, cause = first_line(exc), exc
    raise LsaUserError(
        f"{what} {str(path)!r} is unreadable: truncated or corrupt, or not a PyTorch file "
        f"({reason})"
    ) from cause


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Loads a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        LsaUserError: the file is missing, truncated, corrupt, or not an lsa_ext checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise LsaUserError(f"checkpoint {path} does not exist")
    try:
        state = torch_load(path, map_location)
    except LsaUserError as exc:
        prev = path.with_name(PREVIOUS)
        if path.name == PREVIOUS or not prev.is_file():
            raise
        raise LsaUserError(f"{exc}; an older checkpoint is kept at {prev} (resume from it: "
                           f"lsa train --resume {prev}, or resume={str(prev)!r} in "
                           "lsa_ext.train)") from exc.__cause__
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise LsaUserError(f"{path} is not an lsa_ext training checkpoint")
    if state.get("version", 0) > VERSION:
        raise LsaUserError(
            f"checkpoint {path} has format version {state.get('version')}, newer than this "
            f"lsa_ext ({VERSION}); upgrade lsa_ext"
        )
    return state


def model_state_from_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """A model ``state_dict`` from a training checkpoint or from a plain saved state_dict."""
    obj = torch_load(path, map_location)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return obj["model"]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise LsaUserError(f"{path} holds neither an lsa_ext checkpoint nor a model state_dict")
