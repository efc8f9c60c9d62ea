"""Training: plain fit, the LR term (value and gradients vs float64 reference), AT-LR steps."""

from __future__ import annotations

import copy
import gc
import math

import pytest
import torch
from torch import nn

import lsa_ext
from lsa_ext import training
from lsa_ext.errors import LsaUserError
from lsa_ext.losses import cross_entropy, kl_div

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed: int = 0, out: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.ELU(), nn.Linear(16, 16), nn.ELU(),
                         nn.Linear(16, out))


def _blobs(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 2, generator=g) * 0.5 + (2 * y.float() - 1).unsqueeze(1) * 1.5
    return x, y


def _ref_lr(model: nn.Module, x, x_adv, idx: list[int], gamma: list[float]) -> torch.Tensor:
    """float64 reference: run the Sequential layer by layer, relative error per sample."""
    total = torch.zeros((), dtype=torch.float64)
    a, b = x.double(), x_adv.double()
    outs_a, outs_b = [], []
    for layer in model:
        a, b = layer(a), layer(b)
        outs_a.append(a)
        outs_b.append(b)
    for g, i in zip(gamma, idx, strict=True):
        ca, cb = outs_a[i].flatten(1), outs_b[i].flatten(1)
        total = total + g * ((ca - cb).norm(dim=1) / ca.norm(dim=1)).mean()
    return total


def test_fit_learns_and_is_deterministic():
    x, y = _blobs()
    m1 = training.fit(_mlp(), (x, y), epochs=3, batch_size=32, lr=1e-2, seed=3, progress=False)
    m2 = training.fit(_mlp(), torch.utils.data.TensorDataset(x, y), epochs=3, batch_size=32,
                      lr=1e-2, seed=3, progress=False)
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)
    m3 = training.fit(_mlp(), (x, y), epochs=3, batch_size=32, lr=1e-2, seed=4, progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(m1.parameters(), m3.parameters(),
                                                     strict=True))
    with torch.no_grad():
        acc = (lsa_ext.losses.predict(m1(x)) == y).float().mean().item()
    assert acc > 0.95


def test_fit_matches_handwritten_sgd_loop():
    """One epoch of plain SGD equals a hand-written loop over the same permutation."""
    x, y = _blobs(64)
    model = training.fit(_mlp(), (x, y), epochs=1, batch_size=16, lr=0.1, optimizer="sgd",
                         seed=7, progress=False)
    ref = _mlp()
    ref.train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(7)
    order = torch.randperm(64, generator=g)
    for i in range(0, 64, 16):
        idx = order[i:i + 16]
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(
            ref(x[idx]).squeeze(1), y[idx].float()).backward()
        opt.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_lr_term_value_and_gradients_match_float64_reference():
    model = _mlp(1, out=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, generator=g)
    x_adv = x + 0.1 * torch.randn(8, 2, generator=g)
    layers = training.resolve_layers(model, "L0,1")
    assert layers == ["0", "1"]
    lr, logits_c, logits_a = training.lr_term(model, x, x_adv, layers, [0.5, 2.0])
    ref_model = copy.deepcopy(model).double()
    ref = _ref_lr(ref_model, x, x_adv, [0, 1], [0.5, 2.0])
    torch.testing.assert_close(lr.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logits_c.double(), ref_model(x.double()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits_a.double(), ref_model(x_adv.double()), rtol=1e-5,
                               atol=1e-6)
    lr.backward()
    ref.backward()
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None or float(p.grad.abs().max()) == 0.0
        else:
            torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-6)


def test_lr_term_gradient_flows_through_both_passes():
    """d LR / d x and d LR / d x_adv are both non-zero and match float64 autograd."""
    model = _mlp(2, out=2).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    x_adv = (x.detach() + 0.2 * torch.randn(4, 2, generator=g,
                                            dtype=torch.float64)).requires_grad_()
    lr, _, _ = training.lr_term(model, x, x_adv, ["2"], 1.0)
    gx, gxa = torch.autograd.grad(lr, [x, x_adv])
    x2, xa2 = x.detach().clone().requires_grad_(), x_adv.detach().clone().requires_grad_()
    ref = _ref_lr(model, x2, xa2, [2], [1.0])
    rx, rxa = torch.autograd.grad(ref, [x2, xa2])
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gxa, rxa)
    assert float(gx.abs().sum()) > 0 and float(gxa.abs().sum()) > 0


