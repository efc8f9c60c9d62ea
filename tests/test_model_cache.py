import logging

import torch

from lsa_ext.data import load_dataset
from lsa_ext.model_cache import cache_dir, cache_name, load_or_train
from lsa_ext.models import build_model
from lsa_ext.training import fit


def _fresh(data):
    return build_model("model_a", data.info, seed=0)


def test_trains_stores_and_reuses_the_weights(tmp_path):
    data = load_dataset("moons", limit_train=64)
    path = tmp_path / "c" / "m.pt"
    model, source = load_or_train(_fresh(data), data.train, path, epochs=1, batch_size=32)
    assert source == "trained" and path.is_file()
    want = fit(_fresh(data), data.train, epochs=1, batch_size=32)  # the same training, again
    for k, v in want.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    again, source = load_or_train(_fresh(data), data.train, path, epochs=1, batch_size=32)
    assert source == "cache"
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)


def test_unusable_file_is_retrained_and_no_path_writes_nothing(tmp_path, caplog):
    data = load_dataset("moons", limit_train=64)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="lsa_ext.model_cache"):
        _, source = load_or_train(_fresh(data), data.train, bad, epochs=1, batch_size=32)
    assert source == "trained" and "ignoring unusable cached model" in caplog.text
    assert torch.load(bad, weights_only=True)  # replaced by the trained weights
    _, source = load_or_train(_fresh(data), data.train, None, epochs=1, batch_size=32)
    assert source == "trained" and sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_cache_location_and_name(tmp_path, monkeypatch):
    monkeypatch.setenv("LSA_CACHE_DIR", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    monkeypatch.delenv("LSA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "lsa_ext"
    assert cache_name("model_b", "digits", 0, 15) == "model_b-digits-seed0-ep15.pt"
    # the data options are part of the key: standardized and raw moons never share a model
    assert cache_name("model_a", "moons", 0, 30, data_options={"scale": "standard"}) == (
        "model_a-moons-seed0-ep30-scale=standard.pt")
    assert cache_name("model_a", "moons", 0, 30, data_options={"scale": "raw", "noise": 0.1,
                                                               "n_train": 500}) == (
        "model_a-moons-seed0-ep30-n_train=500-noise=0.1-scale=raw.pt")
    assert cache_name("pkg.m:f", "mnist", 1, 2, batch_size=64).startswith(
        "pkg.m_f-mnist-seed1-ep2-bs64")
    a = cache_name("model_b", "mnist", 0, 2, data_dir=str(tmp_path / "a"))
    assert a != cache_name("model_b", "mnist", 0, 2, data_dir=str(tmp_path / "b"))
    assert a == cache_name("model_b", "mnist", 0, 2, data_dir=str(tmp_path / "a" / "."))
