"""Cache of normally trained models, so that ``lsa analyze`` trains a default model only once.

Algorithm 2 of Khalooei et al. (arXiv 2202.02626) starts by training the model normally; for the
built-in models and datasets the result depends only on (model, dataset, seed, epochs, batch
size, data files), so it is kept as a state dict (read back with ``weights_only=True``) under
:func:`cache_dir`, named by :func:`cache_name`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lsa_ext import distributed
from lsa_ext.errors import LsaUserError
from lsa_ext.io import atomic_write_with, check_dir
from lsa_ext.models import load_weights
from lsa_ext.training import fit

log = logging.getLogger("lsa_ext.model_cache")


def cache_dir() -> Path:
    """``$LSA_CACHE_DIR``, else ``$XDG_CACHE_HOME/lsa_ext``, else ``~/.cache/lsa_ext``."""
    if os.environ.get("LSA_CACHE_DIR"):
        return Path(os.environ["LSA_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "lsa_ext"


def cache_name(model: str, dataset: str, seed: int, epochs: int, batch_size: int = 128,
               data_dir: str | None = None, data_options: Mapping[str, Any] | None = None
               ) -> str:
    """``<model>-<dataset>-seed<S>-ep<E>.pt``, plus ``-bs<B>`` for a training batch size other
    than 128, ``-d<hash>`` naming the resolved ``data_dir`` (MNIST/CIFAR-10 folders) and
    ``-<key>=<value>`` per dataset option (sorted; e.g. ``-scale=standard`` for two-moons), so
    a model trained on other settings or other data is never taken for this one."""
    key = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model}-{dataset}") + f"-seed{seed}-ep{epochs}"
    if batch_size != 128:
        key += f"-bs{batch_size}"
    if data_dir:
        resolved = str(Path(data_dir).expanduser().resolve())
        key += "-d" + hashlib.sha1(resolved.encode()).hexdigest()[:8]
    for name, value in sorted((data_options or {}).items()):
        key += re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"-{name}={value:g}" if isinstance(
            value, float) else f"-{name}={value}")
    return key + ".pt"


def load_or_train(
    model: nn.Module,
    train_data: Any,
    path: str | os.PathLike | None,
    *,
    epochs: int,
    batch_size: int = 128,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, str]:
    """The weights cached at ``path``, or ``model`` trained normally and then cached.

    Returns ``(copy of model with the cached weights, "cache")`` when ``path`` exists on every
    rank (under torchrun all ranks must take the same branch) and loads; otherwise trains
    ``model`` in place with :func:`lsa_ext.training.fit` (``epochs``, ``batch_size``, ``seed``,
    ``device``; one DDP job under torchrun), writes its CPU state dict to ``path`` atomically
    (rank 0 only) and returns ``(model, "trained")``. ``path=None`` disables the cache. An
    unusable cached file, a cache folder that cannot be written (checked before training: the
    warning names the folder and ``$LSA_CACHE_DIR``) or a failed write is logged as a warning,
    never fatal: the model is then trained and used without caching.

    Raises:
        LsaUserError: bad training settings (from :func:`lsa_ext.training.fit`).
    """
    path = None if path is None else Path(path)
    if path is not None and all(distributed.all_gather_objects(path.is_file())):
        candidate = copy.deepcopy(model)  # a failed load must not leave ``model`` half-loaded
        try:
            load_weights(candidate, path)
            log.info("reusing cached model %s", path)
            return candidate, "cache"
        except LsaUserError as exc:
            log.warning("ignoring unusable cached model %s: %s", path, exc)
    if path is not None and distributed.is_main() and not _writable(path.parent):
        path = None
    fit(model, train_data, epochs=epochs, batch_size=batch_size, seed=seed, device=str(device))
    if path is not None and distributed.is_main():
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        try:
            atomic_write_with(path, lambda fh: torch.save(state, fh))
        except (OSError, LsaUserError) as exc:
            log.warning("could not write the model cache (%s): %s; the model is used without "
                        "caching", _CACHE_HINT, exc)
    return model, "trained"


_CACHE_HINT = "set LSA_CACHE_DIR to a writable folder, or pass --no-cache"


def _writable(folder: Path) -> bool:
    """Whether the cache ``folder`` can be created/written; warns (naming it) when not."""
    try:
        check_dir(folder, "model cache folder")
        return True
    except LsaUserError as exc:
        log.warning("%s; training without caching (%s)", exc, _CACHE_HINT)
        return False
