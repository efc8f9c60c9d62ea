"""Architectures (paper Table 1 and CIFAR variants), user model factories, checkpoints.

Built-in models (``build_model(name, info)``), all with distinct, non-inplace activation modules
and plain attribute names so per-layer reports read well. The paper's "learnable layer k"
(L0, L1, …) is the k-th Conv/Linear module in registration order
(``lsa_ext.probes.select_layers(model, "learnable")[k]``).

- ``model_a``: MLP — fc1 Linear(d, 100) → act1 ELU → fc2 Linear(100, 100) → act2 ELU →
  fc3 Linear(100, 100) → act3 ELU → fc4 Linear(100, 1). One logit for 2 classes
  (``lsa_ext.losses`` treats ``[B, 1]`` as binary), K logits otherwise; image inputs are
  flattened first (``flatten``).
- ``model_b``: CNN — conv1 Conv(C, 16, 5) → relu1 → conv2 Conv(16, 32, 5) → relu2 → pool1
  MaxPool(2) → conv3 Conv(32, 64, 5) → relu3 → pool2 MaxPool(2) → flatten → fc1 Linear(·, 100)
  → relu4 → fc2 Linear(100, K). ``padding="auto"`` uses the paper's valid convolutions when the
  input is at least 20×20 (MNIST 28×28: 64·3·3 = 576 features into fc1) and "same" convolutions
  (padding 2) on smaller inputs (digits 8×8: 64·2·2 = 256 features).
- ``vgg19``: VGG-19 with BatchNorm, CIFAR variant — 16 conv3×3 (64,64,M,128,128,M,256×4,M,
  512×4,M,512×4,M), each conv → BatchNorm → ReLU (``features.conv{s}_{i}``, ``features.bn{s}_{i}``,
  ``features.relu{s}_{i}``, ``features.pool{s}``), then global average pooling and one
  Linear(512, K) (``classifier``). Needs inputs of at least 32×32.
- ``wrn28_10``: WideResNet-28-10 (Zagoruyko & Komodakis, 2016), pre-activation basic blocks,
  ``depth``/``width``/``dropout`` keywords (``depth=10, width=1`` gives a tiny WRN-10-1).

User models: ``"package.module:factory"`` imports ``package.module`` and calls ``factory`` (any
callable, e.g. an ``nn.Module`` subclass or a function; ``module:Outer.attr`` works too). If the
factory accepts a keyword ``info`` it receives the :class:`~lsa_ext.data.DatasetInfo`; else if it
accepts ``num_classes`` it receives ``info.num_classes``. Other keyword arguments of
``build_model`` are passed through.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lsa_ext.checkpoint import torch_load
from lsa_ext.checks import first_line
from lsa_ext.data import DatasetInfo
from lsa_ext.errors import LsaUserError
from lsa_ext.modules import WRAPPER_PREFIXES
from lsa_ext.presets import DEFAULT_MODEL  # noqa: F401  (re-exported: which model per dataset)

log = logging.getLogger("lsa_ext.models")

MODELS: tuple[str, ...] = ("model_a", "model_b", "vgg19", "wrn28_10")


# --------------------------------------------------------------------------- Model A


class ModelA(nn.Module):
    """The paper's Model A: a 3×100 ELU MLP. ``x [B, *input_shape]`` → logits ``[B, out]``.

    ``out`` is 1 for binary problems (``single_logit=True``, default) and ``num_classes``
    otherwise.
    """

    def __init__(
        self, in_features: int = 2, num_classes: int = 2, hidden: int = 100,
        single_logit: bool = True,
    ) -> None:
        super().__init__()
        out = 1 if (num_classes == 2 and single_logit) else num_classes
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act1 = nn.ELU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.ELU()
        self.fc3 = nn.Linear(hidden, hidden)
        self.act3 = nn.ELU()
        self.fc4 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        x = self.act1(self.fc1(x))
        x = self.act2(self.fc2(x))
        x = self.act3(self.fc3(x))
        return self.fc4(x)


# --------------------------------------------------------------------------- Model B


def _model_b_padding(h: int, w: int) -> int:
    return 0 if min(h, w) >= 20 else 2


class ModelB(nn.Module):
    """The paper's Model B CNN, sized to the input. ``x [B, C, H, W]`` → logits ``[B, K]``.

    Args:
        in_channels, height, width: input shape.
        num_classes: K.
        padding: ``"auto"`` (valid convs — the paper's — when min(H, W) ≥ 20, else padding 2,
            i.e. "same"), or an int used for all three 5×5 convs.
        hidden: width of fc1 (100 in the paper).
    """

    def __init__(
        self, in_channels: int = 1, height: int = 28, width: int = 28, num_classes: int = 10,
        padding: int | str = "auto", hidden: int = 100,
    ) -> None:
        super().__init__()
        if padding == "auto":
            padding = _model_b_padding(height, width)
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise LsaUserError(f"model_b padding must be 'auto' or an int >= 0, got {padding!r}")
        p = padding

        def size(n: int) -> int:
            n = n + 2 * p - 4  # conv1
            n = n + 2 * p - 4  # conv2
            n = n // 2  # pool1
            n = n + 2 * p - 4  # conv3
            return n // 2  # pool2

        fh, fw = size(height), size(width)
        if fh < 1 or fw < 1:
            raise LsaUserError(
                f"model_b with padding={p} needs a larger input than {height}x{width}"
            )
        self.padding = p
        self.conv1 = nn.Conv2d(in_channels, 16, 5, padding=p)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 5, padding=p)
        self.relu2 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv3 = nn.Conv2d(32, 64, 5, padding=p)
        self.relu3 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2, 2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * fh * fw, hidden)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.pool1(self.relu2(self.conv2(x)))
        x = self.pool2(self.relu3(self.conv3(x)))
        x = self.relu4(self.fc1(self.flatten(x)))
        return self.fc2(x)


# --------------------------------------------------------------------------- VGG-19

VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
    512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)


class VGG(nn.Module):
    """VGG for CIFAR-sized inputs: ``features`` (conv3×3 → BN → ReLU blocks, max-pools), global
    average pooling, ``classifier`` Linear(512, K). ``x [B, C, H, W]`` (H, W ≥ 32) → ``[B, K]``.
    """

    def __init__(
        self, cfg: tuple[int | str, ...] = VGG19_CFG, in_channels: int = 3, num_classes: int = 10,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        stage, index, c = 1, 1, in_channels
        for v in cfg:
            if v == "M":
                layers[f"pool{stage}"] = nn.MaxPool2d(2, 2)
                stage, index = stage + 1, 1
                continue
            layers[f"conv{stage}_{index}"] = nn.Conv2d(c, int(v), 3, padding=1)
            if batch_norm:
                layers[f"bn{stage}_{index}"] = nn.BatchNorm2d(int(v))
            layers[f"relu{stage}_{index}"] = nn.ReLU(inplace=False)
            c, index = int(v), index + 1
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c, num_classes)
        _init_conv_bn_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


# --------------------------------------------------------------------------- WideResNet


class WideBasic(nn.Module):
    """Pre-activation wide basic block: bn1 → relu1 → conv1 → bn2 → relu2 → (dropout) → conv2,
    plus the identity (or a 1×1 ``shortcut`` conv of the activated input when the shape changes).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
            if (c_in != c_out or stride != 1) else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.relu2(self.bn2(out))
        if self.dropout is not None:
            out = self.dropout(out)
        out = self.conv2(out)
        return out + residual


