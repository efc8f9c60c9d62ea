import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lsa_ext.analysis import load_result
from lsa_ext.cli import main
from lsa_ext.data import load_dataset
from lsa_ext.models import build_model

SMALL = ["--max-samples", "48", "--batch-size", "32"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LSA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LSA_PROGRESS", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: extra threads only add overhead on a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An (untrained) Model B checkpoint for digits: most tests need no training."""
    path = tmp_path_factory.mktemp("ckpt") / "model_b.pt"
    info = load_dataset("digits").info
    torch.save(build_model("model_b", info, seed=0).state_dict(), path)
    return path


def test_default_pipeline_trains_caches_and_is_reproducible(tmp_path, capsys):
    pytest.importorskip("lsa_ext.training")
    args = ["analyze", "--epochs", "1", "--max-samples", "48", "--batch-size", "128",
            "--perturbations",
            "gaussian,salt,pepper,speckle,fgsm,pgd:steps=2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr()
    assert "relu1" in out.out and "Most vulnerable layers" in out.out
    assert "trained" in out.err
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert rep["layers"] == ["relu1", "relu2", "relu3", "relu4"]
    assert list(rep["perturbations"]) == ["gaussian", "salt", "pepper", "speckle", "fgsm", "pgd"]
    assert all(c == 48 for p in rep["perturbations"].values() for c in p["count"])
    assert rep["config"]["batch_size"] == 128
    acc = rep["accuracy"]
    assert list(acc) == ["clean", *rep["perturbations"]]
    assert acc["clean"] > 0.3 and acc["pgd"] <= acc["clean"] and acc["fgsm"] <= acc["clean"]
    assert "accuracy %" in out.out
    assert rep["mvl"]["eta"] == 1.0 and set(rep["mvl"]["layers"]) == set(rep["perturbations"])
    assert set(rep["ranking"]["fgsm"]) == set(rep["layers"])
    assert rep["config"]["dataset"] == "digits" and rep["config"]["model"] == "model_b"
    assert set(rep["versions"]) == {"lsa_ext", "torch", "numpy", "python"}
    assert (tmp_path / "a" / "lsa.png").stat().st_size > 10_000
    csv_rows = (tmp_path / "a" / "layers.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 6 * 4
    assert list((tmp_path / "cache").glob("model_b-digits-seed0-ep1.pt"))
    # second run: model from the cache, byte-identical report
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "cache" in capsys.readouterr().err
    assert (tmp_path / "a" / "report.json").read_bytes() == (
        tmp_path / "b" / "report.json").read_bytes()
    # the report reads back with the same answers
    res = load_result(tmp_path / "a" / "report.json")
    assert res.mvl(1.0) == rep["mvl"]["layers"]
    assert res.mvl(1.0, perturbation="pgd") == rep["mvl"]["layers"]["pgd"]
    assert res.ranking("fgsm") == rep["ranking"]["fgsm"]


def test_checkpoint_options(tmp_path, ckpt, capsys):
    rc = main(["analyze", "--checkpoint", str(ckpt), *SMALL, "--layers", "learnable",
               "--perturbations", "gaussian:std=0.2,salt_pepper:amount=0.1,fgsm:eps=0.05",
               "--measure", "cosine", "--eta", "0.5", "--no-plot", "--device", "cpu",
               "--out", str(tmp_path)])
    assert rc == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["layers"] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert rep["measure"] == "cosine" and rep["mvl"]["eta"] == 0.5
    assert "FGSM(eps=0.05" in rep["perturbations"]["fgsm"]["description"]
    assert "Gaussian(std=0.2" in rep["perturbations"]["gaussian"]["description"]
    assert rep["config"]["checkpoint"] == str(ckpt) and rep["config"]["epochs"] is None
    assert not (tmp_path / "lsa.png").exists()
    assert "fc2" in capsys.readouterr().out


def _factory_module(tmp_path, monkeypatch):
    (tmp_path / "lsa_user_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class NanNet(nn.Module):
            def __init__(self, info=None):
                super().__init__()
                self.flat = nn.Flatten()
                self.fc = nn.Linear(64, 10)
                self.act = nn.ReLU()

            def forward(self, x):
                return self.act(torch.log(self.fc(self.flat(x)) - 1e3))

        def linear_only(info=None):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("lsa_user_models", None)


def _error(args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if not ln.startswith("LSA: ")]  # the info line
    assert len(lines) == 1 and lines[0].startswith("lsa analyze: error:")
    return lines[0]


def test_user_errors(tmp_path, ckpt, capsys, monkeypatch):
    base = ["analyze", *SMALL, "--out", str(tmp_path / "o"), "--checkpoint", str(ckpt)]
    assert "unknown dataset 'nope'" in _error([*base, "--dataset", "nope"], capsys)
    assert "model" in _error([*base, "--model", "resnet9000"], capsys)
    assert "unknown perturbation 'blur'" in _error([*base, "--perturbations", "gaussian,blur"],
                                                   capsys)
    assert "no layer named 'conv9'" in _error([*base, "--layers", "conv9"], capsys)
    assert "unknown measure 'l3'" in _error([*base, "--measure", "l3"], capsys)
    assert "--eps must be >= 0" in _error([*base, "--eps", "-0.1"], capsys)
    assert "eps" in _error([*base, "--perturbations", "fgsm:eps=-1"], capsys)
    missing = ["analyze", *SMALL, "--checkpoint", str(tmp_path / "none.pt")]
    assert "does not exist" in _error(missing, capsys)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert "bad.pt" in _error(["analyze", *SMALL, "--checkpoint", str(bad)], capsys)
    (tmp_path / "empty").mkdir()
    err = _error(["analyze", "--dataset", "mnist", "--data-dir", str(tmp_path / "empty")], capsys)
    assert "t10k" in err or "train-images" in err
    _factory_module(tmp_path, monkeypatch)
    lin = tmp_path / "lin.pt"
    info = load_dataset("digits").info
    torch.save(build_model("lsa_user_models:linear_only", info).state_dict(), lin)
    assert "matches" in _error(["analyze", *SMALL, "--model", "lsa_user_models:linear_only",
                                "--checkpoint", str(lin)], capsys)
    nan = tmp_path / "nan.pt"
    torch.save(build_model("lsa_user_models:NanNet", info).state_dict(), nan)
    err = _error(["analyze", *SMALL, "--model", "lsa_user_models:NanNet", "--checkpoint", str(nan),
                  "--perturbations", "gaussian"], capsys)
    assert "layer 'act'" in err and "'gaussian'" in err
    assert not (tmp_path / "o" / "report.json").exists()


def test_entry_point_exit_code_without_traceback(tmp_path):
    exe = Path(sys.executable).with_name("lsa")
    cmd = [str(exe)] if exe.exists() else [
        sys.executable, "-c", "import sys; from lsa_ext.cli import main; sys.exit(main())"]
    proc = subprocess.run([*cmd, "analyze", "--dataset", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown dataset 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_moons_scale_names_the_cached_model(tmp_path, capsys):
    base = ["analyze", "--dataset", "moons", "--epochs", "1", "--max-samples", "32",
            "--perturbations", "gaussian,fgsm", "--no-plot"]
    assert main([*base, "--out", str(tmp_path / "s")]) == 0
    assert main([*base, "--moons-scale", "raw", "--out", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    names = sorted(p.name for p in (tmp_path / "cache").glob("model_a-moons-*"))
    assert names == ["model_a-moons-seed0-ep1-scale=raw.pt",
                     "model_a-moons-seed0-ep1-scale=standard.pt"]
    conf = [json.loads((tmp_path / d / "report.json").read_text())["config"] for d in "sr"]
    assert [c["data_options"]["scale"] for c in conf] == ["standard", "raw"]
