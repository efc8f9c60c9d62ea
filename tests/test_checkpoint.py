"""Checkpoints: round trip with weights_only=True, RNG states, corrupt files, previous copy."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from lsa_ext import checkpoint as ckpt
from lsa_ext import training
from lsa_ext.errors import LsaUserError

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(out, epochs=1, seed=0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.ELU(), nn.Linear(8, 1))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 2, generator=g)
    y = (x[:, 0] > 0).long()
    cfg = training.TrainConfig(epochs=epochs, batch_size=16, scheduler="cosine", seed=seed)
    return training.Trainer(model, (x, y), cfg, out=out, progress=False)


def test_rng_state_round_trip_restores_every_generator():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = ckpt.capture_rng_state(gen)
    want = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    gen.manual_seed(99)
    ckpt.restore_rng_state(state, gen)
    got = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    assert torch.equal(want[0], got[0])
    assert np.array_equal(want[1], got[1])
    assert want[2] == got[2]
    assert torch.equal(want[3], got[3])


def test_checkpoint_round_trip_weights_only(tmp_path):
    tr = _trainer(tmp_path, epochs=2)
    tr.fit()
    state = torch.load(tmp_path / "last.pt", weights_only=True)  # plain types only
    assert state["format"] == "lsa_ext.checkpoint" and state["epoch"] == 2
    assert set(state) >= {"model", "optimizer", "scheduler", "rng", "config", "history"}
    prev = ckpt.load_checkpoint(tmp_path / "prev.pt")
    assert prev["epoch"] == 1
    tr2 = _trainer(tmp_path / "other", epochs=2)
    tr2.resume(tmp_path / "last.pt")
    assert tr2.epoch == 2 and len(tr2.history) == 2
    for k, v in tr.module.state_dict().items():
        assert torch.equal(tr2.module.state_dict()[k], v)
    assert tr2.scheduler.state_dict() == tr.scheduler.state_dict()
    assert torch.equal(tr2.loader_generator.get_state(), tr.loader_generator.get_state())


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_is_a_clear_user_error_and_prev_survives(tmp_path, damage):
    tr = _trainer(tmp_path, epochs=2)
    tr.fit()
    last = tmp_path / "last.pt"
    raw = last.read_bytes()
    if damage == "truncate":
        last.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        last.write_bytes(b"not a checkpoint" * 10)
    else:
        last.write_bytes(b"")
    with pytest.raises(LsaUserError, match=r"truncated or corrupt.*prev\.pt"):
        ckpt.load_checkpoint(last)
    assert ckpt.load_checkpoint(tmp_path / "prev.pt")["epoch"] == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_resuming_from_prev_keeps_it_when_last_is_damaged(tmp_path, damage, caplog):
    """last.pt damaged → resume from prev.pt (epoch 1) and train on: the damaged last.pt is
    replaced without being rotated over the good prev.pt, which still holds epoch 1; the
    next save rotates normally (prev.pt = the new epoch 2)."""
    tr = _trainer(tmp_path, epochs=3)  # the cosine plan of 3 epochs, stopped after 2
    for _ in range(2):
        tr.train_epoch()
        tr.save()
    last, prev = tmp_path / "last.pt", tmp_path / "prev.pt"
    raw = last.read_bytes()
    last.write_bytes({"truncate": raw[: len(raw) // 2], "garbage": b"not a checkpoint" * 10,
                      "empty": b""}[damage])
    good_prev = prev.read_bytes()
    tr2 = _trainer(tmp_path, epochs=3)
    tr2.resume(prev)
    assert tr2.epoch == 1
    with caplog.at_level("WARNING", logger="lsa_ext.checkpoint"):
        tr2.train_epoch()
        tr2.save()
    assert prev.read_bytes() == good_prev  # not replaced by the damaged file
    assert ckpt.load_checkpoint(last)["epoch"] == 2
    assert any("damaged" in r.getMessage() for r in caplog.records)
    tr2.train_epoch()
    tr2.save()
    assert ckpt.load_checkpoint(prev)["epoch"] == 2 and ckpt.load_checkpoint(last)["epoch"] == 3


def _flip_tensor_bytes(path):
    """Flips 64 bytes inside the data of the archive's largest tensor record: the file stays
    a complete zip archive, torch.load reads it, the weights are wrong."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    # local header: 30 bytes + name + extra, then the record's bytes
    name_len = int.from_bytes(raw[info.header_offset + 26: info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28: info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start: start + 64] = bytes(b ^ 255 for b in raw[start: start + 64])
    path.write_bytes(bytes(raw))
    return info.filename


def test_flipped_tensor_bytes_are_a_clear_error_and_never_rotated(tmp_path, caplog):
    """A checkpoint whose tensor bytes changed (a complete zip archive that torch.load reads
    without complaint) is refused by its CRC, and is not kept as prev.pt."""
    tr = _trainer(tmp_path, epochs=2)
    tr.fit()
    last, prev = tmp_path / "last.pt", tmp_path / "prev.pt"
    torch.load(last, weights_only=True)
    assert ckpt.archive_damage(last) is None
    record = _flip_tensor_bytes(last)
    torch.load(last, weights_only=True)  # no error from torch itself
    assert ckpt.archive_damage(last) == f"CRC mismatch in {record}"
    with pytest.raises(LsaUserError, match=r"truncated or corrupt \(CRC mismatch in .*prev\.pt"):
        ckpt.load_checkpoint(last)
    good_prev = prev.read_bytes()
    tr2 = _trainer(tmp_path, epochs=2)  # the run's own cosine plan
    tr2.resume(prev)
    tr2.train_epoch()
    with caplog.at_level("WARNING", logger="lsa_ext.checkpoint"):
        tr2.save()
    assert prev.read_bytes() == good_prev
    assert any("CRC mismatch" in r.getMessage() for r in caplog.records)


def test_archive_damage_of_real_and_missing_files(tmp_path):
    tr = _trainer(tmp_path, epochs=1)
    tr.fit()
    assert ckpt.archive_damage(tmp_path / "last.pt") is None
    assert ckpt.archive_damage(tmp_path / "missing.pt") == "truncated or not a zip archive"


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path):
    tr = _trainer(tmp_path, epochs=1)
    tr.fit()
    before = (tmp_path / "last.pt").read_bytes()

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save_checkpoint(tmp_path / "last.pt", {"model": Boom()}, keep_previous=False)
    assert (tmp_path / "last.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_not_a_checkpoint_and_missing_file(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(LsaUserError, match="not an lsa_ext training checkpoint"):
        ckpt.load_checkpoint(tmp_path / "plain.pt")
    assert set(ckpt.model_state_from_file(tmp_path / "plain.pt")) == {"weight"}
    with pytest.raises(LsaUserError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")


def _sched_trainer(out, scheduler, epochs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.ELU(), nn.Linear(8, 1))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 2, generator=g)
    y = (x[:, 0] > 0).long()
    cfg = training.TrainConfig(epochs=epochs, batch_size=16, scheduler=scheduler, lr=0.1)
    return training.Trainer(model, (x, y), cfg, out=out, progress=False)


@pytest.mark.parametrize(("scheduler", "run_epochs", "epochs"),
                         [("cosine", 2, 5), ("cosine", 4, 3), ("step", 3, 6)])
def test_resume_refuses_epochs_a_scheduler_plan_cannot_take(tmp_path, scheduler, run_epochs,
                                                            epochs):
    _sched_trainer(tmp_path, scheduler, run_epochs).fit()
    if epochs < run_epochs:  # a run stopped early, resumed with fewer (but enough) epochs
        state = ckpt.load_checkpoint(tmp_path / "prev.pt")
        done = int(state["epoch"])
    else:
        state, done = ckpt.load_checkpoint(tmp_path / "last.pt"), run_epochs
    tr = _sched_trainer(tmp_path / "other", scheduler, epochs)
    with pytest.raises(LsaUserError) as err:
        tr.load_state_dict(state)
    assert str(err.value) == (
        f"the run's {scheduler!r} learning-rate schedule is planned for its {run_epochs} epochs "
        f"and cannot be stretched to {epochs}: the {done} epochs done followed the "
        f"{run_epochs}-epoch plan, so no schedule for {epochs} epochs continues them exactly; "
        f"resume it without changing its number of epochs, or start a new run with {epochs} "
        "epochs")
    assert tr.epoch == 0


@pytest.mark.parametrize(("scheduler", "factors"),
                         [("none", [1, 1, 1, 1, 1]),
                          # step size max(1, epochs // 3) is 1 for 3 and for 5 epochs
                          ("step", [1, 0.1, 0.01, 0.001, 0.0001])])
def test_resume_extends_a_schedule_whose_plan_stays(tmp_path, scheduler, factors):
    _sched_trainer(tmp_path, scheduler, 3).fit()
    tr = _sched_trainer(tmp_path / "other", scheduler, 5)
    tr.resume(tmp_path / "last.pt")
    tr.fit()
    got = [r["learning_rate"] for r in tr.history]
    assert tr.epoch == 5
    assert got == pytest.approx([0.1 * f for f in factors], rel=1e-12)