class WideResNet(nn.Module):
    """WRN-depth-width for CIFAR: conv1 (16) → block1 (16w) → block2 (32w, /2) → block3
    (64w, /2) → bn → relu → global average pool → fc. ``depth = 6n + 4``.
    ``x [B, C, H, W]`` → ``[B, K]``.
    """

    def __init__(
        self, depth: int = 28, width: int = 10, in_channels: int = 3, num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise LsaUserError(f"WideResNet depth must be 6n+4 with n >= 1, got {depth!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise LsaUserError(f"WideResNet width must be an int >= 1, got {width!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise LsaUserError(f"WideResNet dropout must be in [0, 1), got {dropout!r}")
        n = (depth - 4) // 6
        widths = (16, 16 * width, 32 * width, 64 * width)
        self.depth, self.width = depth, width
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = self._group(widths[0], widths[1], n, 1, dropout)
        self.block2 = self._group(widths[1], widths[2], n, 2, dropout)
        self.block3 = self._group(widths[2], widths[3], n, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)
        _init_conv_bn_linear(self)

    @staticmethod
    def _group(c_in: int, c_out: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        blocks = [WideBasic(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, dropout)
                  for i in range(n)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn(out))
        return self.fc(self.flatten(self.avgpool(out)))


def _init_conv_bn_linear(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- build_model


def _image_shape(name: str, info: DatasetInfo) -> tuple[int, int, int]:
    if len(info.input_shape) != 3:
        raise LsaUserError(
            f"model {name!r} needs image inputs [C, H, W]; dataset {info.name!r} has "
            f"input shape {list(info.input_shape)} (use model_a for vector data)"
        )
    c, h, w = info.input_shape
    return int(c), int(h), int(w)


def _build_model_a(info: DatasetInfo, **kw: Any) -> nn.Module:
    return ModelA(math.prod(info.input_shape), info.num_classes, **kw)


def _build_model_b(info: DatasetInfo, **kw: Any) -> nn.Module:
    c, h, w = _image_shape("model_b", info)
    return ModelB(c, h, w, info.num_classes, **kw)


def _build_vgg19(info: DatasetInfo, **kw: Any) -> nn.Module:
    c, h, w = _image_shape("vgg19", info)
    if min(h, w) < 32:
        raise LsaUserError(
            f"vgg19 needs inputs of at least 32x32 (five 2x2 max-pools); dataset {info.name!r} "
            f"is {h}x{w} — use model_b"
        )
    return VGG(VGG19_CFG, c, info.num_classes, **kw)


def _build_wrn(info: DatasetInfo, **kw: Any) -> nn.Module:
    c, h, w = _image_shape("wrn28_10", info)
    kw.setdefault("depth", 28)
    kw.setdefault("width", 10)
    return WideResNet(in_channels=c, num_classes=info.num_classes, **kw)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "model_a": _build_model_a,
    "model_b": _build_model_b,
    "vgg19": _build_vgg19,
    "wrn28_10": _build_wrn,
}


def build_model(
    name: str, info: DatasetInfo, *, seed: int | None = None, **kwargs: Any
) -> nn.Module:
    """Builds a model for the dataset described by ``info``.

    Args:
        name: one of :data:`MODELS` (``model_a``, ``model_b``, ``vgg19``, ``wrn28_10``;
            ``-``/case ignored), or ``"package.module:factory"`` for a user model.
        info: the dataset's :class:`~lsa_ext.data.DatasetInfo` (input shape, classes).
        seed: if given, parameters are initialised under ``torch.manual_seed(seed)`` without
            touching the global RNG state; else from the global RNG.
        **kwargs: architecture options — model_a: ``hidden``, ``single_logit``; model_b:
            ``padding``, ``hidden``; vgg19: ``batch_norm``; wrn28_10: ``depth``, ``width``,
            ``dropout``; user factories: passed through.

    Returns:
        an ``nn.Module`` (train mode, CPU, float32) mapping ``[B, *info.input_shape]`` to
        logits ``[B, K]`` (``[B, 1]`` for model_a on binary data).

    Raises:
        LsaUserError: unknown name, a model that does not fit the data, a bad option, or a user
            factory that cannot be imported, called or does not return an ``nn.Module``.
    """
    if not isinstance(name, str) or not name.strip():
        raise LsaUserError(f"model name must be a non-empty string, got {name!r}")
    if not isinstance(info, DatasetInfo):
        raise LsaUserError(f"build_model needs a DatasetInfo, got {type(info).__name__}")
    if seed is None:
        return _build(name, info, kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return _build(name, info, kwargs)


def _build(name: str, info: DatasetInfo, kwargs: dict[str, Any]) -> nn.Module:
    if ":" in name:
        return _build_user_model(name.strip(), info, kwargs)
    key = name.strip().lower().replace("-", "_")
    key = {"a": "model_a", "b": "model_b", "modela": "model_a", "modelb": "model_b",
           "vgg": "vgg19", "wrn": "wrn28_10", "wideresnet": "wrn28_10"}.get(key, key)
    if key not in _BUILDERS:
        raise LsaUserError(
            f"unknown model {name!r}; choose one of: {', '.join(MODELS)}, "
            "or 'package.module:factory' for your own model"
        )
    try:
        return _BUILDERS[key](info, **kwargs)
    except TypeError as exc:
        raise LsaUserError(f"bad option for model {key!r}: {exc}") from exc


def _build_user_model(spec: str, info: DatasetInfo, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise LsaUserError(f"user model must be written 'package.module:factory', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or any error raised while importing the module
        raise LsaUserError(
            f"cannot import module {module_name!r} for model {spec!r}: "
            f"{type(exc).__name__}: {exc} (is it on PYTHONPATH?)"
        ) from exc
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise LsaUserError(f"module {module_name!r} has no attribute {attr!r} (model {spec!r})")
        factory = getattr(factory, part)
    if not callable(factory):
        raise LsaUserError(f"{spec!r} is not callable (got {type(factory).__name__})")
    call_kw = dict(kwargs)
    params = _keyword_params(factory)
    if params is not None:
        if "info" in params:
            call_kw.setdefault("info", info)
        elif "num_classes" in params:
            call_kw.setdefault("num_classes", info.num_classes)
    try:
        model = factory(**call_kw)
    except LsaUserError:
        raise
    except Exception as exc:
        raise LsaUserError(
            f"calling model factory {spec!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise LsaUserError(
            f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _keyword_params(factory: Callable[..., Any]) -> set[str] | None:
    """Names the factory accepts as keywords (None if unknown; ``**kw`` does not count)."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in sig.parameters.values() if p.kind in kinds}


# --------------------------------------------------------------------------- checkpoints

def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Loads a checkpoint into ``model`` (in place) and returns it.

    Reads with ``torch.load(path, map_location="cpu", weights_only=True)``. Accepts a plain
    state dict, or a dict holding it under ``"model"`` (training checkpoints), ``"state_dict"``
    or ``"model_state_dict"``. A ``module.`` (DDP) or ``_orig_mod.`` (``torch.compile``) prefix
    on every key is stripped. Loading is strict: keys and shapes must match.

    Raises:
        LsaUserError: missing/unreadable/corrupt file, no state dict inside, or mismatched
            keys/shapes (the message names the first few).
    """
    p = Path(path).expanduser()
    obj = torch_load(p, "cpu")
    state = _extract_state_dict(obj, p)
    return load_state_dict_checked(model, state, source=str(p))


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise LsaUserError(
            f"checkpoint {str(path)!r} holds no state dict (expected a dict of tensors, or a "
            "dict with one under 'model' or 'state_dict')"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise LsaUserError(
            f"checkpoint {str(path)!r} is not a state dict: entries {bad[:3]!r} are not "
            "name → tensor"
        )
    state = dict(obj)
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_state_dict_checked(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "state dict"
) -> nn.Module:
    """Strict ``load_state_dict`` whose errors are one readable :class:`LsaUserError`."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} (checkpoint {list(state[k].shape)}, model {list(own[k].shape)})"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_few(shapes)}")
    if problems:
        raise LsaUserError(
            f"{source} does not match the model ({type(model).__name__}): "
            + "; ".join(problems)
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. dtype that cannot be copied
        raise LsaUserError(f"{source}: {first_line(exc)}") from exc
    return model


def _few(items: list[str], n: int = 5) -> str:
    more = f", … (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# --------------------------------------------------------------------------- info


def model_info(model: nn.Module) -> dict[str, Any]:
    """Summary of a model: ``parameters`` (count), ``trainable_parameters``,
    ``learnable_layers`` (qualified names of Conv/Linear modules in registration order — the
    paper's L0, L1, …) and ``activation_layers``.
    """
    from lsa_ext.probes import ACTIVATIONS, LEARNABLE

    named = [(n, m) for n, m in model.named_modules() if n]
    return {
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "learnable_layers": [n for n, m in named if isinstance(m, LEARNABLE)],
        "activation_layers": [n for n, m in named if isinstance(m, ACTIVATIONS)],
    }
