"""Tests for lsa_ext.models: architectures, user factories, checkpoint loading."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from lsa_ext.data import DatasetInfo, dataset_info
from lsa_ext.errors import LsaUserError
from lsa_ext.models import MODELS, build_model, load_weights, model_info
from lsa_ext.probes import select_layers

MOONS = dataset_info("moons")
DIGITS = dataset_info("digits")
MNIST = dataset_info("mnist")
CIFAR = dataset_info("cifar10")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_models_tuple():
    assert MODELS == ("model_a", "model_b", "vgg19", "wrn28_10")


def test_model_a_structure_output_and_param_count():
    m = build_model("model_a", MOONS, seed=0)
    assert m(torch.randn(5, 2)).shape == (5, 1)
    # 2·100+100 + 2·(100·100+100) + 100+1, counted by hand.
    assert n_params(m) == 300 + 2 * 10100 + 101
    assert select_layers(m, "learnable") == ["fc1", "fc2", "fc3", "fc4"]
    assert select_layers(m, "activations") == ["act1", "act2", "act3"]
    assert all(isinstance(getattr(m, f"act{i}"), nn.ELU) for i in (1, 2, 3))
    # Independent re-implementation with the same weights gives the same logits.
    x = torch.randn(7, 2, dtype=torch.float64)
    h = x
    for i in (1, 2, 3):
        lin = getattr(m, f"fc{i}")
        h = torch.nn.functional.elu(h @ lin.weight.double().T + lin.bias.double())
    want = h @ m.fc4.weight.double().T + m.fc4.bias.double()
    torch.testing.assert_close(m.double()(x), want)
    # Multi-class vector data: K logits.
    info3 = DatasetInfo("blobs", (4,), 3, None)
    assert build_model("model_a", info3)(torch.randn(2, 4)).shape == (2, 3)


@pytest.mark.parametrize(
    ("info", "padding", "fc1_in"),
    [(DIGITS, 2, 64 * 2 * 2), (MNIST, 0, 64 * 3 * 3), (dataset_info("mnist5k"), 0, 64 * 3 * 3)],
)
def test_model_b_sized_to_data(info, padding, fc1_in):
    m = build_model("model_b", info, seed=0)
    assert m(torch.rand(3, *info.input_shape)).shape == (3, 10)
    assert m.conv1.padding == (padding, padding) and m.fc1.in_features == fc1_in
    assert [m.conv1.out_channels, m.conv2.out_channels, m.conv3.out_channels] == [16, 32, 64]
    assert all(c.kernel_size == (5, 5) for c in (m.conv1, m.conv2, m.conv3))
    assert m.fc1.out_features == 100 and m.fc2.out_features == 10
    assert select_layers(m, "learnable") == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert select_layers(m, "activations") == ["relu1", "relu2", "relu3", "relu4"]
    acts = [getattr(m, f"relu{i}") for i in range(1, 5)]
    assert len({id(a) for a in acts}) == 4 and not any(a.inplace for a in acts)
    names = [n for n, _ in m.named_children()]
    assert names == ["conv1", "relu1", "conv2", "relu2", "pool1", "conv3", "relu3", "pool2",
                     "flatten", "fc1", "relu4", "fc2"]


def test_model_b_forward_matches_functional_reference():
    m = build_model("model_b", MNIST, seed=1).double()
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    f = torch.nn.functional
    h = f.relu(f.conv2d(x, m.conv1.weight, m.conv1.bias))
    h = f.max_pool2d(f.relu(f.conv2d(h, m.conv2.weight, m.conv2.bias)), 2)
    h = f.max_pool2d(f.relu(f.conv2d(h, m.conv3.weight, m.conv3.bias)), 2)
    h = f.relu(f.linear(h.flatten(1), m.fc1.weight, m.fc1.bias))
    torch.testing.assert_close(m(x), f.linear(h, m.fc2.weight, m.fc2.bias))


def test_model_b_rejects_vector_data_and_tiny_inputs():
    with pytest.raises(LsaUserError, match="image inputs"):
        build_model("model_b", MOONS)
    with pytest.raises(LsaUserError, match="larger input"):
        build_model("model_b", DatasetInfo("tiny", (1, 8, 8), 10, (0.0, 1.0)), padding=0)


def test_vgg19_cifar():
    m = build_model("vgg19", CIFAR, seed=0).eval()
    with torch.no_grad():
        assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    convs = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 16 and convs[0] == "features.conv1_1" and convs[-1] == "features.conv5_4"
    assert len(select_layers(m, "learnable")) == 17
    relus = [mod for mod in m.modules() if isinstance(mod, nn.ReLU)]
    assert len(relus) == 16 and not any(r.inplace for r in relus)
    assert sum(isinstance(mod, nn.BatchNorm2d) for mod in m.modules()) == 16
    # Standard CIFAR VGG-19-BN parameter count: 20,040,522 (conv+BN 20,035,392 + 512·10+10).
    assert n_params(m) == 20_040_522
    with pytest.raises(LsaUserError, match="32x32"):
        build_model("vgg19", DIGITS)


def test_wrn_standard_size_and_small_variant():
    # WRN-28-10 has 36,479,194 parameters (Zagoruyko & Komodakis, CIFAR-10) — build without
    # running it (fast).
    big = build_model("wrn28_10", CIFAR)
    assert n_params(big) == 36_479_194
    small = build_model("wrn28_10", CIFAR, depth=10, width=1, seed=0).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert small(x).shape == (2, 10)
    convs = [n for n, mod in small.named_modules() if isinstance(mod, nn.Conv2d)]
    # stem + 3 blocks × 2 convs + 2 shortcut convs (width 1: block1 keeps 16 channels).
    assert len(convs) == 1 + 6 + 2
    relus = [mod for mod in small.modules() if isinstance(mod, nn.ReLU)]
    assert len(relus) == 7 and len({id(r) for r in relus}) == 7
    assert not any(r.inplace for r in relus)
    # Residual: the identity block1.0 adds its input back (checked through hooks).
    seen = {}
    blk = small.block1[0]
    h = blk.register_forward_hook(lambda mod, inp, out: seen.update(inp=inp[0], out=out))
    with torch.no_grad():
        small(x)
        inner = blk.conv2(blk.relu2(blk.bn2(blk.conv1(blk.relu1(blk.bn1(seen["inp"]))))))
    h.remove()
    torch.testing.assert_close(seen["out"], inner + seen["inp"])
    with pytest.raises(LsaUserError, match="6n\\+4"):
        build_model("wrn28_10", CIFAR, depth=12)


def test_seed_makes_init_reproducible_without_touching_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("model_b", DIGITS, seed=7)
    after = torch.rand(1)
    b = build_model("model_b", DIGITS, seed=7)
    c = build_model("model_b", DIGITS, seed=8)
    assert torch.equal(before, after)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), ka
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_unknown_model_and_bad_option():
    with pytest.raises(LsaUserError, match="model_a, model_b, vgg19, wrn28_10"):
        build_model("resnet50", CIFAR)
    with pytest.raises(LsaUserError, match="bad option"):
        build_model("model_a", MOONS, nonsense=1)


def test_model_info():
    info = model_info(build_model("model_b", DIGITS))
    assert info["learnable_layers"] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert info["activation_layers"] == ["relu1", "relu2", "relu3", "relu4"]
    want = (16 * 25 + 16) + (32 * 16 * 25 + 32) + (64 * 32 * 25 + 64) + (256 * 100 + 100) + 1010
    assert info["parameters"] == want == info["trainable_parameters"]


# ----------------------------------------------------------------------------- user factories


@pytest.fixture()
def user_pkg(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg_lsa"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        def with_info(info, hidden=8):
            return nn.Sequential(nn.Flatten(), nn.Linear(int(__import__("math").prod(
                info.input_shape)), hidden), nn.ReLU(), nn.Linear(hidden, info.num_classes))

        def with_classes(num_classes):
            return nn.Linear(2, num_classes)

        def plain():
            return nn.Linear(2, 2)

        class Net(nn.Module):
            def __init__(self, num_classes=10):
                super().__init__()
                self.fc = nn.Linear(64, num_classes)
            def forward(self, x):
                return self.fc(x.flatten(1))

        class Holder:
            @staticmethod
            def make():
                return nn.Linear(2, 3)

        def not_a_module():
            return 42

        def broken():
            raise RuntimeError("boom")
    """))
    (pkg / "bad_import.py").write_text("import does_not_exist_anywhere_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userpkg_lsa"
    for mod in [m for m in sys.modules if m.startswith("userpkg_lsa")]:
        del sys.modules[mod]


def test_user_factories(user_pkg):
    m = build_model(f"{user_pkg}.nets:with_info", DIGITS, hidden=5)
    assert m(torch.rand(2, 1, 8, 8)).shape == (2, 10) and m[1].out_features == 5
    assert build_model(f"{user_pkg}.nets:with_classes", MOONS).out_features == 2
    assert build_model(f"{user_pkg}.nets:plain", MOONS).out_features == 2
    net = build_model(f"{user_pkg}.nets:Net", DIGITS)
    assert net.fc.out_features == 10
    assert build_model(f"{user_pkg}.nets:Holder.make", MOONS).out_features == 3


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nets:plain", "cannot import module 'nets'"),
        (".nets:missing", "no attribute 'missing'"),
        (".nets:not_a_module", "returned int, not a torch.nn.Module"),
        (".nets:broken", "RuntimeError: boom"),
        (".bad_import:anything", "does_not_exist_anywhere_xyz"),
        (".nets:", "package.module:factory"),
    ],
)
def test_user_factory_errors(user_pkg, spec, needle):
    if spec.startswith("."):
        spec = user_pkg + spec
    with pytest.raises(LsaUserError, match=needle):
        build_model(spec, MOONS)


