"""Tracing of an arbitrary ``nn.Module`` into the graph of layers it computes (docs/MATH.md §11-12).

``torch.fx`` records what the model's ``forward`` does; each recorded operation is mapped to a
layer that computes exactly the same (or to the addition of two branches) (the model's own modules, or new layer objects that share
the model's parameters), so the analysis sees the function the user runs, gradients reach the
user's parameters, and nothing of the model is copied or changed. Operations outside the
supported set raise ``NotImplementedError`` naming the graph node and the line of ``forward``
that recorded it.
"""
from __future__ import annotations

import operator
import os
from dataclasses import dataclass
from numbers import Real
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .adapters import ADAPTERS, adapter_for
from .layers import FlattenTo, Scale

#: Layers without an affine adapter that the chain knows: skipped ones and activations.
SKIPPED: Tuple[type, ...] = (nn.Identity, nn.Dropout)
ACTIVATIONS: Tuple[type, ...] = (nn.ReLU, nn.LeakyReLU)
#: Piecewise-affine selections (docs/MATH.md §10).
POOLS: Tuple[type, ...] = (nn.MaxPool2d,)
#: Modules analysed as themselves when their class keeps the forward of the type they derive from.
ANALYSED_TYPES = SKIPPED + ACTIVATIONS + POOLS

LAYERS = ("Linear, Conv2d, AvgPool2d, MaxPool2d, eval-mode BatchNorm1d/2d, Flatten, Identity, eval-mode "
          "Dropout, mmr_ext.Normalize, ReLU and LeakyReLU")
SUPPORTED = (LAYERS + ", and in forward: F.relu/torch.relu, F.leaky_relu, "
             "flatten/view/reshape to [batch, features], F.avg_pool2d, F.max_pool2d, F.linear/F.conv2d with "
             "the model's tensors, F.dropout in eval mode, multiplication or division by a number, negation, "
             "and the sum of two branches (x + y, torch.add)")


@dataclass(frozen=True)
class TracedOp:
    """One operation of a traced forward: a layer applied to one earlier result, or (``layer``
    None) the sum of two. ``inputs`` index earlier operations; -1 is the model's input."""

    name: str
    layer: Optional[nn.Module]
    inputs: Tuple[int, ...]


def analysed_base(module: nn.Module) -> Optional[type]:
    """The supported type ``module`` is analysed as (its own forward is that type's), else None."""
    base = next((k for k in type(module).__mro__ if k in ANALYSED_TYPES or k in ADAPTERS), None)
    if base is None or type(module).forward is not base.forward:
        return None
    return base


def needs_tracing(model: nn.Module) -> bool:
    """Whether the model must be traced: it, or a module inside it, is neither a plain
    ``nn.Sequential`` nor a layer of a torch type analysed as itself."""
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            if type(module).forward is not nn.Sequential.forward:
                return True
        elif analysed_base(module) is None and not _is_torch_layer(module):
            return True  # a user-defined block or an override of a supported forward
    return False


def _is_torch_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.")


class _Tracer(fx.Tracer):
    """Keeps supported layers, and other torch layers, as single nodes; traces everything else."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, nn.Sequential):
            return False
        return analysed_base(m) is not None or (_is_torch_layer(m) and adapter_for(m) is None
                                                 and not isinstance(m, ANALYSED_TYPES))


def source_line(node: fx.Node) -> str:
    """'file:line' of the innermost frame of the model's own code that recorded ``node``."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [line.strip() for line in (node.stack_trace or "").splitlines() if line.strip().startswith("File ")]
    for frame in reversed(frames):
        path = frame.split('"')[1] if frame.count('"') >= 2 else ""
        if path and not path.startswith(torch_dir):
            line = frame.split(", line ")[1].split(",")[0] if ", line " in frame else "?"
            return f"{os.path.basename(path)}:{line}"
    return "unknown line"


def describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"'{target}' (graph node '{node.name}', {source_line(node)})"


def _unsupported(node: fx.Node, why: str) -> NotImplementedError:
    return NotImplementedError(f"operation {describe(node)} {why}; mmr_ext traces models built from {SUPPORTED}")


