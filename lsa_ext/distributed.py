"""torch.distributed support: torchrun detection, exact sharding and reductions, DDP, rank-0 I/O.

Nothing here launches processes. Start ``lsa analyze`` / ``lsa train`` (or your own script) with
``torchrun``; :func:`init_from_env` reads what torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and joins the process group. Without those
variables (or with ``WORLD_SIZE=1``) the program is one plain process and every helper here is a
no-op that returns its input, so library code calls them unconditionally.

Choices (defaults):

- backend: ``nccl`` when the job runs on CUDA devices, ``gloo`` otherwise; overridden by the
  ``backend`` argument (CLI ``--dist-backend``) or the ``LSA_DIST_BACKEND`` variable.
- device: ``cuda:LOCAL_RANK`` on GPU jobs (``torch.cuda.set_device`` is called), else CPU.
- timeout: every collective (and the rendezvous) gives up after ``LSA_DIST_TIMEOUT`` seconds
  (default 600, CLI ``--dist-timeout``), so a rank blocked on a dead peer raises instead of
  hanging; with nccl ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` is set (unless already set) so a
  timed-out collective tears the process down.
- non-main ranks: progress bars off (``LSA_PROGRESS=0``) and ``lsa_ext`` loggers at WARNING, so
  a job prints one copy of everything; only rank 0 writes files (:func:`is_main`).

Sharding:

- analysis: whole *batches* are dealt round-robin: global batch ``k`` (the same batch a
  1-process run sees) goes to rank ``k % world_size`` (:func:`rank`, :func:`world_size`). Every
  sample is seen exactly once, nothing is padded, and randomness seeded per global batch
  (:func:`lsa_ext.seeding.batch_seeding`) does not depend on the number of ranks, so the
  statistics reduced by :func:`all_reduce_stats` equal a 1-process run up to float64 summation
  order.
- training: every rank draws the same global batch (same seed) and keeps its contiguous slice
  (:func:`shard_batch`); DDP averages gradients, which equals the 1-process gradient of the
  batch-mean loss (uneven slices are weighted so this stays exact).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lsa_ext.devices import resolve_device
from lsa_ext.errors import LsaUserError

log = logging.getLogger("lsa_ext.distributed")

DEFAULT_TIMEOUT_S = 600.0
BACKENDS = ("gloo", "nccl", "mpi", "ucc")
_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


# --------------------------------------------------------------------------------------------
# Context
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job.

    Attributes:
        rank: global rank (0 … world_size-1); 0 in a plain process.
        world_size: number of processes; 1 in a plain process.
        local_rank: rank on this node (selects the GPU).
        device: the device this rank computes on.
        backend: process-group backend (``"gloo"``, ``"nccl"``…), None in a plain process.
        timeout_s: collective timeout in seconds, None in a plain process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    timeout_s: float | None = None

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the only rank that prints and writes files)."""
        return self.rank == 0


_CTX: DistContext | None = None
_OWNS_GROUP = False
_FAILED = False
_QUIETED: list[tuple[logging.Logger, int]] = []


