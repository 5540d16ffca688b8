"""Tests of mmr_ext.math.breakpoints (docs/MATH.md §7): the prefix sums of the clip path
t(μ) = min(μ c, room) give its linear gain and its l2 norm on every segment, and l2_segment finds
the segment where the norm reaches a level."""
import math

import torch

from mmr_ext.math.breakpoints import clip_breakpoints, exclusive_cumsum, l2_segment, sorted_clip_path, suffix_sum


def path(c, room, mu):
    """t(μ) per row (μ = inf: every movable coordinate at its room)."""
    return torch.where(c > 0, torch.minimum(mu[..., None] * c, room), 0.0)


def test_prefix_sums_describe_the_path_on_every_segment():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(7, 12, generator=g, dtype=torch.float64)
    a[:, :3] = 0.0                                          # coordinates that cannot move
    room = torch.rand(7, 12, generator=g, dtype=torch.float64)
    room[:, 3:5] = 0.0
    room[0, 6] = math.inf
    for c in (a, (a > 0).to(a.dtype)):                      # p = 2 and p = inf
        beta, a_m, c_m = clip_breakpoints(a, c, room)
        assert torch.isinf(beta[:, :5]).all() and (a_m[:, :5] == 0).all() and (c_m[:, :5] == 0).all()
        beta_s, order = torch.sort(beta, dim=1, stable=True)
        a_s, c_s, r_s = a_m.gather(1, order), c_m.gather(1, order), room.gather(1, order)
        C, A = exclusive_cumsum(a_s * r_s), suffix_sum(a_s * c_s)
        for mu in torch.rand(20, generator=g, dtype=torch.float64) * 3:
            m = (beta_s <= mu).sum(1, keepdim=True)         # coordinates already clipped at μ
            t = path(c, room, mu.expand(7))
            want = (a * t).sum(1)
            torch.testing.assert_close(C.gather(1, m)[:, 0] + mu * A.gather(1, m)[:, 0], want, rtol=1e-13, atol=1e-15)


def test_l2_segment_finds_where_the_norm_reaches_the_level():
    g = torch.Generator().manual_seed(1)
    w = torch.rand(5, 30, generator=g, dtype=torch.float64)
    w[:, ::4] = 0.0
    room = torch.rand(5, 30, generator=g, dtype=torch.float64) * 0.5
    beta, R, C, A = sorted_clip_path(w, room)
    assert torch.equal(exclusive_cumsum(torch.ones(2, 3)), torch.tensor([[0.0, 1, 2, 3]] * 2))
    assert torch.equal(suffix_sum(torch.ones(2, 3)), torch.tensor([[3.0, 2, 1, 0]] * 2))
    for e in (0.01, 0.3, 1.0, 10.0):
        e2 = torch.full((5, 1), e * e, dtype=torch.float64)
        m = l2_segment(beta, R, A, e2)
        Rm, Am, Cm = R.gather(1, m)[:, 0], A.gather(1, m)[:, 0], C.gather(1, m)[:, 0]
        mu = torch.where(Am > 0, ((e * e - Rm).clamp_min(0) / Am.clamp_min(1e-300)).sqrt(), torch.full_like(Am, math.inf))
        t = path(w, room, mu)
        reach = torch.linalg.vector_norm(torch.minimum(w * 1e300, room), dim=1)   # the whole corner
        torch.testing.assert_close(torch.linalg.vector_norm(t, dim=1), torch.minimum(reach, torch.full_like(reach, e)),
                                   rtol=1e-12, atol=0)
        torch.testing.assert_close((w * t).sum(1), Cm + mu.nan_to_num(posinf=0.0) * Am, rtol=1e-12, atol=0)
