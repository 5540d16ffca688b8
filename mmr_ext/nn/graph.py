"""Graph networks: affine blocks, ReLU-type activations, max pooling and sums of branches
(docs/MATH.md §10-11).

A model whose operations are not a plain chain (:func:`mmr_ext.nn.chain.is_chain`) is analysed
as a :class:`Graph`: nodes in topological order, ``nodes[0]`` the input and ``nodes[-1]`` the
logits. Consecutive affine layers on a path without branching fold into one ``affine`` node
(like the blocks of a chain), so they add no hyperplanes. Every analysis walks the nodes in order
and applies what the node's ``op`` says:

- ``"affine"``: ``block`` (an :class:`~mmr_ext.nn.chain.AffineBlock`) of its one input;
- ``"act"``: ReLU-type activation with negative-side ``slope`` of its input (the pre-activation);
- ``"maxpool"``: ``pool`` (an ``nn.MaxPool2d``) of its input; :func:`window_index` lists each
  output's window;
- ``"add"``: the sum of its two inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import pair
from .chain import AffineBlock, Chain, activation_slope, chain_of, check_affine, check_layer, is_chain, model_ops
from .trace import ACTIVATIONS, POOLS, SKIPPED, TracedOp

INPUT, AFFINE, ACT, MAXPOOL, ADD = "input", "affine", "act", "maxpool", "add"


@dataclass(frozen=True)
class GraphNode:
    op: str
    inputs: Tuple[int, ...]
    name: str
    block: Optional[AffineBlock] = None
    slope: float = 0.0
    pool: Optional[nn.MaxPool2d] = None


@dataclass(frozen=True)
class Graph:
    """A feed-forward graph network (see the module docstring)."""

    nodes: Tuple[GraphNode, ...]

    def values(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The value of every node for the input batch x."""
        out: List[torch.Tensor] = []
        for node in self.nodes:
            if node.op == INPUT:
                out.append(x)
            elif node.op == AFFINE:
                out.append(node.block(out[node.inputs[0]]))
            elif node.op == ACT:
                f = out[node.inputs[0]]
                out.append(torch.where(f > 0, f, f * node.slope))
            elif node.op == MAXPOOL:
                out.append(node.pool(out[node.inputs[0]]))
            else:
                out.append(out[node.inputs[0]] + out[node.inputs[1]])
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.values(x)[-1]

    def as_module(self) -> "GraphNetwork":
        """An ``nn.Module`` (of the same layers) that computes the graph; pickles without the
        model's class (e.g. for worker processes)."""
        return GraphNetwork(self)


class GraphNetwork(nn.Module):
    """``nn.Module`` form of a :class:`Graph`: its layers as submodules, its forward the graph's."""

    def __init__(self, graph: Graph):
        super().__init__()
        self.graph = graph
        self.layers = nn.ModuleList([layer for node in graph.nodes if node.block is not None
                                     for layer in node.block.layers]
                                    + [node.pool for node in graph.nodes if node.pool is not None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)


def window_index(pool: nn.MaxPool2d, shape: Tuple[int, int, int], device=None) -> torch.Tensor:
    """Flat indices into a per-sample input of ``shape`` (C, H, W) of every max-pooling window:
    [C, L, k] with L output positions (row-major, as the pooled output) and k = kh·kw entries per
    window; -1 marks padding cells (never selected, docs/MATH.md §10)."""
    C, H, W = shape
    kernel, stride = pair(pool.kernel_size), pair(pool.stride if pool.stride is not None else pool.kernel_size)
    cells = torch.arange(1, H * W + 1, dtype=torch.float64, device=device).reshape(1, 1, H, W)
    cols = F.unfold(cells, kernel, dilation=pair(pool.dilation), padding=pair(pool.padding), stride=stride)
    flat = cols[0].t().round().long() - 1  # [L, k]; zero padding -> -1
    channel = torch.arange(C, device=device).reshape(C, 1, 1) * (H * W)
    return torch.where(flat >= 0, flat.unsqueeze(0) + channel, flat.unsqueeze(0).expand(C, -1, -1))


def _graph_of(ops: List[TracedOp]) -> Graph:
    """Folds consecutive affine layers and builds the nodes; validates every layer."""
    readers: Dict[int, int] = {}
    for op in ops:
        for i in op.inputs:
            readers[i] = readers.get(i, 0) + 1
    nodes: List[GraphNode] = [GraphNode(INPUT, (), "input")]
    where: Dict[int, int] = {-1: 0}  # op index -> node index
    pending: Dict[int, Tuple[List[nn.Module], List[str]]] = {}  # open affine nodes: layers so far
    for k, op in enumerate(ops):
        layer, inputs = op.layer, tuple(where[i] for i in op.inputs)
        if isinstance(layer, SKIPPED):
            check_layer(op.name, layer)
            where[k] = inputs[0]
            continue
        if layer is None:
            nodes.append(GraphNode(ADD, inputs, op.name))
        elif isinstance(layer, ACTIVATIONS):
            if nodes[inputs[0]].op == ACT:
                raise ValueError(f"layer '{op.name}' ({type(layer).__name__}) directly follows the activation "
                                 f"'{nodes[inputs[0]].name}': two activations in a row are not supported")
            nodes.append(GraphNode(ACT, inputs, op.name, slope=activation_slope(layer)))
        elif isinstance(layer, POOLS):
            check_layer(op.name, layer)
            nodes.append(GraphNode(MAXPOOL, inputs, op.name, pool=layer))
        else:
            check_affine(op.name, layer)
            source = op.inputs[0]
            if source in pending and readers.get(source, 0) == 1:  # extend the open affine node
                layers, names = pending.pop(source)
                layers.append(layer)
                names.append(op.name)
                pending[k] = (layers, names)
                nodes[inputs[0]] = GraphNode(AFFINE, nodes[inputs[0]].inputs, names[0],
                                             block=AffineBlock(tuple(layers), tuple(names)))
                where[k] = inputs[0]
                continue
            pending[k] = ([layer], [op.name])
            nodes.append(GraphNode(AFFINE, inputs, op.name, block=AffineBlock((layer,), (op.name,))))
        where[k] = len(nodes) - 1
    if not any(node.op == AFFINE for node in nodes):
        raise ValueError("model has no affine layers")
    if nodes[-1].op not in (AFFINE, ADD):
        raise ValueError(f"model ends with '{nodes[-1].name}' ({nodes[-1].op}): the logits must be an affine "
                         "function (or a sum of affine functions) of the hidden layers")
    return Graph(tuple(nodes))


def parse_network(model: nn.Module) -> Union[Chain, Graph]:
    """The model as analysed: a :class:`~mmr_ext.nn.chain.Chain` when its operations form a chain
    (the fast path), else a :class:`Graph` (max pooling, sums of branches).

    Raises like :func:`mmr_ext.nn.chain.parse_model` for unsupported operations and unusable
    configurations.
    """
    ops = model_ops(model)
    return chain_of(ops) if is_chain(ops) else _graph_of(ops)
