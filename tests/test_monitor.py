"""Layer monitoring (lsa_ext.monitor; lsa train --monitor): CM values vs a float64 reference,
bitwise-identical training, resume, atomic files, CLI files and user errors."""

from __future__ import annotations

import copy
import csv
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lsa_ext
from lsa_ext import checkpoint as ckpt
from lsa_ext import monitor as mon
from lsa_ext.cli import main
from lsa_ext.errors import LsaUserError
from lsa_ext.training import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--dataset", "moons", "--limit-train", "200", "--limit-test", "100", "--batch-size",
        "50", "--seed", "1"]


def _mlp(seed: int = 0, bn: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    if bn:  # batch statistics and dropout: the monitor must leave both alone
        return nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ELU(), nn.Dropout(0.2),
                             nn.Linear(16, 16), nn.ELU(), nn.Linear(16, 1))
    return nn.Sequential(nn.Linear(2, 16), nn.ELU(), nn.Linear(16, 16), nn.ELU(),
                         nn.Linear(16, 1))


def _blobs(n: int = 160, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 2, generator=g) * 0.6 + (2 * y.float() - 1).unsqueeze(1) * 1.0
    return x, y


def _rows(path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _reference(model: nn.Sequential, x, y, eps: float, sites: list[int]) -> dict[str, tuple]:
    """float64, by hand: FGSM on the binary CE of a 1-logit model, then each site's relative
    error ‖a − b‖₂ / ‖a‖₂ per sample; (mean, population std) per site."""
    m = copy.deepcopy(model).double().eval()
    xd = x.double().requires_grad_(True)
    loss = F.binary_cross_entropy_with_logits(m(xd).squeeze(1), y.double(), reduction="sum")
    (g,) = torch.autograd.grad(loss, xd)
    a, b = x.double(), (x.double() + eps * g.sign())
    out = {}
    with torch.no_grad():
        for i, layer in enumerate(m):
            a, b = layer(a), layer(b)
            if i in sites:
                r = (a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)
                out[str(i)] = (float(r.mean()), float(r.std(unbiased=False)))
    return out


def test_monitor_csv_matches_float64_reference(tmp_path):
    x, y = _blobs()
    model, eps, samples, seed = _mlp(), 0.25, 48, 3
    init = copy.deepcopy(model)
    lsa_ext.train(model, (x, y), at="fgsm", eps=eps, lr_layers="2", gamma=0.1, epochs=2,
                  batch_size=32, lr=1e-2, seed=seed, clip=None, out=tmp_path, progress=False,
                  monitor=True, monitor_samples=samples)
    rows = _rows(tmp_path / mon.CSV_NAME)
    assert list(rows[0]) == list(mon.FIELDS)
    assert [(int(r["epoch"]), r["layer"], r["kind"]) for r in rows] == [
        (e, s, "lr" if s == "2" else "probe") for e in range(3) for s in ("1", "2", "3")]
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:samples]
    weights = {0: init, 1: ckpt.load_checkpoint(tmp_path / ckpt.PREVIOUS)["model"],
               2: ckpt.load_checkpoint(tmp_path / ckpt.LAST)["model"]}
    for epoch, w in weights.items():
        net = init if epoch == 0 else copy.deepcopy(init)
        if epoch:
            net.load_state_dict(w)
        ref = _reference(net, x[idx], y[idx], eps, [1, 2, 3])
        got = {r["layer"]: (float(r["mean"]), float(r["std"])) for r in rows
               if int(r["epoch"]) == epoch}
        for site, (m, s) in ref.items():
            assert got[site][0] == pytest.approx(m, rel=1e-5), (epoch, site)
            assert got[site][1] == pytest.approx(s, rel=1e-4, abs=1e-7), (epoch, site)
    # the CM rises with depth here and changes with training: the rows are not all alike
    assert len({r["mean"] for r in rows}) == len(rows)


@pytest.mark.parametrize("at, bn, custom", [("pgd", False, False), ("pgd", True, False),
                                            ("none", True, False), ("pgd", False, True)])
