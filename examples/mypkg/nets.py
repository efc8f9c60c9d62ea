"""A user model for the README's ``--model mypkg.nets:make_net`` examples.

``lsa`` imports ``package.module:factory`` and calls the factory with ``info`` (the dataset's
:class:`lsa_ext.data.DatasetInfo`) when it takes that keyword, else with ``num_classes``::

    PYTHONPATH=examples lsa analyze --model mypkg.nets:make_net --layers "block*.act,head.fc"
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from lsa_ext.data import DatasetInfo


class Block(nn.Module):
    """3×3 convolution, batch norm, ReLU (probed as ``block<k>.act``)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Head(nn.Module):
    """Global average pooling and a linear classifier (``head.fc``)."""

    def __init__(self, c_in: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.fc(self.pool(x).flatten(1))


def make_net(info: DatasetInfo, width: int = 16) -> nn.Module:
    """Two conv blocks and a head for image data ``[C, H, W]`` (8×8 digits, MNIST, CIFAR-10)."""
    c = info.input_shape[0]
    return nn.Sequential(OrderedDict(
        block1=Block(c, width), block2=Block(width, 2 * width),
        head=Head(2 * width, info.num_classes),
    ))
