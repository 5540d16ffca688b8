"""The architectures of the MMR papers (plain ``nn.Sequential`` ReLU networks) and two graph networks.

- ``fc1``: one hidden layer of 1024 units (784-1024-10 on MNIST).
- ``fc10``: ten hidden layers of 124, 7 x 104 and 2 x 86 units.
- ``cnn``: conv(16, 4x4, stride 2, pad 1) - conv(32, 4x4, stride 2, pad 1) - fc 100 - fc K.
- ``large``: the "large" network of Wong et al. (2018): conv(32, 3x3, pad 1) - conv(32, 4x4,
  stride 2, pad 1) - conv(64, 3x3, pad 1) - conv(64, 4x4, stride 2, pad 1) - fc 512 - fc 512 -
  fc K.
- ``cnn_maxpool``: the papers' CNN with max pooling instead of strides: conv(16, 3x3, pad 1) -
  maxpool 2 - conv(32, 3x3, pad 1) - maxpool 2 - fc 100 - fc K (a graph network, docs/MATH.md §10).
- ``resnet``: conv(16, 4x4, stride 2, pad 1) - a residual block ``relu(x + conv(relu(conv(x))))``
  of two conv(16, 3x3, pad 1) - conv(32, 4x4, stride 2, pad 1) - fc 100 - fc K, as an
  ``nn.Module`` class (a graph network, docs/MATH.md §11).

Every builder takes the input shape (C, H, W) and the number of classes K, and optionally
``normalize=(mean, std)`` to prepend a :class:`mmr_ext.nn.layers.Normalize` layer (per-channel
constants or scalars), so the network still takes images in [0, 1].

Any other architecture is named by its builder, ``'package.module:function'`` or
``'path/to/file.py:function'`` (:func:`build_model`).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Normalize

__all__ = ["MODELS", "build_model", "builder_of", "resolve_model_name", "short_model_name", "fc1", "fc10", "cnn", "large", "cnn_maxpool", "resnet",
           "ResidualCNN"]

Shape = Tuple[int, int, int]
NormSpec = Optional[Tuple[object, object]]

FC10_HIDDEN = (124,) + (104,) * 7 + (86,) * 2


def _check_shape(in_shape: Sequence[int]) -> Shape:
    try:
        shape = tuple(int(s) for s in in_shape)
        ok = len(shape) == 3 and all(s == t and s > 0 for s, t in zip(shape, in_shape))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"in_shape must be three positive ints (C, H, W), got {in_shape!r}")
    return shape  # type: ignore[return-value]


def _check_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return num_classes


def _prefix(in_shape: Shape, normalize: NormSpec) -> list:
    if normalize is None:
        return []
    try:
        mean, std = normalize
    except (TypeError, ValueError):
        raise ValueError(f"normalize must be a pair (mean, std), got {normalize!r}") from None
    layer = Normalize(mean, std)
    c = in_shape[0]
    for name, t in (("mean", layer.mean), ("std", layer.std)):
        if t.numel() not in (1, c):
            raise ValueError(f"normalize {name} has {t.numel()} values; expected 1 or "
                             f"{c} (one per input channel)")
    return [layer]


def _mlp(in_features: int, hidden: Sequence[int], num_classes: int) -> list:
    layers, width = [], in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return layers


def _convs(in_shape: Shape, spec: Sequence[Tuple[int, int, int, int]]) -> Tuple[list, int]:
    """Conv2d + ReLU layers from (out_channels, kernel, stride, padding) tuples, and the
    flattened size of their output."""
    c, h, w = in_shape
    layers = []
    for out_c, k, s, p in spec:
        layers += [nn.Conv2d(c, out_c, k, stride=s, padding=p), nn.ReLU()]
        c, h, w = out_c, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        if h < 1 or w < 1:
            raise ValueError(f"in_shape {in_shape} is too small for this network's "
                             f"convolutions")
    return layers, c * h * w


def fc1(in_shape: Sequence[int], num_classes: int, *, normalize: NormSpec = None) -> nn.Sequential:
    """Fully connected network with one hidden layer of 1024 ReLU units."""
    shape, k = _check_shape(in_shape), _check_classes(num_classes)
    d = shape[0] * shape[1] * shape[2]
    return nn.Sequential(*_prefix(shape, normalize), nn.Flatten(), *_mlp(d, (1024,), k))


def fc10(in_shape: Sequence[int], num_classes: int, *,
         normalize: NormSpec = None) -> nn.Sequential:
    """Fully connected network with ten hidden ReLU layers of 124, 7 x 104 and 2 x 86 units."""
    shape, k = _check_shape(in_shape), _check_classes(num_classes)
    d = shape[0] * shape[1] * shape[2]
    return nn.Sequential(*_prefix(shape, normalize), nn.Flatten(), *_mlp(d, FC10_HIDDEN, k))


def cnn(in_shape: Sequence[int], num_classes: int, *, normalize: NormSpec = None) -> nn.Sequential:
    """conv(16, 4x4, stride 2, pad 1) - conv(32, 4x4, stride 2, pad 1) - fc 100 - fc K."""
    shape, k = _check_shape(in_shape), _check_classes(num_classes)
    convs, flat = _convs(shape, [(16, 4, 2, 1), (32, 4, 2, 1)])
    return nn.Sequential(*_prefix(shape, normalize), *convs, nn.Flatten(),
                         *_mlp(flat, (100,), k))


def large(in_shape: Sequence[int], num_classes: int, *,
          normalize: NormSpec = None) -> nn.Sequential:
    """The large convolutional network of Wong et al. (2018): four convolutions (32, 32, 64,
    64 channels; the 4x4 ones with stride 2), then fc 512 - fc 512 - fc K."""
    shape, k = _check_shape(in_shape), _check_classes(num_classes)
    convs, flat = _convs(shape, [(32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1)])
    return nn.Sequential(*_prefix(shape, normalize), *convs, nn.Flatten(),
                         *_mlp(flat, (512, 512), k))


def cnn_maxpool(in_shape: Sequence[int], num_classes: int, *, normalize: NormSpec = None) -> nn.Sequential:
    """conv(16, 3x3, pad 1) - maxpool 2 - conv(32, 3x3, pad 1) - maxpool 2 - fc 100 - fc K."""
    shape, k = _check_shape(in_shape), _check_classes(num_classes)
    c, h, w = shape
    if h < 4 or w < 4:
        raise ValueError(f"in_shape {in_shape} is too small for this network's two 2x2 max poolings")
    layers = [nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
              nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()]
    return nn.Sequential(*_prefix(shape, normalize), *layers, *_mlp(32 * (h // 2 // 2) * (w // 2 // 2), (100,), k))


class ResidualCNN(nn.Module):
    """The ``resnet`` model (see the module docstring)."""

    def __init__(self, in_shape: Shape, num_classes: int, prefix: Sequence[nn.Module] = ()):
        super().__init__()
        c, h, w = in_shape
        self.prefix = nn.Sequential(*prefix)
        self.stem = nn.Conv2d(c, 16, 4, stride=2, padding=1)
        self.block1 = nn.Conv2d(16, 16, 3, padding=1)
        self.block2 = nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 32, 4, stride=2, padding=1)
        h, w = (h - 2) // 2 + 1, (w - 2) // 2 + 1
        h, w = (h - 2) // 2 + 1, (w - 2) // 2 + 1
        self.fc = nn.Linear(32 * h * w, 100)
        self.out = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(self.prefix(x)))
        x = F.relu(x + self.block2(F.relu(self.block1(x))))
        x = F.relu(self.down(x)).flatten(1)
        return self.out(F.relu(self.fc(x)))


def resnet(in_shape: Sequence[int], num_classes: int, *, normalize: NormSpec = None) -> ResidualCNN:
    """conv(16, 4x4, stride 2) - residual block of two conv(16, 3x3) - conv(32, 4x4, stride 2) -
    fc 100 - fc K."""
    shape, k = _check_shape(in_shape), _check_classes(num_classes)
    if shape[1] < 4 or shape[2] < 4:
        raise ValueError(f"in_shape {in_shape} is too small for this network's convolutions")
    return ResidualCNN(shape, k, _prefix(shape, normalize))


#: Model builders by name, each ``builder(in_shape, num_classes, *, normalize=None)``.
MODELS: Dict[str, Callable[..., nn.Module]] = {
    "fc1": fc1, "fc10": fc10, "cnn": cnn, "large": large, "cnn_maxpool": cnn_maxpool, "resnet": resnet}


def resolve_model_name(name: str) -> str:
    """The canonical form of a model name: a zoo name in lower case, ``package.module:function``
    as given, ``path/to/file.py:function`` with the file's absolute path (so that a checkpoint
    rebuilds the model from any working directory). Raises ValueError when it names nothing."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model must be a zoo name ({', '.join(MODELS)}) or 'module:function', got {name!r}")
    name = name.strip()
    if ":" not in name:
        if name.lower() not in MODELS:
            raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}, or a builder "
                             "'package.module:function' / 'path/to/file.py:function'")
        return name.lower()
    source, _, function = name.rpartition(":")
    if source.endswith(".py"):
        source = str(Path(source).expanduser().resolve())
    name = f"{source}:{function}"
    builder_of(name)
    return name