def _tensor_attr(model: nn.Module, node: fx.Node) -> torch.Tensor:
    obj: Any = model
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def _share(layer: nn.Module, name: str, tensor: Optional[torch.Tensor]) -> None:
    """Makes ``layer.<name>`` the model's own tensor (a Parameter stays registered as one)."""
    delattr(layer, name)
    setattr(layer, name, tensor)


def _functional_linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    layer = nn.Linear(1, 1, bias=False, device="meta")
    layer.in_features, layer.out_features = weight.shape[1], weight.shape[0]
    _share(layer, "weight", weight)
    _share(layer, "bias", bias)
    return layer


def _functional_conv(weight: torch.Tensor, bias: Optional[torch.Tensor], stride=1, padding=0, dilation=1,
                     groups=1) -> nn.Conv2d:
    layer = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride, padding, dilation,
                      groups, bias=False, device="meta")
    _share(layer, "weight", weight)
    _share(layer, "bias", bias)
    return layer


def _bound_args(node: fx.Node, names: Tuple[str, ...], defaults: Dict[str, Any]) -> Dict[str, Any]:
    """The node's arguments (after the input) by name, defaults filled in."""
    values = dict(defaults)
    values.update(zip(names, node.args[1:]))
    for key, value in node.kwargs.items():
        if key not in names:
            raise _unsupported(node, f"has an unexpected argument '{key}'")
        values[key] = value
    return values


ADDITIONS = (operator.add, operator.iadd, torch.add)


class _Lowering:
    """Walks a traced graph, mapping every tensor it computes to a :class:`TracedOp`."""

    def __init__(self, model: nn.Module, graph: fx.Graph):
        self.model, self.graph = model, graph
        self.ops: List[TracedOp] = []
        self.index: Dict[fx.Node, int] = {}  # tensor nodes -> index of the op holding them (-1: input)
        self.batch_sizes: Dict[fx.Node, fx.Node] = {}  # nodes holding the batch size -> their tensor
        self.current: Optional[fx.Node] = None  # the tensor the operation being lowered reads
        floats = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
        self.like = floats[0] if floats else torch.empty(())  # dtype and device of new constants

    def run(self) -> List[TracedOp]:
        for node in self.graph.nodes:
            self.visit(node)
        return self.ops

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            if -1 in self.index.values():
                raise _unsupported(node, "is a second input: the model must take one tensor")
            self.index[node] = -1
        elif node.op == "get_attr":
            pass  # read by the operations that use it
        elif node.op == "output":
            out = node.args[0]
            if out not in self.index or self.index[out] != len(self.ops) - 1:
                raise _unsupported(node, "does not return the result of the last operation (one logits tensor "
                                         "[B, K])")
        elif self._is_batch_size(node):
            self.batch_sizes[node] = self.batch_sizes.get(node.args[0], node.args[0])
        else:
            self.step(node)

    def _is_batch_size(self, node: fx.Node) -> bool:
        """x.size(0), x.shape[0] (and x.shape, x.size(), read only for that) of a traced tensor."""
        source = node.args[0] if node.args else None
        if node.op == "call_method" and node.target == "size" and source in self.index:
            return len(node.args) == 1 or node.args[1:] == (0,) or node.kwargs.get("dim") == 0
        if node.op == "call_function" and node.target is getattr:
            return source in self.index and node.args[1] == "shape"
        if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
            return source in self.batch_sizes
        return False

    def tensors_read(self, node: fx.Node) -> List[fx.Node]:
        tensors = [a for a in node.all_input_nodes if a not in self.batch_sizes and a.op != "get_attr"]
        if any(a not in self.index for a in tensors):
            raise _unsupported(node, "reads a tensor that is not computed from the input by supported operations")
        return tensors

    def step(self, node: fx.Node) -> None:
        tensors = self.tensors_read(node)
        if self._is_addition(node):
            self.add(node, tensors)
            return
        if len(tensors) != 1:
            raise _unsupported(node, "combines tensors in a way other than a sum of two branches")
        self.current = tensors[0]
        reads_first = node.args[:1] == (self.current,) or node.target is operator.mul  # c * x commutes
        if not reads_first:
            raise _unsupported(node, "does not read a tensor as its first argument")
        layer = self.layer_of(node)
        if layer is None:  # the identity (eval-mode dropout)
            self.index[node] = self.index[self.current]
            return
        self.append(node, layer, (self.index[self.current],))

    def append(self, node: fx.Node, layer: Optional[nn.Module], inputs: Tuple[int, ...]) -> None:
        name = node.target if node.op == "call_module" else node.name
        self.ops.append(TracedOp(name, layer, inputs))
        self.index[node] = len(self.ops) - 1

    def _is_addition(self, node: fx.Node) -> bool:
        return ((node.op == "call_function" and node.target in ADDITIONS)
                or (node.op == "call_method" and node.target in ("add", "add_")))

    def add(self, node: fx.Node, tensors: List[fx.Node]) -> None:
        if node.kwargs or len(node.args) != 2:
            raise _unsupported(node, "is an addition with extra arguments (alpha, out)")
        if len(tensors) != 2 or any(not isinstance(a, fx.Node) for a in node.args):
            raise _unsupported(node, "adds a constant to a tensor (only the sum of two branches is supported)")
        a, b = node.args
        if a is b:
            self.append(node, Scale(2.0, self.like.dtype, self.like.device), (self.index[a],))
            return
        self.append(node, None, (self.index[a], self.index[b]))

    def layer_of(self, node: fx.Node) -> Optional[nn.Module]:
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            if node.kwargs or len(node.args) != 1:
                raise _unsupported(node, "is called with more than its input")
            if analysed_base(module) is None:
                raise NotImplementedError(
                    f"layer '{node.target}' ({type(module).__name__}, {source_line(node)}) is not supported: "
                    f"mmr_ext handles {SUPPORTED}")
            return module
        rule = FUNCTIONS.get(node.target) if node.op == "call_function" else METHODS.get(node.target)
        if rule is None:
            raise _unsupported(node, "is not supported")
        return rule(self, node)

    def tensor(self, node: fx.Node, value) -> Optional[torch.Tensor]:
        if value is None:
            return None
        if isinstance(value, fx.Node) and value.op == "get_attr":
            t = _tensor_attr(self.model, value)
            if isinstance(t, torch.Tensor):
                return t
        raise _unsupported(node, "takes a weight that is not a tensor attribute of the model "
                                 "(compute derived weights outside forward)")


