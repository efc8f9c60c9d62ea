"""User mistakes on every `lsa` command: one line on stderr, exit status 2, no traceback.

Each case fails before any training (the model cache points at an empty folder, so a case that
trained would also leave a file there, which is checked).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lsa_ext.cli import main
from lsa_ext.data import load_dataset
from lsa_ext.models import build_model


class _Obj:  # pickled into a checkpoint: weights_only=True must refuse it
    pass


@pytest.fixture
def files(tmp_path, monkeypatch):
    """Bad inputs on disk; the working directory and model cache are tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LSA_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("x")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint" * 4)
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "good.pt")
    raw = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    torch.save({"model": _Obj()}, tmp_path / "obj.pt")
    model = build_model("model_a", load_dataset("moons").info, seed=0)
    torch.save(model.state_dict(), tmp_path / "moons_a.pt")
    return tmp_path


A = ["analyze", "--max-samples", "8", "--no-plot"]
T = ["train", "--limit-train", "32", "--epochs", "1", "--out", "run"]
E = ["evaluate", "--checkpoint", "moons_a.pt", "--dataset", "moons"]
R = ["reproduce", "moons", "--quick", "--out", "rep"]

CASES = [
    # analyze: names
    ([*A, "--dataset", "nope"], "unknown dataset 'nope'"),
    ([*A, "--model", "resnet9000"], "unknown model 'resnet9000'"),
    ([*A, "--model", "nomodule_xyz:make"], "cannot import module 'nomodule_xyz'"),
    ([*A, "--perturbations", "gaussian,blur"], "unknown perturbation 'blur'"),
    ([*A, "--perturbations", "gaussian:std=abc"], "std must be a finite number"),
    ([*A, "--perturbations", "pgd:steps=0"], "steps must be >= 1"),
    ([*A, "--perturbations", "gaussian:sigma=0.1"],
     "unknown parameter 'sigma' for noise 'gaussian'; valid: std, clip, seed"),
    ([*A, "--perturbations", "pgd:stepz=3"], "unknown parameter 'stepz' for attack 'pgd'; "
                                             "valid: eps, alpha, steps,"),
    ([*A, "--perturbations", "fgsm:eps=0.1,eps=0.2"], "'eps' given twice for 'fgsm'"),
    ([*A, "--perturbations", "pgd:random_start=no,steps=2"],
     "random_start must be True or False (in a perturbation spec: true or false), got 'no'"),
    ([*A, "--perturbations", "pgd:return_best=yes"], "return_best must be True or False"),
    ([*A, "--perturbations", "apgd:random_start=1"], "random_start must be True or False"),
    ([*A, "--perturbations", "gaussian:clip=(0,1)"],
     "clip in a perturbation spec is lo:hi with lo < hi (e.g. clip=0:1) or none, got '(0'"),
    ([*A, "--layers", "conv9"], "no layer named 'conv9'"),
    ([*A, "--layers", "relu1,relu1#2"], "layer site relu1#2 never runs in a forward"),
    ([*T, "--at", "pgd", "--restarts", "3"],
     "--restarts does not apply to --at pgd (it takes --steps, --alpha)"),
    ([*T, "--at", "fgsm", "--steps", "5"], "--steps does not apply to --at fgsm"),
    ([*A, "--measure", "l3"], "unknown measure 'l3'"),
    ([*A, "--mode", "fast"], "invalid choice: 'fast'"),
    # analyze: files and values
    ([*A, "--checkpoint", "missing.pt"], "does not exist"),
    ([*A, "--checkpoint", "garbage.pt"], "truncated or corrupt"),
    ([*A, "--checkpoint", "trunc.pt"], "truncated or corrupt"),
    ([*A, "--checkpoint", "obj.pt"], "weights_only=True: it holds a pickled"),
    ([*A, "--checkpoint", "good.pt"], "does not match the model"),
    ([*A, "--dataset", "mnist", "--data-dir", "empty"], "t10k-images-idx3-ubyte"),
    ([*A, "--dataset", "cifar10", "--data-dir", "empty"], "test_batch"),
    ([*A, "--dataset", "mnist"], "name the folder"),
    ([*A, "--eps", "-0.1"], "--eps must be >= 0"),
    ([*A, "--perturbations", "fgsm:eps=-1"], "eps must be >= 0"),
    ([*A, "--batch-size", "0"], "--batch-size must be >= 1"),
    ([*A, "--batch-size", "x"], "invalid int value: 'x'"),
    ([*A, "--epochs", "-1"], "--epochs must be >= 1"),
    ([*A, "--eta", "-1"], "--eta must be a number >= 0, got -1.0"),
    ([*A, "--seed", "-1"], "seed must be >= 0"),
    ([*A, "--out", "afile"], "'afile' is a file"),
    ([*A, "--out", "afile/sub"], "'afile' is a file"),
    ([*A, "--device", "tpu9"], "unknown device 'tpu9'"),
    # analyze: mistakes found from the arguments alone (issue 10 case 10: DLR used to be
    # rejected after a minute of training)
    ([*A, "--dataset", "moons", "--perturbations", "apgd:loss=dlr"],
     "the DLR loss of APGD needs at least 3 classes; the data has 2"),
    ([*A, "--perturbations", "pgd:stepz=3"], "unknown parameter 'stepz' for attack 'pgd'; valid:"),
    ([*A, "--perturbations", "gaussian:sdt=0.1"],
     "unknown parameter 'sdt' for noise 'gaussian'; valid: std, clip, seed"),
    ([*A, "--eta", "inf"], "--eta must be a number >= 0, got inf"),
    ([*A, "--epochs", "0"], "--epochs must be >= 1"),
    # train
    ([*T, "--dataset", "nope"], "unknown dataset 'nope'"),
    ([*T, "--at", "pgd", "--lr-layers", "mvl", "--eta", "-1"], "--eta must be a number >= 0"),
    ([*T[:-1], "full"], "--out 'full' already holds files that are not an lsa train run "
                        "(notes.txt); choose another --out, or write the run next to them "
                        "with --overwrite"),
    (["train", "--resume", "--overwrite", "--out", "full"], "give one of them"),
    ([*T, "--at", "cw"], "invalid choice: 'cw'"),
    ([*T, "--at", "pgd", "--lr-layers", "nomatch"], "no layer named 'nomatch'"),
    ([*T, "--at", "pgd", "--lr-layers", "L9"], "4 learnable layers"),
    ([*T, "--at", "pgd", "--lr-layers", "L1,L2", "--gamma", "1,2,3"], "gamma has 3 values"),
    ([*T, "--at", "pgd", "--lr-layers", "L1", "--gamma", "abc"], "--gamma must be a number"),
    ([*T, "--at", "pgd", "--lr-layers", "L1", "--gamma", "-1"], "gamma must be finite"),
    ([*T, "--lr-layers", "L1"], "needs adversarial examples"),
    ([*T, "--at", "pgd", "--eps", "-0.3"], "eps must be"),
    ([*T, "--epochs", "-1"], "epochs must be an integer ≥ 1"),
    ([*T, "--epochs", "0"], "epochs must be an integer ≥ 1"),
    ([*T, "--batch-size", "-4"], "batch_size must be an integer ≥ 1"),
    ([*T, "--limit-train", "0"], "limit_train must be >= 1"),
    ([*T, "--data-seed", "-1"], "seed must be >= 0"),
    ([*T, "--device", "tpu9"], "unknown device 'tpu9'"),
    ([*T, "--out", "afile"], "'afile' is a file"),
    ([*T, "--dataset", "mnist", "--data-dir", "empty"], "MNIST files not found"),
    ([*T, "--at", "pgd", "--lr-layers", "mvl", "--mvl-report", "none.json"], "does not exist"),
    ([*T, "--at", "fgsm", "--alpha", "0.1"], "--alpha does not apply to --at fgsm"),
    ([*T, "--at", "pgd", "--steps", "0"], "steps must be >= 1"),
    ([*T, "--at", "apgd", "--restarts", "0"], "--restarts must be >= 1, got 0"),
    ([*T, "--mvl-report", "none.json"], "--mvl-report is read only with --lr-layers mvl"),
    ([*T, "--at", "pgd", "--lr-layers", "mvl", "--mvl-perturbation", "pgd"],
     "--mvl-perturbation picks a perturbation of the --mvl-report report"),
    ([*T, "--lr-layers", "mvl"], "--lr-layers needs adversarial examples: add --at"),
    ([*T, "--at", "pgd", "--lr-layers", "mvl", "--eta", "nan"],
     "--eta must be a number >= 0, got nan"),
    ([*T, "--limit-test", "0"], "limit_test must be >= 1"),
    ([*T, "--dataset", "mnist"], "name the folder"),
    (["train", "--resume", "--out", "empty"], "nothing to resume: 'empty' is empty (no run in "
                                              "it); start the run without --resume"),
    (["train", "--resume", "--out", "nosuch"], "nothing to resume: 'nosuch' does not exist (no "
                                               "run there); start the run without --resume"),
    (["train", "--resume", "--out", "full"], "nothing to resume: 'full' holds no lsa train run "
                                             "(notes.txt); start the run without --resume, "
                                             "with another --out or --overwrite"),
    (["train", "--resume", "trunc.pt", "--out", "run"], "truncated or corrupt"),
    # evaluate
    (["evaluate", "--checkpoint", "missing.pt"], "does not exist"),
    (["evaluate", "--checkpoint", "garbage.pt"], "truncated or corrupt"),
    (["evaluate", "--checkpoint", "good.pt"], "name its --dataset"),
    ([*E[:1], "--checkpoint", "good.pt", "--dataset", "moons"], "does not match the model"),
    ([*E, "--eps-grid", "0,abc"], "--eps-grid must be a number or comma-separated numbers"),
    ([*E, "--device", "tpu9"], "unknown device 'tpu9'"),
    ([*E, "--out", "afile"], "'afile' is a file"),
    ([*E, "--pgd-eps", "0.1", "--pgd-steps", "0"], "steps must be >= 1"),
    ([*E, "--apgd-eps", "-0.1"], "eps must be >= 0"),
    ([*E, "--limit-test", "0"], "limit_test must be >= 1"),
    # reproduce
    (["reproduce", "mnist"], "invalid choice: 'mnist'"),
    (["reproduce"], "name a dataset: lsa reproduce {moons,mnist5k,digits} [options]"),
    ([*R, "--seeds", "a"], "--seeds must be an integer or comma-separated integers"),
    ([*R, "--methods", "cw"], "unknown method(s) ['cw']"),
    ([*R, "--layers", "L9"], "4 learnable layers"),
    ([*R, "--epochs", "-1"], "epochs must be >= 1"),
    ([*R, "--gamma", "-1"], "gamma must be >= 0"),
    ([*R, "--device", "tpu9"], "unknown device 'tpu9'"),
    ([*R, "--eps", "0"], "eps must be > 0"),
    (["reproduce", "moons", "--quick", "--out", "afile"], "'afile' is a file"),
    # the command itself
    (["bogus"], "invalid choice: 'bogus'"),
    (["reproduce", "moons", "--quick", "--seeds", " , "], "--seeds needs at least one seed"),
    (["reproduce", "moons", "--quick", "--seeds", "0,1,0"], "--seeds lists 0 more than once"),
    # an unknown option is reported by its subcommand ('lsa train: error', its --help)
    (["analyze", "--foo"], "unrecognized arguments: --foo (see 'lsa analyze --help')"),
    (["train", "--epochs", "2", "--bar", "3"],
     "unrecognized arguments: --bar 3 (see 'lsa train --help')"),
    # a typo in a required option is reported as the typo, not as the missing option
    (["evaluate", "--checkpoint", "."], "--checkpoint . is a folder: name a file in it"),
    (["reproduce", "moons", "--quick", "--seeds", "0,,1"], "--seeds has an empty item: '0,,1'"),
    (["evaluate", "--dataset", "moons", "--chekpoint", "x.pt"],
     "unrecognized arguments: --chekpoint x.pt (see 'lsa evaluate --help')"),
    (["evaluate", "--dataset", "moons"], "the following arguments are required: --checkpoint"),
]


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[" ".join(c[0][:1] + c[0][-2:])
                                                          for c in CASES])
