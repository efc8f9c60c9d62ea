"""The model-output contract (lsa_ext.outputs; issue 10, case 13): models returning tuples,
dicts or objects give, with the documented default or an ``output=`` selector, exactly the
results of their plain-logits twin in every entry point; any other output is one LsaUserError
naming its type (API) or one line and exit status 2 (CLI)."""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import lsa_ext
from lsa_ext.attacks import PGD
from lsa_ext.cli import main
from lsa_ext.errors import LsaUserError
from lsa_ext.evaluation import accuracy, evaluate
from lsa_ext.outputs import check_model_output, logits_of, select_output
from lsa_ext.training import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

Named = collections.namedtuple("Named", ["logits", "aux"])


@dataclass
class HFLike:  # an object with a .logits tensor, e.g. a Hugging Face ModelOutput
    logits: torch.Tensor
    hidden: torch.Tensor


class Opaque:  # an object without logits
    def __init__(self, z):
        self.z = z


class Net(nn.Module):
    """One architecture, one set of weights (seeded), many output kinds."""

    def __init__(self, kind: str = "plain"):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.fc1, self.act, self.fc2 = nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)

    def forward(self, x):
        h = self.act(self.fc1(x))
        z = self.fc2(h)
        return {
            "plain": lambda: z,
            "tuple": lambda: (z, h),
            "reversed": lambda: (h, z),
            "dict": lambda: {"logits": z, "feat": h},
            "dict_z": lambda: {"z": z, "feat": h},
            "object": lambda: HFLike(z, h),
            "namedtuple": lambda: Named(z, h),
            "none": lambda: None,
            "opaque": lambda: Opaque(z),
            "ints": lambda: z.argmax(1),
        }[self.kind]()


# kind -> output selector that reads its logits (None: the default rule)
GOOD = {
    "dict": None,
    "object": None,
    "namedtuple": None,
    "tuple": 0,
    "reversed": lambda out: out[1],
    "dict_z": "z",
}
# kind -> words the error must contain (the output's type)
BAD = {
    "tuple": "tuple (Tensor[",
    "dict_z": "dict with keys ['z', 'feat']",
    "none": "NoneType",
    "opaque": "test_outputs.Opaque",
    "ints": "floating point",
}


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)


# ----------------------------------------------------------------------------- logits_of
def test_logits_of_default_rule_and_selectors():
    z, h = torch.randn(4, 3), torch.randn(4, 5)
    assert logits_of(z) is z
    assert logits_of({"logits": z, "h": h}) is z
    assert logits_of(HFLike(z, h)) is z and logits_of(Named(z, h)) is z
    assert logits_of((h, z), 1) is z and logits_of([z, h], 0) is z
    assert logits_of({"out": z}, "out") is z and logits_of(Opaque(z), "z") is z
    assert logits_of((h, z), lambda o: o[1]) is z
    assert logits_of(z, batch=4) is z
    with pytest.raises(LsaUserError, match=r"returned a tuple \(Tensor\[4, 3\] float32, "
                                           r"Tensor\[4, 5\] float32\).*output=<index>"):
        logits_of((z, h))
    with pytest.raises(LsaUserError, match="does not select anything"):
        logits_of((z, h), 2)
    with pytest.raises(LsaUserError, match="does not select anything"):
        logits_of(z, 0)  # an index into a tensor would pick a sample, not the logits
    with pytest.raises(LsaUserError, match="are a Opaque|are a test_outputs.Opaque"):
        logits_of((Opaque(z),), 0)
    with pytest.raises(LsaUserError, match="B=5"):
        logits_of(z, batch=5)
    with pytest.raises(LsaUserError, match="output must be None, an index"):
        logits_of(z, 1.5)


def test_select_output_keeps_names_and_state_dict(data):
    x, _ = data
    plain, tup = Net("plain"), Net("tuple")
    names = [n for n, _ in tup.named_modules()]
    keys = list(tup.state_dict())
    assert select_output(tup, 0) is tup
    select_output(tup, 0)  # applying it again replaces the first hook
    assert len(tup._forward_hooks) == 1
    assert [n for n, _ in tup.named_modules()] == names and list(tup.state_dict()) == keys
    assert torch.equal(tup(x), plain(x))


def test_check_model_output_rejects_a_wrong_number_of_logits():
    assert check_model_output(Net("dict"), (6,), 3).shape == (2, 3)
    with pytest.raises(LsaUserError, match="gives 3 logit"):
        check_model_output(Net("plain"), (6,), 10)
    with pytest.raises(LsaUserError, match="fails on inputs of shape"):
        check_model_output(Net("plain"), (7,), 3)
    with pytest.raises(LsaUserError, match="returned a tuple"):
        check_model_output(Net("tuple"), (6,), 3)