def launched() -> bool:
    """True when torchrun (or a compatible launcher) started this process with WORLD_SIZE > 1."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise LsaUserError(
                f"environment variable {name} is not set; start the job with torchrun "
                "(it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)"
            )
        return default
    try:
        return int(raw)
    except ValueError:
        raise LsaUserError(f"environment variable {name}={raw!r} is not an integer") from None


def _resolve_device(device: str | torch.device | None, local_rank: int | None) -> torch.device:
    """:func:`lsa_ext.devices.resolve_device`, then on CUDA this rank's GPU ``cuda:local_rank``;
    ``local_rank`` None (a plain process) keeps a given index.

    Raises:
        LsaUserError: a bad device (see ``resolve_device``), or ``local_rank`` beyond this
            node's CUDA devices.
    """
    dev = resolve_device(device)
    if dev.type != "cuda" or local_rank is None:
        return dev
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise LsaUserError(
            f"LOCAL_RANK={local_rank} but this node has only {count} CUDA device(s); "
            f"start at most {count} processes per node (--nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


def choose_backend(device: torch.device, requested: str | None = None) -> str:
    """The process-group backend: ``requested`` > ``LSA_DIST_BACKEND`` > nccl (CUDA) / gloo.

    Raises:
        LsaUserError: an unknown or unavailable backend, or nccl without a CUDA device.
    """
    name = requested or os.environ.get("LSA_DIST_BACKEND") or None
    if name is None:
        name = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    name = name.lower()
    if name not in BACKENDS:
        raise LsaUserError(f"unknown distributed backend {name!r}; choose one of {BACKENDS}")
    if not dist.is_backend_available(name):
        raise LsaUserError(f"distributed backend {name!r} is not available in this torch build")
    if name == "nccl" and device.type != "cuda":
        raise LsaUserError("backend 'nccl' needs CUDA devices; use 'gloo' on CPU")
    return name


def _timeout_from_env(timeout_s: float | None) -> float:
    if timeout_s is None:
        raw = os.environ.get("LSA_DIST_TIMEOUT")
        try:
            timeout_s = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise LsaUserError(f"LSA_DIST_TIMEOUT={raw!r} is not a number of seconds") from None
    if not timeout_s > 0 or not math.isfinite(timeout_s):
        raise LsaUserError(
            f"distributed timeout must be a positive number of seconds, got {timeout_s}"
        )
    return float(timeout_s)


def init_from_env(
    backend: str | None = None,
    device: str | torch.device | None = None,
    timeout_s: float | None = None,
    quiet_non_main: bool = True,
) -> DistContext:
    """Joins the torchrun job described by the environment, or returns a 1-process context.

    Idempotent: a second call returns the context of the first. A process group the caller
    initialised already is adopted (and left to the caller to destroy); one created here is
    destroyed by :func:`cleanup`, which also runs at interpreter exit.

    Args:
        backend: ``"gloo"``, ``"nccl"``…; None: ``LSA_DIST_BACKEND`` or automatic.
        device: ``"cpu"``, ``"cuda"`` or None/``"auto"`` (CUDA when available). On CUDA each
            rank takes ``cuda:LOCAL_RANK``.
        timeout_s: collective timeout; None: ``LSA_DIST_TIMEOUT`` or 600 s.
        quiet_non_main: on ranks ≠ 0 switch progress bars off and raise ``lsa_ext`` logging to
            WARNING.

    Returns:
        The :class:`DistContext` (also kept for :func:`get_context`).
    """
    global _CTX, _OWNS_GROUP
    if _CTX is not None:
        return _CTX
    if dist.is_available() and dist.is_initialized():  # set up by the caller
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        dev = _resolve_device(device, local)
        _CTX = DistContext(rank, world, local, dev, dist.get_backend(), timeout_s)
        _quiet(_CTX, quiet_non_main)
        return _CTX
    if not launched():
        _CTX = DistContext(device=_resolve_device(device, None))
        return _CTX
    if not dist.is_available():
        raise LsaUserError("this torch build has no torch.distributed support")
    rank = _env_int("RANK")
    world = _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK", 0)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise LsaUserError(
                f"environment variable {var} is not set; start the job with torchrun"
            )
    if not 0 <= rank < world:
        raise LsaUserError(f"RANK={rank} is outside 0..WORLD_SIZE-1 ({world - 1})")
    dev = _resolve_device(device, local)
    name = choose_backend(dev, backend)
    timeout = _timeout_from_env(timeout_s)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if name == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    log.debug("rank %d/%d joining (%s, %s, timeout %.0fs)", rank, world, name, dev, timeout)
    try:
        dist.init_process_group(
            backend=name,
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout),
        )
    except Exception as exc:
        raise RuntimeError(
            f"rank {rank} failed to join the process group at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({name}): {exc}"
        ) from exc
    _OWNS_GROUP = True
    atexit.register(cleanup)
    _CTX = DistContext(rank, world, local, dev, name, timeout)
    _quiet(_CTX, quiet_non_main)
    log.info("rank %d/%d ready on %s (backend %s)", rank, world, dev, name)
    return _CTX


def _quiet(ctx: DistContext, enabled: bool) -> None:
    if enabled and not ctx.is_main:
        os.environ["LSA_PROGRESS"] = "0"
        lg = logging.getLogger("lsa_ext")
        _QUIETED.append((lg, lg.level))
        lg.setLevel(logging.WARNING)


def add_cli_options(parser) -> None:
    """Adds ``--dist-backend`` and ``--dist-timeout`` to an argparse (sub)parser."""
    group = parser.add_argument_group("distributed (under torchrun)")
    group.add_argument(
        "--dist-backend",
        default=None,
        choices=BACKENDS,
        help="process-group backend (default: $LSA_DIST_BACKEND, else nccl on CUDA, gloo on CPU)",
    )
    group.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"collective timeout (default: $LSA_DIST_TIMEOUT, else {DEFAULT_TIMEOUT_S:.0f})",
    )


def get_context() -> DistContext:
    """The current context: the one :func:`init_from_env` made, else a 1-process CPU one."""
    if _CTX is not None:
        return _CTX
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return DistContext(rank, dist.get_world_size(), _env_int("LOCAL_RANK", rank),
                           backend=dist.get_backend())
    return DistContext()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Global rank of this process (0 in a plain process)."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """Number of processes in the job (1 in a plain process)."""
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on rank 0 and in a plain process: the process that prints and writes files."""
    return rank() == 0


