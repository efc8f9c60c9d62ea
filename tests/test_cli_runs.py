"""Issue 13, the first hour: `lsa train --at pgd --lr-layers mvl` out of the box, run folders
never overwritten silently, outputs readable as the umask says, run configs read by every
command taking --checkpoint, one set of defaults and units (CLI through real subprocesses where
exit codes, file modes and messages are what is tested)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

import pytest
import torch

from lsa_ext.cli import main

MAIN = "import sys; from lsa_ext.cli import main; sys.exit(main())"
pytestmark = pytest.mark.usefixtures("one_thread")


def _lsa(cwd, *args, umask=0o022):
    env = dict(os.environ, OMP_NUM_THREADS="1", LSA_PROGRESS="0",
               LSA_CACHE_DIR=str(cwd / "cache"))
    return subprocess.run([sys.executable, "-c", MAIN, *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=300, preexec_fn=lambda: os.umask(umask))


def test_at_pgd_lr_mvl_works_out_of_the_box(tmp_path):
    """Point 1: the first AT-LR command anyone types. MVL on the fly probes the activation
    outputs, as lsa analyze; no layer passes η = 1 on two-moons: the top-ranked one is taken
    (one warning line), the default γ does not collapse."""
    res = _lsa(tmp_path, "train", "--at", "pgd", "--lr-layers", "mvl", "--epochs", "3",
               "--limit-train", "1000")
    assert res.returncode == 0, res.stderr
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("WARNING")]
    assert warnings == ["WARNING lsa_ext.mvl_select: no layer passes the MVL cut-off eta=1: "
                        "taking the top-ranked layer act3 (a lower eta selects by the cut-off)"]
    assert ("LR layers (--lr-layers mvl): MVL on the fly (activation outputs, as lsa analyze; "
            "pgd, η=1): A2 (act3) (top-ranked: no layer passes η)") in res.stderr.splitlines()
    run = tmp_path / "runs" / "moons-AT-PGD-LR-mvl"  # point 2: the default --out names the run
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["lr_layers"] == ["act3"] and cfg["config"]["gamma"] == 0.1
    assert "AT-PGD-LR-A2:" in res.stdout
    acc = float(re.search(r"clean test accuracy ([\d.]+) %", res.stdout).group(1))
    assert acc > 70.0, res.stdout  # chance is 50 %; γ = 1 on fc3+fc4 gave exactly 50 %
    # point 5: progress lines with units
    assert re.search(r"\nepoch 3/3: loss \d\.\d{4} \(base \d\.\d{4} \+ LR \d\.\d{4}\), "
                     r"accuracy [\d.]+ % \(adversarial\), learning rate 0\.001, [\d.]+ s\n",
                     res.stderr), res.stderr


def test_runs_are_never_overwritten_silently_and_files_follow_the_umask(tmp_path, monkeypatch,
                                                                        capsys):
    """Points 2 and 3: every file a run writes is 0644 under umask 022 (a real process started
    with that umask); a second run into the same (default) --out is refused, --overwrite
    replaces it (0640 under umask 027)."""
    args = ["train", "--limit-train", "64", "--limit-test", "50", "--epochs", "1",
            "--device", "cpu"]
    first = _lsa(tmp_path, *args)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "runs" / "moons-Normal"
    names = sorted(p.name for p in run.iterdir())
    assert names == ["config.json", "history.json", "last.pt", "model.pt", "prev.pt"]
    for name in names:
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name
    before = (run / "model.pt").read_bytes()

    monkeypatch.chdir(tmp_path)
    assert main([*args, "--seed", "1"]) == 2
    assert capsys.readouterr().err.startswith(
        "lsa train: error: --out 'runs/moons-Normal' already holds a run (config.json, "
        "history.json, last.pt, model.pt, ...); continue it with --resume, replace it with "
        "--overwrite")
    assert (run / "model.pt").read_bytes() == before

    (run / "notes.txt").write_text("mine")
    old = os.umask(0o027)
    try:
        assert main([*args, "--seed", "1", "--overwrite"]) == 0
    finally:
        os.umask(old)
    assert "--overwrite: removed the old run's config.json, history.json, last.pt, prev.pt, " \
           "model.pt" in capsys.readouterr().err
    assert (run / "model.pt").read_bytes() != before
    assert json.loads((run / "config.json").read_text())["config"]["seed"] == 1
    assert (run / "notes.txt").read_text() == "mine"  # not a run file: left alone
    assert stat.S_IMODE((run / "model.pt").stat().st_mode) == 0o640


@pytest.fixture
def moons_run(tmp_path):
    """A run folder as `lsa train` leaves it, without last.pt: config.json + model.pt."""
    from lsa_ext.data import load_dataset
    from lsa_ext.models import build_model

    run = tmp_path / "run"
    run.mkdir()
    model = build_model("model_a", load_dataset("moons").info, seed=0)
    torch.save(model.state_dict(), run / "model.pt")
    (run / "config.json").write_text(json.dumps({
        "config": {"at": "none"}, "meta": {"dataset": "moons", "model": "model_a",
                                            "data_dir": None, "data_seed": 0}}))
    return run


def test_every_checkpoint_command_reads_the_runs_config(moons_run, tmp_path, capsys):
    """Point 6: `lsa analyze` and `lsa evaluate` take the run's dataset and model from its
    config.json (a moons checkpoint under analyze's default digits failed before); options
    that contradict the run are an error naming them."""
    ckpt = str(moons_run / "model.pt")
    assert main(["analyze", "--checkpoint", ckpt, "--max-samples", "40", "--no-plot",
                 "--perturbations", "gaussian", "--device", "cpu",
                 "--out", str(tmp_path / "a")]) == 0
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert rep["config"]["dataset"] == "moons" and rep["config"]["model"] == "model_a"
    assert rep["layers"] == ["act1", "act2", "act3"]  # Model A's, not Model B's
    assert main(["evaluate", "--checkpoint", ckpt, "--limit-test", "40",
                 "--eps-grid", "0,0.1"]) == 0
    assert "model_a from " in capsys.readouterr().out
    assert main(["analyze", "--checkpoint", ckpt, "--dataset", "digits", "--model", "model_a",
                 "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.startswith(
        "lsa analyze: error: --dataset digits (the run: moons) contradict the run that wrote")
    assert main(["evaluate", "--checkpoint", ckpt, "--model", "model_b"]) == 2
    assert "--model model_b (the run: model_a)" in capsys.readouterr().err


def test_report_accuracy_is_written_in_percent_and_both_schemas_read(tmp_path):
    """Point 5: report.json (schema 1.1 and later) adds accuracy_percent; schema-1 reports
    (accuracy as a fraction only) still load, to the same accuracies."""
    from lsa_ext import analysis
    from lsa_ext.data import load_dataset
    from lsa_ext.models import build_model
    from lsa_ext.noise import Gaussian
    from lsa_ext.result import load_result

    data = load_dataset("moons", limit_test=64)
    model = build_model("model_a", data.info, seed=0)
    res = analysis.analyze(model, data.test, {"g": Gaussian(std=0.5, clip=None, seed=1)},
                           layers="activations", progress=False)
    res.to_json(tmp_path / "r.json")
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["schema"] == "lsa_ext.analysis/1.2"  # 1.2: "labels" (test_site_labels_report)
    correct = sum(int(c) for c in (model(data.test.tensors[0]).squeeze(1) > 0).long()
                  == data.test.tensors[1])
    assert rep["accuracy_percent"]["clean"] == pytest.approx(100.0 * correct / 64, abs=1e-9)
    assert rep["accuracy"]["clean"] == pytest.approx(correct / 64, abs=1e-12)
    old = dict(rep, schema="lsa_ext.analysis/1")
    del old["accuracy_percent"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    for name in ("r.json", "old.json"):
        back = load_result(tmp_path / name)
        assert back.accuracy_percent == pytest.approx(res.accuracy_percent)


def test_api_defaults_clip_from_the_data_and_takes_attack_alone(tmp_path):
    """Point 5: lsa_ext.train's clip="auto" clips images to [0, 1] (as `lsa train`) and not
    two-moons; attack= works without at=; an API error is worded for the API."""
    import lsa_ext
    from lsa_ext import checkpoint as ckpt
    from lsa_ext.attacks import FGSM
    from lsa_ext.batches import auto_clip
    from lsa_ext.data import load_dataset
    from lsa_ext.errors import LsaUserError
    from lsa_ext.models import build_model

    digits = load_dataset("digits", limit_train=64)
    moons = load_dataset("moons", limit_train=64)
    assert auto_clip(digits) == (0.0, 1.0) and auto_clip(digits.train) == (0.0, 1.0)
    assert auto_clip(moons) is None and auto_clip(moons.train) is None
    model = build_model("model_b", digits.info, seed=0)
    lsa_ext.train(model, digits, at="fgsm", eps=0.3, epochs=1, out=tmp_path / "d",
                  progress=False)
    assert ckpt.load_checkpoint(tmp_path / "d" / "last.pt")["config"]["clip"] == [0.0, 1.0]

    seen = []
    m = build_model("model_a", moons.info, seed=0)
    fgsm = FGSM(m, 0.2, clip=None)

    def attack(x, y):
        seen.append(x.shape[0])
        return fgsm(x, y)

    lsa_ext.train(m, moons.train, attack=attack, lr_layers="L1", epochs=1, batch_size=32,
                  out=tmp_path / "m", progress=False)
    state = ckpt.load_checkpoint(tmp_path / "m" / "last.pt")
    assert seen == [32, 32] and state["history"][0]["lr_loss"] > 0
    assert state["config"]["clip"] is None and state["config"]["gamma"] == 0.1
    with pytest.raises(LsaUserError) as err:
        lsa_ext.train(m, moons.train, lr_layers="L1", epochs=1, progress=False)
    assert "set at= to one of fgsm, pgd, fast, trades, apgd, or pass attack=" in str(err.value)
    assert "--" not in str(err.value)


def test_unwritable_cache_is_named_and_not_fatal(tmp_path, monkeypatch, caplog):
    """Point 7: LSA_CACHE_DIR under a file cannot be created: one warning naming the model
    cache and LSA_CACHE_DIR, and the model is trained and used without caching."""
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("LSA_CACHE_DIR", str(tmp_path / "afile" / "cache"))
    with caplog.at_level("WARNING", logger="lsa_ext.model_cache"):
        assert main(["analyze", "--dataset", "moons", "--epochs", "1", "--max-samples", "20",
                     "--perturbations", "gaussian", "--no-plot", "--device", "cpu",
                     "--out", str(tmp_path / "o")]) == 0
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith("model cache folder '") and "afile' is a file" in msg
    assert msg.endswith("training without caching (set LSA_CACHE_DIR to a writable folder, "
                        "or pass --no-cache)")
    assert (tmp_path / "o" / "report.json").is_file()
