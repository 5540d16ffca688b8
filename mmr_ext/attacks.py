"""Adversarial attacks in the l1, l2 and l∞ norms, restricted to the input box [lo, hi].

- :func:`pgd`: projected gradient descent on the cross-entropy (Madry et al. 2018) with a random
  start and restarts. l∞ uses sign steps, l2 normalised-gradient steps, l1 the sparse
  steepest-descent steps of Tramèr & Boneh (2019): only the coordinates whose |gradient| is in the
  top ``1 - l1_sparsity`` quantile move (coordinates pinned at a face of the box that the gradient
  pushes outward are left out), by the same amount. Every iterate is projected *exactly* onto the
  intersection of the eps-ball and the box (see :func:`project`).
- :func:`pgd_max`: the "max" strategy of Tramèr & Boneh: per sample, the PGD example of highest
  loss among the norms given.
- :func:`min_norm_attack`: a minimum-norm attack in the spirit of FMN (Pintor et al. 2021):
  gradient steps on the logit margin inside an lp-ball whose radius shrinks while the iterate is
  adversarial and grows while it is not, followed by a line search toward the clean point.
- :func:`verify_adversarial`: re-checks box, norm and class flip of candidate examples.

All attacks run the model in eval mode and restore every module's training flag afterwards; they
never touch parameter gradients. Returned examples lie in the box and in the ball *exactly*: the
projection is computed in float64 and rounded toward the clean point in the input's dtype, so
``||x_adv - x||_p <= eps`` holds for the stored values, not just up to rounding.
"""
from __future__ import annotations

import contextlib
import math
from numbers import Real
from typing import Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_batch, check_box, check_eps, check_in_box, check_y, parse_eps_dict, positive_int
from .math.box_projection import project_ball_box
from .math.distances import distance, lp_norm
from .math.norms import parse_norm

__all__ = ["pgd", "pgd_max", "min_norm_attack", "verify_adversarial", "project", "distance",
           "lp_norm", "parse_norm", "margins"]

Eps = Union[float, torch.Tensor]



# ---------------------------------------------------------------------------------------------
# validation and small helpers
# ---------------------------------------------------------------------------------------------