def test_monitored_training_is_bitwise_identical(tmp_path, at, bn, custom):
    x, y = _blobs()
    models = []
    for monitor in (False, True):
        model = _mlp(bn=bn)
        kw = dict(at=at, eps=0.3, epochs=3, batch_size=32, lr=1e-2, seed=5, clip=None,
                  progress=False, monitor=monitor, monitor_samples=64)
        # small PGD steps: the random start matters (large ones end in the same corner)
        if custom:  # a custom attack with its own generator: its state is kept
            kw["attack"] = lsa_ext.attacks.PGD(model, eps=0.3, alpha=0.02, steps=3, clip=None,
                                               seed=9)
        if at != "none":
            kw.update(lr_layers="2" if not bn else "4", attack_mode="train" if bn else "eval",
                      attack_kwargs={"alpha": 0.02, "steps": 3})
        lsa_ext.train(model, (x, y), out=tmp_path / str(monitor), **kw)
        models.append(model)
    assert (tmp_path / "True" / mon.CSV_NAME).is_file()
    assert not (tmp_path / "False" / mon.CSV_NAME).exists()
    a, b = models[0].state_dict(), models[1].state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert models[0].training and models[1].training


def test_resume_continues_the_csv_and_restart_drops_later_epochs(tmp_path):
    x, y = _blobs()
    cfg = dict(at="fgsm", eps=0.2, lr_layers="2", epochs=4, batch_size=32, lr=1e-2, seed=2,
               clip=None, progress=False, monitor=True, monitor_samples=40)
    lsa_ext.train(_mlp(), (x, y), out=tmp_path / "full", **cfg)
    full = _rows(tmp_path / "full" / mon.CSV_NAME)
    # a run stopped after 2 epochs, resumed to 4: the same rows, no epoch twice
    lsa_ext.train(_mlp(), (x, y), out=tmp_path / "part", **{**cfg, "epochs": 2})
    assert {int(r["epoch"]) for r in _rows(tmp_path / "part" / mon.CSV_NAME)} == {0, 1, 2}
    lsa_ext.train(_mlp(), (x, y), out=tmp_path / "part", resume=tmp_path / "part" / ckpt.LAST,
                  **cfg)
    assert _rows(tmp_path / "part" / mon.CSV_NAME) == full
    # restarted from the checkpoint of epoch 3 (prev.pt): epoch 4's rows are dropped
    config = TrainConfig(at="fgsm", eps=0.2, lr_layers=["2"], epochs=3, batch_size=32,
                         lr=1e-2, seed=2, monitor=True, monitor_samples=40)
    trainer = Trainer(_mlp(), (x, y), config, out=tmp_path / "full", progress=False)
    trainer.resume(tmp_path / "full" / ckpt.PREVIOUS)
    trainer.fit()
    assert _rows(tmp_path / "full" / mon.CSV_NAME) == [r for r in full if int(r["epoch"]) <= 3]
    assert trainer.monitor is not None and max(r["epoch"] for r in trainer.monitor.rows) == 3


def test_files_are_written_atomically(tmp_path, monkeypatch):
    import lsa_ext.io as io

    replaced: list[tuple[str, str]] = []
    real = os.replace

    def spy(src, dst):
        replaced.append((os.path.basename(src), os.path.basename(dst)))
        real(src, dst)

    monkeypatch.setattr(io.os, "replace", spy)
    old = os.umask(0o022)
    try:
        x, y = _blobs()
        lsa_ext.train(_mlp(), (x, y), epochs=1, batch_size=32, seed=0, out=tmp_path,
                      progress=False, monitor=True, monitor_samples=16)
    finally:
        os.umask(old)
    for name in (mon.CSV_NAME, mon.PNG_NAME):
        tmps = [s for s, d in replaced if d == name]
        assert len(tmps) == 2  # epoch 0, then epoch 1
        assert all(s.startswith(f".{name}.") and s.endswith(".tmp") for s in tmps)
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    assert (tmp_path / mon.PNG_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # a write that fails leaves the previous file as it was
    before = (tmp_path / mon.CSV_NAME).read_bytes()
    monkeypatch.setattr(io.os, "replace", lambda s, d: (_ for _ in ()).throw(OSError("boom")))
    m = mon.LayerMonitor(_mlp(), (x, y), TrainConfig(monitor=True, monitor_samples=16),
                         out=tmp_path)
    m.rows = [{"epoch": 9, "layer": "1", "kind": "probe", "mean": 1.0, "std": 0.0}]
    with pytest.raises(OSError):
        m.write()
    assert (tmp_path / mon.CSV_NAME).read_bytes() == before


def test_monitor_sites_and_errors():
    model = _mlp()
    assert mon.monitor_sites(model, "activations", ["2"]) == ["1", "2", "3"]
    assert mon.monitor_sites(model, "4", ["2"]) == ["2", "4"]
    with pytest.raises(LsaUserError, match="monitor layers 'nope'"):
        mon.monitor_sites(model, "nope", [])
    with pytest.raises(LsaUserError, match="matches"):
        mon.monitor_sites(nn.Sequential(nn.Linear(2, 2)), "activations", [])
    assert mon.monitor_sites(nn.Sequential(nn.Linear(2, 2)), "activations", None) == []
    x, y = _blobs()
    with pytest.raises(LsaUserError, match="monitor_samples"):
        lsa_ext.train(_mlp(), (x, y), epochs=1, monitor=True, monitor_samples=0)
    with pytest.raises(LsaUserError, match="monitor layers"):
        lsa_ext.train(_mlp(), (x, y), epochs=1, monitor=True, monitor_layers="nope")


def test_cli_train_monitor_writes_csv_and_png_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--monitor", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "monitoring 3 layers (act1, act2, act3) under FGSM(eps=0.3" in err
    assert "monitor: relative error" in err
    rows = _rows(out / mon.CSV_NAME)
    assert [(int(r["epoch"]), r["layer"]) for r in rows] == [
        (e, s) for e in range(3) for s in ("act1", "act2", "act3")]
    assert all(float(r["mean"]) > 0 and float(r["std"]) >= 0 for r in rows)
    assert (out / mon.PNG_NAME).read_bytes()[:4] == b"\x89PNG"
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3"]) == 0
    capsys.readouterr()
    again = _rows(out / mon.CSV_NAME)
    assert again[:len(rows)] == rows and [int(r["epoch"]) for r in again[len(rows):]] == [3] * 3
    # --monitor added when resuming a run trained without it: measured from the resumed epoch
    plain = tmp_path / "plain"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(plain)]) == 0
    assert not (plain / mon.CSV_NAME).exists()
    assert main(["train", "--out", str(plain), "--resume", "--epochs", "2", "--monitor",
                 "--monitor-layers", "fc2"]) == 0
    assert [(int(r["epoch"]), r["layer"]) for r in _rows(plain / mon.CSV_NAME)] == [
        (1, "fc2"), (2, "fc2")]


