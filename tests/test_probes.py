import pytest
import torch
from torch import nn

from lsa_ext.errors import LsaUserError
from lsa_ext.probes import Capture, select_layers


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.act = nn.ELU()

    def forward(self, x):
        return self.act(self.conv(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.relu = nn.ReLU()  # shared: called twice per forward
        self.block = Block()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))

    def forward(self, x):
        x = self.relu(self.stem(x))
        x = self.block(x)
        x = self.relu(x)
        return self.head(self.pool(x))


def test_kinds_in_registration_order():
    m = Net()
    assert select_layers(m, "activations") == ["relu", "block.act", "head.2"]
    assert select_layers(m, "learnable") == ["stem", "block.conv", "head.1", "head.3"]
    assert select_layers(m, "leaves") == [
        "stem", "relu", "block.conv", "block.act", "pool", "head.0", "head.1", "head.2", "head.3"
    ]


def test_names_globs_lists_predicates():
    m = Net()
    assert select_layers(m, "block.*") == ["block.conv", "block.act"]
    assert select_layers(m, "head.1,relu") == ["relu", "head.1"]  # registration order
    assert select_layers(m, ["learnable", "relu"]) == [
        "stem", "relu", "block.conv", "head.1", "head.3"
    ]
    assert select_layers(m, lambda n, mod: isinstance(mod, nn.Linear)) == ["head.1", "head.3"]
    assert select_layers(m, "block") == ["block"]  # a container is a valid probe too


def test_unknown_name_and_empty_selection():
    m = Net()
    with pytest.raises(LsaUserError, match="no layer named 'nope'"):
        select_layers(m, "nope")
    with pytest.raises(LsaUserError, match="matches"):
        select_layers(nn.Sequential(nn.Linear(2, 2)), "activations")
    with pytest.raises(LsaUserError, match="no layer named"):
        Capture(m, ["relu", "missing"])


def test_shared_module_gives_numbered_sites_and_values():
    torch.manual_seed(0)
    m = Net().eval()
    x = torch.randn(5, 1, 6, 6)
    with Capture(m, ["relu", "block.act"]) as cap:
        m(x)
    assert list(cap.outputs) == ["relu", "block.act", "relu#2"]
    want1 = torch.relu(m.stem(x))
    want2 = torch.relu(m.block(want1))
    torch.testing.assert_close(cap.outputs["relu"], want1)
    torch.testing.assert_close(cap.outputs["relu#2"], want2)
    # a second forward after reset starts the count again
    cap_sites = []
    with Capture(m, ["relu"], on_output=lambda s, t: cap_sites.append(s)) as cap:
        m(x)
        cap.reset()
        m(x)
    assert cap_sites == ["relu", "relu#2", "relu", "relu#2"]


def test_hooks_removed_after_exception():
    m = Net()

    class Boom(Exception):
        pass

    def explode(site, t):
        raise Boom()

    with pytest.raises(Boom):
        with Capture(m, select_layers(m, "leaves"), on_output=explode):
            m(torch.randn(2, 1, 4, 4))
    assert all(not mod._forward_hooks for mod in m.modules())
    with pytest.raises(RuntimeError):
        with Capture(m, ["stem"]):
            m(torch.randn(2, 7, 4, 4))  # wrong channel count: forward raises
    assert all(not mod._forward_hooks for mod in m.modules())


def test_detach_and_gradients():
    m = Net()
    x = torch.randn(2, 1, 4, 4)
    with Capture(m, ["stem"]) as cap:
        m(x)
    assert cap.outputs["stem"].requires_grad
    with Capture(m, ["stem"], detach=True) as cap:
        m(x)
    assert not cap.outputs["stem"].requires_grad


def test_learnable_index_selects_kth_learnable_layer_and_checks_range():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    assert select_layers(net, "L0") == ["0"]
    assert select_layers(net, "l1") == ["3"]
    assert select_layers(net, "L1,1") == ["1", "3"]
    with pytest.raises(LsaUserError, match=r"Sequential has 2 learnable layers \(L0..L1: 0, 3\)"):
        select_layers(net, "L2")
    named = nn.Module()
    named.L0 = nn.ReLU()
    named.fc = nn.Linear(2, 2)
    assert select_layers(named, "L0") == ["L0"]  # a module literally named L0 wins