def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """f_y - max_{s != y} f_s per sample: negative iff the sample is (strictly) misclassified."""
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.scatter(1, y[:, None], -math.inf).amax(1)
    return true - other


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Puts every module in eval mode and restores each module's own training flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _grad_and_logits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the summed per-sample loss w.r.t. x (parameters' .grad untouched)."""
    with torch.enable_grad():
        z = x.detach().requires_grad_(True)
        logits = model(z)
        if loss == "ce":
            value = F.cross_entropy(logits, y, reduction="sum")
        else:  # margin f_y - max_{s != y} f_s, to be minimised
            value = margins(logits, y).sum()
        grad, = torch.autograd.grad(value, z)
    return grad.detach(), logits.detach()


# ---------------------------------------------------------------------------------------------
# exact projection onto the lp-ball ∩ box
# ---------------------------------------------------------------------------------------------

def _round_toward(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """target (float64) cast to x's dtype, rounding every coordinate toward x, so that
    |result - x| <= |target - x| coordinate-wise and the result stays between x and target."""
    if x.dtype == torch.float64:
        return target
    out = target.to(x.dtype)
    x64 = x.to(torch.float64)
    over = (out.to(torch.float64) - x64).abs() > (target - x64).abs()
    if over.any():
        out = torch.where(over, torch.nextafter(out, x), out)
    return out


def project(x: torch.Tensor, z: torch.Tensor, *, norm, eps: Eps, lo: float = 0.0,
            hi: float = 1.0) -> torch.Tensor:
    """Exact Euclidean projection of z onto {v : ||v - x||_p <= eps, lo <= v <= hi}.

    Computed in float64 by :func:`mmr_ext.math.box_projection.project_ball_box` (docs/MATH.md §7)
    and rounded toward x in x's dtype, so the result is in the box and the ball exactly. x must
    lie in the box; eps is a number or a [B] tensor.
    """
    p = parse_norm(norm)
    lo, hi = check_box(lo, hi)
    e = check_eps(eps, x)
    shape = x.shape
    x64 = x.detach().reshape(shape[0], -1).to(torch.float64)
    delta = project_ball_box(x64, z.detach().reshape(shape[0], -1).to(torch.float64), p, e, lo, hi)
    xf = x.detach().reshape(shape[0], -1)
    out = _round_toward(xf, (x64 + delta).clamp(lo, hi))
    # (x + δ) - x need not equal δ in floating point: shrink until the stored point passes the
    # very check that verify_adversarial applies (a few ulps; almost never more than once)
    for it in range(10):
        bad = distance(out, xf, p) > e
        if not bad.any():
            break
        delta = torch.where(bad[:, None], delta * (1 - 4.0 ** (it + 1) * torch.finfo(torch.float64).eps), delta)
        out = _round_toward(xf, (x64 + delta).clamp(lo, hi))
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------
# PGD
# ---------------------------------------------------------------------------------------------

def _random_start(x: torch.Tensor, p: float, eps: torch.Tensor, lo: float, hi: float,
                  generator: Optional[torch.Generator]) -> torch.Tensor:
    B = x.shape[0]
    flat = x.reshape(B, -1)
    kw = dict(dtype=torch.float64, device=x.device, generator=generator)
    if math.isinf(p):
        delta = (torch.rand(flat.shape, **kw) * 2 - 1) * eps[:, None]
    else:
        if p == 2:
            v = torch.randn(flat.shape, **kw)
        else:  # Laplace directions: uniform on the l1 sphere after normalisation
            v = -torch.log(torch.rand(flat.shape, **kw).clamp_min(1e-300)) * torch.sign(torch.rand(flat.shape, **kw) - 0.5)
        v = v / torch.linalg.vector_norm(v, ord=p, dim=1, keepdim=True).clamp_min(1e-300)
        delta = v * (eps * torch.rand((B,), **kw))[:, None]
    z = flat.to(torch.float64) + delta
    return project(x, z.reshape(x.shape), norm=p, eps=eps, lo=lo, hi=hi)


def _step(x_adv: torch.Tensor, grad: torch.Tensor, p: float, step: torch.Tensor, lo: float,
          hi: float, sparsity: float) -> torch.Tensor:
    """One ascent step of lp-norm ``step`` (float64 result, projection happens after)."""
    B = x_adv.shape[0]
    g = grad.reshape(B, -1).to(torch.float64)
    z = x_adv.reshape(B, -1).to(torch.float64)
    if math.isinf(p):
        d = torch.sign(g)
    elif p == 2:
        d = g / torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp_min(1e-300)
    else:
        # room left in the ascent direction; a coordinate (almost) at the face of the box that
        # the gradient pushes against cannot move and is left out of the selection. "Almost":
        # less room than its share of the step, else the top coordinate, shrunk a little by
        # every l1 projection, would be re-selected forever and the mass never spreads to the
        # next coordinates (the greedy optimum of a linear objective over the l1-ball ∩ box).
        room = torch.where(g > 0, hi - z, z - lo)

        def select(min_room):
            a = torch.where(room > min_room, g.abs(), torch.zeros_like(g))
            thr = torch.quantile(a, sparsity, dim=1, keepdim=True)
            return (a >= thr) & (a > 0)

        chosen = select(torch.zeros_like(step)[:, None])
        share = step / chosen.sum(1).clamp_min(1)
        chosen = select(share[:, None])
        e = torch.where(chosen, torch.sign(g), torch.zeros_like(g))
        d = e / e.abs().sum(1, keepdim=True).clamp_min(1.0)
    return (z + step[:, None] * d).reshape(x_adv.shape)


def _better(loss_new, mis_new, loss_old, mis_old) -> torch.Tensor:
    """Misclassified beats correctly classified; then higher loss wins."""
    return (mis_new & ~mis_old) | ((mis_new == mis_old) & (loss_new > loss_old))


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm, eps: Eps, steps: int = 10,
        step_size: Optional[float] = None, restarts: int = 1, lo: float = 0.0, hi: float = 1.0,
        l1_sparsity: float = 0.95, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Projected gradient ascent on the cross-entropy inside the lp-ball ∩ box.

    Args:
        model: classifier returning logits [B, K]; run in eval mode, flags restored.
        x: clean inputs [B, ...] in [lo, hi]; y: int labels [B].
        norm: 1, 2 or inf. eps: radius (number or [B] tensor).
        steps: iterations per restart. step_size: lp-length of each step (default 2.5 eps / steps).
        restarts: random restarts; per sample the worst example is kept (misclassified first,
            then highest loss, over all iterates of all restarts).
        l1_sparsity: quantile q of |gradient| above which coordinates move in the l1 step.
        generator: torch.Generator for the random starts (on x's device).

    Returns:
        Adversarial inputs, same shape and dtype as x, in the box and in the eps-ball exactly.
    """
    p = parse_norm(norm)
    check_batch(x)
    check_y(y, x)
    lo, hi = check_box(lo, hi)
    check_in_box(x, lo, hi)
    e = check_eps(eps, x)
    steps, restarts = positive_int(steps, "steps"), positive_int(restarts, "restarts")
    if isinstance(l1_sparsity, bool) or not isinstance(l1_sparsity, Real) or not 0 <= l1_sparsity < 1:
        raise ValueError(f"l1_sparsity must be in [0, 1), got {l1_sparsity!r}")
    if step_size is None:
        step = 2.5 * e / steps
    else:
        if isinstance(step_size, bool) or not isinstance(step_size, Real) or not step_size > 0:
            raise ValueError(f"step_size must be a positive number, got {step_size!r}")
        step = torch.full_like(e, float(step_size))
    x = x.detach()
    best = x.clone()
    best_loss = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
    best_mis = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    def consider(cand, logits):
        nonlocal best
        loss = F.cross_entropy(logits, y, reduction="none").to(torch.float64)
        mis = margins(logits, y) < 0
        take = _better(loss, mis, best_loss, best_mis)
        best = torch.where(take.reshape((-1,) + (1,) * (x.dim() - 1)), cand, best)
        best_loss.copy_(torch.where(take, loss, best_loss))
        best_mis.copy_(best_mis | mis)

    with eval_mode(model):
        for _ in range(restarts):
            x_adv = _random_start(x, p, e, lo, hi, generator)
            for _ in range(steps):
                grad, logits = _grad_and_logits(model, x_adv, y, "ce")
                consider(x_adv, logits)
                x_adv = project(x, _step(x_adv, grad, p, step, lo, hi, l1_sparsity), norm=p, eps=e,
                                lo=lo, hi=hi)
            with torch.no_grad():
                consider(x_adv, model(x_adv))
    return best