def _relu(lowering: _Lowering, node: fx.Node) -> nn.Module:
    return nn.ReLU()


def _leaky_relu(lowering: _Lowering, node: fx.Node) -> nn.Module:
    args = _bound_args(node, ("negative_slope", "inplace"), {"negative_slope": 0.01, "inplace": False})
    return nn.LeakyReLU(float(args["negative_slope"]))


def _flatten(lowering: _Lowering, node: fx.Node) -> nn.Module:
    args = _bound_args(node, ("start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
    if args["start_dim"] != 1 or args["end_dim"] != -1:
        raise _unsupported(node, "flattens other dimensions than all features (use flatten(1))")
    return nn.Flatten()


def _reshape(lowering: _Lowering, node: fx.Node) -> nn.Module:
    shape = node.args[1:]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    shape = tuple(shape or node.kwargs.get("shape", node.kwargs.get("size", ())))
    if len(shape) == 2 and shape[0] in lowering.batch_sizes and shape[1] == -1:
        return nn.Flatten()
    if len(shape) == 2 and (shape[0] in lowering.batch_sizes or shape[0] == -1) and isinstance(shape[1], int):
        return FlattenTo(shape[1])
    raise _unsupported(node, "reshapes to something other than [batch, features] (e.g. x.view(x.size(0), -1))")


def _avg_pool2d(lowering: _Lowering, node: fx.Node) -> nn.Module:
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
    a = _bound_args(node, names, {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                                  "divisor_override": None})
    if "kernel_size" not in a:
        raise _unsupported(node, "has no kernel_size")
    return nn.AvgPool2d(a["kernel_size"], a["stride"] or None, a["padding"], a["ceil_mode"], a["count_include_pad"],
                        a["divisor_override"])


def _max_pool2d(lowering: _Lowering, node: fx.Node) -> nn.Module:
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    a = _bound_args(node, names, {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False,
                                  "return_indices": False})
    if "kernel_size" not in a:
        raise _unsupported(node, "has no kernel_size")
    if a["return_indices"]:
        raise _unsupported(node, "returns indices (only the pooled values are supported)")
    return nn.MaxPool2d(a["kernel_size"], a["stride"] or None, a["padding"], a["dilation"], False, a["ceil_mode"])


def _linear(lowering: _Lowering, node: fx.Node) -> nn.Module:
    a = _bound_args(node, ("weight", "bias"), {"bias": None})
    return _functional_linear(lowering.tensor(node, a.get("weight")), lowering.tensor(node, a["bias"]))


def _conv2d(lowering: _Lowering, node: fx.Node) -> nn.Module:
    names = ("weight", "bias", "stride", "padding", "dilation", "groups")
    a = _bound_args(node, names, {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
    weight = lowering.tensor(node, a.get("weight"))
    if weight.dim() != 4:
        raise _unsupported(node, f"has a weight of shape {tuple(weight.shape)}, not [out, in/groups, kh, kw]")
    return _functional_conv(weight, lowering.tensor(node, a["bias"]), a["stride"], a["padding"], a["dilation"],
                            a["groups"])


def _dropout(lowering: _Lowering, node: fx.Node) -> Optional[nn.Module]:
    a = _bound_args(node, ("p", "training", "inplace"), {"p": 0.5, "training": True, "inplace": False})
    if a["training"] and a["p"] > 0:
        raise ValueError(f"dropout {describe(node)} is in training mode with p={a['p']}: random masks make the "
                         "geometry undefined; call model.eval()")
    return None


def _scaled(factor: Callable[[float], float]) -> Callable[[_Lowering, fx.Node], nn.Module]:
    def rule(lowering: _Lowering, node: fx.Node) -> nn.Module:
        numbers = [a for a in node.args if a is not lowering.current]
        if len(numbers) != 1 or not isinstance(numbers[0], Real) or isinstance(numbers[0], bool):
            raise _unsupported(node, "multiplies by something other than a number")
        if node.target is operator.truediv and node.args[0] is not lowering.current:
            raise _unsupported(node, "divides a number by a tensor (not affine)")
        return Scale(factor(float(numbers[0])), lowering.like.dtype, lowering.like.device)
    return rule


def _negate(lowering: _Lowering, node: fx.Node) -> nn.Module:
    return Scale(-1.0, lowering.like.dtype, lowering.like.device)


FUNCTIONS: Dict[Any, Callable[[_Lowering, fx.Node], Optional[nn.Module]]] = {
    F.relu: _relu, torch.relu: _relu, torch.relu_: _relu, F.relu_: _relu,
    F.leaky_relu: _leaky_relu, torch.flatten: _flatten, torch.reshape: _reshape,
    F.avg_pool2d: _avg_pool2d, torch._C._nn.avg_pool2d: _avg_pool2d,
    F.max_pool2d: _max_pool2d, torch.max_pool2d: _max_pool2d,
    F.linear: _linear, torch._C._nn.linear: _linear, F.conv2d: _conv2d, torch.conv2d: _conv2d,
    F.dropout: _dropout, operator.mul: _scaled(lambda c: c), operator.truediv: _scaled(lambda c: 1.0 / c),
    operator.neg: _negate,
}
METHODS: Dict[str, Callable[[_Lowering, fx.Node], Optional[nn.Module]]] = {
    "relu": _relu, "relu_": _relu, "flatten": _flatten, "view": _reshape, "reshape": _reshape,
    "mul": _scaled(lambda c: c), "div": _scaled(lambda c: 1.0 / c), "neg": _negate,
}


def traced_ops(model: nn.Module) -> List[TracedOp]:
    """The operations that compute what ``model.forward`` computes, in order: the model's own
    modules (named by their paths), layers sharing its tensors for functional calls and additions
    (named by their graph nodes). Raises ``NotImplementedError`` naming the node and the source line
    of an unsupported operation."""
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # fx raises TraceError, TypeError, RuntimeError on dynamic code
        raise NotImplementedError(f"torch.fx cannot trace {type(model).__name__}.forward ({type(error).__name__}: "
                                  f"{error}); write forward without data-dependent control flow") from None
    return _Lowering(model, graph).run()