# ----------------------------------------------------------------------------- checkpoints


def _fresh_pair():
    src = build_model("model_b", DIGITS, seed=1)
    dst = build_model("model_b", DIGITS, seed=2)
    assert not torch.equal(src.conv1.weight, dst.conv1.weight)
    return src, dst


def _assert_same(a: nn.Module, b: nn.Module):
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), k


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "ddp", "ddp_in_model"])
def test_load_weights_round_trip(tmp_path, wrap):
    src, dst = _fresh_pair()
    sd = src.state_dict()
    ddp = {"module." + k: v for k, v in sd.items()}
    obj = {
        "plain": sd,
        "model": {"model": sd, "optimizer": {"lr": torch.tensor(0.1)}, "epoch": 3},
        "state_dict": {"state_dict": sd},
        "ddp": ddp,
        "ddp_in_model": {"model": ddp, "epoch": 1},
    }[wrap]
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    assert load_weights(dst, path) is dst
    _assert_same(src, dst)


def test_load_weights_batchnorm_buffers(tmp_path):
    src = build_model("wrn28_10", CIFAR, depth=10, width=1, seed=0)
    src.block1[0].bn1.running_mean.fill_(0.25)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = load_weights(build_model("wrn28_10", CIFAR, depth=10, width=1, seed=1), tmp_path / "w.pt")
    _assert_same(src, dst)