@pytest.mark.parametrize("extra, msg", [
    (["--monitor", "--monitor-layers", "nope"], "no layer named 'nope'"),
    (["--monitor", "--monitor-layers", "learnable#3"], "monitor layers"),
    (["--monitor", "--monitor-samples", "0"], "monitor_samples must be an integer"),
    (["--monitor-layers", "act1", "--monitor-samples", "-3"], "monitor_samples must be an"),
])
def test_cli_monitor_user_errors_exit_2_before_training(tmp_path, capsys, extra, msg):
    out = tmp_path / "e"
    rc = main(["train", *TINY, "--epochs", "1", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert msg in err and "Traceback" not in err, err
    assert not out.exists()  # nothing read, nothing trained, nothing written


def test_cli_resume_refuses_other_monitor_settings(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--monitor", "--out", str(out)]) == 0
    capsys.readouterr()
    rc = main(["train", "--out", str(out), "--resume", "--epochs", "2", "--monitor-samples",
               "10"])
    err = capsys.readouterr().err
    assert rc == 2 and "--monitor-samples 10 (the run: 256)" in err, err
    assert ckpt.load_checkpoint(out / ckpt.LAST)["epoch"] == 1


def test_monitor_layers_take_activation_sites(tmp_path, capsys):
    """--monitor-layers A<k> selects the k-th activation site, as --lr-layers does."""
    import csv as _csv

    from lsa_ext.cli import main as cli_main

    out = tmp_path / "run"
    rc = cli_main(["train", "--dataset", "moons", "--limit-train", "100", "--limit-test", "50",
                   "--at", "fgsm", "--monitor-layers", "A2,L0", "--monitor-samples", "32",
                   "--epochs", "1", "--threads", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = list(_csv.DictReader(open(out / "monitor.csv")))
    assert sorted({r["layer"] for r in rows}) == ["act3", "fc1"]
    assert sorted({int(r["epoch"]) for r in rows}) == [0, 1]


def test_resume_of_a_run_not_written_by_lsa_train_is_one_error_line(tmp_path, capsys):
    import lsa_ext
    from lsa_ext.cli import main as cli_main
    from lsa_ext.data import load_dataset

    data = load_dataset("moons", limit_train=64, limit_test=32)
    model = lsa_ext.models.build_model("model_a", data.info)
    lsa_ext.train(model, data, at="fgsm", epochs=1, out=tmp_path / "api", progress=False)
    rc = cli_main(["train", "--out", str(tmp_path / "api"), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "was not written by lsa train" in err and "Traceback" not in err
