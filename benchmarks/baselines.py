"""Baselines that bench_distances.py times against the native path.

- ``dense_universal``: the authors' algorithm (fra31/mmr-universal, TensorFlow 1) rendered in
  PyTorch: the identity matrix is pushed through every layer as a batch of d images, tiled over
  the batch, giving a dense ``B x d x units`` tensor per layer; first-layer distances from the
  weight norms; denominators stabilised with 1e-5; both norms penalised on the union of the two
  top-k sets. Only Conv2d / Linear / ReLU / Flatten Sequentials (the papers' architectures).
- ``jacobian_universal``: per-sample Jacobians of every pre-activation with torch.func
  (vmap over jacrev), then the same distances and per-norm top-k.
Both return the same objective as ``mmr_ext.universal_loss`` (cross-entropy + regularizer).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5


def _split_layers(model: nn.Sequential):
    """[(affine layers), ...] separated by ReLUs, the last group producing the logits."""
    groups, current = [], []
    for layer in model:
        if isinstance(layer, nn.ReLU):
            groups.append(current)
            current = []
        elif isinstance(layer, (nn.Conv2d, nn.Linear, nn.Flatten)):
            current.append(layer)
        else:
            raise NotImplementedError(f"dense baseline: unsupported layer {type(layer).__name__}")
    groups.append(current)
    return groups


def _apply(layers, z, bias: bool):
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            z = F.conv2d(z, layer.weight, layer.bias if bias else None, layer.stride, layer.padding,
                         layer.dilation, layer.groups)
        elif isinstance(layer, nn.Linear):
            z = F.linear(z, layer.weight, layer.bias if bias else None)
        else:
            z = layer(z)
    return z


def _hinge(d, gamma):
    return torch.relu(1 - d / gamma)


def _stable_norm(V, q, dim):
    V = V + EPS * (V.abs() < EPS).to(V.dtype)
    return torch.linalg.vector_norm(V, ord=q, dim=dim)


def dense_universal(model, x, y, *, k_boundary, gamma, lam):
    """Authors' dense identity-propagation MMR-Universal objective (see module docstring)."""
    groups = _split_layers(model)
    B = x.shape[0]
    d = x[0].numel()
    # forward pass with pre-activations
    z, pre = x, []
    for group in groups[:-1]:
        z = _apply(group, z, True)
        pre.append(z)
        z = torch.relu(z)
    logits = _apply(groups[-1], z, True)
    # first layer: denominators from the weights (the authors' shortcut)
    w0 = groups[0][-1].weight
    w_rows = w0.reshape(w0.shape[0], -1)
    dist1 = [pre[0].abs() / torch.linalg.vector_norm(w_rows, ord=math.inf, dim=1).reshape(
        (1, -1) + (1,) * (pre[0].dim() - 2))]
    distinf = [pre[0].abs() / torch.linalg.vector_norm(w_rows, ord=1, dim=1).reshape(
        (1, -1) + (1,) * (pre[0].dim() - 2))]
    eye = torch.eye(d, dtype=x.dtype, device=x.device).reshape((d,) + tuple(x.shape[1:]))
    V = _apply(groups[0], eye, False)                                  # d x units
    V = V.unsqueeze(0).repeat((B,) + (1,) * V.dim())                   # tiled: B x d x units
    V = V * (pre[0] > 0).to(x.dtype).unsqueeze(1)
    for i, group in enumerate(groups[1:-1], start=1):
        V = _apply(group, V.reshape((B * d,) + V.shape[2:]), False)
        V = V.reshape((B, d) + V.shape[1:])
        dist1.append(pre[i].abs() / _stable_norm(V, math.inf, 1))
        distinf.append(pre[i].abs() / _stable_norm(V, 1, 1))
        V = V * (pre[i] > 0).to(x.dtype).unsqueeze(1)
    dist1 = torch.cat([t.reshape(B, -1) for t in dist1], 1)
    distinf = torch.cat([t.reshape(B, -1) for t in distinf], 1)
    k = k_boundary if isinstance(k_boundary, int) else max(1, round(k_boundary * dist1.shape[1]))
    sel = torch.zeros_like(dist1, dtype=torch.bool)
    sel.scatter_(1, torch.topk(dist1.detach(), k, largest=False).indices, True)
    sel.scatter_(1, torch.topk(distinf.detach(), k, largest=False).indices, True)
    g1, ginf = gamma
    l1, linf = lam
    boundary = (sel * (l1 * _hinge(dist1, g1) + linf * _hinge(distinf, ginf))).sum(1) / k
    # decision boundaries
    VL = _apply(groups[-1], V.reshape((B * d,) + V.shape[2:]), False).reshape(B, d, -1)
    K = VL.shape[2]
    onehot = F.one_hot(y, K).to(x.dtype)
    diff = (VL - VL.gather(2, y[:, None, None].expand(B, d, 1))).abs()
    diff = diff + EPS * (diff < EPS).to(x.dtype)
    num = logits.gather(1, y[:, None]) - logits + 100.0 * onehot
    dd1 = num / torch.linalg.vector_norm(diff, ord=math.inf, dim=1) + onehot * 2 * g1
    ddinf = num / torch.linalg.vector_norm(diff, ord=1, dim=1) + onehot * 2 * ginf
    decision = (l1 * _hinge(dd1, g1) + linf * _hinge(ddinf, ginf)).sum(1) / (K - 1)
    return F.cross_entropy(logits, y) + (boundary + decision).mean()


def _preactivations(model, x):
    outs, z = [], x
    for layer in model:
        if isinstance(layer, nn.ReLU):
            outs.append(z.reshape(z.shape[0], -1))
        z = layer(z)
    return outs, z


def jacobian_universal(model, x, y, *, k_boundary, gamma, lam):
    """MMR-Universal objective from per-sample Jacobians (torch.func.vmap over jacrev)."""
    def stacked(xi):
        hidden, logits = _preactivations(model, xi[None])
        return torch.cat([h[0] for h in hidden] + [logits[0]])

    B = x.shape[0]
    hidden, logits = _preactivations(model, x)
    n = sum(h.shape[1] for h in hidden)
    J = torch.func.vmap(torch.func.jacrev(stacked))(x).reshape(B, n + logits.shape[1], -1)
    pre = torch.cat(hidden, 1)
    JL = J[:, n:]
    diff = JL.gather(1, y[:, None, None].expand(B, 1, JL.shape[2])) - JL
    margin = logits.gather(1, y[:, None]) - logits
    k = k_boundary if isinstance(k_boundary, int) else max(1, round(k_boundary * n))
    total = 0
    for q, g, lm in ((math.inf, gamma[0], lam[0]), (1.0, gamma[1], lam[1])):
        db = pre.abs() / torch.linalg.vector_norm(J[:, :n], ord=q, dim=2).clamp_min(1e-30)
        dd = margin / torch.linalg.vector_norm(diff, ord=q, dim=2).clamp_min(1e-30)
        dd = dd.scatter(1, y[:, None], math.inf)
        bt = _hinge(torch.topk(db, k, largest=False).values, g).mean(1)
        dt = _hinge(torch.topk(dd, logits.shape[1] - 1, largest=False).values, g).mean(1)
        total = total + lm * (bt + dt)
    return F.cross_entropy(logits, y) + total.mean()