def pgd_max(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: dict, steps: int = 10,
            restarts: int = 1, lo: float = 0.0, hi: float = 1.0, l1_sparsity: float = 0.95,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Tramèr & Boneh's "max" strategy: per sample the highest-loss example among l1, l2, l∞ PGD.

    ``eps`` maps norms (1, 2, inf or 'l1', 'l2', 'linf') to radii; only those norms are attacked.
    ``l1_sparsity`` is passed to the l1 attack (see :func:`pgd`).
    """
    radii = parse_eps_dict(eps)
    best, best_loss = None, None
    for p, r in radii.items():
        cand = pgd(model, x, y, norm=p, eps=r, steps=steps, restarts=restarts, lo=lo, hi=hi,
                   l1_sparsity=l1_sparsity, generator=generator)
        with torch.no_grad(), eval_mode(model):
            loss = F.cross_entropy(model(cand), y, reduction="none")
        if best is None:
            best, best_loss = cand, loss
        else:
            take = loss > best_loss
            best = torch.where(take.reshape((-1,) + (1,) * (x.dim() - 1)), cand, best)
            best_loss = torch.where(take, loss, best_loss)
    return best


# ---------------------------------------------------------------------------------------------
# minimum-norm attack
# ---------------------------------------------------------------------------------------------

def _cosine(k: int, total: int, start: float, end: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * k / max(total, 1)))


def _dual(p: float) -> float:
    return math.inf if p == 1 else (1.0 if math.isinf(p) else 2.0)


def min_norm_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm, steps: int = 100,
                    lo: float = 0.0, hi: float = 1.0, alpha: float = 0.5, gamma: float = 0.05,
                    line_search: int = 20) -> Tuple[torch.Tensor, torch.Tensor]:
    """Minimum-norm adversarial examples (FMN-style; deterministic).

    Starting from x, each step descends the logit margin f_y - max_{s != y} f_s (sign steps for
    l∞, l2-normalised gradient steps for l1 and l2) by ``alpha_k * eps_k`` and projects onto the
    eps_k-ball ∩ box. The radius eps_k shrinks by (1 - gamma_k) from the norm of the current
    iterate while it is adversarial, grows by (1 + gamma_k) when it is not (before the first
    success it is the linearised distance (||δ|| + margin / ||∇||_q) (1 + gamma_k)); alpha_k and
    gamma_k decay
    on a cosine schedule. Finally the best example is shrunk toward x by a bisection on
    x + t (x_adv - x), t in [0, 1].

    Returns:
        ``(x_adv, found_norm)``: x_adv same shape as x (x itself where nothing was found);
        found_norm float64 [B], the lp-norm of x_adv - x, +inf where no adversarial example was
        found and 0 where x is already misclassified. Every finite entry belongs to an x_adv
        that the model misclassifies (checked in the model's dtype).
    """
    p = parse_norm(norm)
    check_batch(x)
    check_y(y, x)
    lo, hi = check_box(lo, hi)
    check_in_box(x, lo, hi)
    steps = positive_int(steps, "steps")
    if isinstance(line_search, bool) or not isinstance(line_search, int) or line_search < 0:
        raise ValueError(f"line_search must be an integer >= 0, got {line_search!r}")
    for name, v in (("alpha", alpha), ("gamma", gamma)):
        if isinstance(v, bool) or not isinstance(v, Real) or not 0 < v < 1:
            raise ValueError(f"{name} must be in (0, 1), got {v!r}")
    q = _dual(p)
    x = x.detach()
    B = x.shape[0]
    diameter = (hi - lo) * x[0].numel()  # >= the lp-diameter of the box for every p >= 1
    view = (-1,) + (1,) * (x.dim() - 1)
    best = x.clone()
    best_norm = torch.full((B,), math.inf, dtype=torch.float64, device=x.device)
    radius = torch.full((B,), math.inf, dtype=torch.float64, device=x.device)
    x_adv = x.clone()
    with eval_mode(model):
        for k in range(steps + 1):
            grad, logits = _grad_and_logits(model, x_adv, y, "margin")
            m = margins(logits, y).to(torch.float64)
            n = distance(x_adv, x, p)
            adv = m < 0
            take = adv & (n < best_norm)
            best = torch.where(take.reshape(view), x_adv, best)
            best_norm = torch.where(take, n, best_norm)
            if k == steps:
                break
            gamma_k = _cosine(k, steps, gamma, gamma / 50)
            alpha_k = _cosine(k, steps, alpha, alpha / 50)
            gq = lp_norm(grad, q)
            # linearised boundary distance, overshot a little: landing exactly on the boundary
            # (a tie) is not adversarial
            linear = (n + m.clamp_min(0) / gq.clamp_min(1e-300)) * (1 + gamma_k)
            radius = torch.where(adv, torch.minimum(radius, n) * (1 - gamma_k),
                                 torch.where(torch.isinf(best_norm), linear,
                                             radius * (1 + gamma_k)))
            radius = torch.where(torch.isfinite(radius), radius, linear).clamp_max(diameter)
            g = grad.reshape(B, -1).to(torch.float64)
            if math.isinf(p):
                direction = torch.sign(g)
            else:
                direction = g / torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp_min(1e-300)
            z = x_adv.reshape(B, -1).to(torch.float64) - (alpha_k * radius)[:, None] * direction
            x_adv = project(x, z.reshape(x.shape), norm=p, eps=radius, lo=lo, hi=hi)
        if line_search:
            best, best_norm = _shrink(model, x, y, best, best_norm, p, line_search)
    return best, best_norm


@torch.no_grad()
def _shrink(model, x, y, best, best_norm, p, iters):
    """Bisection on t in [0, 1] for the smallest adversarial x + t (best - x)."""
    view = (-1,) + (1,) * (x.dim() - 1)
    found = torch.isfinite(best_norm) & (best_norm > 0)
    if not found.any():
        return best, best_norm
    delta = (best - x).to(torch.float64)
    lo_t = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    hi_t = torch.ones_like(lo_t)
    for _ in range(iters):
        mid = (lo_t + hi_t) / 2
        cand = _round_toward(x, x.to(torch.float64) + mid.reshape(view) * delta)
        adv = margins(model(cand), y) < 0
        hi_t = torch.where(adv, mid, hi_t)
        lo_t = torch.where(adv, lo_t, mid)
    cand = _round_toward(x, x.to(torch.float64) + hi_t.reshape(view) * delta)
    adv = (margins(model(cand), y) < 0) & found
    n = distance(cand, x, p)
    take = adv & (n < best_norm)
    return torch.where(take.reshape(view), cand, best), torch.where(take, n, best_norm)


# ---------------------------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def verify_adversarial(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                       norm, eps: Eps, lo: float = 0.0, hi: float = 1.0, *,
                       tol: float = 1e-6) -> torch.Tensor:
    """bool [B]: x_adv is in the box, within ``eps`` of x in the lp-norm and misclassified.

    Box and norm are checked in float64 with the relative tolerance ``tol`` (box: tol * (hi -
    lo); norm: eps * (1 + tol)). The class flip is strict: max_{s != y} f_s(x_adv) > f_y(x_adv),
    with the model run in eval mode on x_adv as given (its dtype must match the model's).
    """
    p = parse_norm(norm)
    check_batch(x)
    check_batch(x_adv, "x_adv")
    check_y(y, x)
    if x_adv.shape != x.shape:
        raise ValueError(f"x_adv must have the shape of x {tuple(x.shape)}, got {tuple(x_adv.shape)}")
    lo, hi = check_box(lo, hi)
    e = check_eps(eps, x)
    if isinstance(tol, bool) or not isinstance(tol, Real) or not 0 <= tol < 1:
        raise ValueError(f"tol must be in [0, 1), got {tol!r}")
    a = x_adv.detach().reshape(x.shape[0], -1).to(torch.float64)
    slack = tol * (hi - lo)
    in_box = ((a >= lo - slack) & (a <= hi + slack)).all(1)
    in_ball = distance(x_adv, x, p) <= e * (1 + tol)
    with eval_mode(model):
        flipped = margins(model(x_adv.detach()), y) < 0
    return in_box & in_ball & flipped