def rank_prefix() -> str:
    """``"[rank R] "`` in a multi-process job, else ``""`` (for messages)."""
    return f"[rank {rank()}] " if _active() else ""


def barrier() -> None:
    """Waits for every rank (no-op in a plain process)."""
    if _active():
        if get_context().device.type == "cuda" and dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def cleanup() -> None:
    """Destroys the group :func:`init_from_env` created and forgets the context (idempotent)."""
    global _CTX, _OWNS_GROUP, _FAILED
    # after a failure the process is on its way out: a collective-based teardown could wait
    # on the dead peer (nccl), so the group is left to process exit and torchrun
    if _OWNS_GROUP and not _FAILED and dist.is_available() and dist.is_initialized():
        # leave together: a rank tearing its group down while a peer is still working (rank 0
        # writing the report) can abort in gloo's teardown; then free unreachable DDP wrappers
        # (their reducers hold the group) so none is torn down late, at interpreter shutdown
        with contextlib.suppress(Exception):
            barrier()
        gc.collect()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _OWNS_GROUP = False
    _FAILED = False
    while _QUIETED:
        lg, level = _QUIETED.pop()
        lg.setLevel(level)
    _CTX = None


@contextlib.contextmanager
def failure_guard(expected: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Logs ``rank R failed: <error>`` when the body raises in a multi-process job, re-raises.

    torchrun then stops the other ranks and exits non-zero, naming the failed rank too.
    Exceptions of the ``expected`` types (user errors the caller reports itself, Ctrl-C) are
    re-raised without the log line, so they are reported once.
    """
    global _FAILED
    try:
        yield
    except BaseException as exc:
        _FAILED = True
        if (_active() or launched()) and not isinstance(exc, expected):
            r = rank() if _active() else os.environ.get("RANK", "?")
            log.error("rank %s failed: %s: %s", r, type(exc).__name__, exc)
        raise


# --------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------


def batch_slice(n: int, rank_: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous part of a global batch of ``n`` samples (sizes differ by ≤ 1)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def shard_batch(
    *tensors: torch.Tensor, rank_: int | None = None, world: int | None = None
) -> tuple[tuple[torch.Tensor, ...], float] | None:
    """This rank's slice of a global batch, and the weight that keeps DDP's gradient exact.

    DDP averages gradients over W ranks. With a batch-mean loss on ``n_r`` of the ``n`` samples,
    multiplying the loss by ``weight = W · n_r / n`` makes the average equal the gradient of the
    mean over all ``n`` samples (weight 1.0 when ``n`` is divisible by W).

    Returns:
        ``(tensors_slice, weight)``; ``(tensors, 1.0)`` in a plain process; None when the
        global batch has fewer samples than ranks (every rank skips it, consistently).

    Raises:
        LsaUserError: tensors with different first dimensions.
    """
    if not tensors:
        raise LsaUserError("shard_batch needs at least one tensor")
    n = tensors[0].shape[0]
    for t in tensors[1:]:
        if t.shape[0] != n:
            raise LsaUserError(
                f"shard_batch: tensors have different batch sizes ({n} and {t.shape[0]})"
            )
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if w == 1:
        return tuple(tensors), 1.0
    if n < w:
        return None
    sl = batch_slice(n, r, w)
    return tuple(t[sl] for t in tensors), w * (sl.stop - sl.start) / n


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def wrap_model(model: nn.Module, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` in a multi-process job, else ``model`` unchanged.

    The model must already be on this rank's device (``get_context().device``). DDP broadcasts
    rank 0's parameters and buffers at construction, so all ranks start identical. Hooks
    (:class:`lsa_ext.probes.Capture`) go on :func:`lsa_ext.modules.unwrap` (the inner module);
    they fire when the wrapper is called. Run attacks on the inner module too, so their
    gradient computations do not trigger DDP's gradient all-reduce.
    """
    if not _active():
        return model
    ctx = get_context()
    if ctx.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [ctx.device.index])
        ddp_kwargs.setdefault("output_device", ctx.device.index)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


