"""Data → minibatches: the one adapter every pipeline (analysis, training, evaluation) uses.

Accepted ``data`` (the same everywhere):

- a pair ``(x, y)`` of tensors, or a ``TensorDataset`` of one or two tensors — batched by
  slicing (no per-sample collation), in order or in an order drawn from a ``torch.Generator``;
- a tensor ``x`` alone (unlabelled; only where the caller allows it: analysis labels such
  samples with the model's predictions);
- any map-style ``Dataset`` — wrapped in a deterministic single-process ``DataLoader``
  (:func:`make_loader`);
- a ``DataLoader`` — used as is (its own sampler decides the order; a sampler with
  ``set_epoch``, e.g. ``DistributedSampler``, is given ``epoch``);
- any other iterable of ``(x, y)`` batches — used as is.

:func:`auto_clip` reads the input range of such data (``clip="auto"`` of :func:`lsa_ext.train`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lsa_ext.checks import check_batch_size, check_clip
from lsa_ext.errors import LsaUserError


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    sampler: Any = None,
    drop_last: bool = False,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A deterministic single-process ``DataLoader`` (``num_workers=0``).

    Shuffling draws from ``generator`` when given, else from a ``torch.Generator`` seeded with
    ``seed``. With a ``sampler`` (e.g. ``DistributedSampler``) ``shuffle`` must be False — the
    sampler owns the order.

    Raises:
        LsaUserError: ``batch_size < 1``, or both ``shuffle`` and ``sampler``.
    """
    batch_size = check_batch_size(batch_size)
    if sampler is not None and shuffle:
        raise LsaUserError("make_loader: pass either shuffle=True or a sampler, not both")
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=0,
        generator=generator,
    )


def as_tensors(data: Any) -> tuple[torch.Tensor, ...] | None:
    """``(x, y)`` / ``(x,)`` when ``data`` is a tensor, a pair of tensors or a ``TensorDataset``
    of one or two tensors; None for anything else. Checks that x and y have the same length."""
    if isinstance(data, torch.Tensor):
        tensors: tuple[torch.Tensor, ...] = (data,)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(
        isinstance(t, torch.Tensor) for t in data
    ):
        tensors = (data[0], data[1])
    elif isinstance(data, TensorDataset) and len(data.tensors) in (1, 2):
        tensors = tuple(data.tensors)
    else:
        return None
    if len(tensors) == 2 and tensors[0].shape[0] != tensors[1].shape[0]:
        raise LsaUserError(
            f"x and y have different lengths: {tensors[0].shape[0]} and {tensors[1].shape[0]}"
        )
    return tensors


def num_samples(data: Any) -> int:
    """The number of samples in ``data`` (tensors, a Dataset, or a DataLoader's dataset)."""
    t = as_tensors(data)
    if t is not None:
        return int(t[0].shape[0])
    if isinstance(data, DataLoader):
        return len(data.dataset)  # type: ignore[arg-type]
    return len(data)


def first_input(data: Any) -> torch.Tensor:
    """The input ``x`` of the first sample of ``data``, as a batch ``[1, ...]``: for one
    forward that looks at the model's structure (``A<k>`` layer selectors,
    :func:`lsa_ext.probes.activation_sites`). Reads one sample and draws no random numbers: a
    DataLoader's first dataset item, not its sampler's.

    Raises:
        LsaUserError: empty data, a one-shot iterator (reading it would lose a batch), or
            samples whose input is not a tensor.
    """
    tensors = as_tensors(data)
    if tensors is not None:
        x = tensors[0][:1]
    else:
        source = data.dataset if isinstance(data, DataLoader) else data
        if isinstance(source, Dataset) and hasattr(source, "__getitem__") and \
                _len_or_none(source) != 0:
            try:
                item = source[0]
            except (IndexError, KeyError, NotImplementedError):
                item = None
            x = _input_of(item)
            x = None if x is None else x.unsqueeze(0)
        elif iter(data) is data:
            raise LsaUserError("cannot take a sample from a one-shot iterator without losing "
                               "it: pass the data as tensors, a Dataset or a DataLoader")
        else:
            x = _input_of(next(iter(data), None))
            x = None if x is None else x[:1]
    if x is None or x.shape[0] == 0:
        raise LsaUserError("no input sample found in the data (empty, or samples whose input "
                           "is not a tensor)")
    return x


