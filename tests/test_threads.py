"""--threads / lsa_ext.threads: the documented choice of intra-op threads."""

from __future__ import annotations

import argparse

import pytest
import torch

from lsa_ext import threads
from lsa_ext.cli import main
from lsa_ext.cli.options import apply_threads_option
from lsa_ext.errors import LsaUserError


@pytest.fixture
def restore_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_auto_respects_omp_num_threads(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads("auto", small_model=True) == (3, "OMP_NUM_THREADS")


def test_auto_is_one_thread_for_tiny_models(restore_threads):
    assert threads.choose_threads("auto", small_model=True) == (1, "tiny model")
    assert threads.choose_threads(None, small_model=True)[0] == 1


@pytest.mark.parametrize(("cores", "load", "want"), [(4, 0.0, 4), (4, 2.6, 1), (4, 9.0, 1),
                                                      (8, 3.2, 5)])
def test_auto_caps_at_idle_cores(monkeypatch, restore_threads, cores, load, want):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    torch.set_num_threads(6)  # torch's default on a 6-core box
    assert threads.idle_cores() == max(1, cores - round(load))
    assert threads.choose_threads("auto")[0] == min(6, want)


def test_explicit_counts_and_bad_values(restore_threads):
    assert threads.choose_threads(2) == (2, "requested")
    assert threads.choose_threads("3")[0] == 3
    for bad in (0, -1, "x", "1.5", True):
        with pytest.raises(LsaUserError, match="threads"):
            threads.choose_threads(bad)


def test_cli_applies_the_choice(restore_threads):
    tiny = argparse.Namespace(dataset="digits", model=None, threads="auto")
    assert apply_threads_option(tiny) == 1 and torch.get_num_threads() == 1
    own = argparse.Namespace(dataset="digits", model="vgg19", threads="2")
    assert apply_threads_option(own) == 2 and torch.get_num_threads() == 2


def test_cli_rejects_bad_threads_before_work(capsys, restore_threads):
    assert main(["train", "--threads", "zero", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lsa train: error: --threads must be 'auto' or an integer >= 1, got 'zero'"]


def test_more_threads_than_cores_warns_once(monkeypatch, caplog, restore_threads):
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    with caplog.at_level("WARNING", logger="lsa_ext.threads"):
        assert threads.choose_threads(2) == (2, "requested")
        assert not caplog.records
        assert threads.choose_threads(999) == (999, "requested")
    assert [r.getMessage() for r in caplog.records] == [
        "999 intra-op threads requested on 2 available cores: the threads will take turns on "
        "the cores (oversubscription), which is slower than 2"]
