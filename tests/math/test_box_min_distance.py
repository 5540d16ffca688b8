"""Tests of mmr_ext.math.box_distance.box_min_distance (docs/MATH.md §7): the early-stopping minimum
of the MMR paper (App. A.1) against brute force, and the number of pairs it solves."""
import math

import pytest
import torch

import mmr_ext.math.box_distance as box_module
from mmr_ext.math.box_distance import box_distance, box_min_distance

INF = math.inf



def brute_min(full):
    m = full.min(dim=-1).values
    M = full.shape[-1]
    idx = torch.where(full == m[..., None], torch.arange(M), M).min(dim=-1).values
    return m, torch.where(torch.isinf(m), -1, idx)


@pytest.mark.parametrize("p", [1.0, 1.7, 2.0, 4.0, INF])
def test_min_distance_equals_brute_force(p):
    gen = torch.Generator().manual_seed(int(p) if p < INF else 9)
    M, d, B = 150, 12, 9
    w = torch.randn(M, d, generator=gen, dtype=torch.float64)
    b = torch.randn(M, generator=gen, dtype=torch.float64) * 2.5
    w[::9] = 0.0                                   # zero rows
    w[20], b[20] = w[3], b[3]                      # an exact duplicate: ties in the argmin
    w[40], b[40] = 2 * w[3], 2 * b[3]              # the same hyperplane, scaled
    x = torch.rand(B, d, generator=gen, dtype=torch.float64)
    x[0] = 0.0                                     # a corner of the box
    full = box_distance(w, b, x, p)
    ref_v, ref_i = brute_min(full)
    for chunk in (1, 3, 32, 1000):
        v, i = box_min_distance(w, b, x, p, chunk=chunk, chunk_size=17)
        assert torch.equal(v, ref_v) and torch.equal(i, ref_i), chunk
    # a single point gives 0-dim results
    v0, i0 = box_min_distance(w, b, x[0], p)
    assert v0.dim() == 0 and i0.dim() == 0 and v0 == ref_v[0] and i0 == ref_i[0]
    # no hyperplane meets the box
    far_v, far_i = box_min_distance(w[1:4], torch.full((3,), 1e3, dtype=torch.float64), x, p)
    assert torch.isinf(far_v).all() and (far_i == -1).all()
    empty_v, empty_i = box_min_distance(w[:0], b[:0], x, p)
    assert torch.isinf(empty_v).all() and (empty_i == -1).all()


def test_min_distance_float32_matches_brute_force():
    gen = torch.Generator().manual_seed(12)
    w, b = torch.randn(300, 20, generator=gen), torch.randn(300, generator=gen)
    x = torch.rand(16, 20, generator=gen)
    for p in (1.0, 2.0, INF):
        v, i = box_min_distance(w, b, x, p)
        full = box_distance(w, b, x, p)
        assert v.dtype == torch.float32 and torch.equal(v, full.min(dim=1).values)
        assert torch.equal(full.gather(1, i[:, None])[:, 0], v)


def test_min_distance_continues_past_a_plane_the_box_pushes_away(monkeypatch):
    # plane A is closest without the box (0.098) but the box pushes its distance to 0.255;
    # plane B (0.15 either way) is the answer, so the search must not stop after A
    w = torch.tensor([[1.0, 0.2], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([-1.15, -0.65, -0.95], dtype=torch.float64)
    x = torch.tensor([0.95, 0.5], dtype=torch.float64)
    full = box_distance(w, b, x, 2.0)
    assert full[0] == pytest.approx(math.sqrt(0.05 ** 2 + 0.25 ** 2))
    assert full[0] > 0.1 / math.sqrt(1.04) * 2 and full[1] == pytest.approx(0.15)
    solved = []
    original = box_module._pair_distances
    monkeypatch.setattr(box_module, "_pair_distances", lambda *a: solved.append(1) or original(*a))
    v, i = box_min_distance(w, b, x, 2.0, chunk=1)
    assert float(v) == pytest.approx(0.15) and int(i) == 1
    assert len(solved) == 2                      # A, then B; the third plane (0.45) is skipped


def test_min_distance_stops_early(monkeypatch):
    # many far hyperplanes behind a few near ones: most pairs are never solved
    gen = torch.Generator().manual_seed(13)
    M, d, B = 400, 10, 8
    w = torch.randn(M, d, generator=gen, dtype=torch.float64)
    center = torch.full((d,), 0.5, dtype=torch.float64)
    offset = torch.cat([torch.full((5,), 0.01), torch.linspace(0.5, 3.0, M - 5)]).double()
    b = -(w @ center) + offset * torch.linalg.vector_norm(w, dim=1)
    x = center + 0.01 * torch.rand(B, d, generator=gen, dtype=torch.float64)
    solved = []
    original = box_module._pair_distances

    def counting(*args):
        out = original(*args)
        solved.append(out.numel())
        return out

    monkeypatch.setattr(box_module, "_pair_distances", counting)
    v, i = box_min_distance(w, b, x, 2.0, chunk=8)
    monkeypatch.undo()
    assert sum(solved) <= B * 16 < B * M
    ref_v, ref_i = brute_min(box_distance(w, b, x, 2.0))
    assert torch.equal(v, ref_v) and torch.equal(i, ref_i)