def test_user_error_is_one_line_exit_2(files, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lsa {argv[0]}: error: " if argv[0] != "bogus" else "lsa: error")
    assert message in lines[0]
    assert not (files / "cache").exists(), "the case trained a model before failing"
    assert not (files / "run" / "last.pt").exists() and not (files / "rep" / "runs").exists()


# messages that can only come from reading the data folder
READS_FILES = ("t10k-images-idx3-ubyte", "test_batch", "MNIST files not found")
BEFORE_DATA = [c for c in CASES if c[1] not in READS_FILES]


@pytest.mark.parametrize(("argv", "message"), BEFORE_DATA,
                         ids=[" ".join(c[0][:1] + c[0][-2:]) for c in BEFORE_DATA])
def test_argument_mistakes_fail_before_any_data_is_read(files, capsys, monkeypatch, argv,
                                                        message):
    """Issue 10 point 6: every mistake detectable from the arguments is rejected before any
    data is loaded (and so before any training)."""
    import lsa_ext.data
    import lsa_ext.reproduce

    def no_loading(*args, **kwargs):
        raise AssertionError("data was loaded before the arguments were checked")

    monkeypatch.setattr(lsa_ext.data, "load_dataset", no_loading)
    monkeypatch.setattr(lsa_ext.reproduce, "load_dataset", no_loading)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_dlr_on_two_classes_fails_before_training_in_a_subprocess(tmp_path):
    """Issue 10 case 10, as a user runs it: exit 2, one line naming DLR, no model written."""
    cache = tmp_path / "cache"
    env = {**__import__("os").environ, "LSA_CACHE_DIR": str(cache)}
    p = subprocess.run(
        [sys.executable, "-m", "lsa_ext.cli", "analyze", "--dataset", "moons", "--epochs", "1",
         "--perturbations", "apgd:loss=dlr,steps=3", "--no-plot", "--out",
         str(tmp_path / "out"), "--max-samples", "32"],
        capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        "lsa analyze: error: the DLR loss of APGD needs at least 3 classes; the data has 2 "
        "(use loss=ce)"]
    assert not cache.exists() or not list(cache.glob("*.pt"))
    assert not (tmp_path / "out" / "report.json").exists()


def test_help_and_module_entry_point(tmp_path):
    """`python -m lsa_ext.cli` is `lsa`: --help exits 0; a user error is one line, status 2."""
    run = [sys.executable, "-m", "lsa_ext.cli"]
    ok = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "analyze" in ok.stdout and "reproduce" in ok.stdout
    bad = subprocess.run([*run, "train", "--device", "tpu9", "--out", str(Path(tmp_path))],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("lsa train: error: unknown device 'tpu9'; use cpu, cuda")