def short_model_name(name: str) -> str:
    """The name of a (canonical) model name for folders and titles: the builder function's name
    for a user builder."""
    return name.rpartition(":")[2]


def builder_of(name: str) -> Callable[..., nn.Module]:
    """The builder a model name stands for: a zoo builder, or ``function`` of the module or
    Python file before the colon, called as ``function(in_shape, num_classes)``."""
    if ":" not in name:
        return MODELS[name.lower()]
    source, _, function = name.rpartition(":")
    if source.endswith(".py"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(f"model builder file '{source}' does not exist")
        # one module per file and process (sys.modules is the cache): validating a name and building
        # from it execute the file once
        key = "mmr_ext_user_model_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
        module = sys.modules.get(key)
        if module is None:
            spec = importlib.util.spec_from_file_location(key, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[key] = module  # before running it, as an import does (dataclasses look it up)
            try:
                spec.loader.exec_module(module)
            except Exception as error:
                del sys.modules[key]
                raise ValueError(f"model builder file '{source}' failed to import: {type(error).__name__}: "
                                 f"{error}") from None
    else:
        try:
            module = importlib.import_module(source)
        except Exception as error:
            raise ValueError(f"model builder module '{source}' cannot be imported: {type(error).__name__}: "
                             f"{error}") from None
    builder = getattr(module, function, None)
    if not callable(builder):
        raise ValueError(f"model builder '{name}': '{source}' has no function '{function}'")
    return builder


def build_model(name: str, in_shape: Sequence[int], num_classes: int, *,
                normalize: NormSpec = None) -> nn.Module:
    """Build the architecture ``name`` for inputs of shape ``in_shape`` (C, H, W) and
    ``num_classes`` classes: one of :data:`MODELS` (case-insensitive), or a user builder
    ``'package.module:function'`` / ``'path/to/file.py:function'`` called as
    ``function(in_shape, num_classes)`` that returns an ``nn.Module`` (analysed as traced,
    :mod:`mmr_ext.nn.trace`); ``normalize`` is for the zoo builders only."""
    name = resolve_model_name(name)
    if ":" not in name:
        return MODELS[name](in_shape, num_classes, normalize=normalize)
    if normalize is not None:
        raise ValueError(f"normalize applies to the zoo models, not to the builder '{name}'")
    model = builder_of(name)(tuple(in_shape), num_classes)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model builder '{name}' returned {type(model).__name__}, not a torch.nn.Module")
    return model
