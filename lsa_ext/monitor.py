"""Layer monitoring during training: each probed layer's CM on a fixed probe batch, per epoch.

Khalooei et al. (arXiv 2202.02626) speak of layer monitoring; :func:`lsa_ext.analysis.analyze`
runs once, before or after training. :class:`LayerMonitor` runs the same measurement during a
training run (:class:`lsa_ext.trainer.Trainer` with ``TrainConfig.monitor``, ``lsa train
--monitor``): before the first epoch (epoch 0: the model as training starts) and after every
epoch it measures, for each probed site ``l``, the mean and the population std over the probe
samples of the relative error ``‖φ_l(x) − φ_l(x̂)‖ / ‖φ_l(x)‖`` — the CM ``lsa analyze``
reports — with :func:`lsa_ext.analysis.accumulate` (paired capture, hooks reduced inside the
forward, :mod:`lsa_ext.paired_capture`).

Choices (documented defaults):

* Probe: :data:`DEFAULT_SAMPLES` (256) training samples (all of them when the training set is
  smaller), drawn once when the monitor is built by a ``torch.Generator`` seeded with the run's
  seed, so every epoch measures the same inputs.
* Attack: the training attack — ``config.at`` with the run's ε, its training parameters
  (:data:`lsa_ext.train_config.TRAIN_ATTACK_DEFAULTS`, ``attack_kwargs``) and clip — built
  once with seed ``config.seed`` and restarted from it before each measurement (the same
  random starts every epoch), in **eval** mode whatever ``attack_mode`` is: the measurement
  never updates BatchNorm statistics. Runs without an attack (``at="none"``) are measured
  under :data:`NONE_ATTACK` (FGSM) at the run's ε. A custom ``attack=`` is used as given; its
  generator state is saved and restored around the measurement when it has
  ``state_dict``/``load_state_dict`` (as lsa_ext attacks do).
* Sites: ``config.monitor_layers`` (default :data:`DEFAULT_LAYERS`, ``"activations"``, as
  ``lsa analyze`` probes them; any :func:`lsa_ext.probes.select_layers` selector) plus the
  regularised LR sites; ``kind`` is ``"lr"`` for an LR site, else ``"probe"``.
* The model runs in eval mode under torch.no_grad for the forwards (the attack takes its
  gradients with ``torch.autograd.grad``, which leaves ``.grad`` alone); its train/eval mode
  and torch's global RNG (:func:`lsa_ext.seeding.rng_scope`) are restored afterwards, so a
  monitored run trains to bitwise the same weights as an unmonitored one.

Files (rank 0, when the monitor has a folder): :data:`CSV_NAME` (``epoch, layer, kind, mean,
std``; one row per epoch and site), rewritten atomically after every measurement
(:mod:`lsa_ext.io`), and :data:`PNG_NAME` (mean CM per site over the epochs), redrawn
atomically after a measurement when that keeps its drawing under :data:`PNG_SHARE` (10 %) of
the wall time since the last drawing — after every epoch once epochs take a few seconds — and
always when training ends (:meth:`LayerMonitor.finish`). A resumed run keeps the
rows of the epochs it has done and replaces those after them (a run restarted from an earlier
checkpoint drops the later epochs), so no epoch appears twice.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lsa_ext import distributed
from lsa_ext.analysis import accumulate
from lsa_ext.attacks import build_attack
from lsa_ext.batches import as_tensors
from lsa_ext.errors import LsaUserError
from lsa_ext.io import atomic_write_csv, atomic_write_with
from lsa_ext.modules import model_device
from lsa_ext.outputs import OutputSelector
from lsa_ext.probes import canonical_site, select_layers, sites_not_run
from lsa_ext.report import perturbation_params, wants_log_scale
from lsa_ext.seeding import batch_seeding, rng_scope
from lsa_ext.train_config import TRAIN_ATTACK_DEFAULTS
from lsa_ext.types import Perturbation

log = logging.getLogger("lsa_ext.monitor")

DEFAULT_SAMPLES = 256
DEFAULT_LAYERS = "activations"
NONE_ATTACK = "fgsm"  # the monitor's attack for runs that train without one
# monitor.png is redrawn after an epoch only when drawing it (~0.3 s on a busy 2-core CPU)
# keeps it under this share of the wall time since the last drawing; always at the end
PNG_SHARE = 0.1
CSV_NAME = "monitor.csv"
PNG_NAME = "monitor.png"
FIELDS = ("epoch", "layer", "kind", "mean", "std")


def monitor_sites(model: nn.Module, layers: str | Sequence[str],
                  lr_sites: Sequence[str] | None = (),
                  input_shape: Sequence[int] | None = None,
                  example: Any = None) -> list[str]:
    """The probe list of a monitor: the sites ``layers`` selects plus the LR sites.

    Args:
        model: the (unwrapped) model.
        layers: a :func:`lsa_ext.probes.select_layers` selector (string, comma-separated, or a
            list of names, globs, kinds, ``L<k>``, ``name#k``).
        lr_sites: the regularised sites (added when ``layers`` does not cover them); None when
            they are not known yet (``lr_layers="mvl"`` before its search): a selection that
            is empty by itself is then not an error.
        input_shape: one sample's shape; when given, the model runs once (eval mode, no
            gradients, two zero inputs; its mode is restored) to check that every site runs —
            ``name#k`` needs k calls of ``name`` in a forward.
        example: what ``A<k>`` selectors are counted on (:data:`lsa_ext.probes.Example`: an
            input batch or one sample's shape; default: ``input_shape``).

    Returns:
        Module names and ``name#k`` sites for :class:`lsa_ext.probes.Capture`.

    Raises:
        LsaUserError: ``layers`` names a layer the model lacks, nothing is selected, or (with
            ``input_shape``) a site does not run in a forward.
    """
    items = [s.strip() for s in layers.split(",")] if isinstance(layers, str) else list(layers)
    items = [s for s in items if s]
    if not items:
        raise LsaUserError("monitor layers: no layer selector given (default: activations)")
    try:
        names = select_layers(model, items + list(lr_sites or ()),
                              example=example if example is not None else input_shape)
    except LsaUserError as exc:
        if lr_sites is None and str(exc).startswith("no layer of "):
            return []
        raise LsaUserError(f"monitor layers {','.join(items)!r}: {exc}") from None
    if input_shape is not None:
        missing = sites_not_run(model, names, input_shape)
        if missing:
            raise LsaUserError(f"monitor layers {','.join(items)!r}: {', '.join(missing)} "
                               "never run in a forward of the model (name#k needs k calls)")
    return names


def _probe(train_data: Any, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``samples`` training samples ``(x, y)`` (all when fewer), chosen once by a generator
    seeded with ``seed``; torch's, numpy's and random's global RNGs are left as they were."""
    tensors = as_tensors(train_data)
    if tensors is not None:
        if len(tensors) != 2:
            raise LsaUserError("layer monitoring needs labelled training data (x, y)")
        x, y = tensors
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
        idx = idx[:samples]
        return x[idx], y[idx]
    ds = getattr(train_data, "dataset", train_data)  # a DataLoader's dataset
    if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
        raise LsaUserError("layer monitoring needs a training set it can index (tensors, a "
                           f"Dataset or a DataLoader over one), got {type(train_data).__name__}")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:samples]
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):  # a transform drawing random numbers
            items = [ds[int(i)] for i in idx]
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = torch.stack([torch.as_tensor(it[0]) for it in items])
    y = torch.as_tensor([int(it[1]) for it in items], dtype=torch.int64)
    return x, y