def test_load_weights_errors(tmp_path):
    src, dst = _fresh_pair()
    with pytest.raises(LsaUserError, match="does not exist"):
        load_weights(dst, tmp_path / "missing.pt")

    good = tmp_path / "good.pt"
    torch.save(src.state_dict(), good)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(LsaUserError, match="unreadable"):
        load_weights(dst, trunc)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(LsaUserError, match=r"junk\.pt"):
        load_weights(dst, junk)

    # Wrong architecture: shapes differ (MNIST-sized fc1 into a digits-sized model).
    mnist_b = tmp_path / "mnist_b.pt"
    torch.save(build_model("model_b", MNIST).state_dict(), mnist_b)
    want = r"fc1\.weight \(checkpoint \[100, 576\], model \[100, 256\]\)"
    with pytest.raises(LsaUserError, match=want):
        load_weights(dst, mnist_b)

    # Missing and unexpected keys are named.
    sd = dict(src.state_dict())
    sd.pop("fc2.bias")
    sd["extra.weight"] = torch.zeros(1)
    keys = tmp_path / "keys.pt"
    torch.save(sd, keys)
    want = r"missing key\(s\): fc2\.bias.*unexpected key\(s\): extra\.weight"
    with pytest.raises(LsaUserError, match=want):
        load_weights(dst, keys)

    # Not a state dict.
    notsd = tmp_path / "notsd.pt"
    torch.save({"epoch": 3, "lr": 0.1}, notsd)
    with pytest.raises(LsaUserError, match="not a state dict"):
        load_weights(dst, notsd)

    # A pickled object other than tensors is refused by weights_only=True.
    obj = tmp_path / "obj.pt"
    torch.save({"model": src}, obj)
    with pytest.raises(LsaUserError, match="weights_only"):
        load_weights(dst, obj)

    # Failed loads leave the target model untouched.
    fresh = build_model("model_b", DIGITS, seed=2)
    _assert_same(fresh, dst)
