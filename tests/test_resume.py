"""Resume: a killed (SIGKILL, mid-run) or interrupted (Ctrl-C = SIGINT, before the first epoch
ends) and resumed `lsa train` ends with the same weights as an uninterrupted run with the same
seed (real subprocesses, real signals); options that contradict the run are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lsa_ext import checkpoint as ckpt

MAIN = "import sys; from lsa_ext.cli import main; sys.exit(main())"
EPOCHS = 6
ARGS = ["train", "--dataset", "moons", "--model", "model_a", "--at", "pgd", "--eps", "0.2",
        "--steps", "5", "--lr-layers", "L1", "--gamma", "0.5", "--epochs", str(EPOCHS),
        "--batch-size", "32", "--scheduler", "cosine", "--seed", "3", "--limit-train", "800",
        "--device", "cpu"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", LSA_PROGRESS="0")
    return env


def _run(out, *extra):
    return subprocess.run([sys.executable, "-c", MAIN, *ARGS, "--out", str(out), *extra],
                          env=_env(), capture_output=True, text=True, timeout=120)


def _start(out):
    return subprocess.Popen([sys.executable, "-c", MAIN, *ARGS, "--out", str(out)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, path):
    deadline = time.monotonic() + 90
    while not path.exists():
        assert proc.poll() is None, "training exited early: " + proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.005)


def _same_run(a_dir, b_dir):
    want = torch.load(a_dir / "model.pt", weights_only=True)
    got = torch.load(b_dir / "model.pt", weights_only=True)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    a = ckpt.load_checkpoint(a_dir / "last.pt")
    b = ckpt.load_checkpoint(b_dir / "last.pt")
    assert a["epoch"] == b["epoch"] == EPOCHS
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    for k, v in a["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, b["optimizer"]["state"][k][name])


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_killed_or_interrupted_runs_resume_to_identical_weights(tmp_path):
    from lsa_ext.cli import main

    ref_dir, kill_dir, int_dir = tmp_path / "ref", tmp_path / "killed", tmp_path / "int"
    # SIGKILL after the first epoch's checkpoint (history.json follows it)
    proc = _start(kill_dir)
    try:
        _wait_for(proc, kill_dir / "history.json")
        time.sleep(0.05)  # land inside a later epoch (or a later checkpoint write)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = ckpt.load_checkpoint(kill_dir / "last.pt")["epoch"]
    assert 1 <= killed_at < EPOCHS, "the run was not interrupted mid-way"
    assert not (kill_dir / "model.pt").exists()
    # Ctrl-C as soon as the state before the first batch is saved: resumable from epoch 0
    proc = _start(int_dir)
    try:
        _wait_for(proc, int_dir / "last.pt")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert ckpt.load_checkpoint(int_dir / "last.pt")["epoch"] == 0
    assert err.strip().splitlines()[-1] == (
        f"lsa train: interrupted; AT-PGD-LR-L1 stopped with 0 of {EPOCHS} epochs done (saved "
        f"in {int_dir / 'last.pt'}); resume with: lsa train --out {int_dir} --resume")
    assert "Traceback" not in err
    # options that contradict the run are refused, naming each
    assert main(["train", "--out", str(kill_dir), "--resume", "--dataset", "digits",
                 "--at", "fgsm", "--lr", "0.001", "--epochs", str(EPOCHS)]) == 2

    ref = _run(ref_dir)
    assert ref.returncode == 0, ref.stderr
    for out, done in ((kill_dir, killed_at), (int_dir, 0)):
        res = _run(out, "--resume")
        assert res.returncode == 0, res.stderr
        assert (f"{done} of {EPOCHS} epochs done, continuing with epoch {done + 1}/{EPOCHS}"
                in res.stderr)
        assert f"\nepoch {done + 1}/{EPOCHS}: loss " in res.stderr
        _same_run(ref_dir, out)


def test_conflicting_resume_options_are_named(tmp_path, capsys):
    from lsa_ext.cli import main

    out = tmp_path / "run"
    assert main(["train", "--dataset", "moons", "--limit-train", "64", "--epochs", "1",
                 "--at", "fgsm", "--lr-layers", "L1", "--device", "cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--dataset", "digits", "--at", "pgd",
                 "--lr-layers", "fc2", "--gamma", "0.1", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lsa train: error: --resume continues the run in {out / 'last.pt'} "
                          "with its own settings, and --at pgd (the run: fgsm); --dataset "
                          "digits (the run: moons) differ from them: drop them, or start a new "
                          "run (another --out, or --overwrite)"), err
    # the same values as the run's are fine, and so is a longer --epochs; fewer is an error
    assert main(["train", "--out", str(out), "--resume", "--epochs", "0"]) == 2
    assert "--epochs 0 is fewer than the 1 epoch the run" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--dataset", "two-moons", "--at",
                 "fgsm", "--lr-layers", "fc2", "--epochs", "2"]) == 0
    assert "1 of 2 epochs done, continuing with epoch 2/2" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert "is complete (2 of 2 epochs done): nothing to resume" in capsys.readouterr().err


def test_resume_from_corrupt_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"\x00" * 100)
    res = _run(out, "--resume")
    assert res.returncode == 2
    assert "truncated or corrupt" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("scheduler", ["cosine", "none"])
def test_resume_with_more_epochs_only_where_the_schedule_allows(tmp_path, capsys, scheduler):
    from lsa_ext.cli import main

    out = tmp_path / "run"
    assert main(["train", "--dataset", "moons", "--limit-train", "64", "--epochs", "2",
                 "--scheduler", scheduler, "--lr", "0.1", "--device", "cpu",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc = main(["train", "--out", str(out), "--resume", "--epochs", "5"])
    err = capsys.readouterr().err
    if scheduler == "cosine":
        assert rc == 2
        assert err.startswith(
            "lsa train: error: the run's 'cosine' learning-rate schedule is planned for its 2 "
            "epochs and cannot be stretched to 5: the 2 epochs done followed the 2-epoch plan, "
            "so no schedule for 5 epochs continues them exactly; resume it without changing "
            "its number of epochs, or start a new run with 5 epochs"), err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        return
    assert rc == 0, err
    state = ckpt.load_checkpoint(out / "last.pt")
    assert state["epoch"] == 5
    assert [r["learning_rate"] for r in state["history"]] == [0.1] * 5