def _input_of(item: Any) -> torch.Tensor | None:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0]
    return None


def _len_or_none(obj: Any) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None


def _sliced(tensors: tuple[torch.Tensor, ...], batch_size: int,
            order: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, ...]]:
    n = tensors[0].shape[0]
    for s in range(0, n, batch_size):
        if order is None:
            yield tuple(t[s:s + batch_size] for t in tensors)
        else:
            idx = order[s:s + batch_size]
            yield tuple(t[idx] for t in tensors)


def batches(
    data: Any,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    epoch: int | None = None,
    sampler: Any = None,
    allow_unlabelled: bool = False,
) -> tuple[Iterable[Any], int | None]:
    """An iterable of batches over ``data`` (see the module docstring) and its length if known.

    Args:
        data: tensors, a Dataset, a DataLoader or an iterable of batches.
        batch_size: samples per batch where this adapter batches (ignored for loaders and
            iterables, which batch themselves). The last batch may be smaller.
        shuffle: draw a new order from ``generator`` (training); default in order.
        generator: source of the shuffled order (default: a fresh unseeded one).
        epoch: passed to a DataLoader sampler's ``set_epoch`` (``DistributedSampler``).
        sampler: a ``torch.utils.data.Sampler`` over ``data`` (a Dataset or tensors), e.g. a
            ``DistributedSampler``; ``shuffle`` must then be False.
        allow_unlabelled: accept a tensor ``x`` alone (batches are then ``(x,)``).

    Returns:
        ``(iterable, number_of_batches_or_None)``. Batches are what the source yields:
        ``(x, y)`` tuples (``(x,)`` for unlabelled tensors).

    Raises:
        LsaUserError: a bad batch size, x/y of different lengths, an unlabelled tensor where
            labels are needed, a sampler with data that is not a Dataset, or an unsupported type.
    """
    batch_size = check_batch_size(batch_size)
    tensors = as_tensors(data)
    if tensors is not None:
        if len(tensors) == 1 and not allow_unlabelled:
            raise LsaUserError("data must hold labels: pass (x, y), not a tensor x alone")
        if sampler is None:
            n = tensors[0].shape[0]
            order = torch.randperm(n, generator=generator) if shuffle else None
            return _sliced(tensors, batch_size, order), -(-n // batch_size)
        data = TensorDataset(*tensors)
    if sampler is not None and not isinstance(data, Dataset):
        raise LsaUserError("sampler= needs data given as a Dataset, tensors or an (x, y) pair")
    if isinstance(data, DataLoader):
        if epoch is not None and hasattr(data.sampler, "set_epoch"):
            data.sampler.set_epoch(epoch)  # DistributedSampler: a new order per epoch
        return data, _len_or_none(data)
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        loader = make_loader(data, batch_size, shuffle=shuffle, sampler=sampler,
                             generator=generator)
        return loader, len(loader)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        return data, _len_or_none(data)
    raise LsaUserError(
        "data must be a DataLoader, a Dataset of (x, y), a pair (x, y) of tensors or an "
        f"iterable of (x, y) batches; got {type(data).__name__}"
    )


def auto_clip(data: Any) -> tuple[float, float] | None:
    """The input range perturbed inputs are clipped to for ``clip="auto"``.

    ``data.info.data_range`` when ``data`` has one (a :class:`lsa_ext.data.DataSplits`);
    else ``(0.0, 1.0)`` when ``data`` holds float tensors (:func:`as_tensors`) whose values all
    lie in [0, 1] (images); else ``None`` (no clipping: unbounded features such as two-moons,
    or a ``Dataset`` whose values are not at hand — pass ``clip`` explicitly there).
    """
    info = getattr(data, "info", None)
    if info is not None and hasattr(info, "data_range"):
        return check_clip(info.data_range)
    tensors = as_tensors(data)
    if tensors is None or not tensors[0].is_floating_point() or not tensors[0].numel():
        return None
    x = tensors[0]
    return (0.0, 1.0) if bool(x.min() >= 0) and bool(x.max() <= 1) else None