# --------------------------------------------------------------------------------------------
# Exact reductions
# --------------------------------------------------------------------------------------------


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if callable(getattr(obj, "merge", None)) and callable(getattr(obj, "to", None)):
        return obj.to("cpu")  # e.g. analysis.CMStats
    if isinstance(obj, Mapping):
        return type(obj)((k, _to_cpu(v)) for k, v in obj.items()) if isinstance(obj, dict) else {
            k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to_cpu(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable; tensors are moved to the CPU first), in rank order."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, _to_cpu(obj))
    return out


def _combine(values: Sequence[Any], where: str) -> Any:
    present = [v for v in values if v is not None]
    if not present:
        return None
    if len(present) < len(values):  # None: this rank saw nothing here
        return _combine(present, where)
    first = values[0]
    merge = getattr(first, "merge", None)
    if callable(merge) and not isinstance(first, (Mapping, torch.Tensor)):
        acc = first  # lsa_ext.analysis.CMStats, anything with merge(other) -> merged
        for v in values[1:]:
            acc = acc.merge(v)
        return acc
    if isinstance(first, torch.Tensor):
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) != 1:
            raise RuntimeError(f"all_reduce_stats: {where} has different shapes on ranks: {shapes}")
        if first.is_floating_point() or first.is_complex():
            acc = first.to(torch.float64 if first.is_floating_point() else torch.complex128)
            for v in values[1:]:
                acc = acc + v.to(acc.dtype)
            return acc.to(first.dtype)
        if first.dtype == torch.bool:
            raise RuntimeError(f"all_reduce_stats: {where} is a bool tensor; cannot sum it")
        acc = first.clone()
        for v in values[1:]:
            acc = acc + v
        return acc
    if isinstance(first, bool) or isinstance(first, (str, bytes)):
        if any(v != first for v in values[1:]):
            raise RuntimeError(f"all_reduce_stats: {where} differs between ranks: {list(values)}")
        return first
    if isinstance(first, int):
        return sum(values)
    if isinstance(first, float):
        return math.fsum(values)
    if isinstance(first, Mapping):
        keys = list(first.keys())
        for v in values[1:]:
            if list(v.keys()) != keys:
                raise RuntimeError(
                    f"all_reduce_stats: {where or 'stats'} has different keys on ranks: "
                    f"{keys} vs {list(v.keys())}"
                )
        items = [(k, _combine([v[k] for v in values], f"{where}[{k!r}]")) for k in keys]
        return type(first)(items) if isinstance(first, dict) else dict(items)
    if isinstance(first, (list, tuple)):
        if any(len(v) != len(first) for v in values[1:]):
            raise RuntimeError(f"all_reduce_stats: {where} has different lengths on ranks")
        parts = [_combine([v[i] for v in values], f"{where}[{i}]") for i in range(len(first))]
        if isinstance(first, tuple) and hasattr(first, "_fields"):
            return type(first)(*parts)
        return type(first)(parts)
    raise TypeError(f"all_reduce_stats: cannot reduce {where} of type {type(first).__name__}")


def _to_device_like(reduced: Any, original: Any) -> Any:
    if reduced is None or original is None:
        return reduced
    if isinstance(original, torch.Tensor):
        return reduced.to(original.device)
    if callable(getattr(original, "merge", None)) and not isinstance(original, Mapping):
        return reduced  # merge-able objects keep the device of the first rank's value
    if isinstance(original, Mapping):
        items = [(k, _to_device_like(reduced[k], original[k])) for k in original]
        return type(reduced)(items) if isinstance(reduced, dict) else dict(items)
    if isinstance(original, (list, tuple)):
        parts = [_to_device_like(r, o) for r, o in zip(reduced, original, strict=True)]
        if isinstance(original, tuple) and hasattr(original, "_fields"):
            return type(original)(*parts)
        return type(original)(parts)
    return reduced


def all_reduce_stats(stats: Any) -> Any:
    """Sums (exactly) a nested structure of statistics over all ranks; same structure back.

    Leaves: floating tensors are summed in float64 (returned in their dtype, on their device),
    integer tensors and ints summed exactly, floats with ``math.fsum``, objects with a
    ``merge(other)`` method (e.g. ``analysis.CMStats``) merged with it, strings/bools must
    agree on every rank. ``None`` means "nothing from this rank": it is
    skipped (a rank whose shard was empty passes None). Containers: dict (keys in the same order
    on every rank), list, tuple, namedtuple. Ranks are combined in rank order, so every rank
    gets bit-identical results. In a plain process ``stats`` is returned as is.

    Stats are small (perturbations × layers), so they travel pickled in one all-gather.
    """
    if not _active():
        return stats
    gathered = all_gather_objects(stats)
    return _to_device_like(_combine(gathered, ""), stats)


__all__ = [
    "BACKENDS",
    "DEFAULT_TIMEOUT_S",
    "DistContext",
    "add_cli_options",
    "all_gather_objects",
    "all_reduce_stats",
    "barrier",
    "batch_slice",
    "choose_backend",
    "cleanup",
    "failure_guard",
    "get_context",
    "init_from_env",
    "is_main",
    "launched",
    "rank",
    "rank_prefix",
    "shard_batch",
    "wrap_model",
    "world_size",
]