def test_lr_term_early_stop_gives_same_loss_and_gradients():
    model = _mlp(3, out=2)
    x = torch.randn(6, 2)
    x_adv = x + 0.05
    kw = {"lr_pass": "two_pass"}
    full, lc, _ = training.lr_term(model, x, x_adv, ["0"], 1.5, clean_logits=True, **kw)
    gfull = torch.autograd.grad(full, list(model.parameters()), allow_unused=True)
    short, none, _ = training.lr_term(model, x, x_adv, ["0"], 1.5, clean_logits=False, **kw)
    gshort = torch.autograd.grad(short, list(model.parameters()), allow_unused=True)
    assert lc is not None and none is None
    assert torch.equal(full, short)
    for a, b in zip(gfull, gshort, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    # one concatenated forward: the same term up to float rounding
    cat, lcat, _ = training.lr_term(model, x, x_adv, ["0"], 1.5, lr_pass="concat")
    gcat = torch.autograd.grad(cat, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(cat, full)
    torch.testing.assert_close(lcat, lc)
    for a, b in zip(gfull, gcat, strict=True):
        assert (a is None and b is None) or torch.testing.assert_close(a, b) is None


def test_lr_term_on_ddp_style_wrapper_strips_module_prefix():
    model = _mlp(4, out=2)
    wrapped = nn.DataParallel(model)  # same .module layout as DistributedDataParallel
    x = torch.randn(5, 2)
    a, _, _ = training.lr_term(wrapped, x, x + 0.1, ["module.2"], 1.0)
    b, _, _ = training.lr_term(model, x, x + 0.1, ["2"], 1.0)
    torch.testing.assert_close(a, b)


def test_resolve_layers_errors():
    model = _mlp()
    assert training.resolve_layers(model, ["L2"]) == ["4"]
    with pytest.raises(LsaUserError, match="3 learnable layers"):
        training.resolve_layers(model, "L3")
    with pytest.raises(LsaUserError, match="no layer named"):
        training.resolve_layers(model, "conv9")
    with pytest.raises(LsaUserError, match="gamma has 3 values"):
        training.lr_term(model, torch.zeros(2, 2), torch.ones(2, 2), ["0"], [1.0, 2.0, 3.0])


def _shift_attack(eps: float):
    """Deterministic stand-in attack: moves each point by eps towards the other class."""

    def attack(x, y):
        return (x - eps * (2 * y.float() - 1).unsqueeze(1)).detach()

    return attack


def test_at_lr_step_equals_handwritten_objective():
    """One AT-LR step (SGD, one batch) = a hand-written step on CE(x̂) + γ·CM, and TRADES."""
    x, y = _blobs(32, seed=2)
    for at, want_loss in (("pgd", "ce_adv"), ("trades", "trades")):
        model = _mlp(5, out=2)
        ref = copy.deepcopy(model)
        training.train(model, (x, y), at=at, eps=0.5, lr_layers="L1", gamma=0.7, epochs=1,
                       batch_size=32, optimizer="sgd", lr=0.05, momentum=0.0, seed=0,
                       attack=_shift_attack(0.5), trades_beta=6.0, progress=False)
        order = torch.randperm(32, generator=torch.Generator().manual_seed(0))
        xb, yb = x[order], y[order]
        xa = _shift_attack(0.5)(xb, yb)
        h_c, h_a = ref[:3](xb), ref[:3](xa)
        cm = ((h_c - h_a).flatten(1).norm(dim=1) / h_c.flatten(1).norm(dim=1)).mean()
        lc, la = ref(xb), ref(xa)
        if want_loss == "ce_adv":
            loss = cross_entropy(la, yb) + 0.7 * cm
        else:
            loss = cross_entropy(lc, yb) + 6.0 * kl_div(la, lc) + 0.7 * cm
        loss.backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.05 * p.grad
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_lr_needs_an_attack_and_bad_settings_are_user_errors():
    x, y = _blobs(16)
    with pytest.raises(LsaUserError, match="needs adversarial examples"):
        training.train(_mlp(), (x, y), at="none", lr_layers="L0", epochs=1)
    with pytest.raises(LsaUserError, match="unknown training method"):
        training.train(_mlp(), (x, y), at="pgd2", epochs=1)
    with pytest.raises(LsaUserError, match="unknown optimizer"):
        training.fit(_mlp(), (x, y), epochs=1, optimizer="lbfgs")


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    x, y = _blobs(64)
    model = _mlp()
    trainer = training.Trainer(model, (x, y), training.TrainConfig(epochs=1, batch_size=16,
                                                                   lr=1e-2),
                               out=tmp_path, progress=False)
    trainer.fit()
    good = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    trainer.config.epochs = 3
    trainer.config.lr = 1e30
    for group in trainer.optimizer.param_groups:
        group["lr"] = 1e30  # diverges within a few steps
    with pytest.raises(training.TrainingDivergedError, match=r"loss is (nan|inf).*kept"):
        trainer.fit()
    kept = torch.load(tmp_path / "last.pt", weights_only=True)
    assert kept["epoch"] == 1
    for k, v in good.items():
        assert torch.equal(kept["model"][k], v)
    assert all(math.isfinite(float(v.abs().sum())) for v in kept["model"].values())


def test_at_lr_under_distributed_data_parallel_matches_plain_model(tmp_path):
    """World size 1 (gloo): a DDP-wrapped model trains to the same weights as the bare one."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not built")
    x, y = _blobs(64, seed=3)
    kw = dict(at="pgd", eps=0.3, lr_layers=["module.2", "L0"], gamma=[1.0, 0.5], epochs=2,
              batch_size=16, seed=0, attack=_shift_attack(0.3), progress=False)
    plain = training.train(_mlp(6, out=2), (x, y), **kw)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    inner = _mlp(6, out=2)
    try:
        ddp = nn.parallel.DistributedDataParallel(inner)
        training.train(ddp, (x, y), **kw)
        # Free the wrapper (and the trainer's cycles holding it) while the group is alive: a
        # DDP reducer destroyed after destroy_process_group can deadlock a gloo worker thread
        # against the GIL.
        del ddp
        gc.collect()
    finally:
        dist.destroy_process_group()
    for p, q in zip(plain.parameters(), inner.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_nan_parameters_after_last_step_are_not_checkpointed(tmp_path):
    """A step that leaves NaN weights at the end of an epoch (finite loss) stops training
    before the checkpoint is written."""
    x, y = _blobs(32)
    trainer = training.Trainer(_mlp(), (x, y), training.TrainConfig(epochs=2, batch_size=32),
                               out=tmp_path, progress=False)
    real_step = trainer.optimizer.step

    def poisoned_step(*a, **k):
        out = real_step(*a, **k)
        if trainer.epoch == 1:  # second epoch's only step
            with torch.no_grad():
                next(trainer.module.parameters()).fill_(float("nan"))
        return out

    trainer.optimizer.step = poisoned_step
    with pytest.raises(training.TrainingDivergedError, match="became NaN/Inf in epoch 2"):
        trainer.fit()
    kept = torch.load(tmp_path / "last.pt", weights_only=True)
    assert kept["epoch"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in kept["model"].values())


def test_train_refuses_an_out_holding_a_run_unless_overwrite(tmp_path, capsys):
    from lsa_ext import checkpoint as ckpt
    from lsa_ext.cli import main
    from lsa_ext.data import load_dataset
    from lsa_ext.models import build_model

    r1 = tmp_path / "r1"
    assert main(["train", "--dataset", "moons", "--limit-train", "64", "--limit-test", "32",
                 "--at", "pgd", "--steps", "2", "--lr-layers", "L2", "--epochs", "2",
                 "--device", "cpu", "--out", str(r1)]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in r1.iterdir()}
    assert set(before) == {"config.json", "history.json", "last.pt", "prev.pt", "model.pt"}
    data = load_dataset("moons", None, seed=0, limit_train=64, limit_test=32)
    model = build_model("model_a", data.info, seed=0)
    with pytest.raises(LsaUserError) as err:
        lsa_ext.train(model, data, at="fgsm", epochs=1, out=r1, progress=False)
    assert str(err.value) == (
        f"out={str(r1)!r} already holds a run (config.json, history.json, last.pt, prev.pt, "
        "model.pt); continue it with resume=, replace it with overwrite=True, or choose "
        "another out")
    assert {p.name: p.read_bytes() for p in r1.iterdir()} == before  # untouched
    with pytest.raises(LsaUserError, match="give one of them"):
        lsa_ext.train(model, data, at="fgsm", epochs=1, out=r1, resume=r1 / "last.pt",
                      overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in r1.iterdir()} == before
    # an invalid setting fails before the old run is removed
    with pytest.raises(LsaUserError, match="epochs"):
        lsa_ext.train(model, data, at="fgsm", epochs=0, out=r1, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in r1.iterdir()} == before

    (r1 / "notes.txt").write_text("mine")
    lsa_ext.train(model, data, at="fgsm", epochs=1, out=r1, overwrite=True, progress=False)
    # only the fgsm run's checkpoint is left (and the user's own file): no stale pgd files
    assert sorted(p.name for p in r1.iterdir()) == ["last.pt", "notes.txt"]
    state = ckpt.load_checkpoint(r1 / "last.pt")
    assert state["config"]["at"] == "fgsm" and state["config"]["lr_layers"] == []
    assert state["epoch"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(state["model"][k], v)
    # the folder now holds a run: a second plain call is refused, resume= continues it
    with pytest.raises(LsaUserError, match="already holds a run"):
        lsa_ext.train(model, data, at="fgsm", epochs=2, out=r1, progress=False)
    lsa_ext.train(model, data, at="fgsm", epochs=2, out=r1, resume=r1 / "last.pt",
                  progress=False)
    assert ckpt.load_checkpoint(r1 / "last.pt")["epoch"] == 2