class LayerMonitor:
    """Measures the per-site CM of a fixed probe batch under the training attack, per epoch.

    Args:
        model: the model being trained (unwrapped: ``lsa_ext.modules.unwrap``).
        train_data: the training set the probe is drawn from (tensors, a Dataset, a
            DataLoader).
        config: the run's :class:`lsa_ext.train_config.TrainConfig` (``monitor_layers``,
            ``monitor_samples``, ``at``, ``eps``, ``clip``, ``attack_kwargs``, ``batch_size``,
            ``lr_pass``, ``seed``).
        lr_sites: the regularised sites (marked ``kind="lr"``, always probed).
        attack: the run's custom attack, if any (used instead of the one ``config`` builds).
        out: folder for :data:`CSV_NAME` and :data:`PNG_NAME` (None: rows kept in
            :attr:`rows` only).
        output: the model's logits selector (:func:`lsa_ext.outputs.logits_of`).

    Raises:
        LsaUserError: the layers select nothing, the attack settings are invalid, or the
            training set cannot be indexed.
    """

    def __init__(self, model: nn.Module, train_data: Any, config: Any, *,
                 lr_sites: Sequence[str] = (), attack: Perturbation | None = None,
                 out: str | os.PathLike | None = None, output: OutputSelector = None) -> None:
        self.model = model
        self.config = config
        self.x, self.y = _probe(train_data, config.monitor_samples, config.seed)
        self.names = monitor_sites(model, config.monitor_layers, lr_sites, example=self.x)
        self.lr_sites = {canonical_site(s) for s in lr_sites}
        self.out = Path(out) if out is not None else None
        self.custom = attack
        if attack is None:
            at = config.at if config.at != "none" else NONE_ATTACK
            kwargs = ({**TRAIN_ATTACK_DEFAULTS.get(at, {}), **config.attack_kwargs}
                      if config.at != "none" else {})
            self.attack: Perturbation = build_attack(
                at, model, config.eps, clip=None if config.clip is None else tuple(config.clip),
                mode="eval", seed=config.seed, output=output, **kwargs)
        else:
            self.attack = attack
        self.mode = "two_pass" if config.lr_pass == "two_pass" else "concat"
        self.rows: list[dict[str, Any]] = []
        self._png_seconds, self._png_done, self._png_stale = 0.0, -math.inf, False

    @property
    def description(self) -> str:
        """The attack and probe, in words: ``FGSM(eps=0.3, ...) on 256 training samples``."""
        return f"{self.attack!r} on {len(self.y)} training samples"

    @property
    def short_description(self) -> str:
        """``PGD (ε=0.3, 10 steps), 256 training samples``: the figure's title."""
        params = perturbation_params(repr(self.attack))
        name = type(self.attack).__name__
        return f"{name}{f' ({params})' if params else ''}, {len(self.y)} training samples"

    # ----------------------------------------------------------------- measuring
    def measure(self) -> list[dict[str, Any]]:
        """The CM rows of the model as it is now: one ``{"layer", "kind", "mean", "std"}`` per
        site in execution order (floats from float64 sums; std over samples, population).

        Under torchrun every rank must call it (the probe's batches are shared out and the
        sums reduced, :func:`lsa_ext.analysis.accumulate`).
        """
        module, attack = self.model, self.attack
        dev = model_device(module)
        bs = self.config.batch_size
        chunks = [(self.x[i:i + bs], self.y[i:i + bs]) for i in range(0, len(self.y), bs)]
        saved = attack.state_dict() if self.custom is not None and hasattr(
            attack, "state_dict") and hasattr(attack, "load_state_dict") else None
        was_training = module.training
        try:
            with rng_scope(self.config.seed, dev), \
                    batch_seeding({"attack": attack}, self.config.seed) as reseed:
                module.eval()
                sites, stats = accumulate(
                    module, chunks, {"attack": attack}, self.names, "relative_error",
                    device=dev, mode=self.mode, forward_batch=2 * bs, progress_enabled=False,
                    reseed=reseed)
        finally:
            module.train(was_training)
            if saved is not None:
                attack.load_state_dict(saved)
        mean, std = stats.mean[0].tolist(), stats.std[0].tolist()
        return [{"layer": s, "kind": "lr" if canonical_site(s) in self.lr_sites else "probe",
                 "mean": m, "std": d} for s, m, d in zip(sites, mean, std, strict=True)]

    def record(self, epoch: int) -> list[dict[str, Any]]:
        """Measures, replaces the rows of ``epoch`` and later ones with the new rows, writes
        the files (rank 0) and returns the new rows."""
        rows = [{"epoch": int(epoch), **r} for r in self.measure()]
        self.rows = [r for r in self.rows if r["epoch"] < epoch] + rows
        log.debug("monitor epoch %d: %s", epoch,
                  ", ".join(f"{r['layer']}={r['mean']:.4g}" for r in rows))
        self.write()
        return rows

    def start(self, epoch: int) -> None:
        """Called before training continues from ``epoch`` (0 for a fresh run): reads the rows
        of :data:`CSV_NAME` written before (a resumed run), keeps those before ``epoch`` and
        measures ``epoch`` itself (again: the same weights give the same rows)."""
        if not self.rows:
            self.rows = self._read()
        self.record(epoch)

    # ----------------------------------------------------------------- files
    def _read(self) -> list[dict[str, Any]]:
        """The rows of an existing :data:`CSV_NAME` (empty when none; an unreadable file is a
        warning and is replaced)."""
        if self.out is None or not (self.out / CSV_NAME).is_file():
            return []
        path = self.out / CSV_NAME
        try:
            with open(path, encoding="utf-8", newline="") as fh:
                reader = csv.DictReader(fh)
                if tuple(reader.fieldnames or ()) != FIELDS:
                    raise ValueError(f"columns {reader.fieldnames}, expected {list(FIELDS)}")
                return [{"epoch": int(r["epoch"]), "layer": r["layer"], "kind": r["kind"],
                         "mean": float(r["mean"]), "std": float(r["std"])} for r in reader]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s cannot be read (%s): a new one is written", path, exc)
            return []

    def write(self, figure: bool | None = None) -> None:
        """Writes :data:`CSV_NAME` and, when due, :data:`PNG_NAME`, atomically (rank 0, with a
        folder). ``figure``: True/False forces the figure on/off; None (default) draws it
        unless the last drawing was less than ``(1/PNG_SHARE − 1)`` times its own duration
        ago (then :meth:`finish` draws it)."""
        if self.out is None or not distributed.is_main():
            return
        atomic_write_csv(self.out / CSV_NAME, self.rows, FIELDS)
        if figure is None:
            wait = self._png_seconds * (1.0 / PNG_SHARE - 1.0)
            figure = time.perf_counter() - self._png_done >= wait
        self._png_stale = True
        if figure:
            self._draw()

    def _draw(self) -> None:
        t0 = time.perf_counter()
        fig = monitor_figure(self.rows, title=f"Layer monitoring: {self.short_description}")
        assert self.out is not None
        atomic_write_with(self.out / PNG_NAME, lambda fh: fig.savefig(fh, format="png", dpi=110))
        self._png_done = time.perf_counter()
        self._png_seconds, self._png_stale = self._png_done - t0, False

    def finish(self) -> None:
        """Draws :data:`PNG_NAME` if the last :meth:`write` skipped it (end of training)."""
        if self._png_stale and self.out is not None and distributed.is_main():
            self._draw()


