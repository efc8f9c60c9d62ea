"""Resume after SIGKILL: a killed and resumed `lsa train` ends with the same weights as an
uninterrupted run with the same seed (real subprocesses, real SIGKILL)."""

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
        "--batch-size", "32", "--scheduler", "cosine", "--seed", "3", "--limit-train", "1200"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", LSA_PROGRESS="0")
    return env


def _run(out, *extra):
    return subprocess.run([sys.executable, "-c", MAIN, *ARGS, "--out", str(out), *extra],
                          env=_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_resume_after_sigkill_gives_identical_weights(tmp_path):
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", MAIN, *ARGS, "--out", str(kill_dir)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not (kill_dir / "last.pt").exists():
            assert proc.poll() is None, "training exited before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.005)
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

    ref = _run(ref_dir)
    assert ref.returncode == 0, ref.stderr
    res = _run(kill_dir, "--resume")
    assert res.returncode == 0, res.stderr
    assert f"after epoch {killed_at}/{EPOCHS}" in res.stderr

    want = torch.load(ref_dir / "model.pt", weights_only=True)
    got = torch.load(kill_dir / "model.pt", weights_only=True)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    a = ckpt.load_checkpoint(ref_dir / "last.pt")
    b = ckpt.load_checkpoint(kill_dir / "last.pt")
    assert a["epoch"] == b["epoch"] == EPOCHS
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    for k, v in a["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(t, b["optimizer"]["state"][k][name])


def test_resume_from_corrupt_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"\x00" * 100)
    res = _run(out, "--resume")
    assert res.returncode == 2
    assert "truncated or corrupt" in res.stderr and "Traceback" not in res.stderr
