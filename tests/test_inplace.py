"""Layer outputs held past their hooks stay the layer's own output when later ops are in place.

Each model below comes with an in-place-free twin (same weights): ``ReLU(inplace=True)`` after
Linear/Conv, ``F.relu(..., inplace=True)`` in ``forward``, a residual ``out += identity`` after
BatchNorm, a module called twice, nested Sequentials. The LR term on the in-place model (both
pass modes, with and without the clean logits) must equal a float64 reference computed on the
twin — value, gradients and BatchNorm running statistics.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lsa_ext
from lsa_ext.errors import LsaUserError
from lsa_ext.probes import Capture, InplaceGuard
from lsa_ext.regularizer import LRTerm, lr_term
from lsa_ext.training import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- models and twins
def linear_relu(inplace: bool) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(inplace=inplace), nn.Linear(12, 3))


def conv_relu(inplace: bool) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=inplace),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=inplace),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


class FunctionalReLU(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 3)

    def forward(self, x):
        h = self.fc1(x)
        h = F.relu(h, inplace=True) if self.inplace else F.relu(h)
        return self.fc2(h)


class Residual(nn.Module):
    """A ResNet basic block (conv-BN-ReLU-conv-BN, ``out += identity``, ReLU) with a head."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        identity = self.stem(x)
        out = self.relu(self.bn1(self.conv1(identity)))
        out = self.bn2(self.conv2(out))
        if self.inplace:
            out += identity
        else:
            out = out + identity
        return self.head(self.relu(out))


class Reused(nn.Module):
    """One Linear and one in-place ReLU module, each called more than once."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.fc1, self.shared, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x):
        h = self.act(self.fc1(x))
        h = self.act(self.shared(h))
        return self.fc3(self.act(self.shared(h)))


def nested(inplace: bool) -> nn.Module:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=inplace)),
        nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4),
                                    nn.ReLU(inplace=inplace)), nn.Flatten()),
        nn.Linear(4 * 5 * 5, 3),
    )


IMAGE = (3, 5, 5)
CASES = {  # name: (factory, input shape, regularised sites)
    "linear_relu": (linear_relu, (6,), ["0"]),
    "conv_relu": (conv_relu, IMAGE, ["0", "2"]),
    "functional_relu": (FunctionalReLU, (6,), ["fc1"]),
    "residual_bn": (Residual, IMAGE, ["bn2", "conv1", "bn1"]),
    "reused_module": (Reused, (6,), ["shared#2", "act#2", "shared", "act#3"]),
    "nested_sequential": (nested, IMAGE, ["0.0", "1.0.1", "0"]),
}


def _pair(case: str, seed: int = 0) -> tuple[nn.Module, nn.Module, tuple[int, ...], list[str]]:
    """The in-place model and its in-place-free twin (same weights), float64, train mode."""
    factory, shape, sites = CASES[case]
    torch.manual_seed(seed)
    model = factory(True).double().train()
    twin = factory(False).double().train()
    twin.load_state_dict(model.state_dict())
    return model, twin, shape, sites


def _inputs(shape, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    return x, x + 0.3 * torch.randn(n, *shape, generator=g, dtype=torch.float64)


def _site_outputs(model: nn.Module, x: torch.Tensor, sites: list[str]) -> dict:
    """Outputs of ``sites`` (``name``/``name#k``) from plain forward hooks; only valid for a
    model without in-place ops (the twin)."""
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    got: dict[str, torch.Tensor] = {}

    def hook(name):
        def f(_m, _i, out):
            calls[name] = calls.get(name, 0) + 1
            site = name if calls[name] == 1 else f"{name}#{calls[name]}"
            got[site] = out

        return f

    names = {s.split("#")[0] for s in sites}
    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return got, logits


def _reference(twin, x, x_adv, sites, gamma):
    """Σ γ_l mean_i ||a_i − b_i|| / ||a_i|| on the twin, clean pass then adversarial pass."""
    clean, logits_clean = _site_outputs(twin, x, sites)
    adv, logits_adv = _site_outputs(twin, x_adv, sites)
    total = torch.zeros((), dtype=torch.float64)
    for g, s in zip(gamma, sites, strict=True):
        a, b = clean[s].flatten(1), adv[s].flatten(1)
        total = total + g * ((a - b).norm(dim=1) / a.norm(dim=1)).mean()
    return total, logits_clean, logits_adv


# --------------------------------------------------------------------------- the handed cases
def test_case01_capture_conv_then_inplace_relu_holds_the_conv_output():
    torch.manual_seed(23)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),
                          nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True)).eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        expected = model[0](x)
        with Capture(model, ["0"], detach=True) as cap:
            model(x)
        assert int((expected < 0).sum()) > 0  # the ReLU would change it
        torch.testing.assert_close(cap.outputs["0"], expected, rtol=0, atol=0)
        # a Capture reused over forwards copies only the site it found changed
        with Capture(model, ["0", "2"], detach=True) as cap:
            for _ in range(2):
                cap.reset()
                model(x)
                torch.testing.assert_close(cap.outputs["0"], expected, rtol=0, atol=0)
        assert cap.guard.copied == {"0": True, "2": True}
        with Capture(model, ["1"], detach=True) as cap:  # ReLU's output: nothing after it
            model(x)
        assert cap.guard.copied == {"1": False}
        # without the guard the fault is back: the hook's tensor is the post-ReLU one
        with Capture(model, ["0"], detach=True, copy="never") as cap:
            model(x)
        torch.testing.assert_close(cap.outputs["0"], expected.relu(), rtol=0, atol=0)


def _case02():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 3)).train()
    x = torch.randn(32, 8)
    x_adv = x + 0.3 * torch.randn_like(x)
    return model, x, x_adv


@pytest.mark.parametrize("lr_pass", ["auto", "concat", "two_pass"])
@pytest.mark.parametrize("clean_logits", [True, False])
def test_case02_lr_term_linear_then_inplace_relu(lr_pass, clean_logits):
    model, x, x_adv = _case02()
    lr, _, _ = lr_term(model, x, x_adv, ["0"], 1.0, clean_logits=clean_logits,
                       lr_pass=lr_pass)
    assert lr.item() == pytest.approx(0.330318, abs=1e-6)
    with torch.no_grad():
        want = lsa_ext.relative_error(model[0](x), model[0](x_adv), reduction="mean").item()
    assert lr.item() == pytest.approx(want, rel=1e-6)


def test_case02_without_the_guard_gives_the_post_relu_value():
    """The fault the guard closes: holding references, the term is the post-ReLU CM
    (0.322749) or, with the early-stopped clean pass, a mix of two points (0.721677)."""
    model, x, x_adv = _case02()
    full, _, _ = lr_term(model, x, x_adv, ["0"], copy="never", lr_pass="two_pass")
    short, _, _ = lr_term(model, x, x_adv, ["0"], copy="never", lr_pass="two_pass",
                          clean_logits=False)
    assert full.item() == pytest.approx(0.322749, abs=1e-6)
    assert short.item() == pytest.approx(0.721677, abs=1e-6)


def test_case02_trainer_loss_and_detection_paid_once():
    model, x, x_adv = _case02()
    tr = Trainer(model, (x, torch.randint(0, 3, (32,))),
                 TrainConfig(at="fgsm", eps=0.3, lr_layers=["L0"], gamma=1.0, clip=None),
                 progress=False)
    y = torch.zeros(32, dtype=torch.long)
    for _ in range(3):
        _, parts = tr.loss(x, y, lambda xx, yy: x_adv)
        assert float(parts["lr_loss"]) == pytest.approx(0.330318, abs=1e-6)
    assert tr.regularizer.guard.copied == {"0": True}


# --------------------------------------------------------------------------- twins
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lr_pass", ["concat", "two_pass"])
@pytest.mark.parametrize("clean_logits", [True, False])
def test_lr_term_equals_the_cm_of_the_inplace_free_twin(case, lr_pass, clean_logits):
    model, twin, shape, sites = _pair(case)
    x, x_adv = _inputs(shape)
    gamma = [0.5 + i for i in range(len(sites))]
    term = LRTerm(sites, lr_pass=lr_pass)
    lr, lc, la = term(model, x, x_adv, gamma, clean_logits=clean_logits)
    ref, rc, ra = _reference(twin, x, x_adv, sites, gamma)
    assert lr.dtype == torch.float32
    torch.testing.assert_close(lr.double(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(la, ra, rtol=1e-12, atol=1e-12)
    if clean_logits:
        torch.testing.assert_close(lc, rc, rtol=1e-12, atol=1e-12)
    else:
        assert lc is None
    # gradients through both passes, float64: the graph is the layer's own output's
    lr.backward()
    ref.backward()
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if q.grad is None or float(q.grad.abs().max()) == 0:
            assert p.grad is None or float(p.grad.abs().max()) == 0, n
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=n)
    # BatchNorm saw the clean batch, then the adversarial one, each with its own statistics
    # (checked where the whole clean forward ran)
    if clean_logits or lr_pass == "concat":
        for (n, b), c in zip(model.named_buffers(), twin.buffers(), strict=True):
            torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-12, msg=n)
    # sites changed in place later in the forward are exactly the ones copied
    inplace_changed = {
        "linear_relu": {"0"}, "conv_relu": {"0", "2"}, "functional_relu": {"fc1"},
        "residual_bn": {"bn2", "bn1"}, "reused_module": {"shared", "shared#2"},
        "nested_sequential": {"0.0", "1.0.1"},
    }[case]
    assert {s for s, c in term.guard.copied.items() if c} == inplace_changed


@pytest.mark.parametrize("case", ["conv_relu", "residual_bn", "reused_module"])
def test_second_batch_copies_only_what_it_must_and_stays_exact(case):
    model, twin, shape, sites = _pair(case)
    term = LRTerm(sites, lr_pass="two_pass")
    for seed in (1, 2):
        x, x_adv = _inputs(shape, seed=seed)
        lr, _, _ = term(model, x, x_adv, 1.0)
        ref, _, _ = _reference(twin, x, x_adv, sites, [1.0] * len(sites))
        torch.testing.assert_close(lr.double(), ref, rtol=1e-6, atol=1e-7)
        model.zero_grad()
        twin.zero_grad()
        lr.backward()
        ref.backward()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)


def test_float32_model_matches_float64_twin():
    model, twin, shape, sites = _pair("residual_bn")
    model = model.float()
    x, x_adv = _inputs(shape)
    lr, _, _ = lr_term(model, x.float(), x_adv.float(), sites, 1.0)
    ref, _, _ = _reference(twin, x, x_adv, sites, [1.0] * len(sites))
    torch.testing.assert_close(lr.double(), ref, rtol=1e-5, atol=1e-6)
    lr.backward()
    ref.backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-3, atol=1e-6)


class Switch(nn.Module):
    """ReLU in place only when ``self.inplace`` is set: in-place behaviour that changes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 3)
        self.inplace = False

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(F.relu(h, inplace=True) if self.inplace else F.relu(h))


def test_inplace_op_appearing_later_is_caught_and_recomputed(caplog):
    torch.manual_seed(0)
    model = Switch().double()
    x, x_adv = _inputs((6,))
    term = LRTerm(["fc1"], lr_pass="two_pass")
    first, _, _ = term(model, x, x_adv)
    assert term.guard.copied == {"fc1": False}
    model.inplace = True
    with caplog.at_level(logging.WARNING, logger="lsa_ext.regularizer"):
        again, _, _ = term(model, x, x_adv)
    assert "changed in place" in caplog.text
    assert term.guard.copied == {"fc1": True}
    assert again.item() == first.item()
    with torch.no_grad():
        want = lsa_ext.relative_error(model.fc1(x), model.fc1(x_adv), reduction="mean")
    assert again.item() == pytest.approx(want.item(), rel=1e-7)
    # a Capture reused the same way cannot run the forward again: it says so
    model.inplace = False
    with pytest.raises(LsaUserError, match="changed in place"):
        with Capture(model, ["fc1"]) as cap:
            model(x)
            model.inplace = True
            cap.reset()
            model(x)


def test_guard_modes():
    t = torch.randn(3, requires_grad=True) * 1.0
    never, always = InplaceGuard("never"), InplaceGuard("always")
    assert never.keep("a", t) is t
    kept = always.keep("a", t)
    assert kept is not t and torch.equal(kept, t) and kept.requires_grad
    with torch.inference_mode():
        u = torch.randn(3)
        assert InplaceGuard("auto").keep("a", u) is not u  # no version counter: copied
    with pytest.raises(LsaUserError, match="unknown copy mode"):
        InplaceGuard("sometimes")


def test_copy_cost_on_a_model_without_inplace_ops_is_nothing_after_the_first_batch():
    """VGG-style conv-BN-ReLU (not in place): after the first batch no site is copied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(100, 3)).train()
    term = LRTerm(["0", "3"])
    x, x_adv = _inputs(IMAGE)
    term(model, x.float(), x_adv.float())
    assert term.guard.copied == {"0": False, "3": False}
    kept = []
    orig = term.guard.keep
    term.guard.keep = lambda s, t: kept.append(orig(s, t) is t) or orig(s, t)
    term(model, x.float(), x_adv.float())
    assert kept and all(kept)


def test_trainer_copies_nothing_when_the_model_needs_no_copy():
    model = copy.deepcopy(_pair("conv_relu")[1]).float()  # the twin: no in-place ops
    x, x_adv = _inputs(IMAGE)
    tr = Trainer(model, (x.float(), torch.zeros(8, dtype=torch.long)),
                 TrainConfig(at="fgsm", eps=0.1, lr_layers=["0", "2"], clip=None),
                 progress=False)
    tr.loss(x.float(), torch.zeros(8, dtype=torch.long), lambda a, b: x_adv.float())
    assert tr.regularizer.guard.copied == {"0": False, "2": False}


# --------------------------------------------------------------------------- whole pipeline
@pytest.mark.parametrize("case", sorted(CASES))
def test_analyze_train_evaluate_match_the_inplace_free_twin(case):
    """Issue 10 point 7: analyze, AT-LR training and evaluation on the in-place model give the
    twin's numbers (torchvision does not load beside the pinned torch here, so these in-repo
    blocks stand in for its architectures)."""
    from lsa_ext.evaluation import evaluate

    model, twin, shape, sites = _pair(case)
    model, twin = model.float(), twin.float()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(48, *shape, generator=g)
    y = torch.randint(0, 3, (48,), generator=g)
    results = []
    for m in (model, twin):
        rep = lsa_ext.analyze(m, (x, y), "gaussian:std=0.1,fgsm:eps=0.1", layers=sites,
                              clip=(0.0, 1.0), batch_size=16, progress=False)
        lsa_ext.train(m, (x, y), at="pgd", eps=0.1, lr_layers=sites, gamma=0.5, epochs=1,
                      batch_size=16, clip=(0.0, 1.0), seed=0, progress=False)
        ev = evaluate(m, (x, y), eps_grid=(0.0, 0.1), clip=(0.0, 1.0), masking_checks=False)
        results.append((rep.mean, m.state_dict(), ev.fgsm))
    (mean_a, state_a, fgsm_a), (mean_b, state_b, fgsm_b) = results
    assert mean_a.shape == mean_b.shape and bool(torch.isfinite(torch.as_tensor(mean_a)).all())
    torch.testing.assert_close(torch.as_tensor(mean_a), torch.as_tensor(mean_b),
                               rtol=1e-5, atol=1e-6)
    for k in state_b:
        torch.testing.assert_close(state_a[k], state_b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert fgsm_a == fgsm_b
