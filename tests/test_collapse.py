"""lsa_ext.collapse: a collapsed or diverging training run is said once, with its likely cause
(issue 13, points 1 and 7)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from lsa_ext.collapse import CollapseWatch
from lsa_ext.train_config import TrainConfig


class _Fixed(nn.Module):
    """Logits from a fixed rule: the label (``learnt``) or always class 3 (``collapsed``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.collapsed = False

    def forward(self, x):
        cls = torch.full((x.shape[0],), 3) if self.collapsed else x[:, 0].long()
        return nn.functional.one_hot(cls, 10).float() * 5 + self.w


def _data(n=200):
    y = torch.arange(n) % 10
    return torch.stack([y.float(), torch.rand(n)], dim=1), y


def test_collapse_after_learning_is_named_once_with_the_lr_cause(caplog):
    cfg = TrainConfig(at="pgd", lr_layers=["fc1"], gamma=1.0)
    watch = CollapseWatch(_data(), cfg, ["fc1"], steps_per_epoch=2)
    model = _Fixed()
    with caplog.at_level(logging.WARNING, logger="lsa_ext.collapse"):
        assert watch.check(model, {"epoch": 1, "loss": 0.5}) is None
        model.collapsed = True
        msg = watch.check(model, {"epoch": 2, "loss": 0.4})
        assert watch.check(model, {"epoch": 3, "loss": 0.4}) is None  # once
    assert msg == ("training has collapsed at epoch 2: the model predicts class 3 for 100 % of "
                   "200 training samples (clean accuracy 10.0 %, chance 10.0 %, after reaching "
                   "100.0 % at epoch 1); likely cause: the LR term on fc1 with gamma 1.0, which "
                   "is smallest when those layers' outputs no longer depend on the input: try a "
                   "smaller gamma (e.g. 0.01) or hidden layers instead of the output layer")
    assert [r.getMessage() for r in caplog.records] == [msg]
    assert model.training  # the probe restores the mode


def test_one_class_at_the_start_is_not_a_collapse_until_enough_steps():
    model = _Fixed()
    model.collapsed = True
    watch = CollapseWatch(_data(), TrainConfig(), [], steps_per_epoch=12)
    assert watch.check(model, {"epoch": 1, "loss": 2.3}) is None  # 12 steps: just started
    assert watch.check(model, {"epoch": 2, "loss": 2.3}) is None  # 24
    msg = watch.check(model, {"epoch": 3, "loss": 2.3})  # 36 steps and still one class
    assert msg is not None and "after 36 steps" in msg
    assert msg.endswith("too few training steps or an unsuitable learning rate for this model")


def test_an_exploding_loss_names_the_learning_rate(capsys, caplog, tmp_path):
    """`lsa train --lr 1e6` (Adam): the loss reaches ~1e27 without becoming NaN."""
    from lsa_ext.cli import main

    watch = CollapseWatch(_data(), TrainConfig(lr=1e6), [], steps_per_epoch=2)
    assert watch.check(_Fixed(), {"epoch": 1, "loss": 4e25}) == (
        "training is diverging: the loss is 4e+25 after epoch 1; likely cause: the learning "
        "rate 1e+06 is too large (the default is 1e-3)")
    growing = CollapseWatch(_data(), TrainConfig(lr=0.5), [], steps_per_epoch=2)
    assert growing.check(_Fixed(), {"epoch": 1, "loss": 2.0}) is None
    assert "the loss is 40 after epoch 2" in growing.check(_Fixed(), {"epoch": 2, "loss": 40.0})

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lsa_ext.collapse"):
        assert main(["train", "--limit-train", "64", "--batch-size", "16", "--epochs", "1",
                     "--lr", "1e6", "--device", "cpu", "--out", str(tmp_path / "r")]) == 0
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith("training is diverging: the loss is ") and "1e+06 is too large" in msg


def test_an_exploding_loss_names_a_huge_eps_or_float16_adam_before_a_default_lr():
    """With the default learning rate, a diverging loss is blamed on what is out of range:
    an attack budget as large as the data range, or float16 parameters under Adam."""
    loss = {"epoch": 1, "loss": 5e3}
    big = CollapseWatch(_data(), TrainConfig(at="pgd", eps=1e9, clip=[0.0, 1.0]), [], 2)
    assert big.check(_Fixed(), loss).endswith(
        "likely cause: the attack budget eps 1e+09, as large as the data range [0, 1]: inputs "
        "that far from the data make the loss explode; try a smaller eps")
    unclipped = CollapseWatch(_data(), TrainConfig(at="fgsm", eps=5.0, clip=None), [], 2)
    assert "eps 5, as large as unclipped data" in unclipped.check(_Fixed(), loss)
    half = CollapseWatch(_data(), TrainConfig(at="pgd", eps=0.3, clip=[0.0, 1.0]), [], 2)
    assert half.check(_Fixed().half(), loss).endswith(
        "likely cause: float16 parameters with adam (its moment estimates overflow in "
        "float16): train in float32 or bfloat16, or use sgd")
    plain = CollapseWatch(_data(), TrainConfig(at="pgd", eps=0.3, clip=[0.0, 1.0]), [], 2)
    assert plain.check(_Fixed(), loss).endswith(
        "likely cause: the learning rate 0.001 is too large for this model (the default is "
        "1e-3)")