# ----------------------------------------------------------------------------- entry points
def _entry_points(model, x, y, output):
    """Every public entry point that calls the model for logits; each returns numbers."""
    def attack():
        return PGD(model, 0.1, steps=3, output=output)(x, y)

    def acc():
        return accuracy(model, (x, y), output=output,
                        perturb=PGD(model, 0.1, steps=3, output=output))

    def ev():
        r = evaluate(model, (x, y), eps_grid=[0.0, 0.1], clip=(0.0, 1.0), pgd_eps=0.1,
                     pgd_steps=3, apgd_eps=0.1, apgd_steps=3, output=output)
        return (r.fgsm, r.pgd, r.apgd)

    def analysis():
        r = lsa_ext.analyze(model, (x, y), "gaussian,fgsm,pgd:steps=3", clip=(0.0, 1.0),
                            layers="fc1,act", progress=False, output=output)
        return r.mean.tolist(), r.accuracy

    def lr():
        model.zero_grad()
        loss, clean, adv = lsa_ext.lr_term(model, x, x + 0.01, ["fc1", "act"], output=output)
        (loss + adv.sum()).backward()
        return loss.detach(), clean.detach(), [p.grad.clone() for p in model.parameters()]

    def train():
        cfg = TrainConfig(at="pgd", eps=0.1, lr_layers=["fc1"], epochs=1, batch_size=16,
                          clip=[0.0, 1.0])
        Trainer(model, (x, y), cfg, progress=False, output=output).fit()
        return [p.detach().clone() for p in model.parameters()]

    return {"attack": attack, "accuracy": acc, "evaluate": ev, "analyze": analysis,
            "lr_term": lr, "train": train}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("kind", list(GOOD))
@pytest.mark.parametrize("entry", ["attack", "accuracy", "evaluate", "analyze", "lr_term",
                                   "train"])
def test_adapted_outputs_give_the_plain_twins_results(kind, entry, data):
    x, y = data
    want = _entry_points(Net("plain"), x, y, None)[entry]()
    got = _entry_points(Net(kind), x, y, GOOD[kind])[entry]()
    assert _same(got, want)


@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize("entry", ["attack", "accuracy", "evaluate", "analyze", "lr_term",
                                   "train"])
def test_other_outputs_are_one_error_naming_the_type(kind, entry, data):
    x, y = data
    with pytest.raises(LsaUserError, match=BAD[kind].replace("[", r"\[").replace("(", r"\(")):
        _entry_points(Net(kind), x, y, None)[entry]()


def test_analysis_without_logits_reports_no_accuracy_but_selects_them_on_request(data):
    """Analysis reads logits only for its accuracy: a feature extractor's tuple is analysed
    (accuracy None, as documented); output= selects them."""
    x, y = data
    noise = {"s": lambda a, b: a + 0.1}
    res = lsa_ext.analyze(Net("tuple"), (x, y), noise, progress=False)
    assert res.accuracy is None
    res0 = lsa_ext.analyze(Net("tuple"), (x, y), noise, progress=False, output=0)
    want = lsa_ext.analyze(Net("plain"), (x, y), noise, progress=False)
    assert res0.accuracy == want.accuracy and res0.accuracy is not None
    assert res.mean.tolist() == want.mean.tolist()


# ----------------------------------------------------------------------------- CLI
FACTORIES = '''
from torch import nn
from lsa_ext.outputs import select_output

class N(nn.Module):
    def __init__(self, k, kind):
        super().__init__()
        self.kind = kind
        self.fc1, self.act, self.fc2 = nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, k)

    def forward(self, x):
        h = self.act(self.fc1(x)); z = self.fc2(h)
        return z if self.kind == "plain" else (z, h)

def plain(num_classes=2):
    return N(num_classes, "plain")

def tuple_out(num_classes=2):
    return N(num_classes, "tuple")

def selected(num_classes=2):
    return select_output(N(num_classes, "tuple"), 0)

def five_logits(num_classes=2):
    return N(5, "plain")
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "outnets_e10.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LSA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


ANALYZE = ["analyze", "--dataset", "moons", "--epochs", "1", "--max-samples", "64",
           "--perturbations", "gaussian,fgsm", "--no-plot", "--no-cache"]


@pytest.mark.parametrize(("factory", "words"), [
    ("tuple_out", "the model returned a tuple (Tensor[2, 2] float32, Tensor[2, 16] float32)"),
    ("five_logits", "the model gives 5 logit(s) per sample but the data has 2 classes"),
])
@pytest.mark.parametrize("command", ["analyze", "train"])
def test_cli_rejects_other_outputs_in_one_line_before_training(factories, capsys, factory,
                                                                words, command):
    argv = ([*ANALYZE[:1], "--dataset", "moons", "--epochs", "1"] if command == "analyze"
            else ["train", "--dataset", "moons", "--epochs", "1", "--out", "run"])
    assert main([*argv, "--model", f"outnets_e10:{factory}"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"lsa {command}: error: ")
    assert words in lines[0]
    assert not (factories / "cache").exists() and not (factories / "run" / "last.pt").exists()


def test_cli_factory_with_select_output_equals_the_plain_twin(factories, capsys):
    reports = {}
    for factory in ("plain", "selected"):
        out = factories / factory
        assert main([*ANALYZE, "--model", f"outnets_e10:{factory}", "--out", str(out)]) == 0
        reports[factory] = json.loads((out / "report.json").read_text())
    capsys.readouterr()
    assert reports["selected"]["accuracy"] is not None
    for key in ("layers", "perturbations", "accuracy", "mvl"):
        assert reports["selected"][key] == reports["plain"][key]