def monitor_figure(rows: Sequence[dict[str, Any]], title: str = "Layer monitoring") -> Any:
    """Mean CM per site over the epochs (one line per site, LR sites dashed and thicker, ±std
    shaded for up to six sites): a ``matplotlib.figure.Figure`` on its own Agg canvas (no
    pyplot, no global backend). ``rows``: :attr:`LayerMonitor.rows`."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    sites: list[str] = []
    for r in rows:
        if r["layer"] not in sites:
            sites.append(r["layer"])
    fig = Figure(figsize=(9.5, 5.0))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    cmap = colormaps["viridis"]
    means = np.array([r["mean"] for r in rows], dtype=np.float64)
    log_scale = wants_log_scale(means)
    for i, site in enumerate(sites):
        pts = sorted((r["epoch"], r["mean"], r["std"], r["kind"]) for r in rows
                     if r["layer"] == site)
        ep = np.array([p[0] for p in pts])
        m = np.array([p[1] for p in pts])
        s = np.array([p[2] for p in pts])
        lr = pts[-1][3] == "lr"
        color = cmap(0.9 * i / max(len(sites) - 1, 1))
        ax.plot(ep, m, marker="o", ms=3.5, lw=2.4 if lr else 1.5, ls="--" if lr else "-",
                color=color, label=site + (" (LR)" if lr else ""))
        if len(sites) <= 6:
            lo = np.maximum(m - s, m * 1e-3) if log_scale else m - s
            ax.fill_between(ep, lo, m + s, color=color, alpha=0.12, lw=0)
    if log_scale:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (0: before training)")
    ax.set_ylabel("mean relative error (CM), ±std over the probe")
    ax.set_title(f"{title}\nrelative error per layer, clean vs attacked", fontsize=10)
    ax.grid(True, alpha=0.35)
    if sites:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig

